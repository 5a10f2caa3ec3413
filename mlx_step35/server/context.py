"""What every protocol's route shares, below them all: the server's settings, the request
context (engine, tokenizing thread, validation into a GenRequest), and running a job as a
stream or a collected reply, cancelled when its client leaves."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..generation import DRAFT_MIN_CONFIDENCE, MAX_TOKENS, NUM_DRAFT
from ..sampling import Sampler, make_logits_processors, make_sampler
from .engine import Engine, Failed, GenRequest, QueueFull
from .responses import error_body
from .schemas import RequestError, _Common, num_draft_of, stop_list


@dataclass
class Settings:
    model_id: str
    model_aliases: Tuple[str, ...] = ()
    api_key: Optional[str] = None
    allowed_origins: List[str] = field(default_factory=list)
    max_body_bytes: int = 16 * 2**20
    max_tokens: int = MAX_TOKENS
    temp: float = Sampler.temp
    top_p: float = Sampler.top_p
    top_k: int = Sampler.top_k
    min_p: float = Sampler.min_p
    draft_mtp: bool = True
    num_draft: Union[int, str] = NUM_DRAFT
    draft_min_confidence: Union[float, str] = DRAFT_MIN_CONFIDENCE


def error(status: int, message: str, param=None, kind="invalid_request_error", code=None, headers=None):
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


class Context:
    """What the route handlers share: the engine, settings and the tokenizing thread."""

    def __init__(self, engine: Engine, settings: Settings, pool: ThreadPoolExecutor):
        self.engine, self.settings, self.pool = engine, settings, pool

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_model(self, name: Optional[str]):
        if name and name != self.settings.model_id and name not in self.settings.model_aliases:
            raise RequestError(
                f"model {name!r} not found: this server serves {self.settings.model_id!r} (GET /v1/models)",
                "model",
                404,
            )

    def gen_request(
        self, req: _Common, prompt: List[int], max_tokens: Optional[int], top_logprobs, fit_context=False
    ) -> GenRequest:
        """The validated GenRequest; `fit_context`: a max_tokens beyond the context's room is
        lowered to it (Anthropic's behaviour) instead of refused (OpenAI's)."""
        s = self.settings
        vocab = self.engine.model.args.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        room = self.engine.context_length - len(prompt)
        if room < 1:
            raise RequestError(
                f"prompt is too long: {len(prompt)} tokens > {self.engine.context_length} maximum "
                "(the model's context)",
                "messages" if hasattr(req, "messages") else "prompt",
            )
        if max_tokens is not None and max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if fit_context and max_tokens is not None:
            max_tokens = min(max_tokens, room)
        if max_tokens is not None and max_tokens > room:
            raise RequestError(
                f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens exceed the model's context "
                f"of {self.engine.context_length}",
                "max_tokens",
            )
        draft_mtp, num_draft = num_draft_of(req.num_draft, (s.draft_mtp, s.num_draft))
        pick = lambda v, d: d if v is None else v  # noqa: E731
        top_k = pick(req.top_k, s.top_k)
        if top_k > vocab:
            raise RequestError(f"top_k must be at most the vocabulary size {vocab}", "top_k")
        penalties = dict(
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty or None,
            frequency_penalty=req.frequency_penalty or None,
        )
        procs = make_logits_processors(**penalties)
        return GenRequest(
            prompt=prompt,
            max_tokens=min(room, max_tokens or s.max_tokens),
            sampler=make_sampler(
                pick(req.temperature, s.temp),
                pick(req.top_p, s.top_p),
                pick(req.min_p, s.min_p),
                max(top_k, 0),
            ),
            processors=procs or None,
            penalties={k: v for k, v in penalties.items() if v},
            draft_mtp=draft_mtp,
            num_draft=num_draft,
            seed=req.seed,
            stop=stop_list(req.stop),
            top_logprobs=top_logprobs,
            draft_min_confidence=pick(req.draft_min_confidence, s.draft_min_confidence),
        )

    def submit(self, gen: GenRequest) -> "Job":  # noqa: F821
        try:
            return self.engine.submit(gen, asyncio.get_running_loop())
        except QueueFull:
            raise RequestError(
                "the server is busy: the request queue is full, retry later", None, 503
            ) from None


async def watch_disconnect(request: Request, job):
    """Cancel `job` when the client goes away (the body is already read, so the next
    message can only be the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def run_job(ctx: Context, job, request: Request, stream_fn, collect_fn, trailer="data: [DONE]\n\n"):
    """Stream (SSE, `stream_fn`'s chunks, then `trailer`) or collect a job's events
    (`collect_fn`), cancelling it when the client disconnects."""
    watcher = asyncio.create_task(watch_disconnect(request, job))

    async def sse():
        try:
            async for chunk in stream_fn(job.stream()):
                yield chunk
            if trailer:
                yield trailer
        finally:
            job.cancel()
            watcher.cancel()

    if stream_fn is not None:
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        return await collect_fn(job.stream())
    finally:
        job.cancel()
        watcher.cancel()


async def keep_alive(chunks, every_s: float):
    """`chunks` (an async iterator), with None yielded whenever the next chunk takes longer than
    `every_s` (a long prompt's prefill): the caller writes its protocol's keep-alive for it, so
    that clients and proxies do not give up on an idle stream."""
    it, pending = chunks.__aiter__(), None
    try:
        while True:
            pending = pending or asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            pending, task = None, pending
            try:
                chunk = task.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()


def failed_response(ev: Failed):
    return error(500, ev.message, kind="server_error")
