"""Long prompts with 16-bit vs 8-bit vs 4-bit full-attention KV, measured on this machine.

Speed: prefill and decode tokens/s and peak memory at each context length, the three KV
formats interleaved round by round (order rotated), medians. Quality: one teacher-forced pass
over a long text per format (prefill chunks as generate_step runs them): mean cross-entropy,
and against the 16-bit KV's distributions the mean KL divergence, the largest |d logprob| of
the actual next token and top-1 agreement.

The model is the bundled demo; when its config allows fewer positions than asked, a copy with
max_position_embeddings raised runs (its weights unchanged). The text is this repository's
own Python sources (not in the demo's training corpus), repeated if too short.

    python benchmarks/long_context.py [--contexts 4096,16384,32768] [--rounds 2] [--decode 32]
        [--quality 16384] [--kv-group-size 32] [--quantized-kv-start 0]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import ROOT, demo_model, median

from mlx_step35 import load
from mlx_step35.cache import FullKVCache, KVQuant
from mlx_step35.generation import generate_step
from mlx_step35.prompt_cache import make_prompt_cache
from mlx_step35.speculative import PREFILL_STEP

ARMS = (None, 8, 4)  # kv_bits


def model_for(context: int, tmp: Path) -> Path:
    src = demo_model()
    cfg = json.loads((src / "config.json").read_text())
    if cfg["max_position_embeddings"] >= context:
        return src
    dst = tmp / "demo-long"
    shutil.copytree(src, dst)
    cfg["max_position_embeddings"] = max(65536, context)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def long_text_tokens(tokenizer, n: int):
    files = sorted(
        p for d in ("mlx_step35", "tests", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")
    )
    ids = tokenizer.encode("\n\n".join(p.read_text() for p in files))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def kv_args(bits, a):
    return dict(kv_bits=bits, kv_group_size=a.kv_group_size, quantized_kv_start=a.quantized_kv_start)


def one_run(model, prompt, bits, a):
    """(prefill tok/s, decode tok/s, peak GB, full-attention KV MB) of one greedy generation."""
    mx.clear_cache()
    mx.reset_peak_memory()
    pc = make_prompt_cache(model, draft_mtp=False, **kv_args(bits, a))
    t0 = time.perf_counter()
    gen = generate_step(model, prompt, max_tokens=a.decode, prompt_cache=pc, **kv_args(bits, a))
    next(gen)
    t1 = time.perf_counter()
    n = sum(1 for _ in gen)
    t2 = time.perf_counter()
    kv = sum(c.nbytes for c in pc.cache if isinstance(c, FullKVCache))
    return len(prompt) / (t1 - t0), n / (t2 - t1), mx.get_peak_memory() / 1e9, kv / 1e6


def speed(model, ids, a):
    results = {}
    for r in range(a.rounds):
        for context in a.contexts:
            order = ARMS[r % 3 :] + ARMS[: r % 3]
            for bits in order:
                results.setdefault((context, bits), []).append(one_run(model, ids[:context], bits, a))
    print(
        f"Speed: greedy, {a.decode} tokens decoded after each prompt, prefill chunks of {PREFILL_STEP}, "
        f"{a.rounds} interleaved rounds, medians; KV quantized from position {a.quantized_kv_start} "
        f"(group {a.kv_group_size})\n"
    )
    print("| context | KV | prefill tok/s | decode tok/s | peak memory GB | full-attention KV MB |")
    print("|---|---|---|---|---|---|")
    for context in a.contexts:
        for bits in ARMS:
            rows = results[context, bits]
            cols = [median([row[i] for row in rows]) for i in range(4)]
            print(
                f"| {context} | {bits or 16}-bit | {cols[0]:.0f} | {cols[1]:.1f} | {cols[2]:.3f} | {cols[3]:.2f} |"
            )


def teacher_forced(model, ids, bits, a):
    """Log-probabilities [n - 1, V] (float32) of every next token, prefilled in chunks."""
    kv = None if bits is None else KVQuant(bits, a.kv_group_size, a.quantized_kv_start)
    cache = model.make_cache(slack=1, kv=kv)
    out = []
    for s in range(0, len(ids) - 1, PREFILL_STEP):
        chunk = mx.array([ids[s : min(s + PREFILL_STEP, len(ids) - 1)]])
        logits = model(chunk, cache)[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(np.array(lp))
    return np.concatenate(out)


def quality(model, ids, a):
    ids = ids[: a.quality]
    target = np.array(ids[1:])
    ref = teacher_forced(model, ids, None, a)
    rows = np.arange(len(target))
    print(
        f"\nQuality: teacher-forced over {len(ids)} tokens of this repository's Python sources; KV "
        f"quantized from position {a.quantized_kv_start} (group {a.kv_group_size}); model dtype "
        f"{model.model.norm.weight.dtype}\n"
    )
    print(
        "| KV | CE (nats/token) | mean KL(16-bit ‖ this) | max abs d logprob of the next token | top-1 = 16-bit's |"
    )
    print("|---|---|---|---|---|")
    for bits in ARMS:
        lp = ref if bits is None else teacher_forced(model, ids, bits, a)
        ce = -lp[rows, target].mean()
        kl = (np.exp(ref) * (ref - lp)).sum(-1).mean()
        dmax = np.abs(lp[rows, target] - ref[rows, target]).max()
        agree = (lp.argmax(-1) == ref.argmax(-1)).mean()
        print(f"| {bits or 16}-bit | {ce:.4f} | {kl:.2e} | {dmax:.2e} | {agree:.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded after each prompt")
    ap.add_argument("--quality", type=int, default=16384, help="tokens of the teacher-forced text (0: skip)")
    ap.add_argument("--kv-group-size", type=int, default=32, help="the demo's head_dim is 32")
    ap.add_argument("--quantized-kv-start", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    a.contexts = [int(x) for x in a.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = model_for(max(a.contexts + [a.quality]) + a.decode, Path(tmp))
        model, tokenizer = load(path)
        ids = long_text_tokens(tokenizer, max(a.contexts + [a.quality]))
        print(f"Model: {path.name} (max_position_embeddings {model.args.max_position_embeddings})")
        if not a.skip_speed:
            speed(model, ids, a)
        if a.quality:
            quality(model, ids, a)


if __name__ == "__main__":
    main()
