"""Benchmark 10: tensor parallelism over 2 ranks (`mlx.launch --backend ring -n 2`).

Measured here: plain greedy decoding of the larger random 4-bit checkpoint (benchmark 1's) by
2 local ranks vs 1 process, interleaved rounds, tokens/s ratio of medians; all-sums per token
and their bytes, counted on the real call path; the latency of one all-sum of one token's
hidden state and of an all-gather of half the vocabulary's logits, over loopback.
Projected (labelled as such): the bandwidth model of benchmark 3 with per-rank weight bytes
and per-token all-sums, for 2 x M4 Max and 2 x M3 Ultra, 4 and 8 bits, with and without MTP.

    python benchmarks/distributed.py [--rounds 3] [--tokens 48]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, interval, large_checkpoint, median

WORKER = [sys.executable, __file__, "--worker"]
LAUNCH = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", "2"]
LAUNCH += ["--starting-port", "23517", "--"]  # not the default 5000 another launch may hold


def counted(fn):
    """fn()'s result, and the number and bytes of mx.distributed.all_sum calls it made."""
    import mlx.core as mx

    calls = []
    orig = mx.distributed.all_sum

    def spy(x, *a, **k):
        calls.append(x.nbytes)
        return orig(x, *a, **k)

    mx.distributed.all_sum = spy
    try:
        out = fn()
        mx.eval(out)
    finally:
        mx.distributed.all_sum = orig
    return out, len(calls), sum(calls)


def worker(out: str, tokens: int, reps: int, extras: bool):
    import mlx.core as mx

    from mlx_step35 import load
    from mlx_step35.distributed import world
    from mlx_step35.generation import generate_step
    from mlx_step35.speculative import SpecStats

    group = world()
    model, _ = load(large_checkpoint(), group=group)
    prompt = list(range(10, 42))

    def run(n, stats=None, **kw):
        return [t for t, _, _ in generate_step(model, prompt, max_tokens=n, stats=stats, **kw)]

    run(8)  # warm-up
    speeds = []
    for _ in range(reps):
        tic = time.perf_counter()
        run(tokens)
        speeds.append(tokens / (time.perf_counter() - tic))
    res = {"tok_s": speeds, "layers": model.args.num_hidden_layers}
    if group is not None and extras:
        cache = model.make_cache()
        mx.eval(model.hidden(mx.array([prompt]), cache))
        res["plain"] = counted(lambda: model.logits(model.hidden(mx.array([[5]]), cache)))[1:]
        res["verify4"] = counted(lambda: model.logits(model.hidden(mx.array([[5, 6, 7, 8]]), cache)))[1:]
        res["collectives"] = collective_latency(group)
        for k in (1, 2, 3):  # all-sums per speculative step: a 25-token run minus a 1-token one
            stats = SpecStats()
            _, n25, _ = counted(lambda: run(25, stats, draft_mtp=True, num_draft=k))
            _, n1, _ = counted(lambda: run(1, None, draft_mtp=True, num_draft=k))
            res[f"spec{k}"] = ((n25 - n1) / stats.verify_steps, stats.verify_steps)
    if group is None or group.rank() == 0:
        Path(out).write_text(json.dumps(res))


def collective_latency(group, reps=50):
    """Median seconds of an all-sum of one token's hidden state (bf16) and of an all-gather of
    half the real vocabulary's fp32 logits, over this group."""
    import mlx.core as mx

    def timed(fn):
        mx.eval(fn())
        ts = []
        for _ in range(reps):
            tic = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - tic)
        return median(ts)

    h = mx.ones((1, 1, 4096), dtype=mx.bfloat16)
    v = mx.ones((1, 128896 // group.size()), dtype=mx.float32)
    return {
        "all_sum_hidden": timed(lambda: mx.distributed.all_sum(h, group=group)),
        "all_gather_half_vocab": timed(lambda: mx.distributed.all_gather(v, group=group)),
    }


def measure(rounds: int, tokens: int, reps: int):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    large_checkpoint()  # build it once, before timing
    one, two, extra = [], [], None
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):  # interleaved: one process, then two ranks
            for label, prefix, acc in (("one", [], one), ("two", LAUNCH, two)):
                out = Path(d, f"{label}{r}.json")
                cmd = [*prefix, *WORKER, str(out), "--tokens", str(tokens), "--reps", str(reps)]
                cmd += ["--extras"] if label == "two" and r == 0 else []
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                res = json.loads(out.read_text())
                acc += res["tok_s"]
                extra = res if label == "two" and r == 0 else extra
    return one, two, extra


# Per all-sum latency and link bandwidth: ASSUMPTIONS, not measurements (flags override them).
LINKS = {
    "ring, 10 GbE (TCP)": (150e-6, 1.1e9),
    "ring, Thunderbolt 5 bridge (TCP)": (80e-6, 4e9),
    "JACCL, Thunderbolt 5 RDMA": (15e-6, 8e9),
}
PAIRS = {"2 x M4 Max (546 GB/s)": 546e9, "2 x M3 Ultra (819 GB/s)": 819e9}
ACCEPTANCE = (0.9, 0.8, 0.7)  # benchmark 3's assumed conditional acceptance per depth


def parts(bits: int) -> dict:
    """Bytes of the real model at `bits`, by what tensor parallelism does with them."""
    from bandwidth import nbytes
    from mlx.utils import tree_flatten
    from model_size import lazy_model

    from mlx_step35.distributed import split_of
    from mlx_step35.weights import QuantRecipe

    model = lazy_model(QuantRecipe(bits=bits))
    a = model.args
    c = dict(experts=0, dense_split=0, dense_repl=0, lm_head=0, mtp_split=0, mtp_repl=0, mtp_head=0)
    for name, w in tree_flatten(model.parameters()):
        b, split = nbytes(w, name), split_of(name) is not None
        if name.startswith("mtp."):
            key = "mtp_head" if ".shared_head.output." in name else ("mtp_split" if split else "mtp_repl")
            c[key] += b / a.num_nextn_predict_layers
        elif "switch_mlp" in name:
            c["experts"] += b
        elif name.startswith("lm_head"):
            c["lm_head"] += b
        elif not name.startswith("model.embed_tokens"):  # one embedding row per token: ~0
            c["dense_split" if split else "dense_repl"] += b
    c["n_moe"], c["E"], c["k"], c["L"] = (
        len(a.moe_layers),
        a.moe_num_experts,
        a.moe_top_k,
        a.num_hidden_layers,
    )
    c["expert_each"] = c["experts"] / (c["E"] * c["n_moe"])
    return c


def memory_table():
    """Weights per rank of the real model at N ranks (split tensors / N + replicated ones)."""
    from bandwidth import nbytes
    from mlx.utils import tree_flatten
    from model_size import lazy_model

    from mlx_step35.config import ConfigError
    from mlx_step35.distributed import check_splittable, split_of
    from mlx_step35.weights import QuantRecipe

    print(
        "\n| weights | replicated GB | "
        + " | ".join(f"{n} rank{'s' if n > 1 else ''} GB each" for n in (1, 2, 4, 8))
        + " |"
    )
    print("|---|---|---|---|---|---|")
    for bits in (4, 6, 8):
        model = lazy_model(QuantRecipe(bits=bits))
        quant = {
            p: {"group_size": m.group_size} for p, m in model.named_modules() if hasattr(m, "group_size")
        }
        split = repl = 0
        for name, w in tree_flatten(model.parameters()):
            if split_of(name) is None:
                repl += nbytes(w, name)
            else:
                split += nbytes(w, name)

        def cell(n):
            try:
                check_splittable(model.args, n, quant)
            except ConfigError:
                return "refused: group 64 does not split (use --q-group-size 32)"
            return f"{(split / n + repl) / 1e9:.1f}"

        cells = " | ".join(cell(n) for n in (1, 2, 4, 8))
        print(f"| {bits}-bit | {repl / 1e9:.1f} | {cells} |")


def step_time(c, n, ranks, bw, eff, link=None, acc=ACCEPTANCE, vocab_split=False):
    """Seconds per generated token at draft depth n (0 = plain) on `ranks` machines."""
    from bandwidth import distinct_independent

    m = n + 1  # tokens in the verify pass
    experts = c["n_moe"] * distinct_independent(c["E"], c["k"], m) * c["expert_each"]
    head = c["lm_head"] / (ranks if vocab_split else 1)
    weights = c["dense_split"] / ranks + c["dense_repl"] + head + experts / ranks
    if n:
        weights += (2 * n - 1) * (c["mtp_split"] / ranks + c["mtp_repl"]) + n * c["mtp_head"]
    seconds = weights / (eff * bw)
    if ranks > 1:
        lat, link_bw = link
        # trunk: 2 per layer; MTP: 2 per block pass; lockstep: the token / accept + depth / drafts
        sums = 2 * c["L"] + (2 * (2 * n - 1) + n + 2 if n else 1)
        seconds += sums * (lat + m * 4096 * 2 / link_bw)
        if vocab_split:
            seconds += lat + m * 128896 * 4 / 2 / link_bw  # all-gather of half the logits
    tokens, p = 1.0, 1.0
    for j in range(n):
        p *= acc[j]
        tokens += p
    return seconds / tokens


def project():
    from bandwidth import LLAMA_CPP_M4_MAX

    four = parts(4)
    eff = LLAMA_CPP_M4_MAX * step_time(four, 0, 1, 546e9, 1.0)  # calibrated as in benchmark 3
    print(
        f"\nPROJECTIONS (bandwidth model of benchmark 3, efficiency {eff:.0%} of peak; link latencies "
        f"and bandwidths are assumptions: {', '.join(f'{k} {v[0] * 1e6:.0f} us / {v[1] / 1e9:.1f} GB/s' for k, v in LINKS.items())}); "
        f"acceptance {ACCEPTANCE}, empty context, independent routing in verify passes\n"
    )
    header = (
        "| bits | machines | link | plain tok/s | MTP depth 1 / 2 / 3 tok/s | one machine plain / best MTP |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for bits in (4, 8):
        c = four if bits == 4 else parts(bits)
        for pair, bw in PAIRS.items():
            one = [1 / step_time(c, n, 1, bw, eff) for n in range(4)]
            fits = (
                ""
                if c["experts"] + c["dense_split"] + c["dense_repl"] < 0.9 * 128e9 or "Ultra" in pair
                else " (does not fit one)"
            )
            for link_name, link in LINKS.items():
                tp = [1 / step_time(c, n, 2, bw, eff, link) for n in range(4)]
                print(
                    f"| {bits} | {pair} | {link_name} | {tp[0]:.0f} | "
                    f"{' / '.join(f'{x:.0f}' for x in tp[1:])} | {one[0]:.0f} / {max(one[1:]):.0f}{fits} |"
                )
    print(
        "\nVocabulary split of lm_head (all-gather of the logits) vs replicated, 4-bit, 2 x M4 Max, plain / depth 2:"
    )
    for link_name, link in LINKS.items():
        rep = [1 / step_time(four, n, 2, 546e9, eff, link) for n in (0, 2)]
        split = [1 / step_time(four, n, 2, 546e9, eff, link, vocab_split=True) for n in (0, 2)]
        print(
            f"  {link_name}: replicated {rep[0]:.1f} / {rep[1]:.1f} tok/s, split {split[0]:.1f} / {split[1]:.1f} tok/s"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--project-only", action="store_true", help="skip the measurement")
    ap.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.tokens, a.reps, a.extras)
    if not a.project_only:
        one, two, extra = measure(a.rounds, a.tokens, a.reps)
        ratios = [t / o for t, o in zip(two, one)]
        lo, hi = interval(ratios)
        L = extra["layers"]
        print(
            f"Larger random checkpoint (4-bit, {L} layers), plain greedy, {a.tokens} tokens x {a.reps} "
            f"per launch, {a.rounds} interleaved launches each:"
        )
        print(
            f"  1 process: median {median(one):.1f} tok/s; 2 ranks: median {median(two):.1f} tok/s; "
            f"ratio 2 ranks / 1 process {median(ratios):.2f} (95% interval {lo:.2f}-{hi:.2f})"
        )
        n, b = extra["plain"]
        print(
            f"  all-sums per trunk pass of one token: {n} ({b} bytes; 2 per layer, plus 1 token broadcast in the loop)"
        )
        n, b = extra["verify4"]
        print(f"  all-sums per 4-token verify pass: {n} ({b} bytes)")
        for k in (1, 2, 3):
            n, steps = extra[f"spec{k}"]
            print(f"  drafting k={k}: {n:.1f} all-sums per speculative step (mean of {steps} steps)")
        c = extra["collectives"]
        print(
            f"  loopback latency: all-sum of a 4096 bf16 hidden state {c['all_sum_hidden'] * 1e6:.0f} us, "
            f"all-gather of 64448 fp32 logits {c['all_gather_half_vocab'] * 1e6:.0f} us"
        )
    project()
    memory_table()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
