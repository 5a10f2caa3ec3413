"""Agent-sized prompts on the demo model: a first turn of 12K and 25K tokens (what opencode,
Claude Code and Codex send) served by generate.py and by the server, with the prefill time.

The prompt is Python source (the stdlib's `email` package, sorted), cut to N tokens of the demo
tokenizer and sent as one user message (chat template on). generate.py reports its prefill
rate ("Prompt: N tokens, R tokens-per-sec"); the server is timed on a 1-token completion.

    python benchmarks/agent_prompts.py [--tokens 12000 25000] [--only server|generate]
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import ROOT, demo_model
from server_util import running_server  # noqa: E402  (tests/, put on sys.path by common)


def prompt_text(tokens: int) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_model() / "tokenizer.json"))
    root = Path(os.__file__).parent / "email"
    text = "".join(p.read_text() for p in sorted(root.rglob("*.py")))
    ids = tok.encode(text).ids
    if len(ids) < tokens:
        raise SystemExit(f"{root} has only {len(ids)} tokens")
    return tok.decode(ids[:tokens])


def via_generate(text: str) -> dict:
    cmd = [sys.executable, str(ROOT / "generate.py"), "--prompt", "-", "-m", "1"]
    tic = time.perf_counter()
    out = subprocess.run(cmd, input=text, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - tic
    n, rate = re.search(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec", out).groups()
    return {"prompt_tokens": int(n), "prefill_s": int(n) / float(rate), "wall_s": wall}


def via_server(url: str, text: str) -> dict:
    body = {"model": "mlx-step35-demo", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    tic = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=7200)
    wall = time.perf_counter() - tic
    r.raise_for_status()
    return {"prompt_tokens": r.json()["usage"]["prompt_tokens"], "request_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[12000, 25000])
    ap.add_argument("--only", choices=["server", "generate"], default=None)
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    texts = {n: prompt_text(n) for n in a.tokens}
    if a.only != "server":
        for n, text in texts.items():
            print(f"generate.py, {n}-token text: {via_generate(text)}", flush=True)
    if a.only != "generate":
        with running_server(["--max-tokens", "1"], timeout=600) as url:
            for n, text in texts.items():
                print(f"server, {n}-token text: {via_server(url, text)}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
