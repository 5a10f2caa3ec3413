"""POST /v1/chat/completions: Step-3.5's chat template in, reasoning / content / tool-call
deltas out (parsing lives in `mlx_step35.chat_format`)."""

import json
from typing import List, Optional

from jinja2 import TemplateError

from .. import chat_format as cf
from .context import Context, failed_response, run_job
from .engine import Failed, Finished, Piece
from .responses import Envelope, chat_logprobs, error_body, finish_reason, timings, usage
from .schemas import ChatRequest, RequestError, refuse_unsupported


def parser_tools(tools: Optional[list], choice) -> list:
    """The tools whose calls the reply parser turns into tool_calls: those the prompt offered
    (none for tool_choice "none" or no tools: then any tool-call text stays content)."""
    if choice == "required" and not tools:
        raise RequestError("tool_choice 'required' needs tools", "tool_choice")
    if not tools or choice == "none":
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return [t for t in tools if isinstance(t, dict) and t.get("function", t).get("name") == name]
    return tools


def tool_call_json(tc: "cf.ToolCall") -> dict:
    return {
        "index": tc.index,
        "id": tc.id,
        "type": "function",
        "function": {"name": tc.name, "arguments": tc.arguments},
    }


def delta_json(d: "cf.Delta") -> dict:
    if d.tool_call is not None:
        return {"tool_calls": [tool_call_json(d.tool_call)]}
    if d.reasoning:
        return {"reasoning_content": d.reasoning}
    return {"content": d.content}


def render(tokenizer, req: ChatRequest):
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    try:
        ids = cf.render_prompt(
            tokenizer, req.messages, tools=req.tools, tool_choice=req.tool_choice, chat_template_kwargs=kwargs
        )
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    except TemplateError as e:
        raise RequestError(f"the chat template failed on these messages: {e}", "messages") from None
    marks = cf.branch_points(tokenizer, req.messages, ids, req.tools, req.tool_choice, kwargs)
    return ids, cf.prompt_opens_reasoning(tokenizer.decode(ids[-64:])), marks  # the generation prompt's end


class Turn:
    """One chat request on its way out: its prompt, generation settings and reply parser.
    `events()` and `result()` are what every protocol (OpenAI chat, Anthropic messages,
    Responses) translates into its own wire format."""

    def __init__(self, req: ChatRequest, ids, in_reasoning: bool, gen, job, model_id: str):
        self.req, self.ids, self.gen, self.job = req, ids, gen, job
        self.tools = parser_tools(req.tools, req.tool_choice)
        self.in_reasoning = in_reasoning
        self.env = Envelope("chat", model_id)
        self.logprobs = gen.top_logprobs is not None

    async def events(self, events):
        """(deltas, event) for each engine event: the reply parser's deltas of a Piece's text
        (after a Finished, its last ones); a Failed or a cancellation ends it with no deltas."""
        parser = cf.ReplyParser(tools=self.tools, in_reasoning=self.in_reasoning)
        async for ev in events:
            if isinstance(ev, Failed) or (isinstance(ev, Finished) and ev.finish_reason == "cancelled"):
                yield [], ev
                return
            yield (parser.feed(ev.text) if isinstance(ev, Piece) else parser.finish()), ev

    async def result(self, events):
        """(reply, tokens, logprobs, Finished), or the Failed event."""
        lps, text, tokens = [], "", []
        async for ev in events:
            if isinstance(ev, Failed):
                return ev
            if isinstance(ev, Piece):
                text, tokens, lps = text + ev.text, tokens + ev.tokens, lps + ev.logprobs
                continue
            return cf.parse_reply(text, tools=self.tools, in_reasoning=self.in_reasoning), tokens, lps, ev

    async def stream(self, events):
        yield self.env.sse(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        lps: List = []
        called = False
        async for deltas, ev in self.events(events):
            if isinstance(ev, Failed):
                yield "data: " + json.dumps(error_body(ev.message, "server_error")) + "\n\n"
                return
            if isinstance(ev, Finished) and ev.finish_reason == "cancelled":
                return
            lps += ev.logprobs if isinstance(ev, Piece) else []
            for d in deltas:
                called |= d.tool_call is not None
                choice = {"index": 0, "delta": delta_json(d), "finish_reason": None}
                if self.logprobs and lps:
                    choice["logprobs"], lps = chat_logprobs(lps), []
                yield self.env.sse([choice])
            if isinstance(ev, Finished):
                choice = {"index": 0, "delta": {}, "finish_reason": finish_reason(ev, called)}
                if self.logprobs and lps:
                    choice["logprobs"] = chat_logprobs(lps)
                yield self.env.sse([choice], timings=timings(ev))
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield self.env.sse([], usage=usage(ev))

    async def collect(self, events):
        out = await self.result(events)
        if isinstance(out, Failed):
            return failed_response(out)
        reply, tokens, lps, ev = out
        message = {"role": "assistant", "content": reply.content or (None if reply.tool_calls else "")}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [tool_call_json(tc) for tc in reply.tool_calls]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": chat_logprobs(lps) if self.logprobs else None,
        }
        choice["finish_reason"] = finish_reason(ev, bool(reply.tool_calls))
        out = self.env.wrap([choice], False, usage=usage(ev), timings=timings(ev))
        if self.req.return_token_ids:
            out["prompt_token_ids"], choice["token_ids"] = self.ids, tokens
        return out


async def start_chat(
    ctx: Context, req: ChatRequest, max_tokens: Optional[int], top_logprobs=None, fit_context=False
) -> Turn:
    """Validate, render and queue one chat request: the one path every chat protocol takes
    (`fit_context`: see Context.gen_request)."""
    ctx.check_model(req.model)
    refuse_unsupported(req)
    ids, in_reasoning, marks = await ctx.off_loop(render, ctx.engine.tokenizer, req)
    gen = ctx.gen_request(req, ids, max_tokens, top_logprobs, fit_context)
    gen.checkpoints = marks  # where the prompt cache snapshots the prefill
    job = ctx.submit(gen)
    return Turn(req, ids, in_reasoning, gen, job, ctx.settings.model_id)


async def serve_chat(ctx: Context, req: ChatRequest, request):
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    turn = await start_chat(ctx, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    return await run_job(ctx, turn.job, request, turn.stream if req.stream else None, turn.collect)
