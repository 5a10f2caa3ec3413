"""Benchmark 1: plain decoding and prefill tokens/s, this project vs stock mlx-lm step3p5,
on identical weights (our 4-bit conversion loads in both). Each round runs mlx_step35,
mlx-lm and mlx_step35 once more (an A/A control: how far two identical runs land apart on
this machine) in rotating order; the ratios vs mlx-lm are taken within the round, and their
median over rounds is reported with a 95% bootstrap interval.

    python benchmarks/decode_vs_mlx_lm.py [--rounds 7] [--prompt-tokens 256] [--gen-tokens 64] [--models demo,large]
        [--clock wall|cpu] [--unmerged]

--unmerged adds an arm with the projections unmerged (mlx_step35/fusion.py undone: each
checkpoint projection its own matmul again, over the same arrays), to see what merging gives.
"""

import argparse
import time

import mlx.core as mx
import mlx_lm
from common import demo_model, interval, large_checkpoint, median
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

from mlx_step35 import load
from mlx_step35.generation import generate_step

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds


def run(step_fn, n_prompt: int, n_gen: int, clock=time.perf_counter):
    """(prefill tokens/s, decode tokens/s) of one generation."""
    tic = clock()
    first = None
    for i, _ in enumerate(step_fn()):
        if i == 0:
            first = clock()
        if i + 1 == n_gen:
            break
    end = clock()
    return n_prompt / (first - tic), (n_gen - 1) / (end - first)


def unmerged(path):
    model, _ = load(path)
    for _, module in model.named_modules():
        if getattr(module, "merged", None) is not None:
            module.merged = None  # the separate projections, over the merged buffer's views
    return model


def bench(path, rounds, n_prompt, n_gen, clock=time.perf_counter, with_unmerged=False):
    ours, _ = load(path)
    theirs, _ = mlx_lm.load(str(path))
    V = ours.args.vocab_size
    prompt = [int(t) for t in mx.random.randint(3, V - 3, (n_prompt,), key=mx.random.key(0))]
    greedy = mlx_lm_make_sampler(temp=0.0)
    impls = {
        "mlx_step35": lambda: generate_step(ours, prompt, max_tokens=n_gen),
        "mlx-lm": lambda: mlx_lm_generate_step(mx.array(prompt), theirs, max_tokens=n_gen, sampler=greedy),
    }
    impls["mlx_step35 again"] = impls["mlx_step35"]
    if with_unmerged:
        separate = unmerged(path)
        impls["mlx_step35 unmerged"] = lambda: generate_step(separate, prompt, max_tokens=n_gen)
    for name, fn in impls.items():  # warm-up (compilation), not timed
        run(fn, n_prompt, 8)
    speeds = {k: [] for k in impls}  # per round: (prefill, decode)
    order = list(impls)
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            speeds[name].append(run(impls[name], n_prompt, n_gen, clock))
    base = speeds["mlx-lm"]
    return {  # name: per (prefill, decode): (median tok/s, per-round ratios vs mlx-lm)
        name: [(median([x[i] for x in runs]), [x[i] / y[i] for x, y in zip(runs, base)]) for i in (0, 1)]
        for name, runs in speeds.items()
    }


def cell(ratios):
    lo, hi = interval(ratios)
    return f"{median(ratios):.3f} ({lo:.3f}-{hi:.3f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--models", default="demo,large", help="comma-separated: demo, large")
    ap.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="cpu: tokens per CPU-second of this process (all its threads), steadier than wall "
        "time when other work shares the machine",
    )
    ap.add_argument("--unmerged", action="store_true", help="add an arm without merged projections")
    a = ap.parse_args()
    print(
        "| model | impl | prefill tok/s | decode tok/s | prefill vs mlx-lm (95% interval) | "
        "decode vs mlx-lm (95% interval) |"
    )
    print("|---|---|---|---|---|---|")
    models = {"demo": ("demo (bundled)", demo_model), "large": ("random 8L h512 E32 4-bit", large_checkpoint)}
    for key in a.models.split(","):
        label, path = models[key][0], models[key][1]()
        for name, ((p, pr), (d, dr)) in bench(
            path, a.rounds, a.prompt_tokens, a.gen_tokens, CLOCKS[a.clock], a.unmerged
        ).items():
            print(f"| {label} | {name} | {p:.1f} | {d:.1f} | {cell(pr)} | {cell(dr)} |")


if __name__ == "__main__":
    main()
