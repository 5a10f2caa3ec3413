"""The server's one generation thread: a bounded queue of jobs, each streamed back to the
event loop as events. All MLX work happens on this thread; the event loop never waits on MLX."""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Union

import mlx.core as mx

from ..follow import request_kwargs
from ..generation import GenerationResponse, stream_generate
from ..lockstep import share_request
from ..sampling import Sampler
from ..speculative import SpecStats

log = logging.getLogger("mlx_step35.server")
MAX_QUEUE = 64  # requests waiting for the generation thread before 503


@dataclass
class GenRequest:
    """One validated request, in token ids and sampling objects."""

    prompt: List[int]
    max_tokens: int
    sampler: Sampler
    processors: Optional[list] = None
    draft_mtp: bool = True
    num_draft: Union[int, str] = "auto"
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    top_logprobs: Optional[int] = None  # None: no logprobs; 0: the chosen token's only
    checkpoints: List[int] = field(default_factory=list)  # prompt positions the prompt cache snapshots
    penalties: dict = field(default_factory=dict)  # repetition/presence/frequency_penalty given
    draft_min_confidence: Union[float, str] = "auto"

    def shared(self) -> dict:
        """The request as `follow.request_kwargs` takes it (tensor-parallel ranks)."""
        s = self.sampler
        return dict(
            prompt=list(self.prompt),
            max_tokens=self.max_tokens,
            sampler=dict(temp=s.temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k),
            draft_mtp=self.draft_mtp,
            num_draft=self.num_draft,
            stop_strings=list(self.stop),
            seed=self.seed,
            **self.penalties,
            draft_min_confidence=self.draft_min_confidence,
        )


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: List[tuple]  # [(token, text, logprob)]


@dataclass
class Piece:
    """Newly released text (may be empty while a stop string is undecided) and its tokens."""

    text: str
    tokens: List[int]
    logprobs: List[TokenLogprob]


@dataclass
class Finished:
    finish_reason: str  # "stop" / "length" / "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queued_s: float
    prompt_s: float  # start of the job to its first token
    decode_s: float  # first token to the last
    stats: SpecStats


@dataclass
class Failed:
    message: str


def trunk_passes(stats: SpecStats, tokens: int) -> int:
    """Trunk passes that produced `tokens` tokens: the prefill's, then one per verify step or
    plain step; without drafting statistics, one per token."""
    if not tokens:
        return 0
    return 1 + stats.verify_steps + stats.plain_tokens if stats.verify_steps or stats.plain_tokens else tokens


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised between prefill chunks once a job's client has left (see Engine.generate)."""


class Job:
    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.created = time.perf_counter()

    def cancel(self):
        self.cancelled.set()

    def emit(self, event):  # called from the generation thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    async def stream(self):
        """Events until (and including) the final Finished or Failed."""
        while True:
            ev = await self.events.get()
            yield ev
            if isinstance(ev, (Finished, Failed)):
                return


class StopStrings:
    """Releases text only once it cannot be the start of a stop string; cuts at the first one."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple:
        """(text to release, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self._held()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _held(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        for k in range(min(self.hold, len(self.pending)), 0, -1):
            if any(s.startswith(self.pending[-k:]) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """Owns the model; runs queued jobs one at a time on its own thread."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_queue: int = MAX_QUEUE,
        metrics=None,
        prompt_cache=None,
        distributed=False,
        kv: Optional[dict] = None,
    ):
        self.model = model
        # the KV format of every generation (kv_bits, kv_group_size, quantized_kv_start): server-wide,
        # as the prompt cache store keeps one format
        self.kv = dict(kv or {})
        self.tokenizer = tokenizer
        self.metrics = metrics
        # Tensor parallel (rank 0 of an mlx.launch group): each request is shared with the other
        # ranks, which run the same generation (follow.follow); every generation then runs
        # to its end (a stop string ends it on every rank), even if its client has left.
        self.distributed = distributed
        self.prompt_cache = prompt_cache  # a PromptCacheStore, or None: every prompt from scratch
        self.cached_tokens = 0  # of the job being served
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="mlx-generation", daemon=True)
        self.busy = False
        self._current: Optional[Job] = None
        self.stopping = False
        self.thread.start()

    @property
    def context_length(self) -> int:
        return self.model.args.max_position_embeddings

    def submit(self, request: GenRequest, loop) -> Job:
        if self.stopping:
            raise QueueFull()
        job = Job(request, loop)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job

    def queue_depth(self) -> int:
        return self.queue.qsize()

    def stop(self):
        """Fail what is queued, cancel the running job at its next token, and let the thread
        end after it (without waiting: safe from the event loop, e.g. on Ctrl-C)."""
        if self.stopping:
            return
        self.stopping = True
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(Failed("the server is shutting down"))
        self.current_cancel()
        self.queue.put_nowait(None)

    def shutdown(self, timeout: float = 30.0):
        """stop(), then wait for the generation thread and the prompt cache's pending writes
        (a write still running after `timeout` leaves only a temporary file)."""
        self.stop()
        self.thread.join(timeout)
        if self.prompt_cache is not None:
            self.prompt_cache.close(timeout)

    def current_cancel(self):
        job = self._current
        if job is not None:
            job.cancel()

    def generate(self, request: GenRequest, cancelled=None) -> Iterator[GenerationResponse]:
        """Where a request's prompt meets its cache: the prompt cache store hands out the
        conversation sharing the longest prefix, and gets it back when the generation ends
        (not after an error: its state is then unknown). With `cancelled` (a threading.Event),
        the prefill stops at the next chunk once it is set (raising Cancelled); the prompt
        cache keeps the chunks already run, so a client retrying the same prompt continues
        there. Runs on the generation thread."""
        if self.distributed:
            shared = share_request(self.model, {**request.shared(), **self.kv})
            return stream_generate(self.model, self.tokenizer, **request_kwargs(shared))
        if request.seed is not None:
            mx.random.seed(request.seed)
        pc, prompt = None, request.prompt
        if self.prompt_cache is not None and (self.prompt_cache.draft_mtp or not request.draft_mtp):
            # (a server started with --no-draft-mtp keeps no MTP state: a request that drafts
            # anyway runs without the cache)
            pc, prompt = self.prompt_cache.acquire(request.prompt)
        gen = stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            request.max_tokens,
            sampler=request.sampler,
            logits_processors=request.processors,
            draft_mtp=request.draft_mtp,
            num_draft=request.num_draft,
            prompt_cache=pc,
            checkpoints=request.checkpoints,
            draft_min_confidence=request.draft_min_confidence,
            **self.kv,
            prompt_progress_callback=None if cancelled is None else _stop_when(cancelled),
        )
        return gen if pc is None else self._returning(gen, pc)

    def _returning(self, gen, pc):
        ok = False
        try:
            for r in gen:
                self.cached_tokens = pc.cached_tokens
                yield r
            ok = True
        except (GeneratorExit, Cancelled):  # the caches hold what ran: consistent
            ok = True
            raise
        finally:
            gen.close()
            if ok:
                self.prompt_cache.release(pc)

    def _run(self):
        while True:
            job = self.queue.get()
            if job is None:
                if self.distributed:
                    share_request(self.model, None)  # the other ranks stop following
                return
            if job.cancelled.is_set():
                continue
            self._current = job
            self.busy = True
            try:
                self._serve(job)
            except Exception as e:  # a bad request must not take the thread down
                log.exception("generation failed")
                job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self._current = None

    def _serve(self, job: Job):
        req = job.request
        start = time.perf_counter()
        first = last = None
        stops = StopStrings(req.stop)
        self.cached_tokens = 0
        n = 0
        finish = None
        r = None
        gen = self.generate(req, None if self.distributed else job.cancelled)
        try:
            for r in gen:
                n = r.generation_tokens
                last = time.perf_counter()
                if first is None:
                    first = last
                    if self.metrics:
                        self.metrics.first_token(first - start)
                text, hit = stops.feed(r.text)
                finish = "stop" if hit else r.finish_reason
                if finish and not hit:
                    text += stops.flush()
                lps = [self._logprob(r, req.top_logprobs)] if req.top_logprobs is not None else []
                job.emit(Piece(text, [r.token], lps))
                if finish:
                    break
                if job.cancelled.is_set() and not self.distributed:
                    finish = "cancelled"
                    break
        except Cancelled:
            finish = "cancelled"
        finally:
            gen.close()
        if finish is None:  # the generator ended without a finish reason (cannot happen today)
            finish = "length"
        stats = r.stats if r is not None else SpecStats()
        done = Finished(
            finish_reason=finish,
            prompt_tokens=len(req.prompt),
            completion_tokens=n,
            cached_tokens=self.cached_tokens,
            queued_s=start - job.created,
            prompt_s=(first or time.perf_counter()) - start,
            decode_s=(last - first) if first is not None else 0.0,
            stats=stats,
        )
        if self.metrics:
            self.metrics.finished(done)
        log.info(  # one line per request: how much of each prompt the prompt cache saved
            "finished (%s): %d prompt tokens, %d of them cached; %d generated; %.2f s to the first token",
            finish,
            done.prompt_tokens,
            done.cached_tokens,
            n,
            done.prompt_s,
        )
        job.emit(Failed("the server is shutting down") if finish == "cancelled" and self.stopping else done)

    def _logprob(self, r: GenerationResponse, k: int) -> TokenLogprob:
        lp = r.logprobs.astype(mx.float32)
        top = []
        if k:
            idx = mx.argpartition(-lp, kth=k - 1)[:k]
            vals = lp[idx]
            order = mx.argsort(-vals)
            idx, vals = idx[order].tolist(), vals[order].tolist()
            top = [(t, self.tokenizer.decode([t]), v) for t, v in zip(idx, vals)]
        return TokenLogprob(r.token, self.tokenizer.decode([r.token]), lp[r.token].item(), top)


def _stop_when(cancelled: threading.Event):
    def progress(processed: int, total: int):
        if cancelled.is_set():
            raise Cancelled()

    return progress
