"""OpenAI-compatible HTTP server drafting with the MTP blocks: `python -m mlx_step35.server`."""

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from ..batch import DECODE_CONCURRENCY, PROMPT_CONCURRENCY
from ..cli import ArgumentParser, add_kv_arguments, kv_arguments, user_errors
from ..distributed import exit_when_terminated, peer_errors, world
from ..expert_cache import add_expert_cache_arguments
from ..follow import follow, follow_batch
from ..generation import GATE_DEFAULT, MAX_DRAFT, NUM_DRAFT, parse_min_confidence
from ..prompt_cache import PromptCacheStore, default_store_gb
from ..sampling import Sampler
from .app import Settings, create_app
from .engine import MAX_QUEUE, Engine, GenRequest

__all__ = ["main", "serve", "create_app", "Engine", "GenRequest", "Settings"]
DEMO_ID = "mlx-step35-demo"


def parser() -> ArgumentParser:
    d = Settings(model_id="")
    s = Sampler()
    p = ArgumentParser(
        prog="python -m mlx_step35.server",
        description="OpenAI-compatible server (chat/completions, completions, models, metrics, a chat page "
        "at /), also speaking Anthropic's /v1/messages, for Step-3.5/3.7-Flash, drafting with its MTP "
        "blocks. Flags as mlx_lm.server's.",
    )
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder name)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)"
    )
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
    p.add_argument(
        "--draft-mtp",
        action=argparse.BooleanOptionalAction,
        default=d.draft_mtp,
        help="speculative decoding with the MTP blocks (default: on)",
    )
    p.add_argument(
        "--num-draft",
        default=NUM_DRAFT,
        choices=[str(i) for i in range(1, MAX_DRAFT + 1)] + ["auto"],
        help="tokens drafted per step (default %(default)s); a request's num_draft overrides it",
    )
    p.add_argument("--temp", type=float, default=s.temp, help="default temperature (default %(default)s)")
    p.add_argument("--top-p", type=float, default=s.top_p, help="default top-p (0 = off)")
    p.add_argument("--top-k", type=int, default=s.top_k, help="default top-k (0 = off)")
    p.add_argument("--min-p", type=float, default=s.min_p, help="default min-p (0 = off)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="default max tokens per reply")
    p.add_argument(
        "--api-key", default=None, help="require the key: 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
    )
    p.add_argument("--allowed-origins", nargs="*", default=[], help="origins allowed by CORS (default: none)")
    p.add_argument(
        "--max-queue", type=int, default=MAX_QUEUE, help="queued requests before 503 (default %(default)s)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit, 413 above it"
    )
    add_expert_cache_arguments(p)
    p.add_argument(
        "--prompt-cache-gb",
        type=float,
        default=default_store_gb(),
        help="memory for conversations' prompt caches, reused across turns (default %(default)s: 5%% of "
        "this machine's memory, 0.5-8 GB); 0 turns the cache off",
    )
    p.add_argument(
        "--prompt-cache-dir",
        default=None,
        help="also keep prompt caches in this directory (read back after a restart; bounded to 4x "
        "--prompt-cache-gb, oldest files first)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument(
        "--draft-min-confidence",
        default=d.draft_min_confidence,
        metavar="P",
        help="stop a step's draft chain before the first MTP block whose confidence is below P, in "
        f"[0, 1); 0 = never; auto (default): learnt with the depth under --num-draft auto, {GATE_DEFAULT} "
        "at a fixed depth; a request's draft_min_confidence overrides it. Output is unchanged",
    )
    p.add_argument(
        "--decode-concurrency",
        type=int,
        default=DECODE_CONCURRENCY,
        metavar="N",
        help="requests generated together, one trunk pass per step for all of them, each drafting "
        "with its own depth (default %(default)s, as mlx_lm.server); 1: one request at a time. A "
        "request waits in the queue while the KV of those running would not fit in memory",
    )
    p.add_argument(
        "--prompt-concurrency",
        type=int,
        default=PROMPT_CONCURRENCY,
        metavar="N",
        help="prompts prefilled together (default %(default)s, as mlx_lm.server), sharing one chunk "
        "of 2048 tokens per step, interleaved with the others' decoding steps",
    )
    add_kv_arguments(p)
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    for flag, value, low in (
        ("--prompt-cache-gb", a.prompt_cache_gb, 0),
        ("--max-tokens", a.max_tokens, 1),
        ("--max-queue", a.max_queue, 1),
        ("--max-body-bytes", a.max_body_bytes, 1),
        ("--expert-cache-gb", 1 if a.expert_cache_gb is None else a.expert_cache_gb, 1e-9),
        ("--port", a.port, 0),
        ("--decode-concurrency", a.decode_concurrency, 1),
        ("--prompt-concurrency", a.prompt_concurrency, 1),
    ):
        if value < low:
            p.error(f"{flag} must be at least {low}")
    try:
        a.draft_min_confidence = parse_min_confidence(a.draft_min_confidence)
    except ValueError as e:
        p.error(str(e))
    if a.top_k < 0 or a.temp < 0 or not 0 <= a.top_p <= 1 or not 0 <= a.min_p <= 1:
        p.error("need --temp >= 0, 0 <= --top-p <= 1, 0 <= --min-p <= 1 and --top-k >= 0")
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    group = world()  # started by mlx.launch with several ranks: tensor parallel, rank 0 serves
    rank = group.rank() if group is not None else 0
    if group is not None:
        if a.expert_cache_gb is not None:
            p.error("--expert-cache-gb cannot be combined with tensor parallelism (mlx.launch)")
        exit_when_terminated(f"{p.prog}: error: rank {rank}: stopped, another rank exited")
    sock = None
    if rank == 0:
        try:  # before loading (minutes for the real model): a busy port fails now
            sock = bind(a.host, a.port)
        except OSError as e:
            p.error(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}")
    with user_errors(p.prog):
        from ..loading import load

        if a.expert_cache_gb is not None:
            from ..expert_cache import plan_expert_cache
            from ..loading import resolve_path

            logging.getLogger("mlx_step35.server").info(
                plan_expert_cache(resolve_path(a.model), a.expert_cache_gb).describe()
            )
        model, tokenizer = load(
            a.model, expert_cache_gb=a.expert_cache_gb, expert_cache_policy=a.expert_cache_policy, group=group
        )
    if rank != 0:  # the other ranks run each request rank 0 shares, until it stops
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 shuts down, then tells them
        with user_errors(p.prog), peer_errors(rank):
            if a.decode_concurrency > 1:
                follow_batch(model, tokenizer, **kv_arguments(a))
            else:
                follow(model, tokenizer)
        return
    name = a.served_model_name or (Path(a.model).resolve().name if a.model else DEMO_ID)
    settings = Settings(
        model_id=name,
        model_aliases=tuple(x for x in (a.model,) if x),
        api_key=a.api_key,
        allowed_origins=a.allowed_origins,
        max_body_bytes=a.max_body_bytes,
        max_tokens=a.max_tokens,
        temp=a.temp,
        top_p=a.top_p,
        top_k=a.top_k,
        min_p=a.min_p,
        draft_mtp=a.draft_mtp,
        num_draft=a.num_draft if a.num_draft == "auto" else int(a.num_draft),
        draft_min_confidence=a.draft_min_confidence,
    )
    serve(
        model,
        tokenizer,
        settings,
        sock=sock,
        max_queue=a.max_queue,
        log_level=a.log_level,
        prompt_cache_gb=0 if group is not None else a.prompt_cache_gb,  # (not across ranks yet)
        prompt_cache_dir=a.prompt_cache_dir,
        distributed=group is not None,
        kv=kv_arguments(a),
        decode_concurrency=a.decode_concurrency,
        prompt_concurrency=a.prompt_concurrency,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(
    model,
    tokenizer,
    settings: Settings,
    *,
    host="127.0.0.1",
    port=8080,
    sock: Optional[socket.socket] = None,
    max_queue=MAX_QUEUE,
    log_level="INFO",
    prompt_cache_gb: float = 0.0,
    prompt_cache_dir=None,
    distributed: bool = False,
    kv: Optional[dict] = None,
    decode_concurrency: int = DECODE_CONCURRENCY,
    prompt_concurrency: int = PROMPT_CONCURRENCY,
):
    """Run the server on `sock` (default: bound to host:port) until Ctrl-C / SIGTERM (blocking).
    With `prompt_cache_gb` > 0, conversations' caches are reused across requests. `kv`:
    generate_step's kv_bits, kv_group_size, quantized_kv_start for every request;
    `decode_concurrency` / `prompt_concurrency`: see --decode-concurrency / --prompt-concurrency."""
    import uvicorn

    sock = sock or bind(host, port)
    store = None
    if prompt_cache_gb > 0:
        store = PromptCacheStore(
            model,
            int(prompt_cache_gb * 1e9),
            draft_mtp=settings.draft_mtp and model.num_mtp > 0,
            directory=prompt_cache_dir,
            **(kv or {}),
        )
    engine = Engine(
        model,
        tokenizer,
        max_queue=max_queue,
        prompt_cache=store,
        distributed=distributed,
        kv=kv,
        decode_concurrency=decode_concurrency,
        prompt_concurrency=prompt_concurrency,
    )
    app = create_app(engine, settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C / SIGTERM: end running streams now
            engine.stop()
            super().handle_exit(sig, frame)

    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        logging.getLogger("mlx_step35.server").info("stopped")
    finally:
        engine.shutdown()
    sys.stdout.flush()
