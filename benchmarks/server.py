"""Benchmark 5: this server vs stock mlx_lm.server on the same weights (the demo model; our
conversion loads in both), over HTTP as a client sees it: time to first token, decode tokens/s
per request and aggregate tokens/s of a burst of concurrent streaming clients (1, 2, 4, 8).
Arms: mlx_lm.server; ours (batching, default --decode-concurrency 8) drafting with the
server's default (--num-draft auto), with a fixed num_draft, and plain (request num_draft 0);
ours with --decode-concurrency 1 (one request at a time, a second server process), auto.
Prompts: "short" (benchmarks/common.py PROMPTS) or "long" (stdlib source, 150-900 tokens
mixed with ~2000-token ones, each request's prompt opened by its own line so no prompt
cache hits). All servers run side by side; each round runs every arm at each concurrency
once, in rotating order, so slow phases of a loaded machine hit all arms alike; ratios pair
an arm's burst with the baseline's burst of the same round.

    python benchmarks/server.py [--rounds 3] [--gen-tokens 48] [--clients 1 2 4 8]
        [--prompts short long] [--num-draft 2]
"""

import argparse
import asyncio
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
from common import PROMPTS, ROOT, demo_model, interval, median

sys.path.insert(0, str(ROOT / "tests"))
from server_util import free_port  # noqa: E402

LONG_TOKENS = [900, 150, 2000, 600, 300, 750, 2000, 450]  # client i's prompt length (rotated per round)
THEIRS, DC1 = "mlx_lm.server", "ours dc1, auto"


def start(cmd, port):
    proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def long_texts(model) -> dict:
    """Stdlib source cut into texts of about each LONG_TOKENS length (the demo's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    lib = Path(sysconfig.get_paths()["stdlib"])
    ids = tok.encode("".join((lib / f).read_text() for f in ("textwrap.py", "argparse.py", "shutil.py")))
    texts, s = {}, 0
    for n in sorted(set(LONG_TOKENS)):
        texts[n] = [tok.decode(ids[s + k * n : s + (k + 1) * n]) for k in range(2)]
        s += 2 * n
    return texts


def prompts_for(kind, r, c, arm_tag, texts):
    if kind == "short":
        return [PROMPTS[(r + i) % len(PROMPTS)] for i in range(c)]
    out = []
    for i in range(c):
        n = LONG_TOKENS[(r + i) % len(LONG_TOKENS)]
        out.append(f"# request {arm_tag} {r} {c} {i}\n" + texts[n][(r + i) % 2])
    return out


async def one(client, url, prompt, n_gen, extra):
    """(time to first token, decode tokens/s after it, completion tokens) of one streamed request."""
    body = dict(
        prompt=prompt,
        max_tokens=n_gen,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    tic = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    return first - tic, (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan"), tokens


async def burst(url, prompts, n_gen, extra):
    """(per-request results, aggregate tokens/s of the burst)."""
    async with httpx.AsyncClient(timeout=1200) as client:
        tic = time.perf_counter()
        rows = await asyncio.gather(*(one(client, url, p, n_gen, extra) for p in prompts))
        return rows, sum(n for _, _, n in rows) / (time.perf_counter() - tic)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--prompts", nargs="+", choices=["short", "long"], default=["short", "long"])
    p.add_argument("--num-draft", type=int, default=2, help="the fixed-depth drafting arm")
    a = p.parse_args()
    model = str(demo_model())
    texts = long_texts(model) if "long" in a.prompts else {}
    py = [sys.executable]
    ours_cmd = py + ["-m", "mlx_step35.server", "--model", model, "--log-level", "WARNING"]
    procs = []
    try:
        urls = {}
        for name, cmd in (
            ("ours", ours_cmd),
            ("dc1", ours_cmd + ["--decode-concurrency", "1"]),
            ("theirs", py + ["-m", "mlx_lm.server", "--model", model, "--log-level", "WARNING"]),
        ):
            proc, urls[name] = start(cmd, free_port())
            procs.append(proc)
        arms = {
            THEIRS: (urls["theirs"], {}),
            "ours, auto": (urls["ours"], {}),
            f"ours, num_draft {a.num_draft}": (urls["ours"], {"num_draft": a.num_draft}),
            "ours, plain": (urls["ours"], {"num_draft": 0}),
            DC1: (urls["dc1"], {}),
        }
        results = {(kind, arm, c): [] for kind in a.prompts for arm in arms for c in a.clients}
        for i, (url, extra) in enumerate(arms.values()):  # warm-up (a long prompt too, if any)
            warm = PROMPTS[:2] + (prompts_for("long", 3, 1, f"w{i}", texts) if texts else [])
            asyncio.run(burst(url, warm, 8, extra))
        for r in range(a.rounds):
            names = list(arms)
            names = names[r % len(names) :] + names[: r % len(names)]
            for kind in a.prompts:
                for c in a.clients:
                    for arm in names:
                        url, extra = arms[arm]
                        prompts = prompts_for(kind, r, c, list(arms).index(arm), texts)
                        results[(kind, arm, c)].append(asyncio.run(burst(url, prompts, a.gen_tokens, extra)))
                        b = results[(kind, arm, c)][-1]  # as it goes, so a run cut short still says something
                        print(
                            f"round {r}, {kind}, {c} clients, {arm}: {b[1]:.1f} tok/s, TTFT median "
                            f"{STATS['TTFT median'](b):.2f} s, slowest {STATS['TTFT slowest'](b):.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    report(results, a)


def cell(xs, fmt="{:.0f}"):
    lo, hi = interval(xs)
    return f"{fmt.format(median(xs))} ({fmt.format(lo)}-{fmt.format(hi)})"


STATS = {  # per burst
    "aggregate tok/s": lambda b: b[1],
    "decode tok/s per request": lambda b: median([x for _, x, _ in b[0]]),
    "TTFT median": lambda b: median([t for t, _, _ in b[0]]),
    "TTFT slowest": lambda b: max(t for t, _, _ in b[0]),
}


def report(results, a):
    print(f"\n{a.rounds} rounds, {a.gen_tokens} tokens per request, greedy, streamed /v1/completions")
    for kind in a.prompts:
        print(f"\n{kind} prompts: median over rounds (95% CI)\n")
        print(
            "| arm | clients | aggregate tok/s | decode tok/s per request | TTFT ms median | TTFT ms slowest |"
        )
        print("|---|---|---|---|---|---|")
        for (k, arm, c), bursts in results.items():
            if k != kind:
                continue
            rows = [row for rs, _ in bursts for row in rs]
            print(
                f"| {arm} | {c} | {cell([b[1] for b in bursts], '{:.1f}')} "
                f"| {cell([x for _, x, _ in rows], '{:.1f}')} | {cell([1e3 * t for t, _, _ in rows])} "
                f"| {cell([1e3 * STATS['TTFT slowest'](b) for b in bursts])} |"
            )
        for base, only in ((THEIRS, None), (DC1, 1)):
            print(f"\n{kind} prompts: per-round ratios vs {base} (median, 95% CI)\n")
            print("| arm | clients | " + " | ".join(STATS) + " |")
            print("|---|---|" + "---|" * len(STATS))
            for (k, arm, c), bursts in results.items():
                if k != kind or arm == base or (only and c != only) or (base == DC1 and arm == THEIRS):
                    continue
                pairs = list(zip(bursts, results[(kind, base, c)]))
                cells = [cell([f(o) / f(t) for o, t in pairs], "{:.2f}") for f in STATS.values()]
                print(f"| {arm} | {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
