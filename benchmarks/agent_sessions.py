"""Benchmark 13: 5-turn sessions of the real agent CLIs (Claude Code, Codex, opencode) against
the server: per request, the prompt's tokens and how many the prompt cache supplied; where a
prompt shares less with an earlier one than it could, the text at the first differing token.

The server runs the scripted checkpoint of the agent-CLI tests (tests/agent_checkpoint.py: the
first turn calls the shell tool, later ones answer a final text), with the prompt cache on. Turn 1
starts a session; turns 2-5 continue it (`claude -p --continue`, `codex exec resume --last`,
`opencode run --continue`). The server process records each request's prompt token ids
(`--serve` mode of this script: the real server with Engine.submit wrapped), so the counts are
the server's own and the prompts can be diffed.

    python benchmarks/agent_sessions.py --clients claude codex opencode --turns 5
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mlx_step35.prompt_cache import common_prefix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from agent_checkpoint import build  # noqa: E402
from agent_clients import run_client  # noqa: E402
from server_util import running_server  # noqa: E402

MODEL = "step-scripted"
TURNS = [
    "Write the marker file with the shell tool.",
    "What did the command print?",
    "Is the file still there?",
    "Summarize what we did.",
    "Thanks, that is all.",
]


def serve(record: Path, argv):
    """The real server, recording each request's prompt ids and cached count to `record`."""
    from mlx_step35 import server
    from mlx_step35.server.engine import Engine

    submit = Engine.submit

    def recording(self, request, loop):
        job = submit(self, request, loop)
        with record.open("a") as f:
            f.write(json.dumps({"prompt": list(request.prompt), "t": time.time()}) + "\n")
        return job

    Engine.submit = recording
    server.main(argv)


def analyse(requests, log_lines, tokenizer):
    """Rows: request, prompt tokens, cached (the server's log), best prefix shared with an earlier
    prompt, and the text at the first difference from that prompt."""
    rows = []
    for i, req in enumerate(requests):
        p = req["prompt"]
        cached = log_lines[i] if i < len(log_lines) else None
        best, j_best = 0, None
        for j in range(i):
            c = common_prefix(requests[j]["prompt"], p)
            if c > best:
                best, j_best = c, j
        where = ""
        if j_best is not None and best < min(len(p), len(requests[j_best]["prompt"])):
            q = requests[j_best]["prompt"]
            before = tokenizer.decode(p[max(0, best - 12) : best])
            where = (
                f"request {j_best + 1} had {tokenizer.decode(q[best : best + 12])!r}, "
                f"this one {tokenizer.decode(p[best : best + 12])!r} after {before!r}"
            )
        rows.append(
            dict(request=i + 1, prompt=len(p), cached=cached, shared=best, earlier=j_best, where=where)
        )
    return rows


def finished_lines(text: str):
    """The cached-token counts of the server's per-request log lines, in order."""
    out = []
    for line in text.splitlines():
        if "finished (" in line and "prompt tokens" in line:
            seg = line.split("): ", 1)[1]
            out.append(int(seg.split(",")[1].split()[0]))
    return out


def session(client: str, turns: int, work: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ckpt = build(work / "ckpt", client)
    record = work / "requests.jsonl"
    script = Path(__file__).resolve()
    args = ["--serve", record, "--model", ckpt, "--served-model-name", MODEL, "--log-level", "INFO"]
    marks = []
    with running_server(args, script=script, timeout=600) as url:
        for t in range(turns):
            start = time.time()
            r = run_client(
                client, url, MODEL, work / "home", work / "project", TURNS[t], resume=t > 0, timeout=1800
            )
            n = sum(1 for _ in record.open()) if record.exists() else 0
            marks.append((t + 1, n, r.returncode, time.time() - start, r.stdout.strip()[-80:]))
            if r.returncode != 0:
                print(f"{client} turn {t + 1} exited {r.returncode}: {r.stderr[-1500:]}", file=sys.stderr)
                break
    log = running_server.last_output
    requests = [json.loads(line) for line in record.open()]
    rows = analyse(requests, finished_lines(log), load_tokenizer(ckpt))
    turn_of, prev = {}, 0
    for turn, n, *_ in marks:
        for i in range(prev, n):
            turn_of[i + 1] = turn
        prev = n
    for row in rows:
        row["turn"] = turn_of.get(row["request"])
    return rows, marks


def table(client, rows):
    print(f"\n{client}\n")
    print(
        "| turn | request | prompt tokens | cached | prefilled | shared with an earlier prompt | first difference |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pre = r["prompt"] - (r["cached"] or 0)
        pct = f"{pre} ({100 * pre / r['prompt']:.1f}%)"
        shared = f"{r['shared']} (request {r['earlier'] + 1})" if r["earlier"] is not None else ""
        print(
            f"| {r['turn']} | {r['request']} | {r['prompt']} | {r['cached']} | {pct} | {shared} | {r['where']} |"
        )


def main():
    if "--serve" in sys.argv:  # (started by running_server, which puts --port first)
        i = sys.argv.index("--serve")
        return serve(Path(sys.argv[i + 1]), sys.argv[1:i] + sys.argv[i + 2 :])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", nargs="+", default=["opencode", "claude", "codex"])
    p.add_argument("--turns", type=int, default=5, choices=range(1, len(TURNS) + 1))
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    results = {}
    for client in a.clients:
        with tempfile.TemporaryDirectory(prefix=f"agent-{client}-") as tmp:
            rows, marks = session(client, a.turns, Path(tmp))
        results[client] = dict(rows=rows, turns=marks)
        table(client, rows)
        for turn, n, rc, secs, tail in marks:
            print(f"turn {turn}: exit {rc}, {secs:.0f} s, requests so far {n}, output ...{tail!r}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
