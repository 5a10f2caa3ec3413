"""POST /v1/responses, the request side: the OpenAI Responses request body, and its translation
into one chat request (`ChatRequest`, OpenAI chat shape) that the chat path serves.

Items map to chat messages: `developer` -> `system`; a `reasoning` item becomes the next
assistant turn's `reasoning_content`; consecutive `function_call` items (and an assistant
message right before them) become one assistant turn's `tool_calls`; `function_call_output`
-> a `tool` message. Function tools nested in a `namespace` tool (Codex's sub-agents, MCP
servers) are offered to the model flattened as `NAMESPACE__NAME` (Codex's own flat form) and
their calls go back split into `namespace` and `name`, as Codex routes them. Other tool types
(those only OpenAI's service runs, such as web search, and `custom` freeform tools) are not
offered to the model, with a log line."""

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field

from .schemas import ChatRequest, MinConfidence, RequestError

log = logging.getLogger("mlx_step35.server")
STORED_RESPONSES = 64
# include values that ask for nothing we would leave out: encrypted reasoning (we return the
# reasoning in the clear, as `content`) and the outputs of tools only OpenAI's service runs
INCLUDABLE = (
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
    "file_search_call.results",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "message.input_image.image_url",
)


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Optional[TextFormat] = None
    verbosity: Optional[str] = None  # a hint for OpenAI's models; nothing to do here


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Optional[str] = None  # Step-3.7's template variable, as chat's reasoning_effort
    summary: Optional[str] = None  # the reasoning comes back whole, as reasoning_text
    generate_summary: Optional[str] = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    input: Union[str, List[Dict[str, Any]]]
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    reasoning: Optional[Reasoning] = None
    text: Optional[TextConfig] = None
    include: Optional[List[str]] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    background: Optional[bool] = None
    top_logprobs: Optional[int] = None
    max_tool_calls: Optional[int] = None
    num_draft: Optional[Union[int, Literal["auto"]]] = None  # ours: 0 decodes plainly
    draft_min_confidence: MinConfidence = None  # ours: the MTP confidence gate
    # accepted, changing nothing about the output
    store: Optional[bool] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    client_metadata: Optional[Dict[str, Any]] = None
    metadata: Optional[Dict[str, Any]] = None
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    service_tier: Optional[str] = None


def refuse_unsupported(req: ResponsesRequest):
    """400 for every field set to something we cannot honour."""
    fmt = req.text.format.type if req.text and req.text.format else "text"
    if fmt != "text":
        raise RequestError(
            f"text.format {fmt!r} is not supported (no constrained decoding): only 'text'", "text"
        )
    bad = [x for x in req.include or () if x not in INCLUDABLE]
    if bad:
        raise RequestError(
            f"include {bad[0]!r} is not supported (supported: {', '.join(INCLUDABLE)})", "include"
        )
    if req.truncation == "auto":
        raise RequestError(
            "truncation 'auto' is not supported: a prompt over the context is a 400", "truncation"
        )
    if req.background:
        raise RequestError("background responses are not supported", "background")
    if req.top_logprobs:
        raise RequestError("top_logprobs is not supported on /v1/responses", "top_logprobs")
    if req.max_tool_calls is not None:
        raise RequestError("max_tool_calls cannot be enforced", "max_tool_calls")


class ResponseStore:
    """The input and output items of the last `size` responses made with `store` not false, in
    memory, for `previous_response_id` (a restart forgets them)."""

    def __init__(self, size: int = STORED_RESPONSES):
        self.size, self.items = size, OrderedDict()

    def get(self, response_id: str) -> List[dict]:
        if response_id not in self.items:
            raise RequestError(
                f"previous_response_id {response_id!r} is not stored here: this server keeps the last "
                f"{self.size} responses made with store not false, in memory; send the whole "
                "conversation as input instead",
                "previous_response_id",
            )
        self.items.move_to_end(response_id)
        return self.items[response_id]

    def put(self, response_id: str, items: List[dict]):
        self.items[response_id] = items
        while len(self.items) > self.size:
            self.items.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# tools


def flat_name(namespace: str, name: str) -> str:
    """Codex's flat form of a namespaced tool's name."""
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


def _function(tool: dict, where: str, name: Optional[str] = None) -> dict:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise RequestError(f"{where}.name: a function tool needs a name", "tools")
    params = tool.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise RequestError(f"{where}.parameters: expected a JSON schema object", "tools")
    fn = {"name": name or tool["name"]}
    if tool.get("description") is not None:
        fn["description"] = tool["description"]
    fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": fn}


def chat_tools(tools: Optional[list]) -> Tuple[Optional[list], Dict[str, Tuple[str, str]]]:
    """(chat tools, {flat name: (namespace, name)}): function tools as chat's, namespace tools'
    functions flattened; other types (web_search, custom, ...) are skipped with a log line."""
    if tools is None:
        return None, {}
    out, names, skipped = [], {}, []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "function":
            out.append(_function(tool, f"tools[{i}]"))
        elif kind == "namespace":
            ns, inner = tool.get("name"), tool.get("tools")
            if not isinstance(ns, str) or not ns or not isinstance(inner, list):
                raise RequestError(f"tools[{i}]: a namespace tool needs a name and a list of tools", "tools")
            for j, t in enumerate(inner):
                where = f"tools[{i}].tools[{j}]"
                if not isinstance(t, dict) or t.get("type") != "function":
                    kind = t.get("type") if isinstance(t, dict) else type(t).__name__
                    skipped.append(f"{ns}.{kind}")
                    continue
                flat = flat_name(ns, t.get("name") or "")
                out.append(_function(t, where, flat))
                names[flat] = (ns, t["name"])
        elif isinstance(kind, str):
            skipped.append(kind)
        else:
            raise RequestError(f"tools[{i}].type: expected a string", "tools")
    if skipped:
        log.info("/v1/responses: skipped tools the model cannot call here: %s", ", ".join(skipped))
    return out, names


def chat_tool_choice(choice, names: Dict[str, Tuple[str, str]]):
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        name = choice["name"]
        if isinstance(choice.get("namespace"), str):
            name = flat_name(choice["namespace"], name)
        return {"type": "function", "function": {"name": name}}
    raise RequestError(
        f"tool_choice: expected 'auto', 'none', 'required' or {{'type': 'function', 'name': ...}}, got {choice!r}",
        "tool_choice",
    )


# ---------------------------------------------------------------------------------------------
# input items


OMITTED = "[{kind} omitted: this model reads text only]"


def _text(content, where: str, kinds: Tuple[str, ...], omit: Tuple[str, ...] = ()) -> str:
    """The text of string or parts content; parts of an `omit` kind become a note the model
    reads (a tool's image output must not fail an agent's whole turn), any other kind a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: expected a string or a list of content parts", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in omit:
            log.warning("/v1/responses: %s[%d] is %s: the model gets a note instead", where, j, kind)
            texts.append(OMITTED.format(kind=kind.removeprefix("input_")))
            continue
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise RequestError(
                f"{where}[{j}]: only text parts ({', '.join(kinds)}) are supported, got {kind or type(part).__name__!r}",
                "input",
            )
        texts.append(part["text"])
    return "\n".join(texts)  # as chat's text parts


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: its `content` (reasoning_text parts, as we return them), else its
    summary; `encrypted_content` alone cannot be read here."""
    for key, kinds in (("content", ("reasoning_text", "text")), ("summary", ("summary_text",))):
        parts = item.get(key)
        if parts:
            return _text(parts, f"{where}.{key}", kinds)
    return ""


class _Messages:
    """Chat messages built item by item; assistant pieces (reasoning, text, calls) merge into one
    assistant turn until a user, system or tool message ends it."""

    def __init__(self, names):
        self.out: List[dict] = []
        self.reasoning: Optional[str] = None
        self.calls: Dict[str, str] = {}  # call_id -> flat name
        self.flat = {v: k for k, v in names.items()}

    def _assistant(self, fresh: bool) -> dict:
        last = self.out[-1] if self.out else None
        if fresh or last is None or last["role"] != "assistant" or self.reasoning is not None:
            last = {"role": "assistant", "content": ""}
            self.out.append(last)
        if self.reasoning is not None:
            last["reasoning_content"], self.reasoning = self.reasoning, None
        return last

    def add(self, item: dict, i: int):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(
                    f"{where}.role: expected user, assistant, system or developer, got {role!r}", "input"
                )
            if role == "assistant":
                text = _text(item.get("content"), f"{where}.content", ("output_text", "input_text"))
                self._assistant(fresh=True)["content"] = text
            else:
                self.end_assistant()
                text = _text(item.get("content"), f"{where}.content", ("input_text", "output_text"))
                self.out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "reasoning":
            self.end_assistant()
            self.reasoning = _reasoning_text(item, where)
        elif kind == "function_call":
            name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments")
            if not (
                isinstance(name, str)
                and name
                and isinstance(call_id, str)
                and call_id
                and isinstance(args, str)
            ):
                raise RequestError(
                    f"{where}: a function_call needs call_id, name and arguments (strings)", "input"
                )
            if isinstance(item.get("namespace"), str):
                name = self.flat.get((item["namespace"], name), flat_name(item["namespace"], name))
            msg = self._assistant(fresh=False)
            msg.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            )
            self.calls[call_id] = name
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in self.calls:
                raise RequestError(
                    f"{where}.call_id: {call_id!r} answers no function_call earlier in the input", "input"
                )
            self.end_assistant()
            output = _text(
                item.get("output"),
                f"{where}.output",
                ("input_text", "output_text"),
                ("input_image", "input_file"),
            )
            self.out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            raise RequestError(
                f"{where}.type: {kind!r} is not supported here (message, reasoning, function_call, "
                "function_call_output)",
                "input",
            )

    def end_assistant(self):
        if self.reasoning is not None:  # reasoning that no assistant message or call followed
            self._assistant(fresh=True)


def as_items(value) -> List[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RequestError(f"input[{i}]: expected an object, got {type(item).__name__}", "input")
    return value


def chat_messages(instructions: Optional[str], items: List[dict], names) -> List[dict]:
    msgs = _Messages(names)
    if instructions:
        msgs.out.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        msgs.add(item, i)
    msgs.end_assistant()
    if not msgs.out:
        raise RequestError("input: the conversation is empty", "input")
    return msgs.out


def to_chat(req: ResponsesRequest, items: List[dict]) -> Tuple[ChatRequest, Dict[str, Tuple[str, str]]]:
    """The chat request that serves `req` (its input `items` resolved), and the namespace map."""
    refuse_unsupported(req)
    tools, names = chat_tools(req.tools)
    chat = ChatRequest(
        model=req.model,
        messages=chat_messages(req.instructions, items, names),
        tools=tools or None,
        tool_choice=chat_tool_choice(req.tool_choice, names),
        parallel_tool_calls=req.parallel_tool_calls,
        temperature=req.temperature,
        top_p=req.top_p,
        reasoning_effort=req.reasoning.effort if req.reasoning else None,
        num_draft=req.num_draft,
        draft_min_confidence=req.draft_min_confidence,
        prompt_cache_key=req.prompt_cache_key,
    )
    return chat, names


def call_name(flat: str, names: Dict[str, Tuple[str, str]]) -> dict:
    """A tool call's name fields on the wire: {"name"} or, for a namespace's function,
    {"name", "namespace"}."""
    if flat in names:
        ns, name = names[flat]
        return {"name": name, "namespace": ns}
    return {"name": flat}
