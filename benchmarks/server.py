"""Benchmark 5: this server vs stock mlx_lm.server on the same weights (the demo model; our
conversion loads in both), over HTTP as a client sees it: time to first token and decode
tokens/s per request, for 1 and 4 concurrent streaming clients. Arms: mlx_lm.server, ours
drafting (the server's default, --num-draft auto), ours with a fixed num_draft, ours plain
(request num_draft 0). Both servers run side by side; each round runs every arm at each
concurrency once, in rotating order, so slow phases of a loaded machine hit all arms alike.

    python benchmarks/server.py [--rounds 5] [--gen-tokens 128] [--num-draft 2]
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx
from common import PROMPTS, ROOT, demo_model, interval, median

sys.path.insert(0, str(ROOT / "tests"))
from server_util import free_port  # noqa: E402


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
    async with httpx.AsyncClient(timeout=600) as client:
        tic = time.perf_counter()
        rows = await asyncio.gather(*(one(client, url, p, n_gen, extra) for p in prompts))
        return rows, sum(n for _, _, n in rows) / (time.perf_counter() - tic)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--num-draft", type=int, default=2, help="the fixed-depth drafting arm")
    a = p.parse_args()
    model = str(demo_model())
    py = [sys.executable]
    ours, ours_url = start(
        py + ["-m", "mlx_step35.server", "--model", model, "--log-level", "WARNING"], free_port()
    )
    theirs, theirs_url = start(
        py + ["-m", "mlx_lm.server", "--model", model, "--log-level", "WARNING"], free_port()
    )
    arms = {
        "mlx_lm.server": (theirs_url, {}),
        "ours, auto": (ours_url, {}),
        f"ours, num_draft {a.num_draft}": (ours_url, {"num_draft": a.num_draft}),
        "ours, plain": (ours_url, {"num_draft": 0}),
    }
    results = {(arm, c): [] for arm in arms for c in (1, 4)}
    try:
        for url, extra in arms.values():  # warm-up
            asyncio.run(burst(url, PROMPTS[:1], 8, extra))
        for r in range(a.rounds):
            names = list(arms)
            names = names[r % len(names) :] + names[: r % len(names)]
            for c in (1, 4):
                for arm in names:
                    url, extra = arms[arm]
                    prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(c)]
                    results[(arm, c)].append(asyncio.run(burst(url, prompts, a.gen_tokens, extra)))
    finally:
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait()
    report(results, a)


def report(results, a):
    print(f"\n{a.rounds} rounds, {a.gen_tokens} tokens per request, greedy, streamed /v1/completions\n")
    print(
        "| arm | clients | TTFT ms (median, 95% CI) | decode tok/s per request (median, 95% CI) "
        "| aggregate tok/s (median) | tokens per request |"
    )
    print("|---|---|---|---|---|---|")
    for (arm, c), bursts in results.items():
        rows = [row for rs, _ in bursts for row in rs]
        ttft = [1e3 * t for t, _, _ in rows]
        tps = [x for _, x, _ in rows]
        lo, hi = interval(ttft)
        tlo, thi = interval(tps)
        print(
            f"| {arm} | {c} | {median(ttft):.0f} ({lo:.0f}-{hi:.0f}) | {median(tps):.1f} ({tlo:.1f}-{thi:.1f}) "
            f"| {median([agg for _, agg in bursts]):.1f} | {median([n for _, _, n in rows]):.0f} |"
        )
    base = "mlx_lm.server"
    print(f"\nPer-round ratios vs {base} (same round, so the machine's slow phases cancel): median, 95% CI")
    print("| arm | clients | decode tok/s ratio | aggregate tok/s ratio | TTFT ratio |")
    print("|---|---|---|---|---|")
    for (arm, c), bursts in results.items():
        if arm == base:
            continue
        pairs = list(zip(bursts, results[(base, c)]))
        cells = []
        for stat in (
            lambda b: median([x for _, x, _ in b[0]]),
            lambda b: b[1],
            lambda b: median([t for t, _, _ in b[0]]),
        ):
            ratios = [stat(o) / stat(t) for o, t in pairs]
            lo, hi = interval(ratios)
            cells.append(f"{median(ratios):.2f} ({lo:.2f}-{hi:.2f})")
        print(f"| {arm} | {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
