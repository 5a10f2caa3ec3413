"""Benchmark 5: an agent's turns against the server with and without the prompt cache, and
against stock mlx_lm.server with its own prompt cache, same weights, interleaved.

An agent-like transcript (a long system prompt with tool definitions, then user messages, the
model's replies, scripted tool calls and tool results) is replayed turn by turn; each turn's
prompt is re-rendered from the whole history by the server's chat template, as a client
does. Per turn it records the tokens the server prefilled (prompt tokens minus the cached ones
it reports: counts carry over to a Mac) and the time to first token. The last table projects
the time to first token of the real model on an M4 Max from the counts (a projection).

    python benchmarks/prompt_cache.py --rounds 3
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mlx_step35" / "demo"
M4_MAX_PREFILL = 406.0  # tokens/s, llama.cpp's published 2K-token prefill of the real model (facts sheet)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": t, "description": f"the {p}"} for p, t in params.items()},
                "required": list(params),
            },
        },
    }
    for name, desc, params in [
        ("read_file", "Read a file of the repository and return its text.", {"path": "string"}),
        ("write_file", "Write text to a file.", {"path": "string", "text": "string"}),
        (
            "run_tests",
            "Run the test suite; returns the failures.",
            {"pattern": "string", "verbose": "boolean"},
        ),
        (
            "grep",
            "Search the repository for a regular expression.",
            {"regex": "string", "max_hits": "integer"},
        ),
        ("list_dir", "List a directory.", {"path": "string", "depth": "integer"}),
    ]
]
SYSTEM = (
    "You are a careful coding agent working in a Python repository. Read before you write, run the "
    "tests after every change, and explain what you did in one short paragraph at the end.\n" * 6
)
USER_TURNS = [
    "The function parse_header in io.py fails on empty files. Find out why.",
    "Good. Now fix it and keep the error message clear.",
    "Run the tests again and tell me what still fails.",
    "Add a test for the empty file case.",
    "Now make the same change in the writer.",
    "Summarise the changes you made in this session.",
]
TOOL_RESULT = "def parse_header(f):\n    n = int.from_bytes(f.read(8), 'little')\n    return f.read(n)\n" * 4


def transcript_turns(reply_of):
    """Yield each turn's messages; `reply_of(messages)` returns the model's reply content."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, user in enumerate(USER_TURNS):
        messages.append({"role": "user", "content": user})
        if i % 2 == 0:  # a scripted tool round before the model answers
            call = {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": "io.py"})},
            }
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": TOOL_RESULT})
        reply = yield list(messages)
        messages.append({"role": "assistant", "content": reply})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    tic = time.perf_counter()
    first, text, usage = None, "", {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = (c.get("delta") or {}).get("content") or (c.get("delta") or {}).get(
                    "reasoning_content"
                )
                if piece and first is None:
                    first = time.perf_counter() - tic
                text += (c.get("delta") or {}).get("content") or ""
    return text, usage, first if first is not None else time.perf_counter() - tic


class Server:
    def __init__(self, kind, model):
        self.port = free_port()
        if kind == "mlx-lm":
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(self.port)]
        else:
            cmd = [
                sys.executable,
                "-m",
                "mlx_step35.server",
                "--model",
                str(model),
                "--port",
                str(self.port),
                "--no-draft-mtp",
            ]
            if kind == "ours, no cache":
                cmd += ["--prompt-cache-gb", "0"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{kind} server did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def replay(server, max_tokens):
    """Per turn: (prompt tokens, prefilled tokens, seconds to first token)."""
    out = []
    turns = transcript_turns(None)
    messages = next(turns)
    while True:
        body = {
            "messages": messages,
            "tools": TOOLS,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, usage, ttft = post(server.url + "/v1/chat/completions", body)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out.append((usage["prompt_tokens"], usage["prompt_tokens"] - cached, ttft))
        try:
            messages = turns.send(text)
        except StopIteration:
            return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--kinds", nargs="+", default=["ours", "ours, no cache", "mlx-lm"])
    a = p.parse_args()
    servers = {k: Server(k, a.model) for k in a.kinds}
    runs = {k: [] for k in a.kinds}
    try:
        for r in range(a.rounds):
            for k in a.kinds if r % 2 == 0 else reversed(a.kinds):  # interleaved, order alternating
                runs[k].append(replay(servers[k], a.max_tokens))
    finally:
        for s in servers.values():
            s.close()
    n_turns = len(USER_TURNS)
    print(f"model {a.model}, {a.rounds} rounds, medians per turn\n")
    print("| turn | prompt tokens | " + " | ".join(f"{k}: prefilled, TTFT ms" for k in a.kinds) + " |")
    print("|---|---|" + "---|" * len(a.kinds))
    for t in range(n_turns):
        cells = []
        for k in a.kinds:
            pre = statistics.median(run[t][1] for run in runs[k])
            ttft = statistics.median(run[t][2] for run in runs[k]) * 1e3
            cells.append(f"{pre:.0f}, {ttft:.0f}")
        print(f"| {t + 1} | {runs[a.kinds[0]][0][t][0]} | " + " | ".join(cells) + " |")
    print("\nTotal tokens prefilled over the conversation (median of rounds):")
    for k in a.kinds:
        print(f"  {k}: {statistics.median(sum(t[1] for t in run) for run in runs[k]):.0f}")
    print(
        f"\nProjection (not measured): the real model on an M4 Max prefills ~{M4_MAX_PREFILL:.0f} tokens/s "
        "(llama.cpp's published 2K figure), so time to first token per turn ~ prefilled tokens / that rate. "
        "The demo's 2048-token vocabulary splits this text into more tokens than the real tokenizer "
        "does, so these are upper bounds:"
    )
    for k in a.kinds:
        secs = [statistics.median(run[t][1] for run in runs[k]) / M4_MAX_PREFILL for t in range(n_turns)]
        print(f"  {k}: " + ", ".join(f"{s:.1f} s" for s in secs))


if __name__ == "__main__":
    main()
