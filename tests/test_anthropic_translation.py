"""Anthropic's Messages API, in process: requests translated into the chat request (the same
prompt tokens as /v1/chat/completions' for the same conversation), the keep-alive helper, and
the streamed events of scripted engine events (pings, errors, stop reasons)."""

import asyncio
import json

import pytest
from factory import make_checkpoint
from mlx_lm.tokenizer_utils import load as load_tokenizer
from test_server_anthropic import A_TOOLS, CHAT_HISTORY
from test_server_chat import TOOLS, USER

from mlx_step35.sampling import make_sampler
from mlx_step35.server import anthropic as protocol
from mlx_step35.server.anthropic import CountTokensRequest, MessagesRequest, Reply, chat_request
from mlx_step35.server.chat import Turn, render
from mlx_step35.server.context import keep_alive
from mlx_step35.server.engine import Failed, Finished, GenRequest, Piece
from mlx_step35.server.schemas import ChatRequest, RequestError
from mlx_step35.speculative import SpecStats


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("templated"), chat_template=True)


def test_translation_renders_the_chat_prompt(ckpt):
    tok = load_tokenizer(ckpt)
    signed = [
        {"type": "thinking", "thinking": "Let me check the weather.", "signature": "x"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "I will call a tool.", "cache_control": {"type": "ephemeral"}},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 3}},
    ]
    body = {
        "model": "scripted",
        "max_tokens": 10,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abcde;"},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": USER
        + [
            {"role": "assistant", "content": signed},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "sunny, 21 C"}],
                    }
                ],
            },
        ],
        "tools": A_TOOLS,
    }
    ids = render(tok, chat_request(MessagesRequest(**body)))[0]
    want = ChatRequest(messages=[{"role": "system", "content": "Be brief."}] + CHAT_HISTORY, tools=TOOLS)
    assert ids == render(tok, want)[0]
    assert "cch=" not in tok.decode(ids)  # the per-request billing header would defeat the prompt cache


def test_mid_conversation_system_message_is_a_system_turn(ckpt):
    tok = load_tokenizer(ckpt)
    body = {
        "model": "scripted",
        "system": "Rules.",
        "messages": USER + [{"role": "system", "content": [{"type": "text", "text": "Reminder: be brief."}]}],
    }
    text = tok.decode(render(tok, chat_request(CountTokensRequest(**body)))[0])
    assert text.endswith(
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        "<|im_start|>system\nReminder: be brief.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert "<|im_start|>system\nRules.<|im_end|>" in text


def test_tool_choice_and_error_results_translate():
    body = {"model": "m", "max_tokens": 5, "messages": USER, "tools": A_TOOLS}
    for choice, want in [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ]:
        assert chat_request(MessagesRequest(**body, tool_choice=choice)).tool_choice == want
    msgs = USER + [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": "boom"},
                {"type": "text", "text": "and now?"},
            ],
        },
    ]
    out = chat_request(MessagesRequest(**dict(body, messages=msgs))).messages
    assert out[-2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"},
        {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
    ]
    with pytest.raises(RequestError, match="disable_parallel_tool_use"):
        chat_request(MessagesRequest(**body, tool_choice={"type": "auto", "disable_parallel_tool_use": True}))


def test_keep_alive_pings_before_the_first_event_and_between_slow_ones():
    async def events():
        await asyncio.sleep(0.35)
        yield "a"
        await asyncio.sleep(0.35)
        yield "b"

    async def run():
        return [x async for x in keep_alive(events(), 0.1)]

    out = asyncio.run(run())
    a, b = out.index("a"), out.index("b")
    assert out[-1] == "b" and 2 <= a <= 4 and 2 <= b - a - 1 <= 4 and set(out) - {"a", "b"} == {None}


def stream_events(events, monkeypatch, ping_s=5.0, room=5) -> list:
    """(event name, data) of Reply.stream over scripted engine events, in process; the request
    asks for max_tokens=5, of which the context leaves `room`."""
    monkeypatch.setattr(protocol, "PING_S", ping_s)
    req = MessagesRequest(model="m", max_tokens=5, messages=USER, stream=True)
    gen = GenRequest(prompt=[1, 2, 3], max_tokens=min(5, room), sampler=make_sampler())
    reply = Reply(None, Turn(chat_request(req), [1, 2, 3], True, gen, None, "m"), req)

    async def run():
        return [chunk async for chunk in reply.stream(events())]

    out = []
    for chunk in asyncio.run(run()):
        head, data = chunk.strip().split("\n")
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_stream_pings_while_prefilling_then_ends_with_message_stop(monkeypatch):
    async def events():
        await asyncio.sleep(0.5)  # a long prefill
        yield Piece("Hmm.\n</think>\nYes", [7, 8], [])
        yield Finished("stop", 3, 3, 1, 0.0, 0.5, 0.0, SpecStats())

    out = stream_events(events, monkeypatch, ping_s=0.1)
    names = [n for n, _ in out]
    assert names[0] == "message_start" and 3 <= names.count("ping") <= 5
    assert names[1 : 1 + names.count("ping")] == ["ping"] * names.count("ping")  # only before the reply
    assert all(n == d["type"] for n, d in out)
    assert names[-2:] == ["message_delta", "message_stop"]
    delta = out[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["input_tokens"] == 2 and delta["usage"]["cache_read_input_tokens"] == 1
    texts = [
        d["delta"].get("text") or d["delta"].get("thinking") for n, d in out if n == "content_block_delta"
    ]
    assert [t for t in texts if t] == ["Hmm.", "Yes"]


@pytest.mark.parametrize("room, reason", [(5, "max_tokens"), (2, "model_context_window_exceeded")])
def test_length_is_max_tokens_or_the_context_window(monkeypatch, room, reason):
    async def events():
        yield Piece("Hmm", [7, 8], [])
        yield Finished("length", 3, min(5, room), 0, 0.0, 0.1, 0.1, SpecStats())

    out = stream_events(events, monkeypatch, room=room)
    assert out[-2][1]["delta"]["stop_reason"] == reason


def test_a_failure_mid_stream_is_an_error_event(monkeypatch):
    async def events():
        yield Piece("Let me", [7], [])
        yield Failed("generation failed: RuntimeError: boom")

    out = stream_events(events, monkeypatch)
    assert out[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "generation failed: RuntimeError: boom"}},
    )
    assert "message_stop" not in [n for n, _ in out]
