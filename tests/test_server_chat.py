"""Chat completions end to end on a tiny checkpoint scripted to emit a Step-3.5 reply: reasoning,
then content, then an XML tool call; parsed into reasoning_content / content / typed tool_calls,
streamed and not; the tool result goes back in and is rendered as the chat template says."""

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from factory import IM_END, make_checkpoint
from mlx_lm.tokenizer_utils import load as load_tokenizer
from server_util import running_server

from mlx_step35.chat_format import render_prompt

SCRIPT = [  # one vocabulary entry each, so the scripted chain never repeats a token
    "Let me check",
    " the weather.",
    "\n</think>\n",
    "I will call a tool.\n",
    "<tool_call>\n",
    "<function=get_weather>\n",
    "<parameter=city>\nParis\n</parameter>\n",
    "<parameter=days>\n3\n</parameter>\n",
    "</function>\n</tool_call>",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"


def bytes_to_unicode() -> dict:
    """GPT-2's byte-level alphabet (the factory tokenizer's pre-tokenizer)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def script_checkpoint(path: Path, script=SCRIPT) -> Path:
    """Factory checkpoint with Step-3.5's template whose last BPE merges' tokens are renamed to
    the `script` pieces (no later merge uses them), and the chain: prompt end -> script -> EOS."""
    make_checkpoint(path, chat_template=True)
    tj = json.loads((path / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    last = merges[-len(script) :]
    del merges[-len(script) :]
    b2u = bytes_to_unicode()
    ids = []
    for merge, piece in zip(last, script):
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        name = "".join(b2u[c] for c in piece.encode())
        assert name not in vocab
        ids.append(vocab.pop(a + b))
        vocab[name] = ids[-1]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(path)
    assert tok.decode(ids) == "".join(script)
    end = render_prompt(tok, USER)[-1]  # every generation prompt ends in the same token
    eos = tok.convert_tokens_to_ids(IM_END)
    (path / "chain.json").write_text(json.dumps([end] + ids + [eos]))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return script_checkpoint(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def url(ckpt):
    script = Path(__file__).with_name("serve_scripted.py")
    with running_server(["--ckpt", ckpt], script=script) as u:
        yield u


def test_tool_call_parsed_with_typed_arguments(url):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    msg = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert msg["reasoning_content"] == "Let me check the weather."
    assert msg["content"] == "I will call a tool."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"] and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}  # days typed by schema
    mtp = r.json()["timings"]["mtp"]
    assert mtp["drafted"] == mtp["accepted"] and mtp["drafted"][0] > 0  # scripted drafts all accepted


def test_without_tools_the_call_stays_content(url):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=60).json()
    msg = r["choices"][0]["message"]
    assert "tool_calls" not in msg and r["choices"][0]["finish_reason"] == "stop"
    assert msg["content"] == "I will call a tool.\n" + CALL
    assert msg["reasoning_content"] == "Let me check the weather."


def test_streamed_with_openai_client(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="scripted", messages=USER, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    reasoning = content = ""
    calls, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        calls += d.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "Let me check the weather." and content == "I will call a tool."
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    assert usage.completion_tokens == len(SCRIPT) + 1  # the script and EOS


def test_tool_result_goes_back_into_the_prompt(url, ckpt):
    first = httpx.post(
        url + "/v1/chat/completions", json={"messages": USER, "tools": TOOLS}, timeout=60
    ).json()
    msg = first["choices"][0]["message"]
    call = msg["tool_calls"][0]
    history = USER + [
        {
            "role": "assistant",
            "content": msg["content"],
            "reasoning_content": msg["reasoning_content"],
            "tool_calls": [call],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
    ]
    body = {"messages": history, "tools": TOOLS, "return_token_ids": True, "max_tokens": 3}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "length"
    prompt = load_tokenizer(ckpt).decode(r["prompt_token_ids"])
    # the format of STEP35_FACTS.md: this turn follows the last user query, so it keeps its reasoning;
    # the call in XML; the result in a tool_response turn; the new turn opens <think>
    tail = [
        "<|im_start|>assistant\n<think>\nLet me check the weather.\n</think>\nI will call a tool.",
        CALL + "<|im_end|>\n<|im_start|>tool_response\n<tool_response>sunny, 21 C</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
    ]
    assert re.search(r"\s*".join(map(re.escape, tail)) + r"\Z", prompt), prompt[-600:]
    assert "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n" in prompt
    assert '"name": "get_weather"' in prompt  # tools declared in the system turn


def test_tool_choice_none_offers_no_tools_and_parses_none(url, ckpt):
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "none", "return_token_ids": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    msg = r["choices"][0]["message"]
    assert "tool_calls" not in msg and msg["content"] == "I will call a tool.\n" + CALL
    assert "<tools>" not in load_tokenizer(ckpt).decode(r["prompt_token_ids"])
