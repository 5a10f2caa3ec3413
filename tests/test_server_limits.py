"""Server limits on the demo model: API key (401), body limit (413), full queue (503 with
Retry-After), CORS only for --allowed-origins, each followed by a request that succeeds; Ctrl-C.
This server also keeps its routed experts on disk (--expert-cache-gb): output unchanged."""

import contextlib
import signal
import threading

import httpx
import pytest
from server_util import running_server

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://editor.example"


@pytest.fixture(scope="module")
def url():
    args = ["--api-key", KEY, "--max-queue", "1", "--max-body-bytes", "4096", "--allowed-origins", ORIGIN]
    args += ["--decode-concurrency", "2"]
    args += ["--expert-cache-gb", "0.001", "--num-draft", "2"]
    with running_server(args) as u:
        yield u
    assert running_server.last_exit == 0, running_server.last_output[-2000:]


def ok(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_expert_cache_server_output_identical_to_resident_plain_decoding(url):
    from mlx_step35 import load, stream_generate

    model, tok = load(None)
    ref = [r.token for r in stream_generate(model, tok, "def fibonacci(n):", 24)]
    body = {"prompt": "def fibonacci(n):", "max_tokens": 24, "return_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    assert r["choices"][0]["token_ids"] == ref
    assert r["timings"]["mtp"]["drafted"][0] > 0


def test_api_key(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
        assert httpx.get(url + "/metrics", headers=headers).status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # public: liveness and the chat page
    assert httpx.get(url + "/").status_code == 200
    ok(url)


def test_body_over_limit_is_413(url):
    big = {"prompt": "x" * 5000, "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while read
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(url + "/v1/completions", content=chunked(), headers=AUTH)
    assert r.status_code == 413
    ok(url)


def test_cors_only_for_allowed_origins(url):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": ORIGIN, **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example", **AUTH})
    assert "access-control-allow-origin" not in r.headers


def test_full_queue_is_503_with_retry_after(url):
    """Two requests generate together (--decode-concurrency 2), a third waits (--max-queue 1),
    a fourth is refused."""
    long = {"prompt": "def f(x):", "max_tokens": 3000, "stream": True}
    with contextlib.ExitStack() as stack:
        streams = []  # (each line iterator is kept: a dropped one closes its stream, a disconnect)
        for _ in range(2):
            client = stack.enter_context(httpx.Client(timeout=60, headers=AUTH))
            running = stack.enter_context(client.stream("POST", url + "/v1/completions", json=long))
            streams.append(running.iter_lines())
            assert next(ln for ln in streams[-1] if ln.startswith("data: "))  # generating now
        client = stack.enter_context(httpx.Client(timeout=60, headers=AUTH))
        queued = stack.enter_context(client.stream("POST", url + "/v1/completions", json=long))
        assert queued.status_code == 200  # fills the queue of 1
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=AUTH)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert "queue is full" in r.json()["error"]["message"]
    # all hung up: their jobs are cancelled and the queue drains
    for _ in range(100):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
        if r.status_code == 200:
            break
        assert r.status_code == 503
        threading.Event().wait(0.1)
    assert r.status_code == 200


def test_demo_context_is_the_real_models(url):
    """The demo model takes agent-sized prompts: its context is Step-3.5-Flash's 262,144
    positions (STEP35_FACTS), not the 4,096 it was first shipped with."""
    body = {"prompt": "x", "max_tokens": 262144}
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].endswith("exceed the model's context of 262144")
    ok(url)


def test_ctrl_c_ends_running_streams_and_exits_cleanly(url):  # last: stops the server
    body = {"prompt": "def f(x):", "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data: "))
        url.proc.send_signal(signal.SIGINT)
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
    assert url.proc.wait(30) == 0
    out = url.proc.stdout.read()
    assert "Traceback" not in out, out
