"""Benchmark 1c: how much of a decode step is its quantized matmuls, this project vs mlx-lm.

A decode step's quantized matmuls (`mx.quantized_matmul`, `mx.gather_qmm`: every projection,
the experts, the router and lm_head) are recorded while the step's graph is built, then
replayed alone: the same weights, shapes and dtypes, on fixed random inputs, all in one
evaluation.
The same for the attention calls (`mx.fast.scaled_dot_product_attention` over the step's caches).
Their times against the whole step's time (greedy decoding: the median time between tokens,
from the third on) bound what cutting the
other kernels can give: a step cannot be faster than its matmuls and attention.
Rounds alternate the arms; medians over rounds; `--clock cpu` counts this process's CPU time.

    python benchmarks/decode_anatomy.py [--models demo,large] [--rounds 7] [--clock wall|cpu]
"""

import argparse
from contextlib import contextmanager

import mlx.core as mx
import mlx_lm
from common import demo_model, large_checkpoint, median
from decode_vs_mlx_lm import CLOCKS
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

from mlx_step35 import load
from mlx_step35.generation import generate_step

MATMULS = ((mx, "quantized_matmul"), (mx, "gather_qmm"))
ATTENTION = ((mx.fast, "scaled_dot_product_attention"),)
NORMS = ((mx.fast, "rms_norm"), (mx.fast, "rope"))  # one kernel each on Metal, composites on the CPU


@contextmanager
def recording(calls, ops):
    """Record every call of `ops` built inside the block: (function, args, kwargs)."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in ops]

    def wrap(fn):
        def op(*args, **kwargs):
            calls.append((fn, args, kwargs))
            return fn(*args, **kwargs)

        return op

    for mod, name, fn in saved:
        setattr(mod, name, wrap(fn))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def inputs(calls):
    """Fresh random inputs of the recorded shapes and dtypes, evaluated."""
    xs = [mx.random.normal(args[0].shape).astype(args[0].dtype) for _, args, _ in calls]
    mx.eval(xs)
    return xs


def step_calls(build, groups):
    """The calls of each group of ops, recorded while one step is built and evaluated."""
    originals = [{getattr(mod, name) for mod, name in ops} for ops in groups]
    calls = []
    with recording(calls, [op for ops in groups for op in ops]):
        mx.eval(build())
    return [[call for call in calls if call[0] in fns] for fns in originals]


def timed_replay(calls, clock, reps=20):
    """Seconds to evaluate the recorded calls (all but the first argument as recorded) on fixed inputs."""
    xs = inputs(calls)

    def once():
        mx.eval([fn(x, *args[1:], **kw) for x, (fn, args, kw) in zip(xs, calls)])

    once()  # warm-up
    tic = clock()
    for _ in range(reps):
        once()
    return (clock() - tic) / reps


def step_ms(generator, n_tokens: int, clock) -> float:
    """Median time between consecutive tokens of a generation, from its third token on (the
    steady state: where the first steps' pipeline bubble lands differs between the loops)."""
    stamps = []
    for _ in zip(range(n_tokens), generator()):
        stamps.append(clock())
    return 1e3 * median([b - a for a, b in zip(stamps[2:], stamps[3:])])


def arms(path, n_prompt):
    """name: (decode generator, the step's matmul calls, its attention calls, its norm and RoPE calls)."""
    ours, _ = load(path)
    theirs, _ = mlx_lm.load(str(path))
    V = ours.args.vocab_size
    prompt = [int(t) for t in mx.random.randint(3, V - 3, (n_prompt,), key=mx.random.key(0))]
    greedy = mlx_lm_make_sampler(temp=0.0)
    out = {}
    for name, model, cache, gen in (
        ("mlx_step35", ours, ours.make_cache(slack=1), lambda: generate_step(ours, prompt, max_tokens=10**6)),
        (
            "mlx-lm",
            theirs,
            theirs.make_cache(),
            lambda: mlx_lm_generate_step(mx.array(prompt), theirs, max_tokens=10**6, sampler=greedy),
        ),
    ):
        mx.eval(model(mx.array(prompt)[None], cache=cache))
        step = lambda: model(mx.array([[5]]), cache=cache)[:, -1].argmax(-1)  # noqa: E731
        out[name] = (gen, *step_calls(step, (MATMULS, ATTENTION, NORMS)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,large", help="comma-separated: demo, large")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--clock", choices=CLOCKS, default="wall")
    a = ap.parse_args()
    clock = CLOCKS[a.clock]
    models = {"demo": ("demo (bundled)", demo_model), "large": ("random 8L h512 E32 4-bit", large_checkpoint)}
    print(
        "| model | impl | matmul calls | ms per step | its matmuls alone | its attention alone | "
        "its norms and RoPE alone | the rest | mlx-lm's step / (these matmuls + attention) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in a.models.split(","):
        label, path = models[key][0], models[key][1]()
        impls = arms(path, a.prompt_tokens)
        times = {k: ([], [], [], []) for k in impls}  # step, matmuls, attention, norms (ms)
        for r in range(a.rounds):
            order = list(impls)[r % 2 :] + list(impls)[: r % 2]
            for name in order:
                gen, *parts = impls[name]
                times[name][0].append(step_ms(gen, a.gen_tokens, clock))
                for column, calls in zip(times[name][1:], parts):
                    column.append(1e3 * timed_replay(calls, clock))
        base = median(times["mlx-lm"][0])
        for name, (_, matmuls, *_) in impls.items():
            s, m, t, n = (median(c) for c in times[name])
            rest = s - m - t - n
            print(
                f"| {label} | {name} | {len(matmuls)} | {s:.2f} | {m:.2f} ({m / s:.0%}) | {t:.2f} ({t / s:.0%}) | "
                f"{n:.2f} ({n / s:.0%}) | {rest:.2f} ({rest / s:.0%}) | {base / (m + t):.2f} |"
            )


if __name__ == "__main__":
    main()
