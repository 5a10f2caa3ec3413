"""POST /v1/responses end to end on a checkpoint scripted to emit a Step-3.5 reply (reasoning,
content, a call to a function tool and one to a function nested in a namespace tool): the same
prompt and reply as /v1/chat/completions for the same conversation, streamed as the OpenAI SDK
accumulates it, a Codex-shaped request, previous_response_id, and OpenAI's error shape."""

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from server_util import running_server
from test_server_chat import SCRIPT as CHAT_SCRIPT
from test_server_chat import script_checkpoint

from mlx_step35.chat_format import Delta, render_prompt
from mlx_step35.server import openai_responses
from mlx_step35.server.chat import render
from mlx_step35.server.context import Settings
from mlx_step35.server.engine import Failed, Finished, Piece
from mlx_step35.server.responses_input import ResponsesRequest, ResponseStore, as_items, to_chat

SCRIPT = CHAT_SCRIPT + [  # distinct vocabulary entries: the scripted chain never repeats a token
    "\n<tool_call>\n<function=multi_agent_v1__spawn_agent>\n",
    "<parameter=message>\nfind the forecast\n</parameter>\n",
    "</function>\n",
    "</tool_call>",
]
REASONING, CONTENT = "Let me check the weather.", "I will call a tool."
WEATHER = {
    "name": "get_weather",
    "description": "Weather forecast",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
SPAWN = {
    "name": "spawn_agent",
    "description": "Start a sub-agent",
    "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
}
# the same tools as Responses and as chat declares them (a namespace's functions flattened by hand)
TOOLS = [
    {"type": "function", **WEATHER, "strict": False},
    {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Sub-agents",
        "tools": [{"type": "function", **SPAWN}],
    },
    {"type": "web_search"},
]
CHAT_TOOLS = [
    {"type": "function", "function": WEATHER},
    {"type": "function", "function": dict(SPAWN, name="multi_agent_v1__spawn_agent")},
]
QUESTION = "What is the weather in Paris?"
CALLS = [  # what the script calls, as chat's tool_calls (name, arguments)
    ("get_weather", {"city": "Paris", "days": 3}),
    ("multi_agent_v1__spawn_agent", {"message": "find the forecast"}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return script_checkpoint(tmp_path_factory.mktemp("scripted"), SCRIPT)


@pytest.fixture(scope="module")
def url(ckpt):
    script = Path(__file__).with_name("serve_scripted.py")
    with running_server(["--ckpt", ckpt], script=script) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def chat(url, messages, **body):
    r = httpx.post(
        url + "/v1/chat/completions", json=dict(body, messages=messages, tools=CHAT_TOOLS), timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


def history_items(call_ids=("call_a", "call_b")):
    """A first turn as Responses items (as Codex sends them back) and as chat messages."""
    items = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "You are Codex."}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": REASONING}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": CONTENT}]},
        {
            "type": "function_call",
            "call_id": call_ids[0],
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {
            "type": "function_call",
            "call_id": call_ids[1],
            "namespace": "multi_agent_v1",
            "name": "spawn_agent",
            "arguments": '{"message": "go"}',
        },
        {"type": "function_call_output", "call_id": call_ids[0], "output": "sunny, 21 C"},
        {
            "type": "function_call_output",
            "call_id": call_ids[1],
            "output": [{"type": "input_text", "text": "started"}],
        },
    ]
    calls = [
        {
            "id": call_ids[0],
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": call_ids[1],
            "type": "function",
            "function": {"name": "multi_agent_v1__spawn_agent", "arguments": '{"message": "go"}'},
        },
    ]
    messages = [
        {"role": "system", "content": "You are Codex."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": CONTENT, "reasoning_content": REASONING, "tool_calls": calls},
        {"role": "tool", "tool_call_id": call_ids[0], "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": call_ids[1], "content": "started"},
    ]
    return items, messages


def test_prompt_equals_the_chat_prompt_of_the_same_conversation(ckpt):
    tok = load_tokenizer(ckpt)
    items, messages = history_items()
    req = ResponsesRequest(input=items, instructions="Be brief.", tools=TOOLS)
    ours, _, _ = render(tok, to_chat(req, as_items(req.input))[0])
    theirs = render_prompt(tok, [{"role": "system", "content": "Be brief."}] + messages, tools=CHAT_TOOLS)
    assert ours == theirs
    text = tok.decode(ours)  # the reasoning after the last user query is kept, the calls rendered
    assert f"<think>\n{REASONING}\n</think>\n{CONTENT}<tool_call>\n<function=get_weather>" in text
    assert "<function=multi_agent_v1__spawn_agent>\n<parameter=message>\ngo\n</parameter>" in text
    assert "<|im_start|>system\nYou are Codex.<|im_end|>" in text  # developer -> system


def test_a_tool_image_becomes_a_note_the_model_reads():
    """Codex's view_image answers with an image part; a text-only model gets a note instead of
    a failed turn (an image in a user message stays a 400: see the bad-input test)."""
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    output = {
        "type": "function_call_output",
        "call_id": "c1",
        "output": [{"type": "input_text", "text": "see:"}, image],
    }
    req = ResponsesRequest(input=[{"role": "user", "content": QUESTION}, call, output], tools=TOOLS)
    chat_req, _ = to_chat(req, as_items(req.input))
    assert chat_req.messages[-1] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "see:\n[image omitted: this model reads text only]",
    }


def check_output(output, usage, reply):
    """Responses output items and usage against chat's reply for the same conversation."""
    msg = reply["choices"][0]["message"]
    assert [o.type for o in output] == ["reasoning", "message", "function_call", "function_call"]
    assert output[0].content[0].text == msg["reasoning_content"] == REASONING
    assert output[1].content[0].text == msg["content"] == CONTENT
    for item, call, (flat, args) in zip(output[2:], msg["tool_calls"], CALLS):
        assert call["function"]["name"] == flat
        assert json.loads(item.arguments) == json.loads(call["function"]["arguments"]) == args
        assert item.call_id.startswith("call_")
    assert (output[2].name, output[2].namespace) == ("get_weather", None)
    assert (output[3].name, output[3].namespace) == ("spawn_agent", "multi_agent_v1")  # as Codex routes it
    u = reply["usage"]
    assert usage.input_tokens == u["prompt_tokens"] and usage.output_tokens == u["completion_tokens"]
    assert usage.output_tokens == len(SCRIPT) + 1  # the script and EOS
    assert usage.output_tokens_details.reasoning_tokens == SCRIPT.index("\n</think>\n") + 1
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_sdk_create_equals_chat_completions(url, client):
    resp = client.responses.create(model="scripted", input=QUESTION, tools=TOOLS)
    assert resp.object == "response" and resp.status == "completed" and resp.id.startswith("resp_")
    check_output(resp.output, resp.usage, chat(url, [{"role": "user", "content": QUESTION}]))
    assert resp.output_text == CONTENT


def test_tool_results_in_history_equal_chat_completions(url, client):
    items, messages = history_items()
    resp = client.responses.create(model="scripted", input=items, tools=TOOLS, max_output_tokens=2)
    reply = chat(url, messages, max_tokens=2)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in resp.output] == ["reasoning"] and resp.output[0].status == "incomplete"
    assert resp.output[0].content[0].text == reply["choices"][0]["message"]["reasoning_content"] == REASONING
    assert resp.usage.input_tokens == reply["usage"]["prompt_tokens"]
    assert resp.usage.output_tokens == 2 == resp.usage.output_tokens_details.reasoning_tokens


def test_streamed_equals_non_streamed(url, client):
    whole = client.responses.create(model="scripted", input=QUESTION, tools=TOOLS)
    events = list(client.responses.create(model="scripted", input=QUESTION, tools=TOOLS, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type.removeprefix("response.") for e in events]
    item = ["output_item.added", "content_part.added"], ["content_part.done", "output_item.done"]
    call = [
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
    ]
    assert kinds == (
        ["created", "in_progress"]
        + item[0] + ["reasoning_text.delta"] * 2 + ["reasoning_text.done"] + item[1]
        + item[0] + ["output_text.delta"] + ["output_text.done"] + item[1]
        + call * 2
        + ["completed"]
    )  # fmt: skip
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed"
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == REASONING
    done = [e.item for e in events if e.type == "response.output_item.done"]

    def view(items):
        return [i.model_dump(exclude={"id", "call_id"}, exclude_none=True) for i in items]

    def counts(usage):
        return usage.model_dump(exclude={"input_tokens_details"})

    assert view(done) == view(final.output) == view(whole.output)
    assert counts(final.usage) == counts(whole.usage)
    # the SDK's own accumulator rebuilds the same response from the events
    with client.responses.stream(model="scripted", input=QUESTION, tools=TOOLS) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        rebuilt = stream.get_final_response()
    assert text == CONTENT and view(rebuilt.output) == view(whole.output)


def test_codex_shaped_request(url):
    items, _ = history_items(("call_x", "call_y"))
    body = {  # the keys Codex 0.171 sends (../shared/AGENT_CLIENTS.md)
        "model": "scripted",
        "stream": True,
        "input": items[:2]
        + [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Env."}]}],
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": None, "summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": str(uuid.uuid4()),
        "client_metadata": {"originator": "codex_exec"},
        "text": {"verbosity": "medium"},
    }
    headers = {"accept": "text/event-stream", "session-id": str(uuid.uuid4()), "originator": "codex_exec"}
    events = []
    with httpx.stream("POST", url + "/v1/responses", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["store"] is False
    calls = [
        e["item"]
        for e in events
        if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
    ]
    assert [(c["name"], c.get("namespace")) for c in calls] == [
        ("get_weather", None),
        ("spawn_agent", "multi_agent_v1"),
    ]
    # Codex's next turn: its items back, with the tool outputs; store=false keeps nothing here
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    outputs = [{"type": "function_call_output", "call_id": c["call_id"], "output": "ok"} for c in calls]
    body.update(stream=False, input=body["input"] + done + outputs)
    r = httpx.post(url + "/v1/responses", json=body, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    r = httpx.post(
        url + "/v1/responses", json={"input": "hi", "previous_response_id": final["response"]["id"]}
    )
    assert r.status_code == 400 and "previous_response_id" in r.json()["error"]["message"]


def test_previous_response_id_continues_the_stored_conversation(url, client):
    first = client.responses.create(model="scripted", input=QUESTION, tools=TOOLS)
    outputs = [
        {"type": "function_call_output", "call_id": o.call_id, "output": "ok"} for o in first.output[2:]
    ]
    chained = client.responses.create(
        model="scripted", previous_response_id=first.id, input=outputs, tools=TOOLS, max_output_tokens=1
    )
    history = [{"role": "user", "content": QUESTION}] + [
        o.model_dump(exclude_none=True) for o in first.output
    ]
    whole = client.responses.create(
        model="scripted", input=history + outputs, tools=TOOLS, max_output_tokens=1
    )
    assert chained.previous_response_id == first.id
    assert chained.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens


def error_of(r, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    "body, words",
    [
        ({"input": 5}, "input"),
        ({"input": "hi", "tools": "x"}, "tools"),
        ({"input": "hi", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"input": "hi", "temperature": -1}, "temperature"),
        ({"input": "hi", "frobnicate": 1}, "frobnicate"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input_image",
        ),
        ({"input": [{"role": "critic", "content": "hi"}]}, "role"),
        ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]}, "call_nope"),
        ({"input": "hi", "previous_response_id": "resp_unknown"}, "resp_unknown"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "json_schema"),
        ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "hi", "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": "hi", "parallel_tool_calls": False}, "parallel_tool_calls"),
    ],
)
def test_bad_input_is_an_openai_error_then_a_valid_request_works(url, body, words):
    err = error_of(httpx.post(url + "/v1/responses", json=body, timeout=60))
    assert err["type"] == "invalid_request_error" and words in err["message"]
    ok = httpx.post(url + "/v1/responses", json={"input": "hi", "max_output_tokens": 1}, timeout=60)
    assert ok.status_code == 200 and ok.json()["status"] == "incomplete"


def test_bad_json_and_unknown_model(url):
    r = httpx.post(url + "/v1/responses", content=b'{"input": ', headers={"content-type": "application/json"})
    assert "JSON" in error_of(r)["message"]
    err = error_of(httpx.post(url + "/v1/responses", json={"model": "gpt-9", "input": "hi"}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).responses.create(
            input=[{"type": "bogus"}], model="scripted"
        )


def test_streamed_incomplete(client):
    events = list(client.responses.create(model="scripted", input="hi", max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    (done,) = [e.item for e in events if e.type == "response.output_item.done"]
    assert done.type == "reasoning" and done.status == "incomplete" == final.output[0].status
    assert done.content[0].text == "Let me check the weather."


def test_a_failure_mid_stream_is_response_failed(monkeypatch):
    """A generation that fails after some output ends the stream with response.failed carrying
    the error and the items so far; a cancelled one just ends; while the engine is silent,
    response.in_progress events keep the stream alive (SSE comments would not reset Codex's
    idle timeout), numbered in order with the rest."""
    monkeypatch.setattr(openai_responses, "KEEPALIVE_S", 0.05)

    class FakeTurn:  # Turn.events' contract: (deltas, engine event) pairs
        in_reasoning = True

        def __init__(self, last):
            self.last = last

        async def events(self, events):
            await asyncio.sleep(0.3)  # a long prefill
            yield [Delta(reasoning="thinking")], Piece(text="thinking", tokens=[1], logprobs=[])
            yield [], self.last

    class Ctx:
        settings = Settings(model_id="m")

    def run(last):
        req = ResponsesRequest(input="hi", stream=True)
        out = openai_responses.Output(Ctx(), req, FakeTurn(last), {}, [], ResponseStore())

        async def collect():
            return [c async for c in out.stream(None)]

        return [json.loads(c.split("data: ", 1)[1]) for c in asyncio.run(collect())]

    events = run(Failed("the engine broke"))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds.index("response.output_item.added") >= 4
    assert set(kinds[1 : kinds.index("response.output_item.added")]) == {"response.in_progress"}
    last = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and last["status"] == "failed"
    assert last["error"] == {"code": "server_error", "message": "the engine broke"}
    cancelled = run(Finished("cancelled", 1, 1, 0, 0.0, 0.0, 0.0, None))
    assert not any(e["type"].startswith(("response.completed", "response.failed")) for e in cancelled)
