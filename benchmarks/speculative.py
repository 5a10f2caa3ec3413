"""Benchmark 2: MTP speculative decoding on the bundled demo model, greedy and sampled.

For plain decoding, --num-draft 1/2/3 and auto: accepted tokens per verify step, acceptance
per depth, trunk forward passes per generated token, and decode speed relative to plain
decoding. Every (prompt, round) runs all modes back to back in rotating order; the
speed ratio is taken within that group, then the median over groups is reported with a
95% bootstrap interval. Mode `plain-again` is plain decoding once more: an A/A control
that shows how far apart two identical runs land on this machine.

    python benchmarks/speculative.py [--rounds 3] [--gen-tokens 128] [--model PATH]
        [--modes plain,1,2,3,auto] (or plain-again,auto)
"""

import argparse
import time

import mlx.core as mx
from common import PROMPTS, demo_model, interval, median

from mlx_step35 import load, make_sampler
from mlx_step35.cache import rewind
from mlx_step35.generation import build_prompt, generate_step
from mlx_step35.speculative import SpecStats

ALL_MODES = [("plain", None), ("plain-again", None), ("1", 1), ("2", 2), ("3", 3), ("auto", "auto")]
MODES = ALL_MODES


def one(model, prompt, n_gen, sampler, num_draft, seed):
    mx.random.seed(seed)
    stats = SpecStats()
    kw = dict(draft_mtp=num_draft is not None, num_draft=num_draft or 1, stats=stats)
    gen = generate_step(model, prompt, max_tokens=n_gen, sampler=sampler, **kw)
    next(gen)  # prefill + first token: not part of the decode timing
    tic = time.perf_counter()
    n = 1 + sum(1 for _ in gen)
    seconds = time.perf_counter() - tic
    return (n - 1) / seconds, stats, n


def bench(model, tokenizer, sampler, rounds, n_gen):
    prompts = [build_prompt(tokenizer, p, chat_template=False) for p in PROMPTS]
    for p in prompts[:1]:  # warm-up
        for _, nd in MODES:
            one(model, p, 16, sampler, nd, 0)
    speed = {m: [] for m, _ in MODES}
    ratio = {m: [] for m, _ in MODES}
    agg = {m: SpecStats() for m, _ in MODES}
    tokens = {m: 0 for m, _ in MODES}
    for r in range(rounds):
        for i, p in enumerate(prompts):
            k = (r * len(prompts) + i) % len(MODES)
            group = {}
            for name, nd in MODES[k:] + MODES[:k]:
                tps, st, n = one(model, p, n_gen, sampler, nd, seed=1000 * r + i)
                group[name] = tps
                speed[name].append(tps)
                agg[name].merge(st)
                tokens[name] += n - 1
            for name in group:
                ratio[name].append(group[name] / group["plain"])
    return speed, ratio, agg, tokens


def pass_cost(model, tokenizer, reps=30):
    """Median seconds of one trunk pass (hidden states + logits, evaluated) over m = 1..4
    tokens after a 64-token context: what a verify step at depth m-1 costs in the trunk."""
    prompt = build_prompt(tokenizer, PROMPTS[0], chat_template=False)
    ctx = mx.array((prompt * 64)[:64], dtype=mx.int32)[None]
    cache = model.make_cache(slack=4)
    mx.eval(model.hidden(ctx, cache))
    out = {}
    for m in range(1, 5):
        times = []
        for _ in range(reps + 3):
            tic = time.perf_counter()
            mx.eval(model.logits(model.hidden(ctx[:, :m], cache)))
            times.append(time.perf_counter() - tic)
            rewind(cache, m)
        out[m] = median(times[3:])
    return out


def table(label, speed, ratio, agg, tokens):
    print(f"\n{label}\n")
    print(
        "| mode | decode tok/s (median) | speed vs plain (median ratio) | 95% interval | "
        "tokens per trunk pass | trunk passes per token | steps drafting / plain | acceptance by depth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, _ in MODES:
        a = agg[name]
        # plain decoding counts no steps: each of its tokens is one plain pass
        plain_steps = a.plain_tokens if a.verify_steps + a.plain_tokens else tokens[name]
        per_pass = tokens[name] / (a.verify_steps + plain_steps)
        acc = ", ".join(f"{x:.0%}" for x in a.acceptance) or "-"
        lo, hi = interval(ratio[name])
        print(
            f"| {name} | {median(speed[name]):.1f} | {median(ratio[name]):.3f} | {lo:.3f}-{hi:.3f} | "
            f"{per_pass:.2f} | {1 / per_pass:.3f} | {a.verify_steps} / {plain_steps} | {acc} |"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument(
        "--modes",
        default="plain,plain-again,1,2,3,auto",
        help="comma-separated subset (plain is always run)",
    )
    a = ap.parse_args()
    global MODES
    wanted = set(a.modes.split(",")) | {"plain"}
    MODES = [m for m in ALL_MODES if m[0] in wanted]
    model, tokenizer = load(a.model or demo_model())
    print(
        f"model: {a.model or 'bundled demo'}; {len(PROMPTS)} prompts x {a.rounds} rounds, "
        f"{a.gen_tokens} tokens each"
    )
    cost = pass_cost(model, tokenizer)
    print(
        "trunk pass over m tokens (not pipelined; median ms, and x the 1-token pass): "
        + ", ".join(f"m={m}: {t * 1e3:.1f} ({t / cost[1]:.2f}x)" for m, t in cost.items())
    )
    for label, sampler in (
        ("greedy", make_sampler()),
        ("sampled (temp 0.7, top-p 0.95)", make_sampler(0.7, 0.95)),
    ):
        table(label, *bench(model, tokenizer, sampler, a.rounds, a.gen_tokens))


if __name__ == "__main__":
    main()
