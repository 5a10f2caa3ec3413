"""Benchmark 1b: kernels per decode step (and per verify step of 2-4 tokens), this project vs
stock mlx-lm step3p5 on identical weights.

A step's kernels are the nodes of its lazy graph (after a prompt, exported with
`mx.export_to_dot`) that are not views: a compiled function shows as one `Compiled...` node per
fused elementwise chain plus each non-elementwise op inside it, so compiling hides no work. On
this CPU backend `mx.fast` ops (rms_norm, rope, attention) and `mx.dequantize` expand into their
composite fallbacks; each is counted as the one kernel it is on Metal.

    python benchmarks/op_count.py [--models demo,large,flash] [--prompt-tokens 100] [--by-op]

`flash` is a checkpoint with Step-3.5-Flash's layer structure (45 layers, full attention every
4th, MoE layers 3-44 with top-8 routing, 3 dense) at tiny widths: counts do not depend on widths.
"""

import argparse
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx_lm
from common import BUILD, demo_model, large_checkpoint

from mlx_step35 import load
from mlx_step35.generation import plain_step, verify_step
from mlx_step35.sampling import make_sampler

VIEWS = {  # no kernel (a copy at most where the input is not contiguous)
    "Broadcast",
    "Reshape",
    "Flatten",
    "Unflatten",
    "ExpandDims",
    "Squeeze",
    "Slice",
    "Transpose",
    "AsStrided",
    "StopGradient",
}
FAST = {  # op name on Metal: (module, attribute)
    "RMSNorm": (mx.fast, "rms_norm"),
    "RoPE": (mx.fast, "rope"),
    "SDPA": (mx.fast, "scaled_dot_product_attention"),
    "Dequantize": (mx, "dequantize"),
}
NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def graph_ops(outputs) -> Counter:
    """Non-view nodes of the graph that computes `outputs`, by op name (evaluated arrays are inputs)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.dot"
        mx.export_to_dot(str(path), outputs)
        names = NODE.findall(path.read_text())
    return Counter("Compiled" if n.startswith("Compiled") else n for n in names if n not in VIEWS)


def _placeholder(x):
    if not isinstance(x, mx.array):
        return x
    p = mx.zeros(x.shape, x.dtype)
    mx.eval(p)
    return p


@contextmanager
def metal_fast_ops(correction: Counter):
    """Count each mx.fast call as one kernel: its CPU fallback graph (rebuilt on evaluated
    placeholders of the same shapes) is subtracted from the step's count via `correction`."""
    saved = {name: getattr(mod, attr) for name, (mod, attr) in FAST.items()}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            alone = fn(*[_placeholder(a) for a in args], **{k: _placeholder(v) for k, v in kwargs.items()})
            correction.subtract(graph_ops(alone))
            correction[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, (mod, attr) in FAST.items():
        setattr(mod, attr, wrap(name, saved[name]))
    try:
        yield
    finally:
        for name, (mod, attr) in FAST.items():
            setattr(mod, attr, saved[name])


def count(build) -> Counter:
    correction = Counter()
    with metal_fast_ops(correction):
        outputs = build()
    ops = graph_ops(outputs)
    ops.update(correction)
    return +ops


def _prefilled(model, n_prompt, cache):
    V = model.args.vocab_size
    prompt = mx.random.randint(3, V - 3, (1, n_prompt), key=mx.random.key(0))
    model(prompt, cache)
    mx.eval([c.state for c in cache])
    return cache


def ours_step(model, n_prompt, width):
    cache = _prefilled(model, n_prompt, model.make_cache(slack=1 if width == 1 else 4))
    y = mx.array([5], dtype=mx.int32)
    if width == 1:
        return lambda: plain_step(model, y, cache, make_sampler())
    drafts = mx.array([7] * (width - 1), dtype=mx.int32)
    greedy = make_sampler()

    def step():
        h, lp = verify_step(model, [5], drafts, cache)
        return greedy(lp), lp, h

    return step


def mlx_lm_step(model, n_prompt, width):
    """mlx-lm's generate_step `_step` (greedy, no processors) over `width` tokens."""
    cache = _prefilled(model, n_prompt, model.make_cache())
    sampler = mlx_lm.sample_utils.make_sampler(temp=0.0)
    y = mx.array([5] + [7] * (width - 1), dtype=mx.int32)

    def step():
        logits = model(y[None], cache=cache)[:, -1 if width == 1 else slice(None), :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True, axis=-1)
        return sampler(logprobs), logprobs

    return step


def flash_shape() -> Path:
    """Step-3.5-Flash's layer structure at tiny widths, 4-bit (made once, under build/)."""
    from factory import make_checkpoint

    from mlx_step35 import convert

    hf, out = BUILD / "flash-shape-hf", BUILD / "flash-shape-4bit"
    if not (out / "config.json").exists():
        layers = dict(num_hidden_layers=45, moe_layers_enum=",".join(str(i) for i in range(3, 45)))
        make_checkpoint(hf, moe_top_k=8, moe_num_experts=16, sliding_window=8, **layers)
        convert(hf, out, quantize=True)
    return out


def table(path, n_prompt):
    ours, _ = load(path)
    theirs, _ = mlx_lm.load(str(path))
    rows = []
    for width in (1, 2, 3, 4):
        a = count(ours_step(ours, n_prompt, width))
        b = count(mlx_lm_step(theirs, n_prompt, width))
        rows.append((width, a, b))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=100, help="past both models' sliding windows")
    ap.add_argument("--models", default="demo,large", help="comma-separated: demo, large, flash")
    ap.add_argument("--by-op", action="store_true", help="also list the ops whose counts differ")
    a = ap.parse_args()
    models = {
        "demo": ("demo (bundled)", demo_model),
        "large": ("random 8L h512 E32 4-bit", large_checkpoint),
        "flash": ("Step-3.5-Flash's structure (45L, top-8), tiny widths, 4-bit", flash_shape),
    }
    print("| model | step | mlx_step35 kernels | mlx-lm kernels | ratio |")
    print("|---|---|---|---|---|")
    diffs = []
    for key in a.models.split(","):
        label, path = models[key][0], models[key][1]()
        for width, x, y in table(path, a.prompt_tokens):
            step = "decode (1 token)" if width == 1 else f"verify ({width} tokens)"
            n, m = x.total(), y.total()
            print(f"| {label} | {step} | {n} | {m} | {n / m:.3f} |")
            if a.by_op:
                diffs.append((label, step, {k: (x[k], y[k]) for k in sorted(x | y) if x[k] != y[k]}))
    for label, step, d in diffs:
        print(f"\n{label}, {step}: " + ", ".join(f"{k} {u} vs {v}" for k, (u, v) in d.items()))


if __name__ == "__main__":
    main()
