"""Benchmark 3: a bandwidth model of decoding the real Step-3.5-Flash at 4 bits on a Mac.

A Mac decodes at memory speed, so cost = weight (and KV) bytes read per generated token.
Byte counts come from the real architecture built lazily (no weights) under our 4-bit
recipe. A verify pass over m tokens reads the dense weights once but the union of the
experts its m tokens route to; drafting at depth n reads MTP blocks 1..n (commit pass),
blocks 2..n again (draft pass) and heads 1..n, each block pass its block's KV (sliding
windows of 512 in the real config). Projected tokens/s = efficiency x bandwidth
/ bytes per token, with the efficiency calibrated on llama.cpp's published 48 tok/s
(M4 Max, Q4_K_S, no MTP). These are projections, not measurements.

    python benchmarks/bandwidth.py [--acceptance 0.9,0.8,0.7] [--context 4096]
    python benchmarks/bandwidth.py --kv-table   # 32K and 128K, 16/8/4-bit KV, depths 0-3
    python benchmarks/bandwidth.py --batch-table --acceptance 0.71,0.77,0.84   # 1-8 rows per pass

With --kv-bits, full-attention KV positions from --quantized-kv-start on are read at
mx.quantize's size (bits per value plus a 16-bit scale and bias per group), as
generate_step(kv_bits=...) stores them, plus the float32 cast of the scales and biases that
the float32 attention scores cost (see kv_read_per_value); the sliding windows stay 16-bit.
"""

import argparse
import sys

import mlx.core as mx
from common import ROOT, demo_model
from mlx.utils import tree_flatten

sys.path.insert(0, str(ROOT / "scripts"))
from model_size import lazy_model  # noqa: E402

from mlx_step35.cache import KV_GROUP_SIZE, QUANTIZED_KV_START, KVQuant  # noqa: E402
from mlx_step35.weights import QuantRecipe  # noqa: E402

MACS = {"M3 Max (400 GB/s)": 400e9, "M4 Max (546 GB/s)": 546e9, "M3 Ultra (819 GB/s)": 819e9}
LLAMA_CPP_M4_MAX = 48.0  # tok/s, Q4_K_S, empty context, no MTP (published)


def nbytes(w, name):
    return w.size * (2 if w.dtype == mx.float32 and "router_bias" not in name else w.dtype.size)


def components():
    model = lazy_model(QuantRecipe())
    a = model.args
    c = dict(dense=0, experts=0, mtp_body=0, mtp_head=0, lm_head=0)
    for name, w in tree_flatten(model.parameters()):
        b = nbytes(w, name)
        if name.startswith("mtp."):
            c["mtp_head" if ".shared_head.output." in name else "mtp_body"] += b
        elif "switch_mlp" in name:
            c["experts"] += b
        elif name.startswith("lm_head"):
            c["lm_head"] += b
        elif not name.startswith("model.embed_tokens"):  # one embedding row per token: ~0
            c["dense"] += b
    n_moe = len(a.moe_layers)
    c["expert_each"] = c["experts"] / (a.moe_num_experts * n_moe)
    c["n_moe"], c["E"], c["k"] = n_moe, a.moe_num_experts, a.moe_top_k
    c["mtp_body"] /= a.num_nextn_predict_layers
    c["mtp_head"] /= a.num_nextn_predict_layers
    full = sum(1 for i in range(a.num_hidden_layers) if not a.is_sliding(i))
    c["kv_full_per_token"] = full * 2 * a.num_attention_groups * a.head_dim * 2
    c["kv_sliding"] = (
        (a.num_hidden_layers - full) * 2 * a.num_attention_groups * a.head_dim * 2 * a.sliding_window
    )
    # the MTP blocks (layers 45-47) are sliding-attention layers in the real config: 16-bit windows
    mtp_layers = range(a.num_hidden_layers, a.num_hidden_layers + a.num_nextn_predict_layers)
    if not all(a.is_sliding(i) for i in mtp_layers):
        raise ValueError("a full-attention MTP block: its KV reads are not modelled here")
    c["kv_mtp_block"] = c["kv_sliding"] / (a.num_hidden_layers - full)
    return c


def distinct_independent(E, k, m):
    return E * (1 - (1 - k / E) ** m)


def kv_read_per_value(kv) -> float:
    """Bytes a pass moves per quantized key or value with 16-bit activations: the stored bytes,
    plus casting the 16-bit scales and biases to float32 (read 2, write 4, then read 4 bytes
    instead of 2, each): cache.attention's scores are float32, and mx.quantized_matmul casts
    its scales and biases to the queries' dtype."""
    return kv.bytes_per_value() + 2 * (2 + 4 + 2) / kv.group_size


def kv_bytes(c, context, kv=None):
    """KV bytes one pass reads at `context`: full-attention layers (with a KVQuant `kv`: 16-bit
    before kv.start, quantized after) and the sliding windows (16-bit)."""
    full = c["kv_full_per_token"] * context
    if kv is not None:
        fp = min(context, kv.start)
        full = c["kv_full_per_token"] * (fp + (context - fp) * kv_read_per_value(kv) / 2)
    return full + c["kv_sliding"] * min(1.0, context / 512)


def pass_bytes(c, overlap, m, corr, context=0, kv=None):
    """Bytes one trunk pass over m tokens reads: dense weights once, the union of the experts
    its tokens route to (independent routing, or scaled by the demo's measured overlap), the KV."""
    extra = (distinct_independent(c["E"], c["k"], m) - c["k"]) * (overlap[m] if corr else 1.0)
    return (
        c["dense"]
        + c["lm_head"]
        + kv_bytes(c, context, kv)
        + c["n_moe"] * (c["k"] + extra) * c["expert_each"]
    )


def draft_bytes(c, blocks, depth=None, context=0):
    """Bytes of one step's drafting at `depth` (default `blocks`) whose chain ran MTP blocks
    1..blocks (fewer than depth when the confidence gate stopped it): the commit pass runs
    blocks 1..depth whatever the chain does, the draft pass blocks 2..blocks, the heads
    1..blocks; each block pass reads its weights and its sliding window."""
    if blocks == 0:
        return 0
    window = c["kv_mtp_block"] * min(1.0, context / 512)
    passes = max(depth or blocks, blocks) + blocks - 1
    return passes * (c["mtp_body"] + window) + blocks * c["mtp_head"]


def bytes_per_token(c, overlap, steps, corr=True, context=0, depth=None, kv=None):
    """Real-model bytes per generated token for measured steps {(drafts verified, MTP blocks
    run, drafts accepted): count} (see SpecStats.steps) of a run at a fixed `depth` (None: each
    step's blocks run, a lower bound when the gate cut chains)."""
    total = sum(
        k * (pass_bytes(c, overlap, n + 1, corr, context, kv) + draft_bytes(c, b, depth, context))
        for (n, b, _), k in steps.items()
    )
    return total / sum(k * (a + 1) for (_, _, a), k in steps.items())


def demo_overlap(max_m=4):
    """Distinct experts touched by m consecutive tokens of real text on the demo model,
    relative to independent routing (1.0 = as if independent)."""
    from mlx_step35 import load
    from mlx_step35.model import MoEGate

    model, tok = load(demo_model())
    picks = []
    orig = MoEGate.__call__

    def spy(self, x):
        idx, w = orig(self, x)
        picks.append(idx)
        return idx, w

    text = open(ROOT / "mlx_step35" / "speculative.py").read()[:4000]
    ids = mx.array([tok.encode(text)])
    MoEGate.__call__ = spy
    try:
        model(ids)
    finally:
        MoEGate.__call__ = orig
    E, k = model.args.moe_num_experts, model.args.moe_top_k
    out = {}
    for m in range(1, max_m + 1):
        counts = []
        for idx in picks:  # [1, L, k] per MoE layer
            rows = idx[0].tolist()
            counts += [len({e for r in rows[s : s + m] for e in r}) for s in range(0, len(rows) - m, m)]
        measured = sum(counts) / len(counts)
        out[m] = (measured - k) / (distinct_independent(E, k, m) - k) if m > 1 else 1.0
    return out, E, k


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--acceptance",
        default="0.9,0.8,0.7",
        help="conditional acceptance at depths 1,2,3 (default: assumed 0.9,0.8,0.7)",
    )
    ap.add_argument("--context", type=int, default=0, help="tokens of context already in the KV cache")
    ap.add_argument("--kv-bits", type=int, default=None, help="quantized full-attention KV (default 16-bit)")
    ap.add_argument("--kv-group-size", type=int, default=KV_GROUP_SIZE)
    ap.add_argument("--quantized-kv-start", type=int, default=QUANTIZED_KV_START)
    ap.add_argument(
        "--batch-table",
        action="store_true",
        help="the batch engine: 1, 2, 4, 8 rows per pass, plain or depth 2, at 1K and 32K tokens per row",
    )
    ap.add_argument(
        "--kv-table",
        action="store_true",
        help="bytes and tokens/s per token at 32K and 128K of context, 16/8/4-bit KV, depths 0-3",
    )
    a = ap.parse_args()
    kvq = None if a.kv_bits is None else KVQuant(a.kv_bits, a.kv_group_size, a.quantized_kv_start)
    acc = [float(x) for x in a.acceptance.split(",")]
    c = components()
    overlap, dE, dk = demo_overlap()

    def verify_bytes(m, corr, context=a.context, kv=kvq):
        return pass_bytes(c, overlap, m, corr, context, kv)

    G = 1e9
    if a.batch_table:
        return batch_table(c, overlap, acc, kvq)
    if a.kv_table:
        drafting = lambda n, context, depth=None: draft_bytes(c, n, depth, context)  # noqa: E731
        return kv_table(acc, verify_bytes, drafting, a.kv_group_size, a.quantized_kv_start)
    print(
        f"Real model, 4-bit recipe: dense+attention {c['dense'] / G:.2f} GB, lm_head {c['lm_head'] / G:.2f} GB, "
        f"one expert {c['expert_each'] / 1e6:.2f} MB x {c['k']} of {c['E']} in {c['n_moe']} MoE layers, "
        f"MTP block body {c['mtp_body'] / G:.2f} GB + head {c['mtp_head'] / G:.2f} GB; context {a.context}"
    )
    print(
        f"Demo model ({dE} experts, top-{dk}): distinct experts of m consecutive tokens beyond the first "
        "token's, relative to independent routing: "
        + ", ".join(f"m={m}: {v:.2f}" for m, v in overlap.items())
    )
    eff = LLAMA_CPP_M4_MAX * verify_bytes(1, False, 0) / MACS["M4 Max (546 GB/s)"]
    print(
        f"Bytes per token, plain decoding: {verify_bytes(1, False) / G:.2f} GB at this context, "
        f"{verify_bytes(1, False, 0) / G:.2f} GB at empty context; efficiency implied by llama.cpp's "
        f"{LLAMA_CPP_M4_MAX:.0f} tok/s on M4 Max at empty context: {eff:.0%} of peak bandwidth"
    )
    print(f"\nAcceptance assumed per depth: {acc}\n")
    header = (
        "| depth | tokens/step | verify GB (indep. / corr.) | GB per token (indep. / corr.) | "
        + " | ".join(MACS)
        + " |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in range(0, 4):
        E_n, p = 1.0, 1.0
        for j in range(n):
            p *= acc[j]
            E_n += p
        vi, vc = verify_bytes(n + 1, False), verify_bytes(n + 1, True)
        d = draft_bytes(c, n, context=a.context)
        ti, tc = (vi + d) / E_n, (vc + d) / E_n
        speeds = " | ".join(f"{eff * bw / ti:.0f}-{eff * bw / tc:.0f} tok/s" for bw in MACS.values())
        print(f"| {n} | {E_n:.2f} | {vi / G:.2f} / {vc / G:.2f} | {ti / G:.2f} / {tc / G:.2f} | {speeds} |")


def tokens_per_step(acc, n):
    total, p = 1.0, 1.0
    for j in range(n):
        p *= acc[j]
        total += p
    return total


def kv_table(acc, verify_bytes, draft_bytes, group, start):
    """Bytes read per generated token (independent / correlated routing) and projected tok/s on
    an M4 Max, at 32K and 128K tokens of context, 16/8/4-bit full-attention KV, depths 0-3;
    then the goal at 32K (8-bit KV, depth 2 vs plain 16-bit) and what it would take."""
    G = 1e9
    eff = LLAMA_CPP_M4_MAX * verify_bytes(1, False, 0, None) / MACS["M4 Max (546 GB/s)"]
    print(
        f"Projection (not a measurement): real model, 4-bit weights, acceptance {acc}, KV quantized "
        f"from position {start} (group {group}); M4 Max 546 GB/s at {eff:.0%} efficiency (llama.cpp-calibrated)\n"
    )
    print("| context | KV | depth | GB read per token (indep. / corr.) | M4 Max tok/s (indep. / corr.) |")
    print("|---|---|---|---|---|")

    def per_token(context, kv, n, acc=acc):
        E_n = tokens_per_step(acc, n)
        d = draft_bytes(n, context)
        return tuple((verify_bytes(n + 1, corr, context, kv) + d) / E_n for corr in (False, True))

    for context in (32768, 131072):
        for bits in (None, 8, 4):
            kv = None if bits is None else KVQuant(bits, group, start)
            for n in range(4):
                ti, tc = per_token(context, kv, n)
                bw = eff * MACS["M4 Max (546 GB/s)"]
                print(
                    f"| {context // 1024}K | {bits or 16}-bit | {n} | {ti / G:.2f} / {tc / G:.2f} | "
                    f"{bw / ti:.0f} / {bw / tc:.0f} |"
                )
    ctx, kv8 = 32768, KVQuant(8, group, start)
    base = per_token(ctx, None, 0)
    goal = per_token(ctx, kv8, 2)
    ratios = [b / g for b, g in zip(base, goal)]
    print(
        f"\nGoal check at 32K: plain 16-bit decoding reads {base[0] / G:.2f} GB per token; 8-bit KV with "
        f"depth-2 drafting {goal[0] / G:.2f} / {goal[1] / G:.2f} GB: {ratios[0]:.3f}x / {ratios[1]:.3f}x fewer "
        f"bytes (indep. / corr. routing); the goal (>= 1.6x) "
        + (
            "holds"
            if min(ratios) >= 1.6
            else "holds with correlated routing only"
            if max(ratios) >= 1.6
            else "does not hold"
        )
    )
    # An oracle gate: the chain stops exactly before the first draft the trunk would reject (a
    # block must run for its confidence to be known); no accepted draft is lost.
    a1, a2 = acc[0], acc[1]
    cases = [(1 - a1, 0, 1), (a1 * (1 - a2), 1, 2), (a1 * a2, 2, 2)]  # (probability, kept, blocks run)
    oracle = [
        sum(p * (verify_bytes(k + 1, corr, ctx, kv8) + draft_bytes(b, ctx, 2)) for p, k, b in cases)
        / tokens_per_step(acc, 2)
        for corr in (False, True)
    ]
    print(
        f"An oracle confidence gate at depth 2 (cuts every draft the trunk rejects, keeps every other; "
        f"an upper bound for any gate): {oracle[0] / G:.2f} / {oracle[1] / G:.2f} GB, "
        f"{base[0] / oracle[0]:.3f}x / {base[1] / oracle[1]:.3f}x"
    )
    for i, corr in enumerate(("independent", "correlated")):
        lo, hi = 0.0, 1.0  # the acceptance, the same at depths 1 and 2, at which depth 2 reaches 1.6x
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if base[i] / per_token(ctx, kv8, 2, [mid, mid])[i] >= 1.6 else (mid, hi)
        print(f"Acceptance needed at depths 1 and 2 for 1.6x without a gate ({corr} routing): {hi:.3f}")


def batch_pass_bytes(c, overlap, rows, corr, context, kv=None):
    """Bytes one packed pass of the batch engine reads for `rows` (each a row's tokens in the
    pass: 1 plain, n+1 verifying n drafts), each at `context` tokens: dense weights once, the
    union of the experts all tokens route to, every row's KV, and each row's drafting (the
    engine drafts row by row: MTP bytes per drafting row). Routing: independent over all
    tokens, or (corr.) each row's tokens overlapping as the demo measured within a sequence and
    the rows independent of each other."""
    E, k = c["E"], c["k"]
    if corr:
        per_row = [k + (distinct_independent(E, k, m) - k) * overlap[m] for m in rows]
        miss = 1.0
        for d in per_row:
            miss *= 1 - d / E
        experts = E * (1 - miss)
    else:
        experts = distinct_independent(E, k, sum(rows))
    drafts = sum(draft_bytes(c, m - 1) for m in rows)
    return (
        c["dense"]
        + c["lm_head"]
        + len(rows) * kv_bytes(c, context, kv)
        + c["n_moe"] * experts * c["expert_each"]
        + drafts
    )


def batch_table(c, overlap, acc, kv=None, sizes=(1, 2, 4, 8), depth=2):
    """The batch engine on the real model: per pass, bytes read and tokens produced for 1-8
    rows, all plain or all drafting at `depth` with acceptance `acc`, at 1K and 32K tokens of
    context per row; aggregate tokens/s = efficiency x bandwidth x tokens per pass / bytes."""
    G = 1e9
    eff = LLAMA_CPP_M4_MAX * pass_bytes(c, overlap, 1, False) / MACS["M4 Max (546 GB/s)"]
    macs = {m: bw for m, bw in MACS.items() if not m.startswith("M3 Max")}
    per_row = tokens_per_step(acc, depth)
    print(
        f"Projection (not a measurement): real model, 4-bit weights, {'16-bit' if kv is None else f'{kv.bits}-bit'} "
        f"KV; depth-{depth} rows at acceptance {acc} ({per_row:.2f} tokens per pass each), drafts run row by "
        f"row; efficiency {eff:.0%} of peak bandwidth (llama.cpp-calibrated, as above); routing independent / "
        "correlated within a row\n"
    )
    print(
        "| context per row | rows | each row | tokens per pass | GB per pass (indep. / corr.) | "
        + " | ".join(f"{m} aggregate tok/s" for m in macs)
        + " | per row, M4 Max |"
    )
    print("|---|---|---|---|---|" + "---|" * len(macs) + "---|")
    for context in (1024, 32768):
        for mode, m, tokens in (("plain", 1, 1.0), (f"depth {depth}", depth + 1, per_row)):
            for b in sizes:
                gb = [batch_pass_bytes(c, overlap, [m] * b, corr, context, kv) for corr in (False, True)]
                tps = {name: [eff * bw * b * tokens / x for x in gb] for name, bw in macs.items()}
                speeds = " | ".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in tps.values())
                m4 = tps["M4 Max (546 GB/s)"]
                print(
                    f"| {context // 1024}K | {b} | {mode} | {b * tokens:.2f} | {gb[0] / G:.2f} / {gb[1] / G:.2f} | "
                    f"{speeds} | {m4[0] / b:.0f}-{m4[1] / b:.0f} |"
                )


if __name__ == "__main__":
    main()
