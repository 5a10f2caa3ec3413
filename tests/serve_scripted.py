"""Serve a tiny factory checkpoint scripted (successor-map trick) to emit one fixed reply:
`python tests/serve_scripted.py --ckpt DIR --port N`; DIR/chain.json holds the token chain."""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_models import successor_model  # noqa: E402

from mlx_step35.server import Settings, serve  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--log-level", default="WARNING")
p.add_argument("--api-key", default=None)
p.add_argument("--prompt-cache-gb", type=float, default=0.0)
a = p.parse_args()
model, tokenizer = successor_model(a.ckpt, chain=json.loads((Path(a.ckpt) / "chain.json").read_text()))
mx.eval(model.parameters())
settings = Settings(model_id="scripted", num_draft=3, api_key=a.api_key)
serve(model, tokenizer, settings, port=a.port, log_level=a.log_level, prompt_cache_gb=a.prompt_cache_gb)
