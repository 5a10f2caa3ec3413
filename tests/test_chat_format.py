"""Step-3.5's chat format: the reply parser on real-format strings (streamed in any pieces, and
malformed), and the chat template against prompts written by hand from the format facts."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_step35.chat_format import (
    STEP35_CHAT_TEMPLATE,
    ReplyParser,
    convert_value,
    parse_reply,
    prompt_opens_reasoning,
    render_prompt,
    template_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "threshold": {"type": "number"},
                "options": {"type": "object"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "zip": {"type": "string"},
                "limit": {"type": ["integer", "null"]},
            },
        },
    },
}
SHELL = {
    "type": "function",
    "function": {
        "name": "run",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    },
}
TOOLS = [WEATHER, SHELL]


def call(name, **params):
    """A tool call in Step-3.5's XML form, as the format facts give it."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


WEATHER_CALL = call(
    "get_weather",
    city="Paris",
    days="3",
    metric="true",
    threshold="-2.5",
    options='{"units": "C", "alerts": [1, 2]}',
    hours="[6, 12]",
    zip="07001",
    limit="null",
)
REPLY = (
    "The user wants the weather.\nI should call the tool.\n</think>\nLet me check.\n\n"
    + WEATHER_CALL
    + "\n"
    + call("run", cmd="ls -la\necho 'a < b' && cat x.txt")
    + "\n"
)


def streamed(text, pieces, tools=TOOLS, in_reasoning=True):
    parser = ReplyParser(tools, in_reasoning)
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    for d in deltas:
        assert sum(bool(x) for x in (d.reasoning, d.content, d.tool_call)) == 1, d
    return deltas


def summary(reply):
    """A Reply without the random call ids."""
    return (
        reply.reasoning,
        reply.content,
        [(c.index, c.name, json.loads(c.arguments)) for c in reply.tool_calls],
    )


def joined(deltas):
    calls = [
        (d.tool_call.index, d.tool_call.name, json.loads(d.tool_call.arguments))
        for d in deltas
        if d.tool_call
    ]
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), calls


# ---------------------------------------------------------------------------------------------
# reasoning


def test_reasoning_split_trims_one_newline_around_think_end():
    r = parse_reply("Two plus two.\n</think>\nThe answer is 4.")
    assert (r.reasoning, r.content, r.tool_calls) == ("Two plus two.", "The answer is 4.", [])
    r = parse_reply("a\n\n</think>\n\nb\n")  # only one newline on each side goes
    assert (r.reasoning, r.content) == ("a\n", "\nb\n")
    r = parse_reply("</think>b")
    assert (r.reasoning, r.content) == ("", "b")


def test_reply_that_never_closes_think_is_all_reasoning():
    r = parse_reply("Still thinking about <tool_call> and </thi\n")
    assert (r.reasoning, r.content, r.tool_calls) == ("Still thinking about <tool_call> and </thi", "", [])


def test_without_open_reasoning():
    assert summary(parse_reply("Hello </think> world", in_reasoning=False)) == (
        "",
        "Hello </think> world",
        [],
    )
    r = parse_reply("<think>\nhmm\n</think>\nHi", in_reasoning=False)  # the reply opens it itself
    assert (r.reasoning, r.content) == ("\nhmm", "Hi")
    assert parse_reply("<thin", in_reasoning=False).content == "<thin"


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# tool calls


def test_tool_calls_typed_by_schema():
    r = parse_reply(REPLY, TOOLS)
    assert r.reasoning == "The user wants the weather.\nI should call the tool."
    assert r.content == "Let me check."  # whitespace before, between and after the calls dropped
    assert [(c.index, c.name) for c in r.tool_calls] == [(0, "get_weather"), (1, "run")]
    assert json.loads(r.tool_calls[0].arguments) == {
        "city": "Paris",
        "days": 3,
        "metric": True,
        "threshold": -2.5,
        "options": {"units": "C", "alerts": [1, 2]},
        "hours": [6, 12],
        "zip": "07001",  # a string parameter stays a string even when it looks like a number
        "limit": None,
    }
    assert json.loads(r.tool_calls[1].arguments) == {"cmd": "ls -la\necho 'a < b' && cat x.txt"}
    ids = [c.id for c in r.tool_calls]
    assert all(i.startswith("call_") and len(i) > 12 for i in ids) and len(set(ids)) == 2
    assert ids[0] != parse_reply(REPLY, TOOLS).tool_calls[0].id
    json.loads(r.tool_calls[0].arguments)  # arguments are JSON object text
    assert r.tool_calls[0].arguments.startswith("{")


def test_values_that_do_not_parse_stay_strings():
    text = "</think>" + call("get_weather", days="three", metric="yes", hours="[1, 2", limit="5", extra="42")
    r = parse_reply(text, TOOLS)
    args = json.loads(r.tool_calls[0].arguments)
    assert args == {"days": "three", "metric": "yes", "hours": "[1, 2", "limit": 5, "extra": "42"}
    assert convert_value("1e3", {"type": "number"}) == 1000.0
    assert convert_value(" 12 ", {"type": "integer"}) == 12
    assert convert_value("True", {"type": "boolean"}) is True
    assert convert_value("{'a': 1}", {"type": "object"}) == {"a": 1}  # Python literal, as vLLM
    assert convert_value("[1]", {"type": "object"}) == "[1]"  # wrong kind
    assert convert_value("7", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) == 7
    assert convert_value("  keep  spaces ", {"type": "string"}) == "  keep  spaces "
    assert convert_value("true", {"type": "number"}) == "true"
    for text, kind in [
        ("NaN", "number"),
        ("Infinity", "number"),
        ('{"a": NaN}', "object"),
        ("9" * 5000, "integer"),
        ("[" * 100000, "array"),
        ("1" * 5000, "number"),
    ]:
        assert convert_value(text, {"type": kind}) == text, text[:10]


def test_without_tools_any_function_parses_with_string_values():
    r = parse_reply("</think>" + call("anything", n="3"))
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [("anything", {"n": "3"})]


def test_multiline_values_keep_inner_newlines_and_empty_calls():
    text = (
        "</think>"
        + call("run", cmd="\nline1\n\nline2\n")
        + "<tool_call>\n<function=run>\n</function>\n</tool_call>"
    )
    r = parse_reply(text, TOOLS)
    assert [json.loads(c.arguments) for c in r.tool_calls] == [{"cmd": "\nline1\n\nline2\n"}, {}]
    assert r.content == ""


def test_content_after_a_tool_call_is_kept():
    r = parse_reply("</think>" + call("run", cmd="ls") + "\nDone.\n", TOOLS)
    assert r.content == "\nDone.\n" and len(r.tool_calls) == 1


def test_function_without_equals_is_repaired():
    r = parse_reply(
        "</think><tool_call>\n<function get_weather>\n<parameter=days>\n2\n</parameter>\n"
        "</function>\n</tool_call>",
        TOOLS,
    )
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [("get_weather", {"days": 2})]


MALFORMED = [
    "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n</parameter>\n",  # unterminated call
    "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n</parameter>\n</tool_call>",  # no </function>
    "<tool_call>\n<function=run>\n<parameter cmd>\nls\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=run>\n<parameter=cmd\nls\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n</function>\n</tool_call>",  # no </parameter>
    "<tool_call>\n<function=run>\nstray text\n</function>\n</tool_call>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
    "<tool_call>\n<function=rm_rf>\n<parameter=path>\n/\n</parameter>\n</function>\n</tool_call>",  # unknown
    "<tool_call>\n<function rm_rf>\n</function>\n</tool_call>",  # unknown: not repaired
    '<tool_call>\n{"name": "run", "arguments": {}}\n</tool_call>',  # JSON form: not Step's
    "<tool_call>",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_tool_calls_come_back_as_content(bad):
    text = "why\n</think>\nI will run it.\n" + bad
    r = parse_reply(text, TOOLS)
    assert (r.reasoning, r.content, r.tool_calls) == ("why", "I will run it.\n" + bad, [])
    for size in (1, 3):
        assert joined(streamed(text, [text[i : i + size] for i in range(0, len(text), size)])) == summary(r)
    good = parse_reply(text + "\n" + call("run", cmd="ls"), TOOLS)  # a later good call still parses
    assert [c.name for c in good.tool_calls] == ["run"] and good.content.endswith(bad.rstrip())


# ---------------------------------------------------------------------------------------------
# streaming


def test_streamed_one_char_at_a_time_equals_one_shot_and_shows_no_partial_tag():
    one_shot = summary(parse_reply(REPLY, TOOLS))
    deltas = streamed(REPLY, list(REPLY))
    assert joined(deltas) == one_shot
    assert not any("<" in d.reasoning + d.content for d in deltas)  # every "<" in REPLY is a tag's
    kinds = [("r" if d.reasoning else "c" if d.content else "t") for d in deltas]
    assert kinds.index("c") > max(i for i, k in enumerate(kinds) if k == "r")  # reasoning first
    assert kinds[-2:] == ["t", "t"]
    assert len([k for k in kinds if k == "r"]) > 10  # it really streams


def test_streamed_split_inside_every_tag():
    tags = [
        "</think>",
        "<tool_call>",
        "<function=",
        "<parameter=",
        "</parameter>",
        "</function>",
        "</tool_call>",
    ]
    one_shot = summary(parse_reply(REPLY, TOOLS))
    for tag in tags:
        start = REPLY.find(tag)
        for cut in range(1, len(tag)):
            pieces = [REPLY[: start + cut], REPLY[start + cut :]]
            assert joined(streamed(REPLY, pieces)) == one_shot, (tag, cut)


def test_parser_holds_a_partial_tag_until_decided():
    p = ReplyParser(TOOLS)
    assert [d.reasoning for d in p.feed("abc</thi")] == ["abc"]
    assert [(d.reasoning, d.content) for d in p.feed("nk>x<tool_")] == [("", "x")]
    assert [d.content for d in p.feed("calls are ")] == ["<tool_calls are"]  # not a tag after all
    assert [d.content for d in p.finish()] == [" "]


settings_fast = settings(max_examples=150, deadline=None)


@settings_fast
@given(st.lists(st.integers(0, len(REPLY)), max_size=12))
def test_random_splits_give_the_same_parse(cuts):
    cuts = sorted(cuts)
    pieces = [REPLY[a:b] for a, b in zip([0] + cuts, cuts + [len(REPLY)])]
    assert joined(streamed(REPLY, pieces)) == summary(parse_reply(REPLY, TOOLS))


FRAGMENTS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<function=run>",
    "<function run>",
    "</function>",
    "<parameter=cmd>",
    "</parameter>",
    "\n",
    " ",
    "ls",
    "<",
    ">",
    "=",
    "{}",
    "</",
]


@settings_fast
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=30),
    st.lists(st.integers(0, 300), max_size=8),
    st.booleans(),
)
def test_arbitrary_tag_soup_never_raises_and_streams_like_one_shot(parts, cuts, in_reasoning):
    text = "".join(parts)
    cuts = sorted(c for c in cuts if c <= len(text))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    one = parse_reply(text, TOOLS, in_reasoning)
    assert joined(streamed(text, pieces, in_reasoning=in_reasoning)) == summary(one)
    for c in one.tool_calls:
        assert isinstance(json.loads(c.arguments), dict)


# ---------------------------------------------------------------------------------------------
# the chat template and prompts

TOOLS_BLOCK = (  # Step-3.5's tools declaration, from the format facts
    "# Tools\n\nYou have access to the following functions in JSONSchema format:\n\n<tools>\n"
    + "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS)
    + "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...>\n...\n</function> block "
    "must be nested within <tool_call>\n...\n</tool_call> XML tags\n"
    "- Required parameters MUST be specified\n</IMPORTANT>"
)
GEN = "<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from factory import write_tokenizer
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = tmp_path_factory.mktemp("step_tok")
    write_tokenizer(path, 512, chat_template=True)
    return load_tokenizer(path)


def render(tok, messages, tools=None, **kw):
    return tok.apply_chat_template(
        template_messages(messages), tools=tools, add_generation_prompt=True, tokenize=False, **kw
    )


def test_template_plain_chat(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render(tok, msgs) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" + GEN
    )
    assert render(tok, msgs[1:]) == "<s><|im_start|>user\nhi<|im_end|>\n" + GEN
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render(tok, parts) == "<s><|im_start|>user\na\nb<|im_end|>\n" + GEN


def test_template_tools_block(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render(tok, msgs, TOOLS) == (
        "<s><|im_start|>system\nBe brief.\n\n"
        + TOOLS_BLOCK
        + "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        + GEN
    )
    assert render(tok, msgs[1:], TOOLS) == (
        "<s><|im_start|>system\n" + TOOLS_BLOCK + "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" + GEN
    )


def test_template_tool_calls_results_and_reasoning_after_the_last_query(tok):
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Old thoughts."},
        {"role": "user", "content": "And for 2 days, in Rome too?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Two calls.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Rome", "options": {"u": "C"}}',
                    },
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
    ]
    assert render(tok, msgs) == (
        "<s><|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nIt is sunny.<|im_end|>\n"  # before the last user query: reasoning dropped
        "<|im_start|>user\nAnd for 2 days, in Rome too?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo calls.\n</think>\nChecking."
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
        '<parameter=options>\n{"u": "C"}\n</parameter>\n</function>\n</tool_call><|im_end|>\n'
        "<|im_start|>tool_response\n<tool_response>sunny</tool_response><tool_response>rain</tool_response>"
        "<|im_end|>\n" + GEN
    )
    # the reply the model would write parses back into the same call
    reply = "x\n</think>\n" + call("get_weather", city="Paris", days="2")
    assert json.loads(parse_reply(reply, TOOLS).tool_calls[0].arguments) == {"city": "Paris", "days": 2}


def test_template_reasoning_inside_content_and_effort(tok):
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nr\n</think>\n\nanswer"},
        {"role": "tool", "content": "t"},  # a tool turn is not a user query
    ]
    assert render(tok, msgs) == (
        "<s><|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\nanswer<|im_end|>\n"
        "<|im_start|>tool_response\n<tool_response>t</tool_response><|im_end|>\n" + GEN
    )
    effort = render(tok, [{"role": "user", "content": "q"}], reasoning_effort="low")
    assert effort == "<s><|im_start|>system\nReasoning: low<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" + GEN


def test_render_prompt_ids(tok):
    msgs = [{"role": "user", "content": "hi"}]
    ids = render_prompt(tok, msgs, TOOLS)
    text = "<s><|im_start|>system\n" + TOOLS_BLOCK + "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" + GEN
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == 0 and ids.count(0) == 1  # one BOS
    assert prompt_opens_reasoning(tok.decode(ids))
    assert render_prompt(tok, msgs, TOOLS, tool_choice="none") == tok.encode(
        "<s><|im_start|>user\nhi<|im_end|>\n" + GEN, add_special_tokens=False
    )
    named = render_prompt(tok, msgs, TOOLS, tool_choice={"type": "function", "function": {"name": "run"}})
    assert json.dumps(SHELL) in tok.decode(named) and "get_weather" not in tok.decode(named)
    low = render_prompt(tok, msgs, chat_template_kwargs={"reasoning_effort": "low"})
    assert "Reasoning: low" in tok.decode(low)
    for kw, needle in [
        (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "'nope' is not among"),
        (dict(tool_choice="sometimes"), "tool_choice"),
        (dict(chat_template_kwargs={"tools": []}), "chat_template_kwargs: tools"),
        (dict(tools=[{"type": "function"}]), "tools[0]"),
    ]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
            render_prompt(tok, msgs, **{"tools": TOOLS, **kw})


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([], "messages: expected a non-empty list"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content: content is required"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
            ],
            "messages[1].tool_calls[0].function.arguments: not valid JSON",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
            "messages[0].tool_calls[0].function.arguments: expected a JSON object",
        ),
        ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0].function"),
        ([{"role": "assistant", "content": "a", "reasoning_content": 5}], "messages[0].reasoning_content"),
    ],
)
def test_template_messages_errors_name_the_message_and_field(messages, needle):
    with pytest.raises(ValueError) as e:
        template_messages(messages)
    assert needle in str(e.value)


def test_template_messages_converts_openai_form():
    out = template_messages(
        [
            {
                "role": "assistant",
                "content": None,
                "reasoning": "r",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1]}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]},
        ]
    )
    assert out == [
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "r",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": [1]}}}
            ],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
    ]


def test_render_prompt_needs_a_chat_template(tmp_path):
    from factory import write_tokenizer
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    write_tokenizer(tmp_path, 512)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(load_tokenizer(tmp_path), [{"role": "user", "content": "hi"}])


def test_demo_model_has_the_template():
    from mlx_step35 import load
    from mlx_step35.generation import build_prompt

    model, tokenizer = load()
    assert tokenizer.chat_template == STEP35_CHAT_TEMPLATE
    assert tokenizer.eos_token_ids == {1, 2, 4}
    ids = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<s><|im_start|>user\nhi<|im_end|>\n" + GEN and ids.count(0) == 1
    assert build_prompt(tokenizer, "hi") == ids  # generate.py --prompt hi goes through it
    raw = build_prompt(tokenizer, "def f():", chat_template=False)  # --ignore-chat-template: BOS + text
    assert raw[0] == 0 and raw.count(0) == 1 and 3 not in raw and tokenizer.decode(raw) == "<s>def f():"
