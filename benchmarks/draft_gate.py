"""Benchmark 11: the MTP confidence gate on the demo model (float32), greedy and sampled.

For num_draft=3 (--depth) ungated and gated at each threshold (the block's own confidence, and the
chain's running product): rejected drafts per generated token, tokens per trunk pass, the
share of steps the gate cut, and the real model's bytes per token under the bandwidth
model of benchmark 3, from the runs' per-step (drafts verified, MTP blocks run, accepted).
Then what num_draft="auto" with a learnt gate chooses when step costs follow that
bandwidth model (a Mac-like cost: a step costs its bytes) instead of this CPU's clock.
Counts only: nothing here is timed, so the machine's load does not matter.

    python benchmarks/draft_gate.py [--gen-tokens 96] [--own 0.05,0.1,0.2] [--product 0.05,0.1]
        [--regimes greedy,sampled] [--seeds 2] [--auto-tokens 192]
    python benchmarks/draft_gate.py --depth 2 --context 32768 --kv-bits 8 --regimes greedy \
        --own 0.1,0.15,0.2 --product "" --auto-tokens 0   # section 15's goal with measured steps

The GB column counts every step's commit pass over all `--depth` blocks (a gated chain runs
fewer draft passes, not fewer commits).
"""

import argparse
from collections import Counter

import mlx.core as mx
from bandwidth import bytes_per_token, components, demo_overlap, draft_bytes, pass_bytes
from common import PROMPTS, demo_model

from mlx_step35 import load, make_sampler, speculative
from mlx_step35.cache import KVQuant, kv_name
from mlx_step35.draft_policy import AutoDraft
from mlx_step35.generation import build_prompt, generate_step
from mlx_step35.speculative import SpecStats

SAMPLED = dict(temp=0.7, top_p=0.95)


def run(model, prompts, n_gen, sampler, gate, mode, seeds, depth=3):
    speculative.GATE = mode
    stats, tokens = SpecStats(), 0
    for seed in seeds:
        for p in prompts:
            mx.random.seed(seed)
            gen = generate_step(
                model,
                p,
                max_tokens=n_gen,
                sampler=sampler,
                draft_mtp=True,
                num_draft=depth,
                stats=stats,
                draft_min_confidence=gate,
            )
            tokens += sum(1 for _ in gen) - 1  # the first token comes from the prefill
    speculative.GATE = "own"
    return stats, tokens


def mac_auto(model, prompts, n_gen, sampler, c, overlap, seeds):
    """num_draft=auto, gate auto, with step costs in bytes (relative to a plain step) times the
    measured plain step time; returns the (depth, threshold) choices and the stats."""
    plain = pass_bytes(c, overlap, 1, True)
    ratio = lambda n: (pass_bytes(c, overlap, n + 1, True) + draft_bytes(c, n)) / plain  # noqa: E731
    saved = AutoDraft.cost, AutoDraft.choose
    choices = Counter()

    def choose(self):
        n = saved[1](self)
        if n:
            choices[(n, self.min_confidence)] += 1
        return n

    AutoDraft.cost = lambda self, n: self.c1 * ratio(n)
    AutoDraft.choose = choose
    try:
        stats, tokens = SpecStats(), 0
        for seed in seeds:
            for p in prompts:
                mx.random.seed(seed)
                gen = generate_step(model, p, max_tokens=n_gen, sampler=sampler, draft_mtp=True, stats=stats)
                tokens += sum(1 for _ in gen) - 1
    finally:
        AutoDraft.cost, AutoDraft.choose = saved
    return choices, stats, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--own", default="0.05,0.1,0.15,0.2,0.3")
    ap.add_argument("--product", default="0.05,0.1,0.15")
    ap.add_argument("--seeds", type=int, default=2, help="sampled runs per prompt")
    ap.add_argument("--auto-tokens", type=int, default=192, help="0: skip the auto runs")
    ap.add_argument("--regimes", default="greedy,sampled")
    ap.add_argument("--depth", type=int, default=3, help="num_draft of the gated and ungated runs")
    ap.add_argument("--context", type=int, default=0, help="real-model context for the GB column")
    ap.add_argument("--kv-bits", type=int, default=None, help="full-attention KV bits for the GB column")
    a = ap.parse_args()
    kv = None if a.kv_bits is None else KVQuant(a.kv_bits)
    model, tokenizer = load(demo_model(), dtype="float32")
    prompts = [build_prompt(tokenizer, p, chat_template=False) for p in PROMPTS]
    c = components()
    overlap, _, _ = demo_overlap()
    G = 1e9
    print(f"demo model, float32; {len(prompts)} prompts x {a.gen_tokens} tokens; num_draft={a.depth}")
    plain = pass_bytes(c, overlap, 1, True, a.context) / G
    print(
        f"real model, plain decoding with 16-bit KV: {plain:.2f} GB per token (4-bit, context {a.context}); "
        f"the GB column: KV {kv_name(kv)}, each step's commit pass over all {a.depth} blocks"
    )
    configs = [("ungated", 0.0, "own")]
    configs += [(f"own >= {t}", float(t), "own") for t in a.own.split(",") if t]
    configs += [(f"product >= {t}", float(t), "product") for t in a.product.split(",") if t]
    regimes = {
        "greedy": ("greedy", make_sampler(), [0]),
        "sampled": (
            f"sampled (temp {SAMPLED['temp']}, top-p {SAMPLED['top_p']}, {a.seeds} seeds)",
            make_sampler(**SAMPLED),
            range(a.seeds),
        ),
    }
    for label, sampler, seeds in (regimes[r] for r in a.regimes.split(",")):
        print(f"\n{label}\n")
        print(
            "| gate | rejected drafts per token | vs ungated | tokens per trunk pass | vs ungated | "
            "steps cut by the gate | drafts per step | real-model GB per token (corr.) | vs ungated |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        base = None
        for name, gate, mode in configs:
            st, tok = run(model, prompts, a.gen_tokens, sampler, gate, mode, seeds, a.depth)
            rej, per_pass = st.rejected / tok, tok / st.verify_steps
            gb = bytes_per_token(c, overlap, st.steps, True, a.context, a.depth, kv) / G
            base = base or (rej, per_pass, gb)
            print(
                f"| {name} | {rej:.3f} | {rej / base[0]:.2f}x | {per_pass:.2f} | {per_pass / base[1]:.3f}x | "
                f"{st.gated}/{st.verify_steps} | {sum(st.drafted) / st.verify_steps:.2f} | {gb:.2f} | "
                f"{gb / base[2]:.3f}x ({plain / gb:.3f}x fewer than plain) |",
                flush=True,
            )
        if not a.auto_tokens:
            continue
        choices, st, tok = mac_auto(model, prompts[:3], a.auto_tokens, sampler, c, overlap, list(seeds)[:1])
        total = sum(choices.values()) or 1
        picks = ", ".join(f"depth {n} gate {t:g}: {k / total:.0%}" for (n, t), k in choices.most_common(6))
        print(
            f"\nauto under the bandwidth cost model ({len(prompts[:3])} prompts x {a.auto_tokens} tokens): "
            f"{picks or 'never drafted'}; tokens per pass {tok / max(1, st.verify_steps + st.plain_tokens):.2f}, "
            f"rejected per token {st.rejected / tok:.3f}, steps cut {st.gated}/{st.verify_steps}, "
            f"GB per token {bytes_per_token(c, overlap, st.steps) / G if st.steps else float('nan'):.2f} "
            f"(drafting steps only)"
        )


if __name__ == "__main__":
    main()
