"""The few-token path of the trunk (decode and verify steps: merged projections, the fused MoE combine, constant
gather rows, the fused head gate, slice-updated sliding caches) computes the same float32 logits
as stock mlx-lm step3p5, step by step on the same weights, up to float32 rounding.

Bound: max |ours - mlx-lm| <= 2e-6 * (spread of mlx-lm's logits in that step). Reordering sums
of float32 terms moves each by a few ulps (2^-23 = 1.2e-7 relative); the bound allows ~16 ulps of
the logit range, and anything that is not a reordering (a wrong weight, a stale cache entry, a
missing normalisation) moves logits by 1e-2 of the spread or more (checked below).
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import reference as R

from mlx_step35 import load

BOUND = 2e-6


def _steps(model, cache, tokens, widths):
    """Logits [n, V] of each step, feeding `widths` tokens at a time after a 10-token prefill."""
    out = [model(mx.array(tokens[:10])[None], cache=cache)[0, -1:]]
    t = 10
    for w in widths:
        out.append(model(mx.array(tokens[t : t + w])[None], cache=cache)[0])
        t += w
    return [np.array(x.astype(mx.float32), np.float64) for x in out]


def _max_rel_err(ours, theirs):
    return max(np.abs(a - b).max() / (b.max() - b.min()) for a, b in zip(ours, theirs))


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    ours, _ = load(tiny_ckpt, quantize=False, dtype="float32", mtp=False)
    return ours, R.mlx_lm_trunk(tiny_ckpt).model


# decode steps past the sliding window's wrap (window 8), then verify-sized steps of 2-4 tokens
WIDTHS = [1] * 10 + [2, 3, 4, 1]  # 10 + 20 tokens: the fixture's 30


def test_float32_steps_match_mlx_lm_to_rounding(pair, tokens):
    ours, theirs = pair
    a = _steps(ours, ours.make_cache(slack=4), tokens, WIDTHS)
    b = _steps(theirs, theirs.make_cache(), tokens, WIDTHS)
    assert [x.shape for x in a] == [x.shape for x in b]
    err = _max_rel_err(a, b)
    assert err <= BOUND, f"max error {err:.3g} of the spread > {BOUND}"


def test_bound_catches_a_wrong_routing_weight(pair, tokens, monkeypatch):
    """The bound is tight enough to see an error smaller than any real bug: a 1% change of
    one layer's routing scale in the fused combine."""
    ours, theirs = pair
    moe = next(layer.mlp for layer in ours.layers if hasattr(layer.mlp, "switch_mlp"))
    monkeypatch.setattr(moe.gate, "scale", moe.gate.scale * 1.01)
    a = _steps(ours, ours.make_cache(slack=4), tokens, WIDTHS)
    b = _steps(theirs, theirs.make_cache(), tokens, WIDTHS)
    assert _max_rel_err(a[1:], b[1:]) > 100 * BOUND


def test_fewer_kernels_per_step_than_mlx_lm(pair):
    """benchmarks/op_count.py's count (deterministic): a decode step and a 3-token verify step
    take at most 0.7x and 0.75x the kernels of mlx-lm's step (0.66 and 0.73 now), and no
    index arrays, scatters or gathers but the embedding's one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import op_count

    ours, theirs = pair
    for width in (1, 3):
        a = op_count.count(op_count.ours_step(ours, 40, width))
        b = op_count.count(op_count.mlx_lm_step(theirs, 40, width))
        assert a.total() <= (0.7 if width == 1 else 0.75) * b.total(), (width, a.total(), b.total())
        assert (a["Arange"], a["Scatter"], a["Gather"]) == (0, 0, 1), a


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_both_forms_of_the_moe_combine_give_the_same_bits(dtype):
    """Few experts take the chained-adds form (2 kernels), many the reductions (5): for every
    top_k either computes the same bits, with and without normalisation and residual."""
    from mlx_step35.model import _combine_chained, _combine_reduced

    rng = np.random.default_rng(0)
    for top_k in range(1, 9):
        for normalize, residual in ((True, True), (False, False)):
            experts, shared, res = (
                mx.array(rng.normal(size=s).astype(np.float32)).astype(dtype)
                for s in ((3, 5, top_k, 64), (3, 5, 64), (3, 5, 64))
            )
            chosen = mx.array(rng.normal(size=(3, 5, top_k)).astype(np.float32)).astype(dtype)
            args = (experts, chosen, shared, res if residual else None, 3.0, normalize)
            a, b = _combine_chained(*args), _combine_reduced(*args)
            assert a.dtype == b.dtype == dtype and mx.array_equal(a, b).item(), (top_k, normalize)
