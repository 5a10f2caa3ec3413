"""Step-3.5's chat format: prompt rendering, and the incremental parser that splits a generated
reply into reasoning, content and tool calls.

The format (Step-3.5 / 3.7 checkpoints ship it as their chat template; `STEP35_CHAT_TEMPLATE` is
our own rendering of it for models without one): ChatML turns after BOS; the generation prompt
opens `<think>`, so a reply starts inside its reasoning and closes it with `</think>`; tools are
called in an XML form, one function per block:

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are text; the parser converts each by the tool's JSON schema (as vLLM's step3p5 parser).
"""

import ast
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

STEP35_CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text(encoding="utf-8")

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_END, PARAMETER_END = "</function>", "</parameter>"
_FUNCTION = re.compile(r"<function=([^<>\n]*)>")
_FUNCTION_NO_EQUALS = re.compile(r"<function\s+([A-Za-z_][\w.\-]*)\s*>")  # repaired as vLLM does
_PARAMETER = re.compile(r"<parameter=([^<>\n]*)>")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class ToolCall:
    index: int  # 0, 1, ... within the reply
    id: str  # "call_" + random hex, unique
    name: str
    arguments: str  # JSON object text, values converted by the tool's JSON schema


@dataclass
class Delta:
    """One streamed piece of the reply; exactly one field is set."""

    reasoning: str = ""
    content: str = ""
    tool_call: Optional[ToolCall] = None  # emitted once, complete, when its </tool_call> is seen


@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: List[ToolCall] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# tools and argument values


def tool_schemas(tools: Optional[list]) -> Optional[Dict[str, dict]]:
    """{function name: its parameters' JSON-schema `properties`} of OpenAI-style `tools`
    ({"type": "function", "function": {...}} or the bare function object); None stays None."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"tools: expected a list of tool objects, got {type(tools).__name__}")
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type: only 'function' tools are supported, got {tool['type']!r}")
        params = fn.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters: expected a JSON-schema object")
        props = params.get("properties") or {}
        out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


def _schema_types(schema) -> List[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    types = [x for sub in schema.get("anyOf", []) + schema.get("oneOf", []) for x in _schema_types(sub)]
    return types or (["object"] if "properties" in schema else [])


_PARSE_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, OverflowError)


def _as_json(value: str, kind: type):
    """`value` parsed as JSON (or a Python literal, as vLLM also accepts) if it gives a `kind`
    that serializes as strict JSON (no NaN / Infinity); None otherwise."""
    for parse in (json.loads, ast.literal_eval):
        try:
            out = parse(value)
            if isinstance(out, kind) and not isinstance(out, bool):
                json.dumps(out, allow_nan=False)
                return out
        except _PARSE_ERRORS:
            pass
    return None


def convert_value(value: str, schema) -> object:
    """A parameter's text converted by its JSON schema: integer, number, boolean, object, array
    and null are parsed; anything else, an unknown parameter, or text that does not parse as
    any of the schema's types stays the string."""
    v = value.strip()
    for t in _schema_types(schema):
        if t == "integer" and _INTEGER.fullmatch(v) and len(v) < 4000:  # int() refuses longer
            return int(v)
        if t == "number" and (out := _as_json(v, (int, float))) is not None:
            return out
        if t == "boolean" and v.lower() in ("true", "false"):
            return v.lower() == "true"
        if t in ("object", "array") and (out := _as_json(v, dict if t == "object" else list)) is not None:
            return out
        if t == "null" and v == "null":
            return None
    return value


def parse_tool_call(block: str, tools: Optional[Dict[str, dict]], index: int) -> Optional[ToolCall]:
    """The ToolCall in one `<tool_call>...</tool_call>` block, or None if the block is malformed
    or names a function that `tools` (from `tool_schemas`; None: any name) does not declare."""
    body = block[len(CALL_START) : -len(CALL_END)].strip()
    m = _FUNCTION_NO_EQUALS.match(body)
    if m and (tools is None or m.group(1) in tools):
        body = f"<function={m.group(1)}>" + body[m.end() :]
    m = _FUNCTION.match(body)
    name = m.group(1).strip() if m else ""
    if not name or not body.endswith(FUNCTION_END) or (tools is not None and name not in tools):
        return None
    props = tools[name] if tools is not None else {}
    inner, pos, args = body[m.end() : -len(FUNCTION_END)], 0, {}
    while True:
        pos += len(inner[pos:]) - len(inner[pos:].lstrip())
        if pos == len(inner):
            break
        p = _PARAMETER.match(inner, pos)
        end = inner.find(PARAMETER_END, p.end()) if p else -1
        if end < 0 or not p.group(1).strip():
            return None
        value = inner[p.end() : end]
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        arg = p.group(1).strip()
        args[arg] = convert_value(value, props.get(arg))
        pos = end + len(PARAMETER_END)
    return ToolCall(index, "call_" + secrets.token_hex(12), name, json.dumps(args, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# the reply parser


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReplyParser:
    """Incremental parser of a generated reply: reasoning up to </think>, then content with tool calls.

    Feed it text in any pieces (split anywhere, inside tags too): the deltas of all `feed` calls
    and `finish` concatenate to what one `feed(whole reply)` + `finish()` gives, and no delta ever
    shows part of a tag. Rules (as vLLM's step3p5 parsers): with `in_reasoning` the reply starts
    inside the reasoning (the prompt opened `<think>`); otherwise a reply that begins with
    `<think>` opens it itself. A reply that never closes `</think>` is all reasoning (as vLLM).
    One newline before and one after `</think>` are dropped. Each well-formed `<tool_call>` block
    becomes a ToolCall (values converted by `tools`' schemas; tools=None: any function name, values
    as the schema-less strings); a malformed, unknown-function or unterminated block comes back as
    content, verbatim (a block not closed before the next `<tool_call>` is unterminated).
    Whitespace-only text between content and a tool call, between two tool calls, or after the
    last tool call at the end of the reply is dropped.
    """

    def __init__(self, tools: Optional[list] = None, in_reasoning: bool = True):
        self._tools = tool_schemas(tools)
        self._state = "reasoning" if in_reasoning else "start"
        self._buf = ""  # text not yet decided
        self._strip_newline = False  # drop one "\n" right after </think>
        self._space = ""  # content whitespace held until we know whether a tool call follows it
        self._after_call = False  # the held whitespace follows a tool call
        self._calls = 0
        self._out: List[Delta] = []

    def feed(self, text: str) -> List[Delta]:
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> List[Delta]:
        """End of generation: flush what was held back; an unterminated tool call becomes content."""
        while self._buf and self._step(final=True):
            pass
        if self._space and not self._after_call:
            self._emit("content", self._space)
        self._space = ""
        return self._take()

    # one state transition per call; returns whether it made progress
    def _step(self, final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._state == "start":
            if buf.startswith(THINK_START):
                self._buf, self._state = buf[len(THINK_START) :], "reasoning"
                return True
            if THINK_START.startswith(buf) and not final:
                return False
            self._state = "content"
            return True
        if self._state == "reasoning":
            return self._reasoning(buf, final)
        if self._state == "content":
            return self._content(buf, final)
        return self._call(buf, final)

    def _reasoning(self, buf: str, final: bool) -> bool:
        i = buf.find(THINK_END)
        if i >= 0:
            text = buf[:i]
            self._emit("reasoning", text[:-1] if text.endswith("\n") else text)
            self._buf, self._state, self._strip_newline = buf[i + len(THINK_END) :], "content", True
            return True
        keep = 0 if final else _partial_tag(buf, THINK_END)
        if buf[: len(buf) - keep].endswith("\n"):  # held: dropped if </think> follows
            keep += 1
        self._emit("reasoning", buf[: len(buf) - keep])
        if final and keep:  # an unclosed reasoning loses its last newline too (as vLLM)
            keep = 0
        self._buf = buf[len(buf) - keep :] if keep else ""
        return False

    def _content(self, buf: str, final: bool) -> bool:
        if self._strip_newline:
            self._strip_newline = False
            if buf.startswith("\n"):
                self._buf = buf[1:]
                return True
        i = buf.find(CALL_START)
        if i >= 0:
            self._text(buf[:i])
            self._buf, self._state = buf[i:], "call"
            return True
        keep = 0 if final else _partial_tag(buf, CALL_START)
        self._text(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _call(self, buf: str, final: bool) -> bool:
        j = buf.find(CALL_END, len(CALL_START))
        k = buf.find(CALL_START, len(CALL_START))
        if 0 <= k and (j < 0 or k < j):  # a new call starts before this one ends: this one is text
            self._text(buf[:k])
            self._buf = buf[k:]
            return True
        if j < 0 and not final:
            return False
        block = buf[: j + len(CALL_END)] if j >= 0 else buf
        self._buf, self._state = buf[len(block) :], "content"
        call = parse_tool_call(block, self._tools, self._calls) if j >= 0 else None
        if call is None:
            self._text(block)
        else:
            self._space, self._after_call, self._calls = "", True, self._calls + 1
            self._out.append(Delta(tool_call=call))
        return True

    def _text(self, text: str):
        """Content, holding back trailing whitespace until what follows it is known."""
        core = text.rstrip()
        if core:
            self._emit("content", self._space + core)
            self._space, self._after_call = "", False
        self._space += text[len(core) :]

    def _emit(self, kind: str, text: str):
        if not text:
            return
        if self._out and getattr(self._out[-1], kind):
            setattr(self._out[-1], kind, getattr(self._out[-1], kind) + text)
        else:
            self._out.append(Delta(**{kind: text}))

    def _take(self) -> List[Delta]:
        out, self._out = self._out, []
        return out


def parse_reply(text: str, tools=None, in_reasoning: bool = True) -> Reply:
    """The whole reply at once: `ReplyParser(tools, in_reasoning).feed(text)` + `finish()`, joined."""
    parser = ReplyParser(tools, in_reasoning)
    deltas = parser.feed(text) + parser.finish()
    return Reply(
        reasoning="".join(d.reasoning for d in deltas),
        content="".join(d.content for d in deltas),
        tool_calls=[d.tool_call for d in deltas if d.tool_call is not None],
    )


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether the generation prompt ends inside an open `<think>` (the reply starts in reasoning)."""
    return prompt_text.rstrip().endswith(THINK_START)


# ---------------------------------------------------------------------------------------------
# prompts

ROLES = ("system", "user", "assistant", "tool")
_RESERVED_KWARGS = ("messages", "conversation", "tools", "add_generation_prompt", "tokenize", "chat_template")


def _text_content(content, where: str, allow_none: bool) -> Optional[str]:
    if content is None:
        if not allow_none:
            raise ValueError(f"{where}: content is required")
        return None
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: expected a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"{where}[{j}]: only {{'type': 'text', 'text': ...}} parts are supported, got {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)  # parts joined by newlines, as vLLM does


def _template_tool_calls(calls, where: str) -> list:
    if not isinstance(calls, list):
        raise ValueError(f"{where}: expected a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{j}].function: expected {{'name': ..., 'arguments': ...}}")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise ValueError(f"{where}[{j}].function.arguments: not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where}[{j}].function.arguments: expected a JSON object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("id") is not None:
            entry["id"] = call["id"]
        out.append(entry)
    return out


def template_messages(messages: list) -> list:
    """OpenAI request messages -> what the chat template expects: assistant tool calls with their
    JSON arguments parsed into dicts (as HF templates expect), tool messages with tool_call_id,
    reasoning_content kept, text parts joined. Raises ValueError naming the message and field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        calls = m.get("tool_calls") if role == "assistant" else None
        content = _text_content(m.get("content"), f"{where}.content", allow_none=role == "assistant")
        entry = {"role": role, "content": content if content is not None else ""}
        if calls:
            entry["tool_calls"] = _template_tool_calls(calls, f"{where}.tool_calls")
        reasoning = m.get("reasoning_content", m.get("reasoning")) if role == "assistant" else None
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}.reasoning_content: expected a string")
            entry["reasoning_content"] = reasoning
        if role == "tool" and m.get("tool_call_id") is not None:
            entry["tool_call_id"] = str(m["tool_call_id"])
        if isinstance(m.get("name"), str):
            entry["name"] = m["name"]
        out.append(entry)
    return out


def _chosen_tools(tools, tool_choice):
    """The tools the template declares: none for tool_choice "none", only the named function for
    a named choice (we cannot force a call, so the prompt offers nothing else), all otherwise."""
    schemas = tool_schemas(tools)
    if tool_choice in (None, "auto", "required"):
        return tools or None
    if tool_choice == "none":
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError(
            "tool_choice: expected 'auto', 'none', 'required' or "
            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
        )
    if not schemas or name not in schemas:
        raise ValueError(f"tool_choice: function {name!r} is not among the request's tools")
    return [t for t in tools if t.get("function", t).get("name") == name]


def render_prompt(tokenizer, messages, tools=None, tool_choice=None, chat_template_kwargs=None) -> List[int]:
    """Token ids of the chat prompt: the tokenizer's chat template applied to `messages` (OpenAI
    form, see `template_messages`) with `tools`, ending in the generation prompt. The template
    writes BOS itself, so the text is encoded without adding special tokens (no double BOS)."""
    if not (getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None)):
        raise ValueError("the tokenizer has no chat template (a base model): send raw text as a completion")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ValueError("chat_template_kwargs: expected an object")
    kwargs = dict(chat_template_kwargs or {})
    bad = sorted(set(kwargs) & set(_RESERVED_KWARGS))
    if bad:
        raise ValueError(f"chat_template_kwargs: {', '.join(bad)} cannot be set here")
    return _render(tokenizer, template_messages(messages), _chosen_tools(tools, tool_choice), True, kwargs)


def _render(tokenizer, messages, tools, generation_prompt: bool, kwargs) -> List[int]:
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **kwargs
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def branch_points(
    tokenizer, messages, ids, tools=None, tool_choice=None, chat_template_kwargs=None
) -> List[int]:
    """Positions in the prompt `ids` (from `render_prompt` with the same arguments) where a
    later prompt of the conversation is likely to leave it: the end of the system turn (tools
    included) and the end of the last message. A prompt cache checkpoints there. Positions the
    template does not render as a prefix of `ids` are left out."""
    msgs, chosen, kwargs = (
        template_messages(messages),
        _chosen_tools(tools, tool_choice),
        chat_template_kwargs,
    )
    heads = [msgs] + ([msgs[:1]] if msgs and msgs[0].get("role") == "system" else [[]] if chosen else [])
    out = []
    for head in heads:
        try:
            part = _render(tokenizer, head, chosen, False, dict(kwargs or {}))
        except Exception:  # a template may refuse a partial conversation: no checkpoint there
            continue
        if 0 < len(part) < len(ids) and ids[: len(part)] == part:
            out.append(len(part))
    return sorted(set(out))
