"""Benchmark 5: the expert cache (experts streamed from disk into bounded slot pools).

    python benchmarks/expert_cache.py record [--gen-tokens 256]   # demo-model traces on real text
    python benchmarks/expert_cache.py replay [TRACE ...]           # hit rate, bytes/token by size, policy
    python benchmarks/expert_cache.py speed [--rounds 5]           # tokens/s, 25% budget vs resident
    python benchmarks/expert_cache.py project                      # the real model on 64/48 GB Macs

`record` runs the demo model on held-out CPython sources (files the demo never trained on),
plain and drafting 3 tokens (verify passes load the union of their tokens' experts), and writes
one npz trace per run under benchmarks/traces/ (the format of `generate.py --trace-experts`).
`replay` feeds traces through the runtime's own `SlotTable` (lru, lfu) and Belady's optimum
("opt": evicts the expert needed furthest in the future; an upper bound no online policy
reaches). Each trace starts cold; its prompt passes warm the cache and are not counted.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from common import PROMPTS, ROOT, demo_model, interval, median

from mlx_step35.expert_cache import POLICIES, SlotTable

TRACES = Path(__file__).parent / "traces"
SIZES = (0.10, 0.25, 0.50)


def record(a):
    import mlx.core as mx

    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_data import collect_corpus, split_docs

    from mlx_step35 import load
    from mlx_step35.expert_trace import trace_experts
    from mlx_step35.generation import generate_step

    model, tok = load(demo_model())
    _, held = split_docs(collect_corpus(int(4e6))[1])
    TRACES.mkdir(exist_ok=True)
    for i, (name, text) in enumerate(held[: a.prompts]):
        prompt = tok.encode(text, add_special_tokens=False)[: a.prompt_tokens]
        for mode, kw in (("plain", {}), ("draft3", dict(draft_mtp=True, num_draft=3))):
            trace = trace_experts(model)
            out = [t for t, _, _ in generate_step(model, prompt, max_tokens=a.gen_tokens, **kw)]
            trace.close()
            file = TRACES / f"demo-{i}-{mode}.npz"
            trace.save(file, prompt_tokens=len(prompt), generated_tokens=len(out), source=name)
            print(f"{file.relative_to(ROOT)}: {name}, {len(prompt)} + {len(out)} tokens")
    mx.clear_cache()


def passes(trace):
    """Per pass: (prompt pass?, [distinct experts per layer])."""
    rows = np.cumsum(trace["pass_rows"])
    starts = rows - trace["pass_rows"]
    n_prompt = int(trace["prompt_tokens"])
    out = []
    for s, e in zip(starts, rows):
        block = trace["experts"][s:e]  # [rows, layers, k]
        out.append((e <= n_prompt, [np.unique(block[:, j]) for j in range(block.shape[1])]))
    return out


def replay_trace(trace, slots: int, policy: str):
    """(hits, accesses, misses) over the trace's decode passes, every layer."""
    E = int(trace["num_experts"])
    ps = passes(trace)
    hits = acc = misses = 0
    for j in range(len(trace["layers"])):
        seq = [layer[j] for _, layer in ps]
        count = [not prompt for prompt, _ in ps]
        m = opt_misses(seq, slots, count) if policy == "opt" else lru_like(seq, E, slots, policy, count)
        a = sum(len(u) for u, c in zip(seq, count) if c)
        hits, acc, misses = hits + a - m, acc + a, misses + m
    return hits, acc, misses


def lru_like(seq, E, slots, policy, count):
    table = SlotTable(E, slots, policy)
    misses = 0
    for need, c in zip(seq, count):
        before = table.misses
        for group in table.groups(need):
            table.assign(group)
        misses += (table.misses - before) if c else 0
    return misses


def opt_misses(seq, slots, count):
    """Belady: on a miss evict the cached expert whose next use is furthest away."""
    nxt = [dict() for _ in seq]
    last = {}
    for t in range(len(seq) - 1, -1, -1):
        nxt[t] = dict(last)  # expert -> next pass that needs it, after t
        for e in seq[t].tolist():
            last[e] = t
    cache, misses = set(), 0
    for t, (need, c) in enumerate(zip(seq, count)):
        for e in set(need.tolist()) - cache:  # the cached ones are used first (as the runtime does)
            misses += c
            if len(cache) >= slots:  # everything cached is unneeded or already used in this pass
                cache.remove(max(cache, key=lambda x: nxt[t].get(x, len(seq))))
            cache.add(e)
    return misses


def replay(a):
    files = [Path(f) for f in a.traces] or sorted(TRACES.glob("*.npz"))
    traces = [dict(np.load(f)) for f in files]
    E = int(traces[0]["num_experts"])
    size = int(traces[0]["expert_bytes"])
    print(f"{len(files)} traces ({', '.join(f.name for f in files)}); {E} experts per layer, {size} B each")
    for kind in ("plain", "draft3"):
        group = [t for f, t in zip(files, traces) if kind in f.name] or (traces if kind == "plain" else [])
        if not group:
            continue
        gen = sum(int(t["generated_tokens"]) - 1 for t in group)  # the first token comes from the prompt
        print(f"\n{kind}: {gen} decoded tokens\n")
        print(
            "| cache (slots of experts) | policy | hit rate | experts read per token | bytes read per token |"
        )
        print("|---|---|---|---|---|")
        for frac in SIZES:
            slots = max(1, round(frac * E))
            for policy in (*POLICIES, "opt"):
                h, acc, m = map(sum, zip(*(replay_trace(t, slots, policy) for t in group)))
                print(
                    f"| {frac:.0%} ({slots} of {E}) | {policy} | {h / acc:.3f} | {m / gen:.2f} | "
                    f"{m * size / gen:,.0f} B |"
                )


def speed(a):
    import time

    from mlx_step35 import load
    from mlx_step35.expert_cache import plan_expert_cache
    from mlx_step35.generation import generate_step

    path = demo_model()
    resident, tok = load(path, mtp=False)
    E = resident.args.moe_num_experts
    full = plan_expert_cache(path, 1e3, mtp=False)
    gb = round(0.25 * E) * len(full.layers) * full.expert_bytes / 1e9
    cached = load(path, mtp=False, expert_cache_gb=gb)[0]
    runs = [("resident", resident), ("cache 25%", cached), ("resident again", resident)]  # + A/A control
    ratios, tps = {"cache 25%": [], "resident again": []}, {name: [] for name, _ in runs}

    def decode(model, prompt):
        toks, tic = [], None
        for t, _, _ in generate_step(model, prompt, max_tokens=a.gen_tokens):
            tic = tic or time.perf_counter()  # after the prompt's pass
            toks.append(t)
        return (len(toks) - 1) / (time.perf_counter() - tic), toks

    for r in range(a.rounds):
        for i, text in enumerate(PROMPTS):
            prompt = tok.encode(text)
            k = (r * len(PROMPTS) + i) % len(runs)
            out = {name: decode(m, prompt) for name, m in runs[k:] + runs[:k]}  # rotating order
            assert out["resident"][1] == out["cache 25%"][1], "the cached model's tokens differ"
            for name in out:
                tps[name].append(out[name][0])
            for name in ratios:
                ratios[name].append(out[name][0] / out["resident"][0])
    print(f"demo model, MTP off, 25% budget ({round(0.25 * E)} of {E} experts per layer, {gb * 1e3:.3f} MB)")
    print(f"{a.rounds} rounds x {len(PROMPTS)} prompts x {a.gen_tokens} tokens, greedy, rotating order")
    for name, xs in tps.items():
        print(f"{name}: median {median(xs):.1f} tok/s decode")
    for name, xs in ratios.items():
        lo, hi = interval(xs)
        print(f"speed ratio {name} / resident: median {median(xs):.3f} (95% interval {lo:.3f}-{hi:.3f})")
    print(f"cache: {cached.expert_cache.stats()}")


def project(a):
    sys.path.insert(0, str(Path(__file__).parent))
    from bandwidth import LLAMA_CPP_M4_MAX, MACS, components, nbytes
    from mlx.utils import tree_flatten
    from model_size import lazy_model

    from mlx_step35.weights import QuantRecipe

    c = components()
    total = sum(nbytes(w, n) for n, w in tree_flatten(lazy_model(QuantRecipe()).parameters()))
    per_token = c["dense"] + c["lm_head"] + c["k"] * c["n_moe"] * c["expert_each"]
    eff = LLAMA_CPP_M4_MAX * per_token / MACS["M4 Max (546 GB/s)"]
    experts = c["E"] * c["n_moe"] * c["expert_each"]
    resident = total - experts
    one = c["k"] * c["n_moe"] * c["expert_each"]  # experts of one token, all layers
    print(
        f"resident {resident / 1e9:.1f} GB; experts {experts / 1e9:.1f} GB; one token's experts {one / 1e9:.2f} GB"
    )
    print(
        f"minimum budget (a 4-token verify pass): {4 * one / 1e9:.1f} GB; efficiency {eff:.0%} of bandwidth\n"
    )
    for mac, mem in (("64 GB", 36e9), ("48 GB", 24e9)):
        print(
            f"{mac} Mac: resident {resident / 1e9:.1f} GB + cache {mem / 1e9:.0f} GB ({mem / experts:.0%} of the experts)"
        )
    bw = 273e9  # M4 Pro, the chip of most 64 and 48 GB Macs
    plain = per_token / (eff * bw)
    draft = (per_token + (a.union - 1) * one + c["mtp_body"] + c["mtp_head"]) / (eff * bw)
    got = 1 + a.acceptance  # tokens per verify pass at depth 1
    print(
        f"\nM4 Pro (273 GB/s): {plain * 1e3:.0f} ms of compute per token from RAM; with MTP depth 1 "
        f"(acceptance {a.acceptance}) a 2-token pass reads x{a.union:.2f} one token's experts, "
        f"takes {draft * 1e3:.0f} ms in RAM and yields {got:.2f} tokens. Reads and compute not overlapped.\n"
    )
    print(
        "| hit rate | SSD GB per token | tok/s 10 GB/s | tok/s 17 GB/s | MTP-1: SSD GB per token | tok/s 10 GB/s | tok/s 17 GB/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for h in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9):
        ssd, ssd2 = (1 - h) * one, (1 - h) * a.union * one
        row = [f"{h:.0%}", f"{ssd / 1e9:.2f}"] + [f"{1 / (plain + ssd / s):.1f}" for s in (10e9, 17e9)]
        row += [f"{ssd2 / got / 1e9:.2f}"] + [f"{got / (draft + ssd2 / s):.1f}" for s in (10e9, 17e9)]
        print("| " + " | ".join(row) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--prompts", type=int, default=6)
    r.add_argument("--prompt-tokens", type=int, default=256)
    r.add_argument("--gen-tokens", type=int, default=256)
    sub.add_parser("replay").add_argument("traces", nargs="*")
    s = sub.add_parser("speed")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--gen-tokens", type=int, default=128)
    j = sub.add_parser("project")
    j.add_argument("--acceptance", type=float, default=0.9)
    j.add_argument("--union", type=float, default=1.85, help="experts of a 2-token pass / one token's")
    a = p.parse_args()
    dict(record=record, replay=replay, speed=speed, project=project)[a.cmd](a)


if __name__ == "__main__":
    main()
