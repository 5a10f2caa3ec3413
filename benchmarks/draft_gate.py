"""Benchmark 11: the MTP confidence gate on the demo model (float32), greedy and sampled.

For num_draft=3 (--depth) ungated and gated by each rule (a signal `speculative.confidence` reads:
the block's top probability "own", top-1 minus top-2 "margin", exp(-entropy) "entropy", the
chain's running product "product"; and a threshold for every block or one per block, written
a/b/c: 0 leaves that block ungated): rejected drafts per generated token, tokens per trunk pass, the
share of steps the gate cut, and the real model's bytes per token under the bandwidth
model of benchmark 3, from the runs' per-step (drafts verified, MTP blocks run, accepted).
Then what num_draft="auto" with a learnt gate chooses when step costs follow that
bandwidth model (a Mac-like cost: a step costs its bytes) instead of this CPU's clock.
Counts only: nothing here is timed, so the machine's load does not matter.

    python benchmarks/draft_gate.py [--gen-tokens 96] [--gates own:0.15,margin:0/0/0.12]
        [--regimes greedy,sampled] [--seeds 2] [--auto-tokens 192] [--sets test,held-out]
    python benchmarks/draft_gate.py --depth 2 --context 32768 --kv-bits 8 --regimes greedy \
        --gates own:0.1,own:0.15,own:0.2 --sets test --auto-tokens 0   # section 15's goal, measured steps

The GB column counts every step's commit pass over all `--depth` blocks (a gated chain runs
fewer draft passes, not fewer commits).

Prompt sets: "test", the code prompts of benchmarks/common.py (section 14's); "held-out", six
more of the same kind that no threshold was chosen on; "tune", six more that the thresholds
were chosen on (with benchmarks/gate_replay.py).
"""

import argparse
from collections import Counter

import mlx.core as mx
from bandwidth import bytes_per_token, components, demo_overlap, draft_bytes, pass_bytes
from common import PROMPTS, demo_model

from mlx_step35 import load, make_sampler, speculative
from mlx_step35.cache import KVQuant, kv_name
from mlx_step35.draft_policy import AutoDraft
from mlx_step35.generation import GATE_DEFAULT, build_prompt, generate_step
from mlx_step35.speculative import SpecStats

SAMPLED = dict(temp=0.7, top_p=0.95)
HELD_OUT = [
    "def merge_sort(items):",
    "import json\nimport logging\n\nlogger = logging.getLogger(__name__)\n\n\ndef load(path):",
    'class Queue:\n    """A first-in first-out queue."""\n\n    def __init__(self, maxsize=0):',
    "    def __len__(self):",
    "try:\n    import threading\nexcept ImportError:",
    "if __name__ == '__main__':",
]
TUNE = [
    "def binary_search(items, target):",
    "import re\n\n\ndef tokenize(text):",
    "class Node:\n    def __init__(self, value, next=None):",
    "    def __eq__(self, other):",
    "with open(filename) as f:",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
]
SETS = {"test": PROMPTS, "held-out": HELD_OUT, "tune": TUNE}
GATES = "default,own:0.15,margin:0/0/0.12,own:0.15/0.15/0.3"


def parse_gate(text):
    """'default', or 'signal:t' or 'signal:t1/t2/t3' -> (rule or None for the default, threshold)."""
    if text == "default":
        return None, GATE_DEFAULT
    signal, _, limits = text.partition(":")
    if signal not in speculative.SIGNALS or not limits:
        raise SystemExit(
            f"--gates: expected 'default' or signal:threshold(s) with a signal of {speculative.SIGNALS}, "
            f"got {text!r}"
        )
    limits = tuple(float(t) for t in limits.split("/"))
    top = max(limits)  # passed as generate_step takes it: one number, per-block factors in the rule
    return (signal, tuple(t / top for t in limits) if top else (1.0,)), top


def run(model, prompts, n_gen, sampler, rule, gate, seeds, depth=3):
    """`rule` (signal, per-block factors) for both regimes, or None: speculative.GATE_RULES as it is."""
    saved = speculative.GATE_RULES
    if rule is not None:
        speculative.GATE_RULES = {"greedy": rule, "sampled": rule}
    stats, tokens = SpecStats(), 0
    try:
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
    finally:
        speculative.GATE_RULES = saved
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
    ap.add_argument(
        "--gates",
        default=GATES,
        help="comma-separated: default (GATE_DEFAULT under GATE_RULES), signal:t, signal:t1/t2/t3",
    )
    ap.add_argument("--sets", default="test,held-out", help=f"prompt sets, of {sorted(SETS)}")
    ap.add_argument("--seeds", type=int, default=2, help="sampled runs per prompt")
    ap.add_argument(
        "--first-seed", type=int, default=0, help="sampled seeds: first-seed .. first-seed + seeds - 1"
    )
    ap.add_argument("--auto-tokens", type=int, default=192, help="0: skip the auto runs")
    ap.add_argument("--regimes", default="greedy,sampled")
    ap.add_argument("--depth", type=int, default=3, help="num_draft of the gated and ungated runs")
    ap.add_argument("--context", type=int, default=0, help="real-model context for the GB column")
    ap.add_argument("--kv-bits", type=int, default=None, help="full-attention KV bits for the GB column")
    a = ap.parse_args()
    kv = None if a.kv_bits is None else KVQuant(a.kv_bits)
    configs = [("ungated", ("own", (1.0,)), 0.0)] + [(g, *parse_gate(g)) for g in a.gates.split(",") if g]
    model, tokenizer = load(demo_model(), dtype="float32")
    c = components()
    overlap, _, _ = demo_overlap()
    G = 1e9
    print(f"demo model, float32; {a.gen_tokens} tokens per prompt; num_draft={a.depth}")
    plain = pass_bytes(c, overlap, 1, True, a.context) / G
    print(
        f"real model, plain decoding with 16-bit KV: {plain:.2f} GB per token (4-bit, context {a.context}); "
        f"the GB column: KV {kv_name(kv)}, each step's commit pass over all {a.depth} blocks"
    )
    regimes = {
        "greedy": ("greedy", make_sampler(), [0]),
        "sampled": (
            f"sampled (temp {SAMPLED['temp']}, top-p {SAMPLED['top_p']}, {a.seeds} seeds)",
            make_sampler(**SAMPLED),
            range(a.first_seed, a.first_seed + a.seeds),
        ),
    }
    for set_name in a.sets.split(","):
        prompts = [build_prompt(tokenizer, p, chat_template=False) for p in SETS[set_name]]
        for label, sampler, seeds in (regimes[r] for r in a.regimes.split(",")):
            print(f"\n{set_name} prompts ({len(prompts)}), {label}\n")
            print(
                "| gate | rejected drafts per token | vs ungated | tokens per trunk pass | vs ungated | "
                "steps cut by the gate | drafts per step | real-model GB per token (corr.) | vs ungated |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            base = None
            for name, rule, gate in configs:
                st, tok = run(model, prompts, a.gen_tokens, sampler, rule, gate, seeds, a.depth)
                rej, per_pass = st.rejected / tok, tok / st.verify_steps
                gb = bytes_per_token(c, overlap, st.steps, True, a.context, a.depth, kv) / G
                base = base or (rej, per_pass, gb)
                if rule is None:
                    signal, factors = speculative.gate_rule(sampler)
                    limits = "/".join(f"{GATE_DEFAULT * f:g}" for f in factors)
                    name = f"**default: {signal}:{limits}**"
                print(
                    f"| {name} | {rej:.3f} | {rej / base[0]:.2f}x | {per_pass:.2f} | {per_pass / base[1]:.3f}x | "
                    f"{st.gated}/{st.verify_steps} | {sum(st.drafted) / st.verify_steps:.2f} | {gb:.2f} | "
                    f"{gb / base[2]:.3f}x ({plain / gb:.3f}x fewer than plain) |",
                    flush=True,
                )
    if not a.auto_tokens:
        return
    prompts = [build_prompt(tokenizer, p, chat_template=False) for p in PROMPTS[:3]]
    for label, sampler, seeds in (regimes[r] for r in a.regimes.split(",")):
        choices, st, tok = mac_auto(model, prompts, a.auto_tokens, sampler, c, overlap, list(seeds)[:1])
        total = sum(choices.values()) or 1
        picks = ", ".join(f"depth {n} gate {t:g}: {k / total:.0%}" for (n, t), k in choices.most_common(6))
        print(
            f"\n{label}: auto under the bandwidth cost model ({len(prompts)} test prompts x {a.auto_tokens} "
            f"tokens): {picks or 'never drafted'}; tokens per pass "
            f"{tok / max(1, st.verify_steps + st.plain_tokens):.2f}, rejected per token {st.rejected / tok:.3f}, "
            f"steps cut {st.gated}/{st.verify_steps}, GB per token "
            f"{bytes_per_token(c, overlap, st.steps) / G if st.steps else float('nan'):.2f} (drafting steps only)"
        )


if __name__ == "__main__":
    main()
