"""Size of the real Step-3.5-Flash under each quantization recipe (no weights needed).

Builds the model lazily from the published config (nothing is allocated) and adds up
the bytes every parameter would take: `python scripts/model_size.py`. With
`--preflight-table`, the memory pre-flight of `load()` / `generate.py` on 64, 128 and
192 GB Macs (README's table); with `--context-table`, the longest context that fits per Mac
at 16/8/4-bit KV (README's table)."""

import argparse

import mlx.nn as nn

from mlx_step35.cache import KVQuant
from mlx_step35.config import parse_config
from mlx_step35.memory import OS_RESERVE, Device, assess, estimate, gb, recipe_weights
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
    w = recipe_weights(parse_config(REAL), recipe)
    return w["total"], w["experts"], w["mtp"]


def mac(memory_gb: int) -> Device:
    """A Mac as Metal describes it with the default wired limit: the GPU's recommended working
    set is 3/4 of memory above 36 GB, 2/3 below (macOS's default, as commonly reported)."""
    memory = memory_gb << 30
    return Device(memory, memory * 3 // 4 if memory_gb > 36 else memory * 2 // 3)


def preflight_table(bits=(3, 4, 8), macs=(64, 128, 192), context=32768) -> str:
    """The pre-flight of the real model (MTP blocks loaded, drafting) at each --q-bits on each Mac."""
    args = parse_config(REAL)
    weights = {b: recipe_weights(args, QuantRecipe(bits=b))["total"] for b in sorted({3, 4, 6, *bits})}
    rows = [
        f"| weights | needs ({context // 1024}K context) | " + " | ".join(f"{m} GB Mac" for m in macs) + " |",
        "|---" * (2 + len(macs)) + "|",
    ]
    for b in bits:
        needs = estimate(lazy_model(QuantRecipe(bits=b)), args, context=context, draft=True)
        smaller = {x: w for x, w in weights.items() if x < b}
        cells = [_cell(assess(needs, mac(m), smaller)) for m in macs]
        rows.append(f"| {b}-bit | {gb(needs.total)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


MAX_CONTEXT = 262144  # the model's positions


def longest_context(model, args, budget: int, kv) -> int:
    """The longest context (a multiple of 256, at most MAX_CONTEXT) whose pre-flight total
    (weights, MTP blocks, KV of trunk and MTP blocks when drafting, headroom) fits `budget`."""
    lo, hi = 0, MAX_CONTEXT // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(model, args, context=mid * 256, draft=True, kv_quant=kv).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def context_table(bits=(3, 4), macs=(96, 128, 192), kv_bits=(None, 8, 4)) -> str:
    """Longest context per Mac: as is (the default wired limit: Metal's recommended working set)
    / with the wired limit raised to all memory but 8 GiB."""
    args = parse_config(REAL)
    rows = [
        "| weights | KV | " + " | ".join(f"{m} GB Mac" for m in macs) + " |",
        "|---" * (2 + len(macs)) + "|",
    ]
    for b in bits:
        model = lazy_model(QuantRecipe(bits=b))
        for kb in kv_bits:
            kv = None if kb is None else KVQuant(kb)
            cells = []
            for m in macs:
                d = mac(m)
                fits = [
                    longest_context(model, args, budget, kv)
                    for budget in (d.recommended, d.memory - OS_RESERVE)
                ]
                cells.append(" / ".join(_k(t) for t in fits))
            rows.append(f"| {b}-bit | {kb or 16}-bit | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _k(tokens: int) -> str:
    return "none" if not tokens else "262K (all)" if tokens >= MAX_CONTEXT else f"{tokens // 1024}K"


def _cell(report) -> str:
    """A short table cell: fits, the sysctl, or 'no' and the first fix."""
    if report.ok:
        return "fits"
    if report.verdict == "raise-wired-limit":
        return f"`{report.fixes[0]}`"
    if not report.fixes:
        return f"no: needs more than its {gb(report.device.memory)}"
    fix = report.fixes[0]
    if fix.startswith("--expert-cache-gb"):
        fix = f"`{fix.split(' (')[0]}` (experts from disk)"
    elif "-bit weights" in fix:  # "B-bit weights (...): --q-bits B (...) fits ..."
        fix = f"`--q-bits {fix.split('-bit')[0]}`{fix.rsplit(')', 1)[-1]}"
    return f"no; {fix}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preflight-table", action="store_true", help="the README's memory pre-flight table")
    ap.add_argument("--context-table", action="store_true", help="the README's longest-context table")
    a = ap.parse_args()
    if a.preflight_table:
        print(preflight_table())
        return
    if a.context_table:
        print(context_table())
        return
    print("| weights | total GB | routed experts GB | MTP blocks GB |")
    print("|---|---|---|---|")
    for label, r in [("bf16", None)] + [
        (f"{b}-bit (router 8, vocab heads 6)", QuantRecipe(bits=b)) for b in (3, 4, 6, 8)
    ]:
        t, e, m = sizes(r)
        print(f"| {label} | {t / 1e9:.1f} | {e / 1e9:.1f} | {m / 1e9:.1f} |")


if __name__ == "__main__":
    main()
