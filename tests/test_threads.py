"""Generation from worker threads: identical tokens to the main thread's, and a clean exit.

MLX streams, compile caches and random keys are per thread; a worker thread's compile cache
and random key hold Python objects that its C++ thread-exit destructors release, which
aborts the process if the interpreter is already finalizing. Generation therefore has MLX
release them when the worker thread's Python state is cleared (`mx.clear_streams()`, as MLX
asks of every worker thread), before `Thread.join()` returns.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx

from mlx_step35 import load
from mlx_step35.generation import generate_step

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, threading, time
from mlx_step35 import load, make_sampler
from mlx_step35.generation import generate_step

model, _ = load(sys.argv[1], quantize=False, dtype="float32")
prompt = list(range(3, 40))
modes = [dict(), dict(draft_mtp=True, num_draft=2), dict(draft_mtp=True, num_draft="auto")]

def tokens(**kw):
    return [t for t, _, _ in generate_step(model, prompt, max_tokens=24, **kw)]

def in_thread(fn, **kw):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(**kw)))
    t.start()
    t.join()
    return out[0]

main = [tokens(**m) for m in modes]
workers = [in_thread(tokens, **m) for m in modes]  # several worker threads in turn
sampled = in_thread(tokens, sampler=make_sampler(0.8), draft_mtp=True, num_draft=3)
sys.setswitchinterval(100)  # the main thread keeps the GIL as long as it can from here to exit
print(json.dumps(dict(main=main, workers=workers, sampled=len(sampled))), flush=True)
end = time.perf_counter() + 0.2
while time.perf_counter() < end:
    pass
"""


def test_worker_threads_generate_identically_and_exit_cleanly(tiny_ckpt):
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_ckpt)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["workers"] == out["main"]
    assert all(len(t) == 24 for t in out["main"]) and out["sampled"] == 24


def test_worker_thread_releases_mlx_state_before_join(tiny_ckpt, monkeypatch):
    """mx.clear_streams() runs in the worker itself, once, before join() returns; never on
    the main thread (whose state MLX releases at exit)."""
    model = load(tiny_ckpt, quantize=False, dtype="float32")[0]
    calls, real = [], mx.clear_streams
    monkeypatch.setattr(mx, "clear_streams", lambda: calls.append(threading.get_ident()) or real())
    prompt = list(range(3, 20))
    main = [t for t, _, _ in generate_step(model, prompt, max_tokens=8)]
    out = []

    def work():
        out.append(threading.get_ident())
        for _ in range(2):  # two generations in one thread: one release, at its end
            out.append([t for t, _, _ in generate_step(model, prompt, max_tokens=8)])
            assert calls == []

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert calls == [out[0]]
    assert out[1] == out[2] == main
