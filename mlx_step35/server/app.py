"""The FastAPI application: OpenAI-compatible and Anthropic routes, errors (each protocol's
shape, by path), API key, body limit, metrics."""

import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..memory import wired_limit
from . import anthropic
from .chat import serve_chat
from .context import Context, Settings, error, failed_response, run_job
from .engine import Engine, Failed, Finished, Piece
from .metrics import Metrics
from .openai_responses import serve_responses
from .responses import Envelope, completion_logprobs, error_body, timings, usage
from .responses_input import ResponsesRequest, ResponseStore
from .schemas import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    refuse_unsupported,
)

log = logging.getLogger("mlx_step35.server")
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")
RETRY_AFTER_S = 5


class Guard:
    """ASGI middleware: 401 without the API key, 413 over the body limit (the body is read
    here, before any route sees it), and requests counted by path and status."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send, path)
        finally:
            if path.startswith("/v1/") and "code" in status:
                self.metrics.request(path, status["code"])

    async def _guarded(self, scope, receive, send, path):
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key and scope["method"] != "OPTIONS" and path not in PUBLIC_PATHS:
            bearer = headers.get(b"authorization", b"").decode("latin-1").encode()
            given = headers.get(b"x-api-key", b"").decode("latin-1").encode()  # Anthropic's clients
            if not (
                hmac.compare_digest(bearer, f"Bearer {key}".encode())
                or hmac.compare_digest(given, key.encode())
            ):
                return await _reply(
                    send,
                    path,
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                    "authentication_error",
                    {"www-authenticate": "Bearer"},
                )
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply(send, path, 413, f"request body over the limit of {limit} bytes")
        body, more, disconnect = [], True, None
        size = 0
        while more and scope["method"] in ("POST", "PUT", "PATCH"):
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnect = message
                break
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await _reply(send, path, 413, f"request body over the limit of {limit} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return disconnect or {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        if path.startswith("/v1/") and scope["method"] == "POST":  # JSON whatever the client declared
            hdrs = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=hdrs + [(b"content-type", b"application/json")])
        await self.app(scope, replay, send)


async def _reply(send, path: str, status: int, message: str, kind="invalid_request_error", headers=None):
    body = anthropic.error_body(status, message) if anthropic.owns(path) else error_body(message, kind)
    body = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> Tuple[str, Optional[str]]:
    parts, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unsupported field {where!r}")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        if e.get("type") != "json_invalid":
            param = param or loc[0] if loc else param
    return "; ".join(parts) or "invalid request", param


def _error(request: Request, status: int, message: str, param=None, kind="invalid_request_error", **kw):
    """An error in the shape of the protocol that `request`'s path belongs to."""
    if anthropic.owns(request.url.path):
        return anthropic.error_response(status, message, headers=kw.get("headers"))
    return error(status, message, param, kind=kind, **kw)


def add_error_handlers(app: FastAPI):
    """Every error as the protocol's error object (OpenAI's, or Anthropic's on its routes);
    validation errors are 400s naming the field."""

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc):
        message, param = _validation_message(exc)
        return _error(request, 400, message, param)

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc: RequestError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        kind = "server_busy" if exc.status == 503 else "invalid_request_error"
        code = "model_not_found" if exc.status == 404 else None
        return _error(request, exc.status, str(exc), exc.param, kind=kind, code=code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return _error(
            request,
            exc.status_code,
            str(exc.detail),
            kind="not_found_error" if exc.status_code == 404 else "invalid_request_error",
        )

    @app.exception_handler(Exception)
    async def on_crash(request, exc):
        log.exception("unexpected error")
        return _error(request, 500, f"internal error: {type(exc).__name__}", kind="server_error")


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    metrics = engine.metrics or Metrics()
    engine.metrics = metrics
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # tokenizers are not re-entrant

    @asynccontextmanager
    async def lifespan(app):
        with wired_limit(engine.model):  # on Metal the weights stay wired for the server's whole life
            yield
        engine.shutdown()
        pool.shutdown(wait=False)

    app = FastAPI(title="mlx-step35", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"], allow_headers=["*"]
        )

    add_error_handlers(app)
    ctx = Context(engine, settings, pool)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    card = {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "mlx-step35"}
    card.update(anthropic.model_card(settings.model_id))  # one listing both SDKs read

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card], **anthropic.model_page(settings.model_id)}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        ctx.check_model(name)
        return card

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(engine.queue_depth(), engine.running(), engine.batch_sizes())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("mlx_step35.server").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.head("/")
    async def probe():  # Claude Code probes the base URL before its first request
        return Response(media_type="text/html")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await serve_completion(ctx, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await serve_chat(ctx, req, request)

    stored = ResponseStore()  # for previous_response_id

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        return await serve_responses(ctx, req, request, stored)

    @app.post(anthropic.PREFIX)  # also as Claude Code's /v1/messages?beta=true
    async def messages(req: anthropic.MessagesRequest, request: Request):
        return await anthropic.serve_messages(ctx, req, request)

    @app.post(anthropic.PREFIX + "/count_tokens")
    async def count_tokens(req: anthropic.CountTokensRequest):
        return await anthropic.count_tokens(ctx, req)

    return app


async def serve_completion(ctx: Context, req: CompletionRequest, request: Request):
    ctx.check_model(req.model)
    refuse_unsupported(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        raise RequestError("one prompt per request (a string or a list of token ids)", "prompt")
    ids = await ctx.off_loop(ctx.engine.tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
    gen = ctx.gen_request(req, ids, req.max_tokens, req.logprobs)
    job = ctx.submit(gen)
    env = Envelope("completion", ctx.settings.model_id)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def extras(done: Finished):
        return {"usage": usage(done), "timings": timings(done)}

    async def stream(events):
        offset = 0
        async for ev in events:
            if isinstance(ev, Piece):
                if not ev.text and not ev.logprobs:
                    continue
                choice = {"index": 0, "text": ev.text, "finish_reason": None, "logprobs": None}
                if gen.top_logprobs is not None:
                    choice["logprobs"] = completion_logprobs(ev.logprobs, offset)
                if req.return_token_ids:
                    choice["token_ids"] = ev.tokens
                offset += len(ev.text)
                yield env.sse([choice])
            elif isinstance(ev, Finished):
                if ev.finish_reason == "cancelled":
                    return
                choice = {"index": 0, "text": "", "finish_reason": ev.finish_reason, "logprobs": None}
                yield env.sse([choice], timings=timings(ev))
                if include_usage:
                    yield env.sse([], usage=usage(ev))
            else:
                yield "data: " + json.dumps(error_body(ev.message, "server_error")) + "\n\n"

    async def collect(events):
        text, tokens, lps = "", [], []
        async for ev in events:
            if isinstance(ev, Piece):
                text += ev.text
                tokens += ev.tokens
                lps += ev.logprobs
            elif isinstance(ev, Failed):
                return failed_response(ev)
            else:
                choice = {"index": 0, "text": text, "finish_reason": ev.finish_reason, "logprobs": None}
                if gen.top_logprobs is not None:
                    choice["logprobs"] = completion_logprobs(lps, 0)
                if req.return_token_ids:
                    choice["token_ids"] = tokens
                out = env.wrap([choice], False, **extras(ev))
                if req.return_token_ids:
                    out["prompt_token_ids"] = ids
                return out

    return await run_job(ctx, job, request, stream if req.stream else None, collect)
