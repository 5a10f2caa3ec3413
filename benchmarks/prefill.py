"""Benchmark 6: prefill chunk size (512 vs 2048 tokens), with and without the MTP drafter.

For a prompt of --prompt-tokens random ids, runs `generate_step` up to the first token and
reports MLX's peak memory above what was allocated before the prompt (the weights), i.e. the
prefill's working set: KV caches, activations of one chunk, and with the drafter the MTP
blocks' caches and rows; and the prefill time. Configurations run interleaved, in rotating
order, --rounds times; the memory figures are exact and repeat, the times are medians.

Model: a random float32 checkpoint with the wide synthetic shape (hidden 512, 12 / 8 heads of
64, 16 experts, top-4, sliding window 512 as the real model), 4 layers + 3 MTP blocks; made
once under build/bench.

    python benchmarks/prefill.py [--prompt-tokens 4096] [--rounds 2] [--steps 512,2048]
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from common import BUILD, WIDE, median

from mlx_step35 import load
from mlx_step35.generation import generate_step

SHAPE = dict(
    WIDE,
    sliding_window=512,
    num_hidden_layers=4,
    moe_num_experts=16,
    moe_intermediate_size=256,
    share_expert_dim=256,
)


def checkpoint():
    from factory import make_checkpoint

    path = BUILD / "prefill-hf"
    if not (path / "config.json").exists():
        make_checkpoint(path, seed=0, dtype="float32", **SHAPE)
    return path


def one(model, prompt, step, draft):
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    gen = generate_step(model, prompt, max_tokens=1, prefill_step_size=step, draft_mtp=draft, num_draft=3)
    next(gen)
    seconds = time.perf_counter() - tic
    gen.close()
    return mx.get_peak_memory() - before, seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", default="512,2048")
    a = p.parse_args()
    model, _ = load(checkpoint(), quantize=False, dtype="float32")
    V = model.args.vocab_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, V, a.prompt_tokens)]
    configs = [(s, d) for d in (False, True) for s in map(int, a.steps.split(","))]
    one(model, prompt[:300], 128, True)  # warm-up
    peak = {c: [] for c in configs}
    secs = {c: [] for c in configs}
    for r in range(a.rounds):
        k = r % len(configs)
        for c in configs[k:] + configs[:k]:
            m, s = one(model, prompt, *c)
            print(f"round {r}: chunk {c[0]}, drafter {c[1]}: {m / 2**20:.1f} MB, {s:.2f} s", flush=True)
            peak[c].append(m)
            secs[c].append(s)
    print(f"prompt {a.prompt_tokens} tokens, {a.rounds} rounds; peak MLX memory above the weights")
    print("| chunk | drafter | peak MB (min-max) | prefill s (median) | prompt tok/s |")
    print("|---|---|---|---|---|")
    for c in configs:
        lo, hi = min(peak[c]) / 2**20, max(peak[c]) / 2**20
        t = median(secs[c])
        print(
            f"| {c[0]} | {'MTP x3' if c[1] else 'none'} | {lo:.1f}-{hi:.1f} | {t:.2f} | {a.prompt_tokens / t:.0f} |"
        )


if __name__ == "__main__":
    main()
