#!/usr/bin/env python3
"""How the bundled demo model (mlx_step35/demo) became a group-32, 256K-context conversion.

The demo was first shipped as `convert.py -q` of scripts/train_demo.py's export: 4-bit with
quantization groups of 64 and `max_position_embeddings` 4096. Two things were wrong with it:
  * it cannot be split over 2 ranks (`mlx.launch --backend ring -n 2 -- python generate.py`):
    the sliding layers' o_proj input (6 heads x 32 = 192) and the routed experts' down_proj
    input (moe_intermediate_size 64) split in halves of 96 and 32, not whole groups of 64;
  * agent CLIs send first prompts of 12-25K tokens, which a 4K context refuses.
The float checkpoint it was converted from is not kept, and retraining takes 30 minutes, so
this script rewrites the shipped files in place, exactly:
  * every quantized tensor keeps its packed integers, and each group of 64 becomes two groups
    of 32 with the parent group's scale and bias (the scales/biases columns are repeated).
    The dequantized weights are bit-identical (checked below, tensor by tensor), so the
    model is the same function; per-tensor bits stay as they were (router 8, embedding,
    lm_head and MTP heads 6, the rest 4), which is what `convert.py -q --q-group-size 32`
    writes for a fresh export;
  * `max_position_embeddings` / `max_seq_len` (config.json) and `model_max_length`
    (tokenizer_config.json) become the real model's 262144. Nothing else in the model reads
    them: the llama3 RoPE scaling depends on rope_scaling's own fields, which stay as trained.

Usage: .venv/bin/python scripts/regroup_demo.py [--model mlx_step35/demo] [--group-size 32]
       [--context 262144]
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 262144  # the real Step-3.5-Flash's


def regroup(weights: dict, quant: dict, group: int) -> dict:
    """The same quantized tensors with groups of `group`: each old group's scale and bias
    repeated over the new groups it splits into; the packed weights are unchanged."""
    out = dict(weights)
    for key in weights:
        if not key.endswith(".scales"):
            continue
        base = key[: -len(".scales")]
        old = quant["group_size"]  # the checkpoint's keys are not the config's module paths:
        # the bits follow from the shapes (packed uint32 columns per input width)
        bits = weights[f"{base}.weight"].shape[-1] * 32 // (weights[key].shape[-1] * old)
        if old % group:
            raise SystemExit(f"{base}: group size {old} is not a multiple of {group}")
        for part in ("scales", "biases"):
            out[f"{base}.{part}"] = mx.repeat(weights[f"{base}.{part}"], old // group, axis=-1)
        w, s, b = (weights[f"{base}.{p}"] for p in ("weight", "scales", "biases"))
        before = mx.dequantize(w, s, b, group_size=old, bits=bits)
        after = mx.dequantize(w, out[f"{base}.scales"], out[f"{base}.biases"], group_size=group, bits=bits)
        if not mx.array_equal(before, after).item():
            raise SystemExit(f"{base}: dequantized weights differ after regrouping")
    return out


def regroup_config(quant: dict, group: int) -> dict:
    return {k: regroup_config(v, group) if isinstance(v, dict) else v for k, v in quant.items()} | (
        {"group_size": group} if "group_size" in quant else {}
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "mlx_step35" / "demo")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64])
    p.add_argument("--context", type=int, default=CONTEXT)
    a = p.parse_args(argv)
    config_path = a.model / "config.json"
    config = json.loads(config_path.read_text())
    quant = config["quantization"]
    if quant["group_size"] == a.group_size:
        print(f"{a.model}: already quantized with groups of {a.group_size}", file=sys.stderr)
    else:
        st = a.model / "model.safetensors"
        weights = regroup(mx.load(str(st)), quant, a.group_size)
        mx.save_safetensors(str(st), weights, metadata={"format": "mlx"})
        index_path = a.model / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["metadata"]["total_size"] = sum(v.nbytes for v in weights.values())
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        config["quantization"] = config["quantization_config"] = regroup_config(quant, a.group_size)
    config["max_position_embeddings"] = config["max_seq_len"] = a.context
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    tok_path = a.model / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["model_max_length"] = a.context
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")
    print(f"{a.model}: groups of {a.group_size}, context {a.context}")


if __name__ == "__main__":
    main()
