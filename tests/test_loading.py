"""Config parsing, `load()` variants, the +1 norm rule, quantize-on-load and streamed expert slices."""

import json
import shutil
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from factory import PER_LAYER_FIELDS, make_checkpoint
from mlx.utils import tree_flatten

from mlx_step35 import ConfigError, QuantRecipe, convert, load
from mlx_step35.config import parse_config
from mlx_step35.model import Model

# ---------------------------------------------------------------------------------------------
# config parsing, on the real Step-3.5-Flash numbers (STEP35_FACTS.md)


def real_config(n_entries: int = 48) -> dict:
    full = [i % 4 == 0 for i in range(48)]
    cfg = {
        "model_type": "step3p5",
        "hidden_size": 4096,
        "head_dim": 128,
        "vocab_size": 128896,
        "num_hidden_layers": 45,
        "num_nextn_predict_layers": 3,
        "intermediate_size": 11264,
        "num_attention_heads": 64,
        "num_attention_groups": 8,
        "attention_other_setting": {"num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 128},
        "sliding_window": 512,
        "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
        "partial_rotary_factors": [0.5 if f else 1.0 for f in full],
        "rope_theta": [5e6 if f else 1e4 for f in full],
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 131072,
        },
        "yarn_only_types": ["full_attention"],
        "moe_layers_enum": ",".join(str(i) for i in range(3, 45)),
        "moe_num_experts": 288,
        "moe_top_k": 8,
        "moe_intermediate_size": 1280,
        "share_expert_dim": 1280,
        "swiglu_limits": [7.0 if i in (43, 44) else 0.0 for i in range(48)],
        "swiglu_limits_shared": [16.0 if i in (43, 44) else 0.0 for i in range(48)],
        "eos_token_id": [1, 2, 128007],
    }
    for key in PER_LAYER_FIELDS:
        cfg[key] = cfg[key][:n_entries]
    return cfg


def test_truncated_arrays_follow_the_i_mod_4_rule():
    a48, a45 = parse_config(real_config(48)), parse_config(real_config(45))
    assert a48.num_layers_total == a45.num_layers_total == 48
    for i in range(48):
        for lookup in ("layer_type", "rope_theta_at", "rotary_factor", "rope_scaling_at", "heads"):
            assert getattr(a48, lookup)(i) == getattr(a45, lookup)(i), (lookup, i)
        for shared in (False, True):
            assert a48.swiglu_limit(i, shared) == a45.swiglu_limit(i, shared)
    # the MTP layers 45..47 are sliding (45 % 4 == 1, ...): 96 heads, theta 1e4, full rotary
    for i in (45, 46, 47):
        assert a45.is_sliding(i)
        assert a45.heads(i) == (96, 8)
        assert a45.rope_theta_at(i) == 1e4 and a45.rotary_factor(i) == 1.0
        assert a45.rope_scaling_at(i) is None
        assert a45.swiglu_limit(i, shared=False) == 0.0
    assert a45.swiglu_limit(44, shared=False) == 7.0 and a45.swiglu_limit(44, shared=True) == 16.0
    assert a45.eos_token_ids == [1, 2, 128007]
    assert a45.moe_layers == set(range(3, 45)) and not a45.is_moe(2) and not a45.is_moe(45)


def test_heads_and_rope_per_layer_kind():
    args = parse_config(real_config())
    assert args.heads(0) == (64, 8) and args.heads(4) == (64, 8)  # full attention
    assert args.heads(1) == (96, 8) and args.heads(3) == (96, 8)  # from attention_other_setting
    assert args.rope_scaling_at(0)["rope_type"] == "llama3" and args.rope_scaling_at(44) is not None
    assert args.rope_scaling_at(1) is None  # scaling only on yarn_only_types
    assert (args.rotary_factor(0), args.rope_theta_at(0)) == (0.5, 5e6)
    assert (args.rotary_factor(1), args.rope_theta_at(1)) == (1.0, 1e4)
    # the modules built from it: a tiny model with the same per-layer arrays
    from mlx_lm.models.rope_utils import Llama3RoPE

    small = parse_config(
        {
            **real_config(),
            "hidden_size": 64,
            "head_dim": 16,
            "vocab_size": 32,
            "num_hidden_layers": 5,
            "moe_layers_enum": "3,4",
            "moe_num_experts": 4,
            "moe_top_k": 2,
            "attention_other_setting": {"num_attention_heads": 6, "num_attention_groups": 2, "head_dim": 16},
            "num_attention_heads": 4,
            "num_attention_groups": 2,
            "layer_types": real_config()["layer_types"][:8],
            "partial_rotary_factors": real_config()["partial_rotary_factors"][:8],
            "rope_theta": real_config()["rope_theta"][:8],
            "swiglu_limits": [0.0] * 8,
            "swiglu_limits_shared": [0.0] * 8,
        }
    )
    model = Model(small)
    full, sliding = model.layers[0].self_attn, model.layers[1].self_attn
    assert isinstance(full.rope, Llama3RoPE) and full.rope.dims == 8
    assert type(sliding.rope) is nn.RoPE and sliding.rope.dims == 16 and sliding.rope.base == 1e4
    assert (full.num_heads, sliding.num_heads, sliding.num_kv_heads) == (4, 6, 2)
    assert model.mtp[0].is_sliding and model.mtp[0].self_attn.num_heads == 6


def test_scalar_rope_theta():
    args = parse_config({**real_config(), "rope_theta": 1e6})
    assert args.rope_theta_at(0) == args.rope_theta_at(47) == 1e6


def test_unknown_model_type_is_named():
    with pytest.raises(ConfigError, match="llama"):
        parse_config({**real_config(), "model_type": "llama"})


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "head_dim", "vocab_size"])
def test_missing_required_field_is_named(field):
    cfg = real_config()
    del cfg[field]
    with pytest.raises(ConfigError, match=field):
        parse_config(cfg)


def test_unknown_field_warns_known_ones_do_not():
    with pytest.warns(UserWarning, match="frobnicate_layers"):
        parse_config({**real_config(), "frobnicate_layers": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config({**real_config(), "torch_dtype": "bfloat16", "architectures": ["X"]})


def test_per_layer_array_of_wrong_length():
    cfg = real_config()
    cfg["layer_types"] = cfg["layer_types"][:47]
    with pytest.raises(ConfigError, match="layer_types"):
        parse_config(cfg)


NESTED = {"rope_type": "llama3", "factor": 2.0}  # llama3 without its frequency factors
OTHER = {"num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 64}
BAD_FIELDS = [  # (field, value, what the message says besides "field = value")
    ("vocab_size", "128896", "expected a positive integer"),
    ("hidden_size", 0, "expected a positive integer"),
    ("num_hidden_layers", 10**6, "at most"),
    ("head_dim", 64.0, "expected a positive integer"),
    ("num_nextn_predict_layers", -1, "0..16"),
    ("rms_norm_eps", 0, "expected a positive number"),
    ("rope_theta", [1e4, -1.0], "positive number"),
    ("sliding_window", True, "expected a positive integer"),
    ("partial_rotary_factors", [0.0] * 48, "(0, 1]"),
    ("use_head_wise_attn_gate", "yes", "expected true or false"),
    ("moe_top_k", 300, "at most moe_num_experts (288)"),
    ("moe_layers_enum", "3,4,x", "layer numbers"),
    ("swiglu_limits", [-1.0] * 48, "non-negative numbers"),
    ("eos_token_id", [1, "2"], "token id"),
    ("rope_scaling.rope_type", "llama4", "llama3"),
    ("rope_scaling.low_freq_factor", None, "expected a positive number"),
    ("attention_other_setting.head_dim", 64, "head_dim (128)"),
    ("quantization.bits", 7, "one of (2, 3, 4, 5, 6, 8)"),
]
CONFIG_VALUES = {  # the config value behind a nested field above
    "rope_scaling.rope_type": ("rope_scaling", {**NESTED, "rope_type": "llama4"}),
    "rope_scaling.low_freq_factor": ("rope_scaling", NESTED),
    "attention_other_setting.head_dim": ("attention_other_setting", OTHER),
    "quantization.bits": ("quantization", {"group_size": 64, "bits": 7}),
}


@pytest.mark.parametrize("field, value, words", BAD_FIELDS, ids=[f for f, _, _ in BAD_FIELDS])
def test_bad_field_is_named_with_value_and_expectation(field, value, words):
    key, config_value = CONFIG_VALUES.get(field, (field, value))
    with pytest.raises(ConfigError) as e:
        parse_config({**real_config(), key: config_value}, source="/m/config.json")
    msg = str(e.value)
    assert msg.startswith(f"/m/config.json: {field} = {value!r}"[:60]) and words in msg, msg


def test_step3p7_nested_config():
    inner = real_config()
    args = parse_config({"model_type": "step3p7", "text_config": inner, "vision_config": {}})
    assert args.num_layers_total == 48 and args.heads(45) == (96, 8)


# ---------------------------------------------------------------------------------------------
# load() variants


def _np(x):
    return np.array(x.astype(mx.float32))


@pytest.fixture(scope="module")
def f32_model(tiny_ckpt):
    model, _ = load(tiny_ckpt, quantize=False, dtype="float32")
    return model


def test_checkpoint_without_mtp_loads_trunk_only(tiny_ckpt_nomtp, tokens):
    model, _ = load(tiny_ckpt_nomtp, quantize=False, dtype="float32")
    assert model.num_mtp == 0
    assert model(mx.array(tokens)[None]).shape == (1, len(tokens), 512)
    with pytest.raises(ValueError, match="MTP weights"):
        model.mtp_logits(mx.array(tokens)[None])


def test_config_promises_mtp_but_weights_absent(tiny_ckpt_nomtp, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_nomtp, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 3  # arrays keep the trunk's 5 entries: still valid
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no MTP weights"):
        model, _ = load(path, quantize=False, dtype="float32")
    assert model.num_mtp == 0


def test_load_mtp_false(tiny_ckpt, f32_model, tokens):
    model, _ = load(tiny_ckpt, quantize=False, dtype="float32", mtp=False)
    assert model.num_mtp == 0 and not any(k.startswith("mtp.") for k, _ in tree_flatten(model.parameters()))
    x = mx.array(tokens)[None]
    np.testing.assert_array_equal(_np(model(x)), _np(f32_model(x)))
    with pytest.raises(ValueError, match="MTP"):
        model.mtp_logits(x)


def test_each_shard_header_is_parsed_once(tiny_ckpt, monkeypatch):
    """The headers validated before the model is built are the ones the tensors are read with."""
    import mlx_step35.safetensors_io as S

    parsed, real = [], S.read_header
    monkeypatch.setattr(S, "read_header", lambda path: parsed.append(path.name) or real(path))
    load(tiny_ckpt, quantize=False, dtype="float32")
    shards = sorted(f.name for f in tiny_ckpt.glob("model*.safetensors"))
    assert len(shards) > 1 and sorted(parsed) == shards


# ---------------------------------------------------------------------------------------------
# zero-centred norms become 1 + w exactly once


def _raw(path, key):
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(path / index[key]), "pt") as f:
        return f.get_tensor(key).float().numpy()


NORMS = {  # our parameter -> HF checkpoint key (layers 5.. are the MTP blocks)
    "model.norm.weight": "model.norm.weight",
    "model.layers.0.input_layernorm.weight": "model.layers.0.input_layernorm.weight",
    "model.layers.3.self_attn.k_norm.weight": "model.layers.3.self_attn.k_norm.weight",
    "mtp.0.enorm.weight": "model.layers.5.enorm.weight",
    "mtp.2.shared_head.norm.weight": "model.layers.7.transformer.shared_head.norm.weight",
}


def test_norms_are_one_plus_w_once(tiny_ckpt, f32_model, tmp_path):
    params = dict(tree_flatten(f32_model.parameters()))
    for ours, key in NORMS.items():
        np.testing.assert_array_equal(np.array(params[ours]), 1.0 + _raw(tiny_ckpt, key), err_msg=ours)
    out = convert(tiny_ckpt, tmp_path / "conv", dtype="float32")
    for attempt in range(2):  # a conversion loads as stored, every time
        conv, _ = load(out, quantize=False, dtype="float32")
        conv_params = dict(tree_flatten(conv.parameters()))
        assert conv_params.keys() == params.keys()
        for k, v in params.items():
            np.testing.assert_array_equal(np.array(conv_params[k]), np.array(v), err_msg=f"{k} ({attempt})")


# ---------------------------------------------------------------------------------------------
# quantize-on-load


def _dequantized_reference(f32_model, q_model):
    """The float model with every weight the quantized model quantized replaced by
    dequantize(quantize(w)) at that module's bits and group size."""
    ref = Model(f32_model.args, mtp=f32_model.num_mtp > 0)
    ref.update(f32_model.parameters())
    float_modules = dict(ref.named_modules())
    updates = []
    for path, m in q_model.named_modules():
        if hasattr(m, "scales"):
            w = float_modules[path].weight
            q = mx.quantize(w, group_size=m.group_size, bits=m.bits)
            updates.append((f"{path}.weight", mx.dequantize(*q, group_size=m.group_size, bits=m.bits)))
    from mlx.utils import tree_unflatten

    ref.update(tree_unflatten(updates))
    return ref


def test_quantized_load_equals_dequantized_float(tiny_ckpt, f32_model, tokens):
    """Quantize-on-load computes exactly what quantize -> dequantize of the float weights gives."""
    q_model, _ = load(tiny_ckpt, dtype="float32")
    ref = _dequantized_reference(f32_model, q_model)
    x = mx.array(tokens)[None]
    ours, want = _np(q_model(x)), _np(ref(x))
    # measured: bit-identical on the CPU backend; the bound leaves room for qmm vs matmul rounding
    assert np.abs(ours - want).max() < 1e-4 * (want.max() - want.min())
    for a, b in zip(q_model.mtp_logits(x), ref.mtp_logits(x)):
        assert np.abs(_np(a) - _np(b)).max() < 1e-4 * float(b.max() - b.min())


def test_quantized_8bit_agrees_with_full_precision(tiny_ckpt, f32_model, tokens):
    recipe = QuantRecipe(bits=8, router_bits=8, vocab_bits=8)
    q_model, _ = load(tiny_ckpt, quantize=recipe, dtype="float32")
    x = mx.array(tokens)[None]
    ref, ours = _np(f32_model(x))[0], _np(q_model(x))[0]
    # measured on seeds 0-3: argmax agreement 1.0, relative L2 error 0.011-0.044
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.05
    for a, b in zip(q_model.mtp_logits(x), f32_model.mtp_logits(x)):
        a, b = _np(a)[0], _np(b)[0]
        # measured: MTP argmax agreement 0.85-1.0 (block 3 sees compounded error), rel L2 <= 0.04
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05


def test_quantized_4bit_default_recipe_correlates(tiny_ckpt, f32_model, tokens):
    q_model, _ = load(tiny_ckpt, dtype="float32")  # the default: 4-bit experts, 8-bit router
    x = mx.array(tokens)[None]
    ref, ours = _np(f32_model(x))[0], _np(q_model(x))[0]
    # measured on seeds 0-3 (random weights, 64-wide, 4 bits): rel L2 0.14-0.22,
    # correlation 0.977-0.990, argmax agreement 0.70-0.80
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.3
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.96
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.6


def _expected_bits(path: str):
    if path.endswith("mlp.gate.gate"):
        return 8  # router
    if path in ("model.embed_tokens", "lm_head") or path.endswith("shared_head.output"):
        return 6  # vocabulary projections
    return 4


def test_quantization_recipe(tiny_ckpt):
    model, _ = load(tiny_ckpt, dtype="float32")
    modules = dict(model.named_modules())
    quantized = {p: m for p, m in modules.items() if hasattr(m, "scales")}
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)
    for path in ("model.layers.3.mlp.switch_mlp.gate_proj", "model.layers.3.mlp.switch_mlp.down_proj"):
        assert type(modules[path]).__name__ == "QuantizedSwitchLinear" and modules[path].bits == 4
    assert modules["model.layers.3.mlp.gate.gate"].bits == 8
    assert modules["lm_head"].bits == 6 and modules["model.embed_tokens"].bits == 6
    assert all(modules[f"mtp.{j}.shared_head.output"].bits == 6 for j in range(3))
    # every linear-like module is quantized with the recipe's bits and the largest group <= 64
    for path, m in modules.items():
        if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "SwitchLinear":
            pytest.fail(f"{path} left unquantized")
    for path, m in quantized.items():
        assert m.bits == _expected_bits(path), path
        in_dim = m.weight.shape[-1] * 32 // m.bits
        assert m.group_size == (64 if in_dim % 64 == 0 else 32), path
    # norms and the router bias stay in full precision; the bias in float32
    for path, m in modules.items():
        if isinstance(m, nn.RMSNorm):
            assert m.weight.dtype == mx.float32 and path not in quantized
    bf16, _ = load(tiny_ckpt, dtype="bfloat16")
    for i in (2, 3, 4):
        assert bf16.layers[i].mlp.gate.router_bias.dtype == mx.float32
    assert bf16.model.norm.weight.dtype == mx.bfloat16


# ---------------------------------------------------------------------------------------------
# streamed expert slices


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """Stacked experts of 16 x 256 x 256 (2 MiB in bf16 per projection)."""
    return make_checkpoint(
        tmp_path_factory.mktemp("wide"),
        num_hidden_layers=4,
        hidden_size=256,
        moe_num_experts=16,
        moe_intermediate_size=256,
        share_expert_dim=64,
        intermediate_size=128,
        num_shards=2,
    )


def test_experts_stream_in_slices(wide_ckpt, monkeypatch):
    import mlx_step35.weights as W
    from mlx_step35.safetensors_io import ShardReader

    expert_bytes = 256 * 256 * 2
    monkeypatch.setattr(W, "SLICE_BYTES", 5 * expert_bytes)  # 5 experts a slice: 5 + 5 + 5 + 1
    reads = []
    real_read = ShardReader.read

    def spy(self, key, start=None, stop=None):
        arr = real_read(self, key, start, stop)
        reads.append((key, start, stop, arr.nbytes))
        return arr

    monkeypatch.setattr(ShardReader, "read", spy)
    model, _ = load(wide_ckpt, dtype="float32", mtp=False)
    stacked = [k for k in dict.fromkeys(r[0] for r in reads) if ".moe." in k and k.endswith("_proj.weight")]
    assert len(stacked) == 6  # layers 2, 3 x gate/up/down
    for key in stacked:
        slices = [(s, e, n) for k, s, e, n in reads if k == key]
        assert [(s, min(e, 16)) for s, e, _ in slices] == [(0, 5), (5, 10), (10, 15), (15, 16)], key
        assert all(n <= 5 * expert_bytes for _, _, n in slices)
    for key in {k for k, *_ in reads if k not in stacked}:  # everything else in one read
        assert len([k for k, *_ in reads if k == key]) == 1, key
    # the sliced quantization is exactly the whole tensor's
    for i in (2, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            whole = mx.array(_raw(wide_ckpt, f"model.layers.{i}.moe.{proj}.weight"))
            m = getattr(model.layers[i].mlp.switch_mlp, proj)
            want = mx.quantize(whole, group_size=64, bits=4)
            for got, ref in zip((m.weight, m.scales, m.biases), want):
                assert mx.array_equal(got, ref).item(), (i, proj)
