"""Server pieces without a server: stop strings split across pieces, trunk-pass counting, and the
Prometheus exposition format of /metrics."""

import os
import re
import socket
import subprocess
import sys

from server_util import ROOT

from mlx_step35.server.engine import Finished, StopStrings, trunk_passes
from mlx_step35.server.metrics import Metrics
from mlx_step35.speculative import SpecStats


def run_stops(stops, pieces):
    s = StopStrings(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = s.feed(p)
        out += text
        if hit:
            return out, True
    return out + s.flush(), False


def test_stop_string_split_across_pieces_is_never_released():
    released = []
    s = StopStrings(["END"])
    for p in ["abc E", "N", "D tail"]:
        text, hit = s.feed(p)
        released.append(text)
    assert released == ["abc ", "", ""] and hit  # only "E", "EN" held back; the cut is before "END"
    assert run_stops(["END"], ["abc E", "N", "D tail"]) == ("abc ", True)


def test_earliest_stop_wins_and_near_misses_are_released():
    assert run_stops(["yz", "b"], ["xa", "byz"]) == ("xa", True)
    assert run_stops(["END"], ["EN", "x", "EN"]) == ("ENxEN", False)
    assert run_stops([], ["a", "b"]) == ("ab", False)


def test_trunk_passes():
    assert trunk_passes(SpecStats(), 10) == 10  # plain decoding: one pass per token
    assert trunk_passes(SpecStats(), 0) == 0
    s = SpecStats(verify_steps=3, plain_tokens=2)
    assert trunk_passes(s, 9) == 6  # prefill + 3 verify steps + 2 plain steps


def test_metrics_exposition_format():
    m = Metrics()
    m.request("/v1/completions", 200)
    m.first_token(0.3)
    s = SpecStats(verify_steps=2, drafted=[2, 1], accepted=[2, 0])
    m.finished(Finished("length", 5, 5, 0, 0.0, 0.3, 0.5, s))
    text = m.render(queue_depth=2, running=1)
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+Inf-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'mlx_step35_mtp_accepted_total{depth="1"} 2' in text
    assert 'mlx_step35_time_to_first_token_seconds{le="0.25"} 0' in text
    assert 'mlx_step35_time_to_first_token_seconds{le="0.5"} 1' in text
    assert "mlx_step35_decode_tokens_per_second 8.0" in text  # 4 tokens after the first in 0.5 s
    assert "mlx_step35_queue_depth 2" in text and "mlx_step35_trunk_passes_total 3" in text


def test_busy_port_is_one_line_exit_2_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "mlx_step35.server", "--port", str(port)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            timeout=120,
        )
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
