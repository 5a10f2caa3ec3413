"""Parse Step-3.5 / Step-3.7 config.json into one resolved ModelArgs."""

import json
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
    """A config.json that cannot describe a Step-3.5 model."""


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


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The step3p5 dict, unwrapped from a Step-3.7 `text_config` if nested."""
    model_type = config.get("model_type")
    if model_type == "step3p7":
        if not isinstance(config.get("text_config"), dict):
            raise ConfigError("model_type 'step3p7' needs a 'text_config' object")
        inner = dict(config["text_config"])
        for key in ("eos_token_id", "tie_word_embeddings", "quantization", FORMAT_KEY):
            if key in config and key not in inner:
                inner[key] = config[key]
        inner["model_type"] = "step3p5"
        return inner
    if model_type != "step3p5":
        raise ConfigError(
            f"unsupported model_type {model_type!r}: expected 'step3p5' (Step-3.5-Flash) "
            "or 'step3p7' (Step-3.7-Flash)"
        )
    return config


def parse_config(config: Dict[str, Any]) -> ModelArgs:
    cfg = text_config(config)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
    names = {f.name for f in fields(ModelArgs)} - {"extra"}
    unknown = sorted(k for k in cfg if k not in names and k not in IGNORED)
    if unknown:
        warnings.warn(f"config.json: ignoring unknown field(s) {', '.join(unknown)}", stacklevel=2)
    args = ModelArgs(**{k: v for k, v in cfg.items() if k in names})
    args.extra = {k: cfg[k] for k in cfg if k not in names}
    args.num_nextn_predict_layers = int(args.num_nextn_predict_layers or 0)
    _validate(args)
    return args


def _validate(args: ModelArgs) -> None:
    total = args.num_layers_total
    for name in ("layer_types", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        values = getattr(args, name)
        if values is not None and len(values) not in (args.num_hidden_layers, total):
            raise ConfigError(
                f"config field {name} has {len(values)} entries: expected "
                f"{args.num_hidden_layers} (trunk) or {total} (trunk + MTP)"
            )
    for i in range(total):
        if args.layer_type(i) not in ("full_attention", "sliding_attention"):
            raise ConfigError(f"layer_types[{i}] = {args.layer_type(i)!r} is not supported")
    if args.moe_layers and max(args.moe_layers) >= args.num_hidden_layers:
        raise ConfigError("moe_layers_enum names a layer beyond num_hidden_layers")


def load_config(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path) / "config.json"
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this a model directory?)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
