"""Start the real server as a subprocess on a free port, for the server tests."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class URL(str):
    """The server's base URL, with its process as `.proc`."""

    proc: subprocess.Popen


@contextmanager
def running_server(args=(), script=None, timeout=120.0):
    """Yield the base URL of `python -m mlx_step35.server ARGS` (or `python SCRIPT ARGS`) once
    /health answers; stop it with SIGINT (Ctrl-C) afterwards and check that it exits."""
    port = free_port()
    cmd = [sys.executable] + ([str(script)] if script else ["-m", "mlx_step35.server"])
    cmd += ["--port", str(port), "--log-level", "WARNING", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = URL(f"http://127.0.0.1:{port}")
    url.proc = proc
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    running_server.last_exit = proc.returncode
    running_server.last_output = proc.stdout.read()
