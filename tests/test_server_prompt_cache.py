"""The server's prompt cache across chat turns (demo model, its Step-3.5 chat template, window
32, drafting): each turn's tokens equal a cold in-process run on the same rendered prompt, the
next turn reuses the conversation up to the end of the previous user message, and a restarted
server reads the same prefix back from --prompt-cache-dir."""

import httpx
import pytest
from server_util import running_server

from mlx_step35 import load, stream_generate
from mlx_step35.chat_format import branch_points, render_prompt

SYSTEM = "You are a terse assistant for Python code. " * 6  # well past the 32-token window
TURNS = ["Write a function that adds two numbers.", "Now one that multiplies them, with a docstring."]
GEN = 16


@pytest.fixture(scope="module")
def demo():
    return load(None)


def chat(url, messages):
    body = {"messages": messages, "max_tokens": GEN, "temperature": 0, "return_token_ids": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def cold_tokens(demo, prompt):
    model, tok = demo
    return [r.token for r in stream_generate(model, tok, prompt, GEN)]


def next_messages(messages, reply, user):
    m = reply["choices"][0]["message"]
    said = {"role": "assistant", "content": m["content"] or ""}
    if m.get("reasoning_content"):
        said["reasoning_content"] = m["reasoning_content"]
    return messages + [said, {"role": "user", "content": user}]


@pytest.fixture(scope="module")
def conversation(demo, tmp_path_factory):
    """Two turns on one server (and its /metrics after them), then the second again on a restarted one."""
    cache_dir = tmp_path_factory.mktemp("prompt_cache")
    args = ["--num-draft", "2", "--prompt-cache-dir", cache_dir]
    with running_server(args) as url:
        m1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
        r1 = chat(url, m1)
        m2 = next_messages(m1, r1, TURNS[1])
        r2 = chat(url, m2)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    with running_server(args) as url:
        r2b = chat(url, m2)
    return m1, r1, m2, r2, r2b, metrics


def test_each_turn_equals_a_cold_run(demo, conversation):
    m1, r1, m2, r2, r2b, metrics = conversation
    for messages, reply in ((m1, r1), (m2, r2), (m2, r2b)):
        prompt = render_prompt(demo[1], messages)
        assert reply["prompt_token_ids"] == prompt
        assert reply["choices"][0]["token_ids"] == cold_tokens(demo, prompt)


def test_next_turn_reuses_up_to_the_previous_user_message(demo, conversation):
    m1, r1, m2, r2, r2b, metrics = conversation
    tok = demo[1]
    p1 = render_prompt(tok, m1)
    end_of_user = max(branch_points(tok, m1, p1))
    p2 = render_prompt(tok, m2)
    assert p2[:end_of_user] == p1[:end_of_user] and p2[: len(p1)] != p1  # the reply re-rendered
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert end_of_user <= r2["usage"]["prompt_tokens_details"]["cached_tokens"] < len(p2)
    assert r2b["usage"]["prompt_tokens_details"]["cached_tokens"] >= end_of_user  # after a restart
    assert r2["usage"]["prompt_tokens"] == len(p2)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (r1, r2))
    assert f"mlx_step35_prompt_tokens_cached_total {cached}\n" in metrics
