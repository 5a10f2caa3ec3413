"""Merged projections (mlx_step35/fusion.py): `load` merges q/k/v/g and gate/up into one matmul
each, and the model still computes exactly what the separate projections compute (bit for bit on
this backend: each output element is the same dot product), keeps every parameter's name, shape,
dtype and value, and holds no more memory. The reference is the same checkpoint loaded without
merging (what the code did before fusion.py), and mlx-lm in test_decode_exactness.py."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_step35 import load, loading
from mlx_step35.model import Attention

SETTINGS = {  # checkpoint fixture -> load() arguments
    "demo": dict(),  # the bundled 4-bit conversion, bfloat16 activations
    "float32": dict(quantize=False, dtype="float32"),  # Linear / SwitchLinear (gather_mm)
    "4bit": dict(),  # quantized while loading, with the 8-bit router of the default recipe
}


def _path(name, tiny_ckpt):
    return None if name == "demo" else tiny_ckpt


def _load(path, merged: bool, monkeypatch, **kw):
    with monkeypatch.context() as m:
        if not merged:
            m.setattr(loading, "fuse", lambda model: 0)
        return load(path, **kw)[0]


def _mergeable_modules(model):
    return [(name, m) for name, m in model.named_modules() if getattr(m, "MERGE", None)]


def _run(model, tokens):
    """Logits of a 70-token prefill (the experts' sorted path), 6 decode steps past the sliding
    window's wrap, steps of 2-4, 16 and 17 tokens, and each MTP block's draft."""
    cache = model.make_cache(slack=4)
    h = model.hidden(mx.array(tokens[:70])[None], cache)
    out = [model.logits(h)]
    t = 70
    for w in [1] * 6 + [2, 3, 4, 16, 17]:  # 16: the most tokens that take the merged matmul
        h = model.hidden(mx.array(tokens[t : t + w])[None], cache)
        out.append(model.logits(h))
        t += w
    mtp_cache = model.make_mtp_cache()
    prev = h
    for k in range(1, model.num_mtp + 1):
        prev, logits = model.mtp_step(
            k, mx.array(tokens[t + k : t + k + 1])[None], prev[:, -1:], mtp_cache[k - 1]
        )
        out.append(logits)
    mx.eval(out)
    return out


@pytest.fixture
def long_tokens():
    return np.random.default_rng(7).integers(3, 500, size=130)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_merged_model_computes_the_same_bits(name, tiny_ckpt, long_tokens, monkeypatch):
    path = _path(name, tiny_ckpt)
    merged = _load(path, True, monkeypatch, **SETTINGS[name])
    separate = _load(path, False, monkeypatch, **SETTINGS[name])
    modules = _mergeable_modules(merged)
    assert modules and all(m.merged is not None for _, m in modules), [
        n for n, m in modules if m.merged is None
    ]
    assert all(m.merged is None for _, m in _mergeable_modules(separate))
    a, b = _run(merged, long_tokens), _run(separate, long_tokens)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and mx.array_equal(x, y).item(), f"step {i} differs"


@pytest.mark.parametrize("name", ["demo", "4bit"])
def test_parameters_and_memory_are_unchanged(name, tiny_ckpt, monkeypatch):
    """Same names, shapes, dtypes and values; MLX's active memory after loading within 1% of
    the unmerged model's (keeping the separate copies too would add 20-40% here: every
    projection but the embedding, lm_head, routers and down projections)."""
    path = _path(name, tiny_ckpt)
    held, params = {}, {}
    limit = mx.set_cache_limit(0)  # no reuse of cached buffers, whose sizes are rounded up
    for merged in (False, True):
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        model = _load(path, merged, monkeypatch, **SETTINGS[name])
        held[merged] = mx.get_active_memory() - before
        params[merged] = {
            k: (v.dtype, np.array(v.view(mx.uint8))) for k, v in tree_flatten(model.parameters())
        }
        del model
    mx.set_cache_limit(limit)
    assert params[True].keys() == params[False].keys()
    for key, (dtype, v) in params[True].items():
        assert dtype == params[False][key][0] and np.array_equal(v, params[False][key][1]), key
    assert abs(held[True] - held[False]) <= 0.01 * held[False], held


def test_a_replaced_weight_is_used_not_the_merged_copy(tiny_ckpt, long_tokens, monkeypatch):
    """After `update` replaces one merged parameter, the model computes with the new value
    (as a model that was never merged does) and drops its stale merged copy."""
    kw = SETTINGS["float32"]
    models = [_load(tiny_ckpt, merged, monkeypatch, **kw) for merged in (True, False)]
    for model in models:
        attn = model.layers[1].self_attn
        model.layers[1].self_attn.update({"k_proj": {"weight": attn.k_proj.weight * 1.5}})
    merged, separate = models
    assert isinstance(merged.layers[1].self_attn, Attention)
    a, b = _run(merged, long_tokens), _run(separate, long_tokens)
    assert merged.layers[1].self_attn.merged is None
    assert merged.layers[0].self_attn.merged is not None
    assert all(mx.array_equal(x, y).item() for x, y in zip(a, b))
