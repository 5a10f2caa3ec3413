"""The server under `mlx.launch --backend ring -n 2`: rank 0 serves HTTP, rank 1 follows in
lockstep; output identical to one process, also after a stop string and a client that left
mid-stream; Ctrl-C ends both ranks."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from factory import make_checkpoint
from server_util import ROOT, free_port
from test_distributed import free_port_base, launch

from mlx_step35 import convert, load, stream_generate

# Wide enough that every quantized column split over 2 ranks keeps whole groups of 64.
SHAPE = dict(
    hidden_size=256,
    head_dim=64,
    vocab_size=512,
    num_attention_heads=4,
    num_attention_groups=2,
    attention_other_setting={"num_attention_heads": 4, "num_attention_groups": 2, "head_dim": 64},
    intermediate_size=512,
    num_hidden_layers=3,
    moe_num_experts=4,
    moe_top_k=2,
    moe_intermediate_size=128,
    share_expert_dim=128,
)
PROMPT = list(range(5, 30))
GEN = 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A float32 conversion: identical output needs no bf16 rounding (the all-sum of partial
    products rounds differently from one matmul, which decides near-ties in bf16)."""
    hf = make_checkpoint(tmp_path_factory.mktemp("tp_server_hf"), sliding_window=8, **SHAPE)
    out = tmp_path_factory.mktemp("tp_server") / "f32"
    convert(hf, out, quantize=False, dtype="float32")
    return out


@pytest.fixture(scope="module")
def one_process(ckpt):
    model, tok = load(ckpt)
    return [r.token for r in stream_generate(model, tok, PROMPT, GEN)]


@pytest.fixture(scope="module")
def served(ckpt):
    port = free_port()
    cmd = launch(free_port_base()) + [
        sys.executable, "-m", "mlx_step35.server", "--model", str(ckpt), "--port", str(port),
        "--num-draft", "2", "--log-level", "WARNING",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(  # its own process group: Ctrl-C in a terminal reaches every rank
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server under mlx.launch did not become healthy"
        time.sleep(0.3)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def complete(url, **extra):
    body = dict(prompt=PROMPT, max_tokens=GEN, temperature=0, return_token_ids=True)
    body.update(extra)
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_two_ranks_serve_what_one_process_generates(served, one_process):
    url, _ = served
    assert complete(url)["token_ids"] == one_process
    assert complete(url, num_draft=3)["token_ids"] == one_process  # drafting in lockstep


def test_stop_string_and_a_client_that_left_keep_the_ranks_in_step(served, one_process):
    url, _ = served
    text = complete(url)["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert complete(url, stop=[stop])["finish_reason"] == "stop"
    body = dict(prompt=PROMPT, max_tokens=GEN, temperature=0, stream=True)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        next(r.iter_lines())  # one chunk, then the client goes away
    assert complete(url)["token_ids"] == one_process


def test_concurrent_requests_share_passes_across_ranks(served, ckpt):
    """Three requests at once, decoded together by both ranks (rank 0's plan each step): each
    gets what it gets alone in one process, and passes carried several rows."""
    model, tok = load(ckpt)
    prompts = [PROMPT, list(range(40, 52)), list(range(7, 60, 2))]
    drafts = [0, 2, 3]
    alone = [
        [r.token for r in stream_generate(model, tok, p, GEN, draft_mtp=n > 0, num_draft=n or 1)]
        for p, n in zip(prompts, drafts)
    ]
    url, _ = served
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda pn: complete(url, prompt=pn[0], num_draft=pn[1]), zip(prompts, drafts)))
    assert [g["token_ids"] for g in got] == alone
    metrics = httpx.get(url + "/metrics").text
    rows = [
        int(line.split('rows="')[1].split('"')[0])
        for line in metrics.splitlines()
        if "batch_passes_total{" in line
    ]
    assert max(rows) >= 2


def test_ctrl_c_ends_both_ranks(served):
    """Ctrl-C in the terminal (SIGINT to the process group): mlx.launch stops and ends every rank."""
    url, proc = served
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(60)
    with pytest.raises(ProcessLookupError):  # no rank is left behind in the group
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
