"""Shared pieces of the benchmarks: models to run on, prompts, timing helpers."""

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the checkpoint factory

BUILD = ROOT / "build" / "bench"

# Synthetic checkpoints wider than the tests' (hidden 512); benchmarks vary depth and experts.
WIDE = dict(
    hidden_size=512,
    head_dim=64,
    vocab_size=4096,
    num_attention_heads=8,
    num_attention_groups=2,
    attention_other_setting={"num_attention_heads": 12, "num_attention_groups": 2, "head_dim": 64},
    intermediate_size=1536,
    moe_top_k=4,
    sliding_window=64,
)
# The larger random checkpoint of benchmark 1: 8 layers, 32 experts.
LARGE = dict(WIDE, num_hidden_layers=8, moe_num_experts=32, moe_intermediate_size=256, share_expert_dim=256)

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):",
    'class Stack:\n    """A last-in first-out stack."""\n\n    def __init__(self):',
    'def read_config(path):\n    """Read a JSON config file and return a dict."""',
    "    def __repr__(self):",
    "for i, line in enumerate(lines):",
]


def large_checkpoint() -> Path:
    """The larger random checkpoint, converted to 4-bit MLX (made once, under build/)."""
    from factory import make_checkpoint

    from mlx_step35 import convert

    hf, mlx = BUILD / "large-hf", BUILD / "large-4bit"
    if not (mlx / "config.json").exists():
        if not (hf / "config.json").exists():
            make_checkpoint(hf, seed=0, **LARGE)
        convert(hf, mlx, quantize=True)
    return mlx


def demo_model() -> Path:
    from mlx_step35.loading import DEMO_MODEL

    return DEMO_MODEL


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def interval(xs, reps=2000, seed=0):
    """95% bootstrap interval of the median of xs."""
    import numpy as np

    xs = np.asarray(xs)
    meds = np.median(np.random.default_rng(seed).choice(xs, size=(reps, len(xs))), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t


def run_child(cmd, what: str, **popen) -> dict:
    """Run a child process that prints a JSON object on its last line; returns that object
    plus `peak_anon`, its peak anonymous memory (RssAnon) polled from /proc (Linux; 0 elsewhere)."""
    import json
    import subprocess
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    peak_anon = 0

    def poll():
        nonlocal peak_anon
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in open(f"/proc/{proc.pid}/status"))
                peak_anon = max(peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=poll)
    thread.start()
    stdout, stderr = proc.communicate()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{what}: exit {proc.returncode}\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_anon"] = peak_anon
    return result
