"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens: a translation
layer over the chat path. A request becomes one ChatRequest (server/chat.py renders, queues and
parses it as for /v1/chat/completions); the reply parser's deltas become Anthropic content
blocks (thinking, text, tool_use), collected or streamed as Anthropic's SSE events.

Choices where the two APIs differ (README, "Anthropic Messages API"):
- a `system` message inside `messages` (Claude Code's mid-conversation system prompts) stays a
  system turn where it stands: Step's chat template renders a later system message as its own
  `<|im_start|>system` turn;
- Step always reasons: its reasoning is always returned as a `thinking` block, whatever
  `thinking` asks (a budget is not enforced); `output_config.effort` becomes the template's
  `reasoning_effort`; the `signature` is a hash of the thinking text (clients echo it back);
- a tool_result with `is_error` is rendered as its content after "Error: ";
- max_tokens beyond the context's room is lowered to it (stop_reason
  `model_context_window_exceeded` when that is what ended the reply), as Anthropic does;
- the system block Claude Code prepends (`x-anthropic-billing-header: ...`, different in every
  request) is dropped, as vLLM does: it would defeat prompt-cache reuse at the prompt's start."""

import hashlib
import json
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .chat import Turn, render, start_chat
from .context import Context, keep_alive, run_job
from .engine import Failed, Finished, Piece
from .schemas import ChatRequest, MinConfidence, RequestError, refuse_unsupported

PREFIX = "/v1/messages"
PING_S = 5.0  # an `event: ping` this often while the prompt is prefilled
BILLING_HEADER = "x-anthropic-billing-header:"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def owns(path: str) -> bool:
    """Whether `path` is one of this protocol's routes (its errors take Anthropic's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def model_card(model_id: str) -> dict:
    """Anthropic's fields of a GET /v1/models entry (beside OpenAI's)."""
    return {"type": "model", "display_name": model_id, "created_at": "1970-01-01T00:00:00Z"}


def model_page(model_id: str) -> dict:
    return {"has_more": False, "first_id": model_id, "last_id": model_id}


# ---------------------------------------------------------------------------------------------
# requests

Blocks = Union[str, List[Dict[str, Any]]]


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: List[Dict[str, Any]] = Field(..., min_length=1)
    system: Optional[Blocks] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Dict[str, Any]] = None
    thinking: Optional[Dict[str, Any]] = None
    output_config: Optional[Dict[str, Any]] = None
    mcp_servers: Optional[List[Dict[str, Any]]] = None  # refused unless empty
    # Anthropic's service only: accepted, ignored
    cache_control: Optional[Dict[str, Any]] = None
    context_management: Optional[Dict[str, Any]] = None
    container: Optional[Any] = None
    diagnostics: Optional[Any] = None
    inference_geo: Optional[str] = None
    service_tier: Optional[str] = None
    speed: Optional[str] = None
    betas: Optional[List[str]] = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(..., ge=1)
    stream: bool = False
    stop_sequences: Optional[List[str]] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    metadata: Optional[Dict[str, Any]] = None
    num_draft: Optional[Union[int, Literal["auto"]]] = None  # ours: 0 decodes plainly
    draft_min_confidence: MinConfidence = None  # ours: the MTP confidence gate


def _field(block: dict, key: str, where: str, kind=str):
    value = block.get(key)
    if not isinstance(value, kind):
        raise RequestError(f"{where}.{key}: expected a {kind.__name__}, got {type(value).__name__}", where)
    return value


def _blocks(content, where: str) -> List[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}: expected a string or a list of content blocks", where)
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise RequestError(f"{where}.{j}: expected a content block with a 'type'", where)
    return content


def _unsupported(block: dict, where: str, allowed: str):
    kind = block["type"]
    why = " (this model reads text only)" if kind in ("image", "document") else ""
    raise RequestError(
        f"{where}.type: {kind!r} blocks are not supported here{why}; expected {allowed}", where
    )


def _texts(content, where: str) -> List[dict]:
    """Text blocks as chat text parts (chat_format joins them)."""
    parts = []
    for j, b in enumerate(_blocks(content, where)):
        if b["type"] != "text":
            _unsupported(b, f"{where}.{j}", "'text'")
        parts.append({"type": "text", "text": _field(b, "text", f"{where}.{j}")})
    return parts


def _system(system, where="system") -> Optional[list]:
    if isinstance(system, str):
        lines = system.split("\n", 1)
        system = (lines[1] if len(lines) > 1 else "") if system.startswith(BILLING_HEADER) else system
        return [{"type": "text", "text": system}] if system else None
    parts = [p for p in _texts(system, where) if not p["text"].startswith(BILLING_HEADER)]
    return parts or None


def _assistant(content, where: str, call_ids: set) -> dict:
    texts, thinking, calls = [], [], []
    for j, b in enumerate(_blocks(content, where)):
        w = f"{where}.{j}"
        if b["type"] == "text":
            texts.append({"type": "text", "text": _field(b, "text", w)})
        elif b["type"] == "thinking":
            thinking.append(_field(b, "thinking", w))
        elif b["type"] == "redacted_thinking":
            continue  # Anthropic-encrypted: nothing this model can read
        elif b["type"] == "tool_use":
            call_id, name = _field(b, "id", w), _field(b, "name", w)
            args = _field(b, "input", w, dict)
            call_ids.add(call_id)
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        else:
            _unsupported(b, w, "'text', 'thinking', 'redacted_thinking' or 'tool_use'")
    msg = {"role": "assistant", "content": texts if isinstance(content, list) else content}
    if thinking:
        msg["reasoning_content"] = "\n".join(thinking)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(role: str, content, where: str, call_ids: set) -> List[dict]:
    """A user (or system) message's blocks: runs of text as one message, each tool_result as
    a tool message, in their order."""
    out, texts = [], []
    for j, b in enumerate(_blocks(content, where)):
        w = f"{where}.{j}"
        if b["type"] == "text":
            texts.append({"type": "text", "text": _field(b, "text", w)})
            continue
        if b["type"] != "tool_result" or role != "user":
            _unsupported(b, w, "'text' or 'tool_result'" if role == "user" else "'text'")
        if texts:
            out.append({"role": role, "content": texts})
            texts = []
        call_id = _field(b, "tool_use_id", w)
        if call_id not in call_ids:
            raise RequestError(f"{w}.tool_use_id: no earlier tool_use block has the id {call_id!r}", w)
        result = b.get("content", "")
        text = "\n".join(p["text"] for p in _texts(result, f"{w}.content")) if result else ""
        if b.get("is_error") is True:
            text = "Error: " + text
        elif b.get("is_error") not in (None, False):
            raise RequestError(f"{w}.is_error: expected a boolean", w)
        out.append({"role": "tool", "tool_call_id": call_id, "content": text})
    if texts or not out:
        out.append({"role": role, "content": texts})
    return out


def _tool(tool, where: str) -> dict:
    if not isinstance(tool, dict):
        raise RequestError(f"{where}: expected a tool object", where)
    kind = tool.get("type") or "custom"
    if kind != "custom":
        raise RequestError(
            f"{where}.type: {kind!r} is a tool Anthropic's service runs; this server offers only "
            "client tools (name, description, input_schema)",
            where,
        )
    fn = {"name": _field(tool, "name", where)}
    if tool.get("description") is not None:
        fn["description"] = _field(tool, "description", where)
    fn["parameters"] = _field(tool, "input_schema", where, dict)
    return {"type": "function", "function": fn}


def _tool_choice(choice: Optional[dict]):
    if choice is None:
        return None
    if choice.get("disable_parallel_tool_use"):
        raise RequestError("tool_choice.disable_parallel_tool_use cannot be enforced", "tool_choice")
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": _field(choice, "name", "tool_choice")}}
    if kind not in ("auto", "any", "none"):
        raise RequestError(
            f"tool_choice.type: expected 'auto', 'any', 'tool' or 'none', got {kind!r}", "tool_choice"
        )
    return "required" if kind == "any" else kind


def chat_request(req: CountTokensRequest) -> ChatRequest:
    """The Anthropic request as the one internal chat request (OpenAI chat shape)."""
    if req.mcp_servers:
        raise RequestError("mcp_servers are not supported: this server runs no MCP connector", "mcp_servers")
    thinking = (req.thinking or {}).get("type", "enabled")
    if thinking not in ("enabled", "disabled", "adaptive"):
        raise RequestError(
            f"thinking.type: expected 'enabled', 'disabled' or 'adaptive', got {thinking!r}", "thinking"
        )
    out = req.output_config or {}
    if out.get("format") is not None:
        raise RequestError("output_config.format is not supported (no constrained decoding)", "output_config")
    if not isinstance(out.get("effort", ""), str):
        raise RequestError("output_config.effort: expected a string", "output_config")
    system = _system(req.system) if req.system is not None else None
    messages = [{"role": "system", "content": system}] if system else []
    call_ids: set = set()
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: expected a message object", where)
        role = m.get("role")
        if role not in ("user", "assistant", "system"):
            raise RequestError(f"{where}.role: expected 'user', 'assistant' or 'system', got {role!r}", where)
        if "content" not in m:
            raise RequestError(f"{where}.content: required", where)
        if role == "assistant":
            messages.append(_assistant(m["content"], f"{where}.content", call_ids))
        else:
            messages += _user(role, m["content"], f"{where}.content", call_ids)
    if req.messages[-1].get("role") == "assistant":
        raise RequestError(
            "the last message must be a user message: continuing an assistant turn (prefill) is not "
            "supported with Step's reasoning format",
            "messages",
        )
    tools = [_tool(t, f"tools.{i}") for i, t in enumerate(req.tools or [])] or None
    fields = dict(
        model=req.model,
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(req.tool_choice),
        reasoning_effort=out.get("effort"),
    )
    if isinstance(req, MessagesRequest):
        fields.update(
            stream=req.stream,
            max_tokens=req.max_tokens,
            stop=req.stop_sequences,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            num_draft=req.num_draft,
            draft_min_confidence=req.draft_min_confidence,
        )
    try:
        return ChatRequest(**fields)
    except ValidationError as e:
        raise RequestError(f"invalid request: {e.errors()[0].get('msg')}") from None


# ---------------------------------------------------------------------------------------------
# replies


def signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode()).hexdigest()


class Content:
    """The reply's content blocks, built from the reply parser's deltas in their order; `feed`
    and `close` return the stream events that build the same blocks."""

    def __init__(self):
        self.blocks: List[dict] = []
        self.open = False

    def feed(self, d) -> List[dict]:
        if d.tool_call is not None:
            tc = d.tool_call
            block = {
                "type": "tool_use",
                "id": "toolu_" + tc.id.split("_", 1)[-1],
                "name": tc.name,
                "input": {},
            }
            events = self.close() + self._start(block)
            block["input"] = json.loads(tc.arguments)
            delta = {"type": "input_json_delta", "partial_json": tc.arguments}
            return events + [self._delta(delta)] + self.close()
        kind, key, text = (
            ("thinking", "thinking", d.reasoning) if d.reasoning else ("text", "text", d.content)
        )
        events = []
        if not (self.open and self.blocks[-1]["type"] == kind):
            start = {"type": kind, key: ""} if kind == "text" else {"type": kind, key: "", "signature": ""}
            events = self.close() + self._start(start)
        self.blocks[-1][key] += text
        return events + [self._delta({"type": f"{kind}_delta", key: text})]

    def close(self) -> List[dict]:
        if not self.open:
            return []
        self.open = False
        block, events = self.blocks[-1], []
        if block["type"] == "thinking":
            block["signature"] = signature(block["thinking"])
            events.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        return events + [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def _start(self, block: dict) -> List[dict]:
        self.blocks.append(block)
        self.open = True
        shown = dict(block, input={}) if block["type"] == "tool_use" else dict(block)
        return [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": shown}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}


def usage(done: Finished) -> dict:
    """Anthropic's split: input_tokens is the part of the prompt not read from the prompt
    cache, cache_read_input_tokens the part that was (the prompt is their sum)."""
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "output_tokens": done.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": done.cached_tokens,
    }


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class Reply:
    """One /v1/messages request's reply, from its chat Turn's events."""

    def __init__(self, ctx: Context, turn: Turn, req: MessagesRequest):
        self.ctx, self.turn, self.req = ctx, turn, req
        self.message = {
            "id": "msg_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }

    async def stop(self, done: Finished, tokens: List[int], content: Content) -> dict:
        """stop_reason and stop_sequence: a tool call wins; a stop that is not an EOS token is
        a stop sequence (found in the decoded reply: the engine cut it from the text)."""
        if done.finish_reason == "length":
            fitted = self.turn.gen.max_tokens < self.req.max_tokens
            return {"stop_reason": "model_context_window_exceeded" if fitted else "max_tokens"}
        if any(b["type"] == "tool_use" for b in content.blocks):
            return {"stop_reason": "tool_use"}
        tok = self.ctx.engine.tokenizer if self.turn.gen.stop else None
        if tok is not None and tokens and tokens[-1] not in set(tok.eos_token_ids):
            text = await self.ctx.off_loop(tok.decode, tokens)
            found = [(text.find(s), s) for s in self.turn.gen.stop if s in text]
            seq = min(found)[1] if found else self.turn.gen.stop[0]
            return {"stop_reason": "stop_sequence", "stop_sequence": seq}
        return {"stop_reason": "end_turn"}

    async def collect(self, events):
        content, tokens = Content(), []
        async for deltas, ev in self.turn.events(events):
            if isinstance(ev, Failed):
                return error_response(500, ev.message)
            if isinstance(ev, Piece):
                tokens += ev.tokens
            for d in deltas:
                content.feed(d)
            if isinstance(ev, Finished):
                content.close()
                stop = await self.stop(ev, tokens, content)
                return dict(self.message, content=content.blocks, **stop, usage=usage(ev))

    async def stream(self, events):
        start = {"input_tokens": len(self.turn.ids), "output_tokens": 0}  # final counts: message_delta
        start.update(cache_creation_input_tokens=0, cache_read_input_tokens=0)
        yield sse({"type": "message_start", "message": dict(self.message, usage=start)})
        content, tokens = Content(), []
        async for item in keep_alive(self.turn.events(events), PING_S):
            if item is None:
                yield sse({"type": "ping"})
                continue
            deltas, ev = item
            if isinstance(ev, Failed):
                yield sse(error_body(500, ev.message))
                return
            if isinstance(ev, Finished) and ev.finish_reason == "cancelled":
                return
            if isinstance(ev, Piece):
                tokens += ev.tokens
            for d in deltas:
                for e in content.feed(d):
                    yield sse(e)
            if isinstance(ev, Finished):
                for e in content.close():
                    yield sse(e)
                delta = dict({"stop_sequence": None}, **await self.stop(ev, tokens, content))
                yield sse({"type": "message_delta", "delta": delta, "usage": usage(ev)})
                yield sse({"type": "message_stop"})


async def serve_messages(ctx: Context, req: MessagesRequest, request: Request):
    chat = chat_request(req)
    turn = await start_chat(ctx, chat, req.max_tokens, fit_context=True)
    reply = Reply(ctx, turn, req)
    return await run_job(
        ctx, turn.job, request, reply.stream if req.stream else None, reply.collect, trailer=""
    )


async def count_tokens(ctx: Context, req: CountTokensRequest) -> dict:
    """The prompt's token count: what input_tokens + cache_read_input_tokens of the same
    request through /v1/messages add up to."""
    chat = chat_request(req)
    ctx.check_model(chat.model)
    refuse_unsupported(chat)
    ids, _, _ = await ctx.off_loop(render, ctx.engine.tokenizer, chat)
    return {"input_tokens": len(ids)}
