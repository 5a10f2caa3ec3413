"""Parity of mlx_step35 with independent references on tiny random checkpoints.

References (tests/reference.py): HF transformers' Step3p7TextModel, mlx-lm's step3p5 Model and
a float64 numpy model written from STEP35_FACTS.md (which also provides the MTP reference).
"""

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import reference as R
from factory import make_checkpoint

VARIANTS = ["tiny_ckpt", "tiny_ckpt_45", "tiny_ckpt_37", "tiny_ckpt_37_flat", "tiny_ckpt_rope"]
MTP_VARIANTS = ["tiny_ckpt", "tiny_ckpt_45", "tiny_ckpt_37", "tiny_ckpt_37_flat"]
REL_TOL = 1e-3  # max |ours - ref| < REL_TOL * (ref.max() - ref.min())


def assert_close(ours, ref, rel=REL_TOL, what=""):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    spread = ref.max() - ref.min()
    err = np.abs(ours - ref).max()
    assert err < rel * spread, f"{what}: max err {err:.3g} >= {rel} * spread {spread:.3g}"


# References are slow to build (torch import, HF init): build once per checkpoint.
@lru_cache(maxsize=None)
def _hf(path):
    return R.hf_trunk(path)


@lru_cache(maxsize=None)
def _mlx_lm(path):
    return R.mlx_lm_trunk(path)


@lru_cache(maxsize=None)
def _ours(path):
    from mlx_step35 import load

    model, _ = load(path, quantize=False, dtype="float32")
    return model


def _np_logits(x):
    import mlx.core as mx

    return np.array(x.astype(mx.float32))


# ---------------------------------------------------------------------------------------------
# the factory and the references themselves


def test_factory_layout(tiny_ckpt, tiny_ckpt_37):
    from safetensors import safe_open

    for path, prefix in ((tiny_ckpt, "model."), (tiny_ckpt_37, "model.language_model.")):
        cfg = R.read_config(path)
        n = cfg["num_hidden_layers"]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        total = 0
        for shard in shards:
            with safe_open(str(path / shard), "pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    total += t.numel() * t.element_size()
                    assert index["weight_map"][k] == shard
                    layer = R._layer_of(k.replace("model.language_model.", "model.", 1))
                    if layer is not None and layer >= n:
                        assert shard == shards[-1], k  # MTP layers only in the last shard
                    want = "float32" if k.endswith("router_bias") else "bfloat16"
                    assert str(t.dtype).endswith(want), (k, t.dtype)
        assert total == index["metadata"]["total_size"]
        keys = set(index["weight_map"])
        assert f"{prefix}layers.5.transformer.shared_head.output.weight" in keys
        assert f"{prefix}layers.2.moe.router_bias" in keys and "lm_head.weight" in keys
        with safe_open(str(path / shards[-1]), "pt") as f:
            assert f.get_slice(f"{prefix}layers.5.self_attn.q_proj.weight").get_shape() == [6 * 16, 64]
            assert f.get_slice(f"{prefix}layers.5.eh_proj.weight").get_shape() == [64, 128]


def test_factory_tokenizer(tiny_ckpt):
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    assert len(hf) == 512
    assert hf.convert_ids_to_tokens([0, 1, 2, 511]) == ["<s>", "<|endoftext|>", "</s>", "<|im_end|>"]
    messages = [{"role": "user", "content": "hi"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok = load_tokenizer(Path(tiny_ckpt))
    ids = tok.encode("def f(x):\n    return x + 1")
    assert max(ids) < 512 and tok.decode(ids) == "def f(x):\n    return x + 1"


def test_factory_is_deterministic_and_fast(tmp_path):
    import time

    make_checkpoint(tmp_path / "a", seed=7)  # tokenizer cached after this
    t = time.perf_counter()
    make_checkpoint(tmp_path / "b", seed=7)
    assert time.perf_counter() - t < 1.0
    for name in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    big = make_checkpoint(
        tmp_path / "c", num_hidden_layers=6, hidden_size=96, moe_num_experts=16, vocab_size=1024
    )
    cfg = R.read_config(big)
    assert len(cfg["layer_types"]) == 9 and cfg["eos_token_id"] == [1, 2, 1023]
    assert R.read_tensors(big)["model.layers.8.eh_proj.weight"].shape == (96, 192)


def test_factory_features_matter(tiny_ckpt, tokens):
    """The random weights exercise the clamps, the router bias and the sliding window: turning
    any of them off moves the logits far beyond the parity tolerance."""
    ref = R.numpy_trunk(tiny_ckpt)
    base = ref.logits(tokens)
    assert base.std() > 1.0 and (base.max(-1) - base.min(-1)).min() > 5.0

    def variant(cfg_fn=None, w_fn=None):
        cfg, w = copy.deepcopy(ref.config), dict(ref.w)
        cfg_fn and cfg_fn(cfg)
        w_fn and w_fn(w)
        return R.NumpyTrunk(w, cfg).logits(tokens)

    def far(x):
        return np.abs(x - base).max() > 20 * REL_TOL * (base.max() - base.min())

    assert far(variant(lambda c: c.update(swiglu_limits=[0.0] * 8)))
    assert far(variant(lambda c: c.update(swiglu_limits_shared=[0.0] * 8)))
    assert far(variant(lambda c: c.update(sliding_window=10**6)))
    assert far(variant(w_fn=lambda w: w.update({k: 0 * v for k, v in w.items() if "router_bias" in k})))


def test_llama3_scaling_matters(tiny_ckpt_rope, tokens):
    ref = R.numpy_trunk(tiny_ckpt_rope)
    base = ref.logits(tokens)
    cfg = dict(ref.config, rope_scaling=None)
    other = R.NumpyTrunk(ref.w, cfg).logits(tokens)
    assert np.abs(other - base).max() > 3 * REL_TOL * (base.max() - base.min())


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_references_agree(ckpt, tokens, request):
    """HF step3p7, mlx-lm step3p5 and the numpy model agree on the trunk."""
    path = request.getfixturevalue(ckpt)
    hf = _hf(path)
    ref = hf.logits(tokens)
    assert ref.shape == (len(tokens), 512)
    assert_close(_mlx_lm(path).logits(tokens), ref, rel=1e-5, what="mlx-lm vs HF")
    numpy = R.numpy_trunk(path)
    assert_close(numpy.logits(tokens), ref, rel=1e-5, what="numpy vs HF")
    assert_close(numpy.hidden_prenorm(tokens), hf.hidden_prenorm(tokens), rel=1e-5, what="hidden")


@pytest.mark.parametrize("layer", [0, 3, 5, 6, 7])
def test_numpy_layer_matches_hf_layer(tiny_ckpt, layer):
    """The numpy decoder layer behind the MTP reference equals HF's Step3p7DecoderLayer on the
    same weights, for trunk layers and for the MTP blocks' layers (sliding, dense, shifted RoPE)."""
    w, cfg = R._np(R.read_tensors(tiny_ckpt)), R.read_config(tiny_ckpt)
    x = np.random.default_rng(layer).standard_normal((30, cfg["hidden_size"]))
    positions = np.arange(30) + max(0, layer - cfg["num_hidden_layers"] + 1)
    ours = R.decoder_layer(w, cfg, layer, x, positions)
    assert_close(ours, R.hf_decoder_layer(tiny_ckpt, layer)(x, positions), rel=1e-5)


def test_mtp_reference_45_equals_48(tiny_ckpt, tiny_ckpt_45, tiny_ckpt_37, tokens):
    """Same seed, same weights: the i % 4 fallback of the 45-entry config gives the same MTP
    settings as the explicit 48-entry arrays, and step3p7 nesting changes nothing."""
    h0 = _hf(tiny_ckpt).hidden_prenorm(tokens)
    a = R.mtp_reference(tiny_ckpt, tokens, h0)
    for other in (tiny_ckpt_45, tiny_ckpt_37):
        for x, y in zip(R.mtp_reference(other, tokens, h0), a):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-9)
    assert [x.shape for x in a] == [(len(tokens) - k, 512) for k in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------
# mlx_step35


@pytest.mark.parametrize("ckpt", VARIANTS + ["tiny_ckpt_nomtp"])
def test_trunk_parity(ckpt, tokens, request):
    import mlx.core as mx

    path = request.getfixturevalue(ckpt)
    ours = _np_logits(_ours(path)(mx.array(tokens)[None]))
    assert ours.shape == (1, len(tokens), 512)
    assert_close(ours[0], _hf(path).logits(tokens), what="vs HF")
    assert_close(ours[0], _mlx_lm(path).logits(tokens), what="vs mlx-lm")


@pytest.mark.parametrize("ckpt", MTP_VARIANTS)
def test_mtp_parity(ckpt, tokens, request):
    import mlx.core as mx

    path = request.getfixturevalue(ckpt)
    ours = _ours(path).mtp_logits(mx.array(tokens)[None])
    ref = R.mtp_reference(path, tokens, _hf(path).hidden_prenorm(tokens))
    assert len(ours) == 3
    for k, (o, r) in enumerate(zip(ours, ref), start=1):
        o = _np_logits(o)
        assert o.shape == (1, len(tokens) - k, 512), (k, o.shape)
        assert_close(o[0], r, what=f"MTP block {k}")


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_ckpt_37"])
def test_incremental_decoding(ckpt, tokens, request):
    """Token-by-token and chunked prefill with a cache reproduce the full-sequence logits,
    well past the point where the sliding-window caches wrap."""
    import mlx.core as mx

    model = _ours(request.getfixturevalue(ckpt))
    full = _np_logits(model(mx.array(tokens)[None]))[0]

    cache = model.make_cache()
    steps = [_np_logits(model(mx.array(tokens[t : t + 1])[None], cache=cache))[0] for t in range(len(tokens))]
    assert_close(np.concatenate(steps), full, what="token by token")

    cache = model.make_cache()
    bounds = [0, 13] + list(range(18, len(tokens), 5)) + [len(tokens)]
    chunks = [
        _np_logits(model(mx.array(tokens[a:b])[None], cache=cache))[0] for a, b in zip(bounds, bounds[1:])
    ]
    assert_close(np.concatenate(chunks), full, what="chunked (13, then 5s)")


def test_mtp_incremental_decoding(tiny_ckpt, tokens):
    """Each MTP block run token by token on its own cache (`make_mtp_cache`, `mtp_step`: the
    draft-time API beyond the parity contract) matches the teacher-forced `mtp_logits`, past the
    sliding-window wrap and with the block's RoPE shift."""
    import mlx.core as mx

    model = _ours(tiny_ckpt)
    x = mx.array(tokens)[None]
    full = model.mtp_logits(x)
    L, h_prev = len(tokens), model.hidden(x)
    caches = model.make_mtp_cache()
    for k in range(1, 4):
        hs, rows = [], []
        for t in range(L - k):
            h, logits = model.mtp_step(k, x[:, t + k : t + k + 1], h_prev[:, t : t + 1], caches[k - 1])
            hs.append(h)
            rows.append(_np_logits(logits)[0])
        assert_close(np.concatenate(rows), _np_logits(full[k - 1])[0], what=f"MTP block {k}")
        h_prev = mx.concatenate(hs, axis=1)
