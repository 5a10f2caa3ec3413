"""Greedy draft-gate rules replayed offline, exactly: how section 14's per-block thresholds were searched.

In float32 greedy drafting emits plain decoding's tokens, and the MTP chain at a position
depends only on the verified tokens before it; so one plain decode, with the ungated depth-3
chain recorded at every position (each block's distribution, and whether its draft equals
the next tokens of the decode), lets any rule that reads those distributions be replayed
step by step as `generate_step` would run it: the same steps, drafts and acceptances as a
real gated run (checked: the ungated and own >= 0.1 / 0.15 / 0.2 rows of section 14 come
out identical). Sampled runs cannot be replayed this way (where a step starts depends on the
random acceptances), so draft_gate.py measures them.

    python benchmarks/gate_replay.py [--set tune] [--gen-tokens 96] [--min-tokens-per-pass 0.97]
"""

import argparse
import itertools

import mlx.core as mx
import numpy as np
from common import demo_model
from draft_gate import SETS

from mlx_step35 import load, make_sampler, speculative
from mlx_step35.cache import rewind
from mlx_step35.generation import build_prompt, verify_step
from mlx_step35.speculative import MTPDrafter

GRID = (0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)


def record(model, prompt, n_gen):
    """Greedy: [positions, 3 blocks, (top-1, top-2, exp(-entropy), accepted)] and the tokens."""
    seen = []
    original = speculative.confidence

    def spy(dist, lp, sampler, chain, signal="own"):
        seen.append(mx.softmax(lp, axis=-1))
        return original(dist, lp, sampler, chain, signal)

    greedy = make_sampler()
    cache, drafter = model.make_cache(slack=4), MTPDrafter(model, 4)
    h = model.hidden(mx.array([prompt]), cache)
    drafter.add_trunk(h)
    tokens = list(prompt) + [int(model.logits(h[:, -1:]).argmax().item())]
    rows = []
    speculative.confidence = spy
    try:
        for _ in range(n_gen - 1):
            seen.clear()
            drafts, _, _ = drafter.draft(tokens, 3, greedy)
            _, lp = verify_step(model, tokens, drafts, cache)
            rewind(cache, drafts.shape[0] + 1)
            hits = [float(d == t) for d, t in zip(drafts.tolist(), lp.argmax(axis=-1).tolist())]
            rows.append([_signals(q) + [a] for q, a in zip(seen, hits)])
            h, lp = verify_step(model, tokens, mx.array([], dtype=mx.int32), cache)
            drafter.add_trunk(h)
            tokens.append(int(lp[0].argmax().item()))
    finally:
        speculative.confidence = original
    return np.array(rows), tokens[len(prompt) :]


def _signals(q):
    top2 = np.sort(np.array(q[0]))[-2:]
    ent = -(np.array(q[0]) * np.log(np.maximum(np.array(q[0]), 1e-30))).sum()
    return [float(top2[1]), float(top2[0]), float(np.exp(-ent))]


def signal(rec, name):
    """[positions, 3] gate signal of a rule ("product": greedy, the product of the tops so far)."""
    top1, top2, expent = rec[..., 0], rec[..., 1], rec[..., 2]
    return {"own": top1, "margin": top1 - top2, "entropy": expent, "product": np.cumprod(top1, -1)}[name]


def replay(recs, name, limits):
    """(rejected drafts per token, tokens per trunk pass) of num_draft=3 gated at per-block `limits`."""
    tokens = rejected = steps = 0
    for rec in recs:
        sig, hit = signal(rec, name), rec[..., 3]
        n = rec.shape[0] + 1  # tokens generated, the first from the prefill
        P, out = 0, 1
        while out < n:
            depth = min(3, n - out - 1)
            kept = next((k for k in range(depth) if sig[P, k] < limits[k]), depth)
            acc = next((k for k in range(kept) if hit[P, k] < 0.5), kept)
            steps, tokens, rejected = steps + 1, tokens + acc + 1, rejected + kept - acc
            P, out = P + acc + 1, out + acc + 1
    return rejected / tokens, tokens / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="tune", choices=sorted(SETS))
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--min-tokens-per-pass", type=float, default=0.97, help="vs ungated")
    a = ap.parse_args()
    model, tokenizer = load(demo_model(), dtype="float32")
    recs = []
    for p in SETS[a.set]:
        rec, _ = record(model, build_prompt(tokenizer, p, chat_template=False), a.gen_tokens)
        recs.append(rec)
    print(f"{a.set} prompts, greedy, demo float32, {a.gen_tokens} tokens: per signal, the per-block")
    print(
        f"thresholds (grid {GRID}) with the fewest rejected drafts at >= {a.min_tokens_per_pass}x tokens per pass\n"
    )
    print(
        "| signal | thresholds (block 1/2/3) | rejected per token vs ungated | tokens per pass vs ungated |"
    )
    print("|---|---|---|---|")
    for name in ("own", "margin", "entropy", "product"):
        base = replay(recs, name, (0, 0, 0))
        rows = []
        for limits in itertools.product(GRID, repeat=3):
            rej, per_pass = replay(recs, name, limits)
            if per_pass >= a.min_tokens_per_pass * base[1]:
                rows.append((rej / base[0], per_pass / base[1], limits))
        for rej, per_pass, limits in sorted(rows)[:3]:
            print(f"| {name} | {'/'.join(f'{t:g}' for t in limits)} | {rej:.3f}x | {per_pass:.3f}x |")


if __name__ == "__main__":
    main()
