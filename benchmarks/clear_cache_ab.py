"""Does clearing MLX's buffer cache (after each prefill chunk, every 256 decoded tokens) change
speed? Benchmark 1's `run` on the demo model, in one process: mlx_step35 as shipped, the same with
`mx.clear_cache` a no-op during its runs, mlx-lm (clears always on), and the shipped version again
(an A/A control), in rotating order; ratios taken within each round.

    python benchmarks/clear_cache_ab.py [--rounds 9] [--prompt-tokens 600] [--gen-tokens 280]
        [--prefill-step-size 512]
"""

import argparse

import mlx.core as mx
import mlx_lm
from common import demo_model, median
from decode_vs_mlx_lm import cell, run
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

from mlx_step35 import load
from mlx_step35.generation import generate_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--gen-tokens", type=int, default=280)
    ap.add_argument("--prefill-step-size", type=int, default=512, help="512: the prompt spans chunks")
    a = ap.parse_args()
    real, clears = mx.clear_cache, {"on": True}
    mx.clear_cache = lambda: real() if clears["on"] else None
    ours, _ = load(demo_model())
    theirs, _ = mlx_lm.load(str(demo_model()))
    key = mx.random.key(0)
    prompt = [int(t) for t in mx.random.randint(3, ours.args.vocab_size - 3, (a.prompt_tokens,), key=key)]
    greedy = mlx_lm_make_sampler(temp=0.0)

    def ours_fn(on):
        def fn():
            clears["on"] = on
            return generate_step(ours, prompt, max_tokens=a.gen_tokens, prefill_step_size=a.prefill_step_size)

        return fn

    def theirs_fn():
        clears["on"] = True
        return mlx_lm_generate_step(
            mx.array(prompt),
            theirs,
            max_tokens=a.gen_tokens,
            sampler=greedy,
            prefill_step_size=a.prefill_step_size,
        )

    impls = {"shipped": ours_fn(True), "no clears": ours_fn(False), "mlx-lm": theirs_fn}
    impls["shipped again (A/A)"] = impls["shipped"]
    for fn in impls.values():  # warm-up, not timed
        run(fn, a.prompt_tokens, 8)
    speeds = {k: [] for k in impls}
    order = list(impls)
    for r in range(a.rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            speeds[name].append(run(impls[name], a.prompt_tokens, a.gen_tokens))
    print("| impl | prefill tok/s | decode tok/s | prefill shipped / this | decode shipped / this |")
    print("|---|---|---|---|---|")
    for name, runs in speeds.items():
        ratios = [[x[i] / y[i] for x, y in zip(speeds["shipped"], runs)] for i in (0, 1)]
        print(
            f"| {name} | {median([x[0] for x in runs]):.1f} | {median([x[1] for x in runs]):.1f} | "
            f"{cell(ratios[0])} | {cell(ratios[1])} |"
        )


if __name__ == "__main__":
    main()
