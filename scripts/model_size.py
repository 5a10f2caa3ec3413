"""Size of the real Step-3.5-Flash under each quantization recipe (no weights needed).

Builds the model lazily from the published config (nothing is allocated) and adds up
the bytes every parameter would take: `python scripts/model_size.py`."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_step35.config import parse_config
from mlx_step35.model import Model
from mlx_step35.weights import QuantRecipe

N = 45
REAL = {
    "model_type": "step3p5",
    "hidden_size": 4096,
    "head_dim": 128,
    "vocab_size": 128896,
    "num_hidden_layers": N,
    "num_nextn_predict_layers": 3,
    "intermediate_size": 11264,
    "num_attention_heads": 64,
    "num_attention_groups": 8,
    "sliding_window": 512,
    "attention_other_setting": {"num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 128},
    "layer_types": ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(N + 3)],
    "moe_layers_enum": ",".join(str(i) for i in range(3, N)),
    "moe_num_experts": 288,
    "moe_top_k": 8,
    "moe_intermediate_size": 1280,
    "share_expert_dim": 1280,
}


def lazy_model(recipe=None) -> Model:
    """The real-size model, its weights never materialised (MLX arrays are lazy)."""
    model = Model(parse_config(REAL))
    if recipe:
        nn.quantize(model, class_predicate=lambda p, m: recipe.params(p, m) or False)
    return model


def sizes(recipe):
    model = lazy_model(recipe)
    total, experts, mtp = 0, 0, 0
    for name, w in tree_flatten(model.parameters()):
        b = w.size * (2 if w.dtype == mx.float32 and "router_bias" not in name else w.dtype.size)
        total += b
        experts += b if "switch_mlp" in name else 0
        mtp += b if name.startswith("mtp.") else 0
    return total, experts, mtp


if __name__ == "__main__":
    print("| weights | total GB | routed experts GB | MTP blocks GB |")
    print("|---|---|---|---|")
    for label, r in [("bf16", None)] + [
        (f"{b}-bit (router 8, vocab heads 6)", QuantRecipe(bits=b)) for b in (3, 4, 6, 8)
    ]:
        t, e, m = sizes(r)
        print(f"| {label} | {t / 1e9:.1f} | {e / 1e9:.1f} | {m / 1e9:.1f} |")
