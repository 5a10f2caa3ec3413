"""Parse Step-3.5 / Step-3.7 config.json into one resolved ModelArgs."""

import json
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

FORMAT_KEY = "mlx_step35"  # config.json block written by our convert; its presence means norms are 1 + w
FORMAT_VERSION = 1

REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_attention_heads",
    "num_attention_groups",
    "head_dim",
    "intermediate_size",
)

# Keys real configs carry that change nothing for inference here (no warning for these).
IGNORED = {
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "bos_token_id",
    "pad_token_id",
    "use_cache",
    "max_seq_len",
    "initializer_range",
    "hidden_act",
    "attention_dropout",
    "need_fp32_gate",
    "moe_router_activation",
    "use_moe_router_bias",
    "use_moe",
    "zero_centered",
    "use_qk_norm",
    "moe_every_n_layer",
    "quantization",
    "quantization_config",
    FORMAT_KEY,
    "model_type",
    "text_config",
    "vision_config",
    "projector_bias",
    "image_token_id",
    "im_end_token",
    "im_patch_token",
    "im_start_token",
    "understand_projector_stride",
    "sink",
    "use_rope_layers",
    "rope_parameters",
    "tie_word_embeddings_in_mtp",
    "num_nextn_predict_layers",
    "att_impl_type",
    "attention_type",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a Step-3.5 model; the message names the field."""


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_attention_groups: int
    head_dim: int
    intermediate_size: int
    num_nextn_predict_layers: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: Union[float, List[float]] = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    yarn_only_types: Optional[List[str]] = None
    max_position_embeddings: int = 262144
    sliding_window: int = 512
    layer_types: Optional[List[str]] = None
    partial_rotary_factors: Optional[List[float]] = None
    attention_other_setting: Optional[Dict[str, Any]] = None
    use_head_wise_attn_gate: bool = True
    moe_num_experts: int = 288
    moe_top_k: int = 8
    moe_intermediate_size: int = 1280
    share_expert_dim: int = 1280
    moe_layers_enum: Optional[Union[str, List[int]]] = None
    moe_router_scaling_factor: float = 3.0
    norm_expert_weight: bool = True
    swiglu_limits: Optional[List[float]] = None
    swiglu_limits_shared: Optional[List[float]] = None
    tie_word_embeddings: bool = False
    eos_token_id: Optional[Union[int, List[int]]] = None
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    # Per-layer lookups. Layer i covers the trunk (0..n-1) and the MTP layers (n..n+K-1).
    # Arrays truncated to the trunk follow the i % 4 pattern for the MTP layers.
    @property
    def num_layers_total(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def layer_type(self, i: int) -> str:
        if self.layer_types and i < len(self.layer_types):
            return self.layer_types[i]
        return "full_attention" if i % 4 == 0 else "sliding_attention"

    def is_sliding(self, i: int) -> bool:
        return self.layer_type(i) == "sliding_attention"

    def _per_layer(self, values, i: int, default):
        if not isinstance(values, list):
            return default if values is None else values
        if i < len(values):
            return values[i]
        same = [j for j in range(len(values)) if self.layer_type(j) == self.layer_type(i)]
        return values[same[0]] if same else default

    def rope_theta_at(self, i: int) -> float:
        return float(self._per_layer(self.rope_theta, i, 10000.0))

    def rotary_factor(self, i: int) -> float:
        return float(self._per_layer(self.partial_rotary_factors, i, 1.0))

    def rope_scaling_at(self, i: int) -> Optional[Dict[str, Any]]:
        if self.yarn_only_types is not None and self.layer_type(i) not in self.yarn_only_types:
            return None
        return self.rope_scaling

    def heads(self, i: int) -> tuple:
        """(query heads, kv heads) of layer i."""
        other = self.attention_other_setting
        if self.is_sliding(i) and other:
            if other.get("head_dim", self.head_dim) != self.head_dim:
                raise ConfigError("attention_other_setting.head_dim differs from head_dim")
            return other["num_attention_heads"], other["num_attention_groups"]
        return self.num_attention_heads, self.num_attention_groups

    def swiglu_limit(self, i: int, shared: bool) -> float:
        values = self.swiglu_limits_shared if shared else self.swiglu_limits
        if not values or i >= len(values):
            return 0.0
        return float(values[i] or 0.0)

    @property
    def moe_layers(self) -> set:
        enum = self.moe_layers_enum
        if enum is None:
            return set(range(3, self.num_hidden_layers))
        items = enum.split(",") if isinstance(enum, str) else enum
        return {int(x) for x in items if str(x).strip()}

    def is_moe(self, i: int) -> bool:
        return i < self.num_hidden_layers and i in self.moe_layers

    @property
    def eos_token_ids(self) -> List[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def text_config(config: Dict[str, Any], source: str = "config.json") -> Dict[str, Any]:
    """The step3p5 dict, unwrapped from a Step-3.7 `text_config` if nested."""
    model_type = config.get("model_type")
    if model_type == "step3p7":
        if not isinstance(config.get("text_config"), dict):
            raise ConfigError(f"{source}: model_type 'step3p7' needs a 'text_config' object")
        inner = dict(config["text_config"])
        for key in ("eos_token_id", "tie_word_embeddings", "quantization", FORMAT_KEY):
            if key in config and key not in inner:
                inner[key] = config[key]
        inner["model_type"] = "step3p5"
        return inner
    if model_type != "step3p5":
        raise ConfigError(
            f"{source}: unsupported model_type {model_type!r}: expected 'step3p5' (Step-3.5-Flash) "
            "or 'step3p7' (Step-3.7-Flash)"
        )
    return config


MAX_DIM = 2**31 - 1  # MLX shapes are 32-bit
MAX_LAYERS = 4096  # far above any real model; a bigger count is a corrupt config, not a model
ROPE_TYPES = {  # rope_scaling type -> numeric fields it needs (mlx-lm's initialize_rope)
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}
ROPE_NUMBERS = ROPE_TYPES["llama3"] + ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    """A finite JSON number that converts to a float (JSON integers can be arbitrarily large)."""
    return (isinstance(v, float) and math.isfinite(v)) or (_int(v) and abs(v) <= 2**53)


def _pos_int(limit=MAX_DIM):
    return lambda v: _int(v) and 0 < v <= limit, f"a positive integer (at most {limit})"


def _opt(test):
    check, what = test
    return lambda v: v is None or check(v), f"{what} or null"


def _list_of(check, what):
    return lambda v: isinstance(v, list) and all(check(x) for x in v), f"a list of {what}"


POS_NUM = (lambda v: _num(v) and v > 0, "a positive number")
BOOL = (lambda v: isinstance(v, bool), "true or false")
LAYER_TYPES = ("full_attention", "sliding_attention")
FIELD_CHECKS = {  # every config field the model reads -> (test, what is expected)
    **{k: _pos_int() for k in REQUIRED if k != "num_hidden_layers"},
    "num_hidden_layers": _pos_int(MAX_LAYERS),
    "num_nextn_predict_layers": _opt((lambda v: _int(v) and 0 <= v <= 16, "an integer in 0..16")),
    "rms_norm_eps": POS_NUM,
    "rope_theta": (
        lambda v: POS_NUM[0](v) or (isinstance(v, list) and bool(v) and all(POS_NUM[0](x) for x in v)),
        "a positive number or a list of them",
    ),
    "rope_scaling": _opt((lambda v: isinstance(v, dict), "an object")),
    "yarn_only_types": _opt(_list_of(lambda x: isinstance(x, str), "strings")),
    "max_position_embeddings": _pos_int(),
    "sliding_window": _pos_int(),
    "layer_types": _opt(_list_of(lambda x: x in LAYER_TYPES, " or ".join(map(repr, LAYER_TYPES)))),
    "partial_rotary_factors": _opt(_list_of(lambda x: _num(x) and 0 < x <= 1, "numbers in (0, 1]")),
    "attention_other_setting": _opt((lambda v: isinstance(v, dict), "an object")),
    "use_head_wise_attn_gate": BOOL,
    "moe_num_experts": _pos_int(1 << 20),
    "moe_top_k": _pos_int(),
    "moe_intermediate_size": _pos_int(),
    "share_expert_dim": _pos_int(),
    "moe_layers_enum": (
        lambda v: (
            v is None
            or (isinstance(v, str) and all(x.strip().isdigit() for x in v.split(",") if x.strip()))
            or (isinstance(v, list) and all(_int(x) for x in v))
        ),
        'layer numbers ("3,4,5" or [3, 4, 5]) or null',
    ),
    "moe_router_scaling_factor": POS_NUM,
    "norm_expert_weight": BOOL,
    "swiglu_limits": _opt(_list_of(lambda x: x is None or (_num(x) and x >= 0), "non-negative numbers")),
    "swiglu_limits_shared": _opt(
        _list_of(lambda x: x is None or (_num(x) and x >= 0), "non-negative numbers")
    ),
    "tie_word_embeddings": BOOL,
    "eos_token_id": (
        lambda v: (
            v is None or (_int(v) and v >= 0) or (isinstance(v, list) and all(_int(x) and x >= 0 for x in v))
        ),
        "a token id, a list of token ids or null",
    ),
    "quantization": _opt((lambda v: isinstance(v, dict), "an object")),
}


def _bad(source: str, field: str, value, expected: str) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ConfigError(f"{source}: {field} = {shown}: expected {expected}")


def check_fields(cfg: Dict[str, Any], source: str = "config.json") -> None:
    """Type and range of every field the model reads (ConfigError naming field, value, expectation)."""
    for name, (check, what) in FIELD_CHECKS.items():
        if name in cfg and not check(cfg[name]):
            raise _bad(source, name, cfg[name], what)
    top_k, experts = cfg.get("moe_top_k", 8), cfg.get("moe_num_experts", 288)  # ModelArgs' defaults
    if top_k > experts:
        raise _bad(source, "moe_top_k", top_k, f"at most moe_num_experts ({experts})")
    other = cfg.get("attention_other_setting") or {}
    for key in ("num_attention_heads", "num_attention_groups") if other else ():
        if not _pos_int()[0](other.get(key)):
            raise _bad(source, f"attention_other_setting.{key}", other.get(key), "a positive integer")
    if other.get("head_dim", cfg["head_dim"]) != cfg["head_dim"]:
        raise _bad(
            source, "attention_other_setting.head_dim", other["head_dim"], f"head_dim ({cfg['head_dim']})"
        )
    _check_rope_scaling(cfg.get("rope_scaling"), source)
    _check_quantization(cfg.get("quantization"), source)


def _check_rope_scaling(scaling, source: str) -> None:
    if not scaling:
        return
    kind = scaling.get("type") or scaling.get("rope_type", "default")
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise _bad(source, "rope_scaling.rope_type", kind, f"one of {', '.join(ROPE_TYPES)}")
    for key in ROPE_TYPES[kind]:
        if not POS_NUM[0](scaling.get(key)):
            raise _bad(source, f"rope_scaling.{key}", scaling.get(key), "a positive number")
    for key in ROPE_NUMBERS:
        if key in scaling and not _num(scaling[key]):
            raise _bad(source, f"rope_scaling.{key}", scaling[key], "a number")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise _bad(
            source, "rope_scaling.high_freq_factor", scaling["high_freq_factor"], "above low_freq_factor"
        )


def _check_quantization(quant, source: str) -> None:
    """mlx-lm's "quantization" block: defaults plus per-module overrides (objects) by path."""
    if not quant:
        return
    for name, params in [("quantization", quant)] + [
        (f"quantization.{k}", v) for k, v in quant.items() if isinstance(v, dict)
    ]:
        for key, ok, what in (
            ("bits", lambda v: v in QUANT_BITS and _int(v), f"one of {QUANT_BITS}"),
            ("group_size", lambda v: _int(v) and v in (16, 32, 64, 128), "16, 32, 64 or 128"),
            ("mode", lambda v: v in QUANT_MODES, f"one of {', '.join(QUANT_MODES)}"),
        ):
            if key in params and not ok(params[key]):
                raise _bad(source, f"{name}.{key}", params[key], what)


def parse_config(config: Dict[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs of a config.json dict; every field the model uses is checked for type and range
    first (`source` names the file in errors)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: is a JSON {type(config).__name__}, expected an object")
    cfg = text_config(config, source)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{source} is missing required field(s): {', '.join(missing)}")
    check_fields(cfg, source)
    names = {f.name for f in fields(ModelArgs)} - {"extra"}
    unknown = sorted(k for k in cfg if k not in names and k not in IGNORED)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown field(s) {', '.join(unknown)}", stacklevel=2)
    args = ModelArgs(**{k: v for k, v in cfg.items() if k in names})
    args.extra = {k: cfg[k] for k in cfg if k not in names}
    args.num_nextn_predict_layers = args.num_nextn_predict_layers or 0
    _validate(args, source)
    return args


def _validate(args: ModelArgs, source: str) -> None:
    total = args.num_layers_total
    for name in ("layer_types", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        values = getattr(args, name)
        if values is not None and len(values) not in (args.num_hidden_layers, total):
            raise ConfigError(
                f"{source}: field {name} has {len(values)} entries: expected "
                f"{args.num_hidden_layers} (trunk) or {total} (trunk + MTP)"
            )
    if isinstance(args.rope_theta, list) and len(args.rope_theta) not in (args.num_hidden_layers, total):
        raise ConfigError(
            f"{source}: field rope_theta has {len(args.rope_theta)} entries: expected a number, "
            f"{args.num_hidden_layers} (trunk) or {total} (trunk + MTP) entries"
        )
    bad = sorted(i for i in args.moe_layers if not 0 <= i < args.num_hidden_layers)
    if bad:
        raise ConfigError(
            f"{source}: moe_layers_enum names layer {bad[0]}: expected layers 0..{args.num_hidden_layers - 1}"
        )
    for i in range(total):
        heads, groups = args.heads(i)
        if heads % groups:
            raise ConfigError(
                f"{source}: layer {i} has {heads} attention heads in {groups} groups: expected a multiple"
            )


def load_config(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path) / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this a model directory?)") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or an integer too long to convert
        raise ConfigError(f"{path}: invalid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: is a JSON {type(config).__name__}, expected an object")
    return config
