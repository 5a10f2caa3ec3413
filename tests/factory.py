"""Tiny random Step-3.5-Flash checkpoints in exactly the real Hugging Face layout.

`make_checkpoint(path)` writes config.json, sharded safetensors with an index, a locally
trained byte-level BPE tokenizer and the small JSON files that go with it. Everything is
deterministic given `seed` and touches no network.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np

VARIANTS = ("step3p5", "step3p5_45", "step3p7")
# Per-layer arrays that real configs pad with the MTP entries (48 = 45 + 3).
PER_LAYER_FIELDS = (
    "layer_types",
    "partial_rotary_factors",
    "rope_theta",
    "swiglu_limits",
    "swiglu_limits_shared",
)
# Chosen so that, with the random weights below, the clamps change the outputs (tests check it).
ROUTED_LIMIT = 1.0
SHARED_LIMIT = 1.5


def _layer_arrays(n_trunk: int, n_total: int) -> dict:
    full = [i % 4 == 0 for i in range(n_total)]
    clamp = [n_trunk - 2 <= i < n_trunk for i in range(n_total)]  # last two trunk layers only
    return {
        "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
        "partial_rotary_factors": [0.5 if f else 1.0 for f in full],
        "rope_theta": [5e6 if f else 1e4 for f in full],
        "swiglu_limits": [ROUTED_LIMIT if c else 0.0 for c in clamp],
        "swiglu_limits_shared": [SHARED_LIMIT if c else 0.0 for c in clamp],
    }


def make_config(*, variant: str = "step3p5", mtp: bool = True, sliding_window: int = 8, **overrides) -> dict:
    """The config.json dict of a tiny checkpoint (nested under text_config for step3p7)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")
    n_layers = overrides.get("num_hidden_layers", 5)
    n_mtp = overrides.get("num_nextn_predict_layers", 3 if mtp else 0)
    vocab = overrides.get("vocab_size", 512)
    cfg = {
        "model_type": "step3p5",
        "architectures": ["Step3p5ForCausalLM"],
        "hidden_size": 64,
        "head_dim": 16,
        "vocab_size": vocab,
        "num_hidden_layers": n_layers,
        "num_nextn_predict_layers": n_mtp,
        "sliding_window": sliding_window,
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "attention_other_setting": {
            "num_attention_heads": 6,
            "num_attention_groups": 2,
            "head_dim": 16,
        },
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4096,
        },
        "yarn_only_types": ["full_attention"],
        "moe_layers_enum": ",".join(str(i) for i in range(2, n_layers)),
        "moe_num_experts": 8,
        "moe_top_k": 2,
        "moe_intermediate_size": 32,
        "share_expert_dim": 32,
        "intermediate_size": 96,
        "moe_router_scaling_factor": 3.0,
        "norm_expert_weight": True,
        "use_head_wise_attn_gate": True,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": [1, 2, vocab - 1],
        "torch_dtype": "bfloat16",
    }
    n_arr = n_layers + n_mtp if variant != "step3p5_45" else n_layers
    cfg.update(_layer_arrays(n_layers, n_layers + n_mtp))
    for field in PER_LAYER_FIELDS:
        cfg[field] = cfg[field][:n_arr]
    cfg.update(copy.deepcopy(overrides))
    if variant != "step3p7":
        return cfg
    return {
        "model_type": "step3p7",
        "architectures": ["Step3p7ForConditionalGeneration"],
        "text_config": cfg,
        "vision_config": {"width": 16, "layers": 1, "heads": 2, "image_size": 28, "patch_size": 14},
        "image_token_id": vocab - 3,
        "torch_dtype": "bfloat16",
    }


def text_config(cfg: dict) -> dict:
    """The Step-3.5 text dict of a config (itself, or text_config for step3p7)."""
    return cfg["text_config"] if "text_config" in cfg else cfg


# ---------------------------------------------------------------------------------------------
# weights


def _is_full(cfg: dict, i: int) -> bool:
    types = cfg["layer_types"]
    if i < len(types):
        return types[i] == "full_attention"
    return i % 4 == 0


def _moe_layers(cfg: dict) -> set[int]:
    return {int(s) for s in str(cfg["moe_layers_enum"]).split(",") if s.strip()}


def make_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under the checkpoint's own key names (prefix `model.`)."""
    rng = np.random.default_rng(seed)
    H, D, V = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    E, I, S = cfg["moe_num_experts"], cfg["moe_intermediate_size"], cfg["share_expert_dim"]
    n_layers, n_mtp = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    moe = _moe_layers(cfg)
    other = cfg["attention_other_setting"]

    def lin(out_dim, in_dim, gain=1.0, lead=()):
        # gain / sqrt(fan_in) keeps activations O(1)
        w = rng.standard_normal((*lead, out_dim, in_dim), dtype=np.float32)
        return w * np.float32(gain / np.sqrt(in_dim))

    def norm(dim):  # zero-centred: applied as 1 + w
        return (0.1 * rng.standard_normal(dim)).astype(np.float32)

    def mlp(prefix, inter, out):
        out[f"{prefix}.gate_proj.weight"] = lin(inter, H)
        out[f"{prefix}.up_proj.weight"] = lin(inter, H)
        out[f"{prefix}.down_proj.weight"] = lin(H, inter, 0.5)

    w: dict[str, np.ndarray] = {}
    w["model.embed_tokens.weight"] = rng.standard_normal((V, H), dtype=np.float32)
    for i in range(n_layers + n_mtp):
        p = f"model.layers.{i}"
        if _is_full(cfg, i):
            nh, nkv = cfg["num_attention_heads"], cfg["num_attention_groups"]
        else:
            nh, nkv = other["num_attention_heads"], other["num_attention_groups"]
        w[f"{p}.input_layernorm.weight"] = norm(H)
        w[f"{p}.post_attention_layernorm.weight"] = norm(H)
        w[f"{p}.self_attn.q_proj.weight"] = lin(nh * D, H)
        w[f"{p}.self_attn.k_proj.weight"] = lin(nkv * D, H)
        w[f"{p}.self_attn.v_proj.weight"] = lin(nkv * D, H)
        w[f"{p}.self_attn.o_proj.weight"] = lin(H, nh * D, 0.5)
        w[f"{p}.self_attn.g_proj.weight"] = lin(nh, H, 2.0)
        w[f"{p}.self_attn.q_norm.weight"] = norm(D)
        w[f"{p}.self_attn.k_norm.weight"] = norm(D)
        if i in moe and i < n_layers:
            w[f"{p}.moe.gate.weight"] = lin(E, H, 2.0)
            # spread comparable to the sigmoid scores' so the bias changes the top-k choice
            w[f"{p}.moe.router_bias"] = (0.2 * rng.standard_normal(E)).astype(np.float32)
            w[f"{p}.moe.gate_proj.weight"] = lin(I, H, lead=(E,))
            w[f"{p}.moe.up_proj.weight"] = lin(I, H, lead=(E,))
            w[f"{p}.moe.down_proj.weight"] = lin(H, I, 0.3, lead=(E,))
            mlp(f"{p}.share_expert", S, w)
        else:
            mlp(f"{p}.mlp", cfg["intermediate_size"], w)
        if i >= n_layers:
            w[f"{p}.enorm.weight"] = norm(H)
            w[f"{p}.hnorm.weight"] = norm(H)
            w[f"{p}.eh_proj.weight"] = lin(H, 2 * H)
            w[f"{p}.transformer.shared_head.norm.weight"] = norm(H)
            w[f"{p}.transformer.shared_head.output.weight"] = lin(V, H, 3.0)
    w["model.norm.weight"] = norm(H)
    w["lm_head.weight"] = lin(V, H, 3.0)
    return w


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _shard_plan(keys: list[str], n_layers: int, num_shards: int) -> list[list[str]]:
    """Trunk keys spread over the first shards, MTP layers (>= n_layers) in the last one only."""
    mtp = [k for k in keys if (_layer_of(k) or -1) >= n_layers]
    mtp_set = set(mtp)
    trunk = [k for k in keys if k not in mtp_set]
    n_trunk_shards = num_shards - 1 if mtp and num_shards > 1 else num_shards
    shards = [list(c) for c in np.array_split(np.array(trunk, dtype=object), n_trunk_shards)]
    if mtp:
        if num_shards > 1:
            shards.append(mtp)
        else:
            shards[-1].extend(mtp)
    return shards


def _save_shards(tensors: dict, plan: list[list[str]], path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    n = len(plan)
    weight_map, total = {}, 0
    for s, keys in enumerate(plan, start=1):
        name = f"model-{s:05d}-of-{n:05d}.safetensors"
        out = {}
        for k in keys:
            t = torch.from_numpy(np.ascontiguousarray(tensors[k]))
            # the router bias stays fp32 in real checkpoints
            t = t.float() if k.endswith("router_bias") else t.to(tdtype)
            out[k] = t
            weight_map[k] = name
            total += t.numel() * t.element_size()
        save_file(out, str(path / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------------
# tokenizer

SPECIAL = {"<s>": 0, "<|endoftext|>": 1, "</s>": 2, "<|im_start|>": 3}
IM_END = "<|im_end|>"  # always the last id (vocab_size - 1)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TOKENIZER_CACHE: dict[int, str] = {}


def _corpus() -> list[str]:
    import inspect
    import json as _json
    import textwrap

    texts = []
    for mod in (textwrap, _json, inspect, os):
        with open(mod.__file__, encoding="utf-8") as f:
            texts.append(f.read())
    return texts


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json with exactly `vocab_size` ids (cached per size)."""
    if vocab_size in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab_size]
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_special = len(SPECIAL) + 1
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Small corpus, big vocab: pad with reserved tokens so <|im_end|> lands on vocab_size - 1.
    n = tok.get_vocab_size()
    if n < vocab_size - 1:
        tok.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True) for i in range(vocab_size - 1 - n)]
        )
    tok.add_special_tokens([AddedToken(IM_END, special=True)])
    vocab = tok.get_vocab(with_added_tokens=True)
    assert tok.get_vocab_size() == vocab_size and vocab[IM_END] == vocab_size - 1, vocab_size
    assert all(vocab[t] == i for t, i in SPECIAL.items())
    _TOKENIZER_CACHE[vocab_size] = tok.to_str()
    return _TOKENIZER_CACHE[vocab_size]


def write_tokenizer(path: Path, vocab_size: int, chat_template: bool = False) -> None:
    """tokenizer.json and its config files; chat_template=True: Step-3.5's chat template
    (mlx_step35.chat_format.STEP35_CHAT_TEMPLATE) instead of a bare ChatML one."""
    from mlx_step35.chat_format import STEP35_CHAT_TEMPLATE

    eos = [1, 2, vocab_size - 1]
    (path / "tokenizer.json").write_text(tokenizer_json(vocab_size))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": IM_END,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 262144,
        "chat_template": STEP35_CHAT_TEMPLATE if chat_template else CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    special = {"bos_token": "<s>", "eos_token": IM_END, "pad_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    gen = {"bos_token_id": 0, "eos_token_id": eos, "pad_token_id": 1, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


# ---------------------------------------------------------------------------------------------


def make_checkpoint(
    path,
    *,
    variant: str = "step3p5",
    seed: int = 0,
    mtp: bool = True,
    sliding_window: int = 8,
    num_shards: int = 3,
    dtype: str = "bfloat16",
    text_prefix: str | None = None,
    chat_template: bool = False,
    **overrides,
) -> Path:
    """Write a tiny random checkpoint into directory `path` and return it as a Path.

    variant: "step3p5" (per-layer arrays padded to num_hidden_layers + MTP layers),
    "step3p5_45" (arrays truncated to num_hidden_layers), "step3p7" (config nested under
    text_config, text weights under `model.language_model.`, plus dummy vision tensors).
    `overrides` replace text-config fields; all shapes follow them. `text_prefix` overrides the
    step3p7 text-weight prefix: "model." is the layout HF's conversion_mapping expects of the hub
    Step-3.7 files (it renames model.layers.* -> model.language_model.layers.* when loading).
    `chat_template=True` gives the tokenizer Step-3.5's chat template (see `write_tokenizer`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(variant=variant, mtp=mtp, sliding_window=sliding_window, **overrides)
    tcfg = text_config(cfg)
    tensors = make_weights(tcfg, seed=seed)
    if variant == "step3p7":
        prefix = text_prefix or "model.language_model."
        tensors = {
            (prefix + k[len("model.") :] if k.startswith("model.") else k): v for k, v in tensors.items()
        }
        # dummy vision tower / projector, under the hub checkpoint's names; text loaders skip them
        rng = np.random.default_rng(seed + 1)
        tensors["vision_model.conv1.weight"] = rng.standard_normal((16, 3, 14, 14), np.float32)
        tensors["vision_model.ln_pre.weight"] = rng.standard_normal(16, np.float32)
        tensors["vit_large_projector.weight"] = rng.standard_normal((tcfg["hidden_size"], 64), np.float32)
    plan = _shard_plan(list(tensors), tcfg["num_hidden_layers"], num_shards)
    _save_shards(tensors, plan, path, dtype)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(path, tcfg["vocab_size"], chat_template=chat_template)
    return path
