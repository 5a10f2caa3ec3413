"""Benchmark 12b: a turn's time to first token while a large prompt-cache file is written
(issue 22 item 4), interleaved arms, medians.

The file is the size the real model writes for a released conversation: its 12 full-attention
layers' KV (8 KV heads x 128, bfloat16: 48 KiB per token) at `--tokens` tokens, random bytes.
The demo model then serves the next turn, a new conversation of `--prompt` tokens (prefilled
cold), and the time from the release to its first token is measured:

  idle        no write at all (reference)
  old-sync    mx.save_safetensors on the generation thread first, as the store did before
              (no checksum, no fsync)
  new-sync    this version's writer (CRC-32, fsync, os.replace) on the generation thread first
  background  snapshot on the generation thread, the write handed to the store's writer
              thread (as PromptCacheStore.release does now); the next turn runs meanwhile

Then the same file read back, as a disk hit does: mx.load (before) vs cache_files.read.

    python benchmarks/prompt_cache_write.py --tokens 20000 --rounds 3
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_step35 import cache_files, load
from mlx_step35.generation import generate_step

LAYERS, KV_HEADS, HEAD_DIM = 12, 8, 128  # the real model's full-attention KV (facts sheet)
ARMS = ["idle", "old-sync", "new-sync", "background"]


def big_state(tokens: int):
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(LAYERS):
        for kind in ("keys", "values"):
            bits = rng.integers(0, 1 << 16, (1, KV_HEADS, tokens, HEAD_DIM), dtype=np.uint16)
            arrays[f"trunk.{i}.{kind}"] = mx.array(bits).view(mx.bfloat16)
    mx.eval(list(arrays.values()))
    return arrays, {"tokens": "[]"}


def first_token(model, prompt) -> float:
    t = time.perf_counter()
    gen = generate_step(model, prompt, max_tokens=1)
    next(gen)
    gen.close()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20000, help="tokens of the large file's KV")
    ap.add_argument("--prompt", type=int, default=512, help="tokens of the next turn's prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    model, _ = load(None)
    arrays, meta = big_state(a.tokens)
    gb = sum(x.nbytes for x in arrays.values()) / 1e9
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 2000, a.prompt)]
    first_token(model, prompt)  # warm up
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        files = cache_files.CacheDir(d, lambda m: (), max_bytes=1 << 40)
        ttft = {k: [] for k in ARMS}
        write_s = {"old-sync": [], "new-sync": [], "background": []}
        for r in range(a.rounds):
            for arm in ARMS:
                f = Path(d) / f"{r:024x}.safetensors"
                t = time.perf_counter()
                if arm == "old-sync":
                    mx.save_safetensors(str(Path(d) / ".old.tmp.safetensors"), arrays, metadata=meta)
                    os.replace(Path(d) / ".old.tmp.safetensors", f)
                elif arm == "new-sync":
                    cache_files.write(f, cache_files.snapshot(arrays, meta))
                elif arm == "background":
                    files.submit(f"{r:024x}", (), cache_files.snapshot(arrays, meta))
                w = time.perf_counter() - t
                ttft[arm].append(w + first_token(model, prompt))
                if arm == "background":
                    files.flush()
                    w = time.perf_counter() - t
                if arm != "idle":
                    write_s[arm].append(w)
                    f.unlink(missing_ok=True)
        files.close()
        read_s = reads(Path(d), arrays, meta, a.rounds)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__}, {mx.default_device()}; "
        f"file {gb:.2f} GB ({a.tokens} tokens of the real model's full-attention KV); "
        f"next turn: demo model, {a.prompt}-token prompt; {a.rounds} rounds, medians"
    )
    print("| arm | time to first token of the next turn, s | write done after, s |")
    print("|---|---:|---:|")
    for arm in ARMS:
        w = f"{statistics.median(write_s[arm]):.2f}" if arm in write_s else "-"
        print(f"| {arm} | {statistics.median(ttft[arm]):.3f} | {w} |")
    print("\n| reading the file back (page cache warm), evaluated | s |\n|---|---:|")
    for name, ts in read_s.items():
        print(f"| {name} | {statistics.median(ts):.2f} |")


def reads(d: Path, arrays, meta, rounds):
    """A disk hit's read: mx.load (format 1, unchecked) vs cache_files.read (checked)."""
    f = d / "read.safetensors"
    cache_files.write(f, cache_files.snapshot(arrays, meta))
    out = {"mx.load (before: no check)": [], "cache_files.read (CRC-32 checked)": []}
    for _ in range(rounds):
        for name in out:
            t = time.perf_counter()
            got = mx.load(str(f)) if name.startswith("mx") else cache_files.read(f)[0]
            mx.eval(list(got.values()))
            out[name].append(time.perf_counter() - t)
            del got
    return out


if __name__ == "__main__":
    main()
