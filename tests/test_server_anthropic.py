"""POST /v1/messages (Anthropic's Messages API) on the checkpoint scripted to emit a Step reply
with reasoning and a tool call (test_server_chat.py): through the `anthropic` SDK (create,
stream, count_tokens), against /v1/chat/completions for the same conversation (same prompt
tokens, same reply, consistent usage and prompt-cache reads), and bad input in Anthropic's
error shape."""

import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from server_util import running_server
from test_server_chat import SCRIPT, TOOLS, USER, script_checkpoint

KEY = "sk-test-anthropic"
A_TOOLS = [  # TOOLS (OpenAI's shape) as Anthropic tools
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
REPLY_BLOCKS = [  # what the scripted reply is, read from SCRIPT by hand
    ("thinking", "Let me check the weather."),
    ("text", "I will call a tool."),
    ("tool_use", ("get_weather", {"city": "Paris", "days": 3})),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return script_checkpoint(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def url(ckpt):
    script = Path(__file__).with_name("serve_scripted.py")
    with running_server(["--ckpt", ckpt, "--api-key", KEY, "--prompt-cache-gb", 0.5], script=script) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def chat(url, messages, **kw):
    body = dict(model="scripted", messages=messages, tools=TOOLS, **kw)
    r = httpx.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


def blocks(message) -> list:
    """(type, payload) of each content block, ids left out (they are random)."""
    out = []
    for b in message.content:
        if b.type == "thinking":
            out.append(("thinking", b.thinking))
        elif b.type == "text":
            out.append(("text", b.text))
        else:
            out.append((b.type, (b.name, b.input)))
    return out


def history(message) -> list:
    """USER, the reply echoed back as Anthropic clients do, and a tool result for its call."""
    call = next(b for b in message.content if b.type == "tool_use")
    return USER + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}],
        },
    ]


CHAT_HISTORY = USER + [  # history() in OpenAI's shape
    {
        "role": "assistant",
        "content": "I will call a tool.",
        "reasoning_content": "Let me check the weather.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


# ---------------------------------------------------------------------------------------------
# the server, through the anthropic SDK


def test_create_with_tools_equals_chat_completions(url, client):
    msg = client.messages.create(model="scripted", max_tokens=200, messages=USER, tools=A_TOOLS)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "scripted"
    assert blocks(msg) == REPLY_BLOCKS
    assert msg.stop_reason == "tool_use" and msg.stop_sequence is None
    call = msg.content[2]
    assert call.id.startswith("toolu_") and msg.content[0].signature
    ref = chat(url, USER)
    m = ref["choices"][0]["message"]
    assert (m["reasoning_content"], m["content"]) == (msg.content[0].thinking, msg.content[1].text)
    assert json.loads(m["tool_calls"][0]["function"]["arguments"]) == call.input
    u = ref["usage"]
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == u["prompt_tokens"]
    assert msg.usage.output_tokens == u["completion_tokens"] == len(SCRIPT) + 1
    assert msg.usage.cache_creation_input_tokens == 0


def test_prompt_cache_reads_match_chat_completions(url, client):
    """The same conversation through either endpoint reads the same number of prompt tokens
    from the cache: only possible if both prompts are the same tokens up to there."""
    first = client.messages.create(model="scripted", max_tokens=200, messages=USER, tools=A_TOOLS)
    msgs = history(first)
    chat(url, CHAT_HISTORY)
    again = chat(url, CHAT_HISTORY)["usage"]
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["prompt_tokens"]
    msg = client.messages.create(model="scripted", max_tokens=200, messages=msgs, tools=A_TOOLS)
    assert msg.usage.cache_read_input_tokens == cached
    assert msg.usage.input_tokens == again["prompt_tokens"] - cached
    assert blocks(msg) == REPLY_BLOCKS  # the script ignores the prompt: the same reply
    n = client.messages.count_tokens(model="scripted", messages=msgs, tools=A_TOOLS).input_tokens
    assert n == again["prompt_tokens"] == msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def test_stream_equals_create(client):
    kw = dict(model="scripted", max_tokens=200, messages=USER, tools=A_TOOLS)
    with client.messages.stream(**kw) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        streamed = stream.get_final_message()
    made = client.messages.create(**kw)
    assert blocks(streamed) == blocks(made) == REPLY_BLOCKS
    assert streamed.content[0].signature == made.content[0].signature  # a hash of the thinking
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (
        made.stop_reason,
        made.usage.output_tokens,
    )
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == (
        made.usage.input_tokens + made.usage.cache_read_input_tokens
    )
    raw = [
        k
        for k in kinds
        if k[0]
        in ("message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop")
        or k[1]
    ]
    assert raw[0] == ("message_start", None) and raw[-2:] == [("message_delta", None), ("message_stop", None)]
    assert ("content_block_delta", "signature_delta") in raw and (
        "content_block_delta",
        "input_json_delta",
    ) in raw
    assert [k for k in raw if k[0] == "content_block_start"] == [("content_block_start", None)] * 3


def test_stream_with_tool_result_in_history(url, client):
    first = client.messages.create(model="scripted", max_tokens=200, messages=USER, tools=A_TOOLS)
    with client.messages.stream(model="scripted", max_tokens=3, messages=history(first), tools=A_TOOLS) as s:
        msg = s.get_final_message()
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    assert blocks(msg) == [("thinking", "Let me check the weather.")]  # SCRIPT's first 3 pieces
    n = client.messages.count_tokens(model="scripted", messages=history(first), tools=A_TOOLS).input_tokens
    assert n == chat(url, CHAT_HISTORY, max_tokens=1)["usage"]["prompt_tokens"]


def test_stop_sequences(client):
    msg = client.messages.create(
        model="scripted", max_tokens=200, messages=USER, tools=A_TOOLS, stop_sequences=["tool.", "call a"]
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "call a"
    assert blocks(msg) == [("thinking", "Let me check the weather."), ("text", "I will ")]


def test_max_tokens_beyond_the_context_is_fitted(url, client):
    msg = client.messages.create(model="scripted", max_tokens=10**7, messages=USER, tools=A_TOOLS)
    assert msg.stop_reason == "tool_use"  # OpenAI's endpoint refuses such a max_tokens
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 10**7},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400


def claude_code_body(cch: str, messages: list) -> dict:
    """A request shaped as Claude Code 2.1.197 sends it (../shared/AGENT_CLIENTS.md)."""
    return {
        "model": "scripted",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": f"x-anthropic-billing-header: cc_version=2.1.197.a1b; cc_entrypoint=cli; cch={cch};",
            },
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be concise. " * 40, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [dict(t, cache_control={"type": "ephemeral"}) for t in A_TOOLS],
        "messages": messages,
        "metadata": {"user_id": "user_0123_account__session_4567"},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
    }


def test_claude_code_shaped_session_reuses_the_prompt_cache(url):
    headers = {
        "Authorization": f"Bearer {KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,mid-conversation-system-2026-04-07",
        "x-app": "cli",
        "X-Claude-Code-Session-Id": "0b7f6f52-6a35-4bd4-a4a3-1d0f5a8e9c11",
    }
    first = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>Today is Monday.</system-reminder>"},
                {
                    "type": "text",
                    "text": "What is the weather in Paris?",
                    "cache_control": {"type": "ephemeral"},
                },
            ],
        },
        {"role": "system", "content": "Mid-conversation system prompt."},
    ]

    def turn(cch, messages):
        events = []
        with httpx.stream(
            "POST",
            url + "/v1/messages?beta=true",
            json=claude_code_body(cch, messages),
            headers=headers,
            timeout=60,
        ) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        return events

    events = turn("1a2b3", first)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    sig = next(
        e["delta"]["signature"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "signature_delta"
    )
    call = starts[2]
    echoed = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Let me check the weather.", "signature": sig},
            {"type": "text", "text": "I will call a tool."},
            {
                "type": "tool_use",
                "id": call["id"],
                "name": call["name"],
                "input": {"city": "Paris", "days": 3},
            },
        ],
    }
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}],
    }
    events = turn("9f8e7", first + [echoed, result])  # a new billing nonce, as every request has
    usage = events[-2]["usage"]
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
    # the whole first prompt but its last few tokens is reused: the nonce was not in the prompt
    assert usage["cache_read_input_tokens"] > prompt / 2, usage


# ---------------------------------------------------------------------------------------------
# bad input: Anthropic's error shape, and the server still serves


def post(url, body, path="/v1/messages?beta=true", key=KEY, **kw):
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"}
    return httpx.post(
        url + path, headers=headers, timeout=60, **kw, **({} if "content" in kw else {"json": body})
    )


def assert_error(r, status, kind, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    for w in words:
        assert w in body["error"]["message"], body


GOOD = {"model": "scripted", "max_tokens": 5, "messages": USER}


@pytest.mark.parametrize(
    "body, words",
    [
        ({"model": "scripted", "messages": USER}, ["max_tokens"]),
        (dict(GOOD, max_tokens="many"), ["max_tokens"]),
        (dict(GOOD, max_tokens=0), ["max_tokens"]),
        (dict(GOOD, messages="hi"), ["messages"]),
        (dict(GOOD, messages=[{"role": "user", "content": 5}]), ["messages.0.content"]),
        (dict(GOOD, messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}]), ["'video'"]),
        (
            dict(GOOD, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            ["text only"],
        ),
        (dict(GOOD, messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), ["text"]),
        (dict(GOOD, messages=[{"role": "robot", "content": "hi"}]), ["role"]),
        (
            dict(
                GOOD,
                messages=USER
                + [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}],
                    }
                ],
            ),
            ["toolu_nope"],
        ),
        (
            dict(
                GOOD,
                messages=USER
                + [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": "Paris"}],
                    },
                    USER[0],
                ],
            ),
            ["input"],
        ),
        (dict(GOOD, messages=USER + [{"role": "assistant", "content": "Sure"}]), ["prefill"]),
        (dict(GOOD, tools=[{"type": "web_search_20250305", "name": "web_search"}]), ["web_search_20250305"]),
        (dict(GOOD, tools=[{"name": "f"}]), ["input_schema"]),
        (dict(GOOD, tool_choice={"type": "maybe"}), ["tool_choice"]),
        (dict(GOOD, tool_choice={"type": "tool", "name": "nope"}, tools=A_TOOLS), ["nope"]),
        (dict(GOOD, thinking={"type": "sometimes"}), ["thinking"]),
        (dict(GOOD, output_config={"format": {"type": "json_schema", "schema": {}}}), ["format"]),
        (dict(GOOD, frobnicate=1), ["frobnicate"]),
        (dict(GOOD, temperature="hot"), ["temperature"]),
        (dict(GOOD, num_draft=99), ["num_draft"]),
    ],
)
def test_bad_request(url, body, words):
    assert_error(post(url, body), 400, "invalid_request_error", *words)


def test_bad_json_key_model_and_path_then_a_valid_request(url, client):
    assert_error(
        post(url, None, content=b'{"model": "scripted", "max_tokens": 5,'),
        400,
        "invalid_request_error",
        "JSON",
    )
    assert_error(post(url, GOOD, key="wrong"), 401, "authentication_error", "x-api-key")
    big = b"x" * (16 * 2**20 + 1)  # over the server's default --max-body-bytes
    assert_error(post(url, None, content=big), 413, "request_too_large", "limit")
    assert_error(post(url, dict(GOOD, model="claude-opus-4")), 404, "not_found_error", "claude-opus-4")
    assert_error(post(url, GOOD, path="/v1/messages/nope"), 404, "not_found_error")
    assert_error(httpx.get(url + "/v1/messages", headers={"x-api-key": KEY}), 405, "invalid_request_error")
    assert_error(
        post(url, {"model": "scripted"}, path="/v1/messages/count_tokens"),
        400,
        "invalid_request_error",
        "messages",
    )
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(**GOOD)
    # the OpenAI routes keep OpenAI's shape
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER}, headers={"x-api-key": "wrong"})
    assert (
        r.status_code == 401
        and r.json()["error"]["type"] == "authentication_error"
        and "type" not in r.json()
    )
    # and the server still serves: x-api-key and Bearer both work
    assert client.messages.create(**GOOD).stop_reason == "max_tokens"
    r = httpx.post(url + "/v1/messages", json=GOOD, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 5


def test_models_list_reads_in_both_sdks(url, client):
    (card,) = client.models.list().data
    assert card.id == "scripted" and card.type == "model"
    assert client.models.retrieve("scripted").id == "scripted"
    openai_client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    assert [m.id for m in openai_client.models.list()] == ["scripted"]


def test_head_root_answers_200(url):
    assert httpx.head(url + "/").status_code == 200  # Claude Code's probe, no key needed
