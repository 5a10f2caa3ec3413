"""POST /v1/responses (the OpenAI Responses API), the reply side: one chat turn's reply as output
items (`reasoning` with the reasoning as `reasoning_text` content, `message` with `output_text`,
`function_call`), collected or streamed as the event sequence the OpenAI SDK and Codex parse.

Stateless apart from a bounded in-memory store for `previous_response_id` (responses made with
`store` not false). The request side is `responses_input`; everything else is the chat path's."""

import itertools
import json
import time
import uuid
from typing import List, Optional

from ..chat_format import THINK_END
from .chat import Turn, start_chat
from .context import Context, failed_response, keep_alive, run_job
from .engine import Failed, Finished, Piece
from .responses import timings
from .responses_input import ResponsesRequest, ResponseStore, as_items, call_name, to_chat

KEEPALIVE_S = 5.0  # a response.in_progress event this often while nothing else is sent (a long prefill)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_tokens(tokenizer, tokens: List[int], in_reasoning: bool) -> int:
    """How many of the reply's tokens are reasoning: those up to the one that completes
    `</think>` (all of them if it never closes); 0 if the reply did not start in reasoning."""
    if not in_reasoning or not tokens:
        return 0

    def closed(k: int) -> bool:
        return THINK_END in tokenizer.decode(tokens[:k])

    if not closed(len(tokens)):
        return len(tokens)
    lo, hi = 1, len(tokens)
    while lo < hi:  # the shortest prefix that holds </think>
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if closed(mid) else (mid + 1, hi)
    return lo


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "encrypted_content": None,
    }


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [output_text(text)],
    }


def call_item(item_id: str, tc, names, status: str) -> dict:
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": tc.id}
    item.update(call_name(tc.name, names))
    item["arguments"] = tc.arguments
    return item


def status_of(done: Finished) -> str:
    return "incomplete" if done.finish_reason == "length" else "completed"


class Output:
    """One response on its way out: the response object's fields, its output items collected or
    streamed, and the store entry for `previous_response_id`."""

    def __init__(self, ctx: Context, req: ResponsesRequest, turn: Turn, names, items, store: ResponseStore):
        self.ctx, self.req, self.turn, self.names = ctx, req, turn, names
        self.items_in, self.store = items, store
        self.id = new_id("resp")
        self.created_at = int(time.time())

    def response(self, status: str, output: list, done: Optional[Finished] = None, reasoning=0, error=None):
        req = self.req
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.ctx.settings.model_id,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {
                "effort": req.reasoning.effort if req.reasoning else None,
                "summary": req.reasoning.summary if req.reasoning else None,
            },
            "store": req.store is not False,
            "temperature": req.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": None,
            "metadata": req.metadata or {},
            "prompt_cache_key": req.prompt_cache_key,
            "user": req.user,
        }
        if done is not None:
            out["usage"] = {
                "input_tokens": done.prompt_tokens,
                "input_tokens_details": {"cached_tokens": done.cached_tokens},
                "output_tokens": done.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            }
            out["timings"] = timings(done)  # ours, as chat completions' (llama-server's names)
        return out

    async def finished(self, output: list, tokens: List[int], done: Finished) -> dict:
        """The final response object; remembered for previous_response_id unless store is false."""
        tok = self.ctx.engine.tokenizer
        reasoning = await self.ctx.off_loop(reasoning_tokens, tok, tokens, self.turn.in_reasoning)
        status = status_of(done)
        if self.req.store is not False:
            self.store.put(self.id, self.items_in + output)
        return self.response(status, output, done, reasoning)

    async def collect(self, events):
        out = await self.turn.result(events)
        if isinstance(out, Failed):
            return failed_response(out)
        reply, tokens, _, done = out
        output = []
        if reply.reasoning:
            output.append(reasoning_item(new_id("rs"), reply.reasoning, "completed"))
        if reply.content:
            output.append(message_item(new_id("msg"), reply.content, "completed"))
        output += [call_item(new_id("fc"), tc, self.names, "completed") for tc in reply.tool_calls]
        if status_of(done) == "incomplete" and output and output[-1]["type"] != "function_call":
            output[-1]["status"] = "incomplete"  # cut off by max_output_tokens
        return await self.finished(output, tokens, done)

    async def stream(self, events):
        sse = _Events()
        yield sse.event("response.created", response=self.response("in_progress", []))
        yield sse.event("response.in_progress", response=self.response("in_progress", []))
        tokens: List[int] = []
        async for pair in keep_alive(self.turn.events(events), KEEPALIVE_S):
            if pair is None:  # a real event: SSE comments do not reset Codex's idle timeout
                yield sse.event("response.in_progress", response=self.response("in_progress", sse.output))
                continue
            deltas, ev = pair
            if isinstance(ev, Failed):
                error = {"code": "server_error", "message": ev.message}
                yield sse.event("response.failed", response=self.response("failed", sse.output, error=error))
                return
            if isinstance(ev, Finished) and ev.finish_reason == "cancelled":
                return
            tokens += ev.tokens if isinstance(ev, Piece) else []
            for d in deltas:
                for chunk in sse.delta(d, self.names):
                    yield chunk
            if isinstance(ev, Finished):
                for chunk in sse.close(status_of(ev)):
                    yield chunk
                body = await self.finished(sse.output, tokens, ev)
                yield sse.event(f"response.{body['status']}", response=body)


class _Events:
    """The streamed events of one response's output items, numbered by sequence_number."""

    def __init__(self):
        self.seq = itertools.count()
        self.output: List[dict] = []  # items done
        self.open: Optional[dict] = None  # the reasoning or message item being streamed
        self.text = ""

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": next(self.seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.output)}

    def delta(self, d, names) -> List[str]:
        kind = "call" if d.tool_call is not None else "reasoning" if d.reasoning else "message"
        out = []
        if self.open is not None and (kind == "call" or self.open["type"] != kind):
            out += self.close()
        if kind == "call":
            return out + self._call(d.tool_call, names)
        if self.open is None:
            out += self._start(kind)
        text = d.reasoning or d.content
        self.text += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [self.event(name, **self._where(), content_index=0, delta=text, **extra)]

    def _start(self, kind: str) -> List[str]:
        if kind == "reasoning":
            self.open, part = (
                reasoning_item(new_id("rs"), "", "in_progress"),
                {"type": "reasoning_text", "text": ""},
            )
            added = dict(self.open, content=[])
        else:
            self.open, part = message_item(new_id("msg"), "", "in_progress"), output_text("")
            added = dict(self.open, content=[])
        self.text = ""
        return [
            self.event("response.output_item.added", output_index=len(self.output), item=added),
            self.event("response.content_part.added", **self._where(), content_index=0, part=part),
        ]

    def close(self, status: str = "completed") -> List[str]:
        """End the open reasoning or message item (if any); `incomplete` if the reply was cut."""
        if self.open is None:
            return []
        item, where = self.open, self._where()
        if item["type"] == "reasoning":
            item.update(reasoning_item(item["id"], self.text, status))
            part = item["content"][0]
            done = self.event("response.reasoning_text.done", **where, content_index=0, text=self.text)
        else:
            item.update(message_item(item["id"], self.text, status))
            part = item["content"][0]
            done = self.event(
                "response.output_text.done", **where, content_index=0, text=self.text, logprobs=[]
            )
        out = [
            done,
            self.event("response.content_part.done", **where, content_index=0, part=part),
            self.event("response.output_item.done", output_index=where["output_index"], item=item),
        ]
        self.output.append(item)
        self.open = None
        return out

    def _call(self, tc, names) -> List[str]:
        """A tool call arrives whole (the parser emits it at its </tool_call>): its events at once."""
        item = call_item(new_id("fc"), tc, names, "completed")
        where = {"item_id": item["id"], "output_index": len(self.output)}
        self.output.append(item)
        return [
            self.event(
                "response.output_item.added",
                output_index=where["output_index"],
                item=dict(item, status="in_progress", arguments=""),
            ),
            self.event("response.function_call_arguments.delta", **where, delta=tc.arguments),
            self.event(
                "response.function_call_arguments.done", **where, arguments=tc.arguments, name=item["name"]
            ),
            self.event("response.output_item.done", output_index=where["output_index"], item=item),
        ]


async def serve_responses(ctx: Context, req: ResponsesRequest, request, store: ResponseStore):
    ctx.check_model(req.model)
    items = as_items(req.input)
    if req.previous_response_id is not None:
        items = store.get(req.previous_response_id) + items
    chat, names = to_chat(req, items)
    turn = await start_chat(ctx, chat, req.max_output_tokens)
    out = Output(ctx, req, turn, names, items, store)
    return await run_job(
        ctx, turn.job, request, out.stream if req.stream else None, out.collect, trailer=None
    )
