"""The server's one generation thread: a bounded queue of jobs, each streamed back to the
event loop as events. All MLX work happens on this thread; the event loop never waits on MLX."""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Union

import mlx.core as mx

from ..batch import DECODE_CONCURRENCY, PROMPT_CONCURRENCY, BatchEngine, BatchRequest
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
    """Owns the model; runs queued jobs on its own thread: up to `decode_concurrency` of them
    together in the batch engine (see batch.BatchEngine), or one at a time."""

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
        decode_concurrency: int = DECODE_CONCURRENCY,
        prompt_concurrency: int = PROMPT_CONCURRENCY,
    ):
        self.model = model
        # Requests decoded together by the batch engine (under tensor parallelism the other ranks
        # follow its plans: follow.follow_batch); 1: one at a time through stream_generate.
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.batch: Optional[BatchEngine] = None  # made on the generation thread
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
        self.max_queue = max_queue
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="mlx-generation", daemon=True)
        self.busy = False
        self._current: Optional[Job] = None
        self._serving: Dict[int, "Serving"] = {}  # batch row uid -> its job's handler
        self.stopping = False
        self.thread.start()

    @property
    def context_length(self) -> int:
        return self.model.args.max_position_embeddings

    def submit(self, request: GenRequest, loop) -> Job:
        if self.stopping:
            raise QueueFull()
        if self.batch is not None and self.queue_depth() >= self.max_queue:
            raise QueueFull()  # (the batch engine takes jobs from the queue at once: count its waiting ones)
        job = Job(request, loop)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job

    def queue_depth(self) -> int:
        """Requests not yet generating: in the queue, and admitted to the batch but waiting
        for room (decode slots or memory)."""
        waiting = len(self.batch.waiting) if self.batch is not None else 0
        return self.queue.qsize() + waiting

    def batch_sizes(self) -> Dict[int, int]:
        """Trunk passes by the number of rows they carried (the batch engine's; empty one at a time)."""
        return dict(self.batch.batch_sizes) if self.batch is not None else {}

    def running(self) -> int:
        """Requests being generated (prefilling or decoding)."""
        if self.batch is not None:
            return len(self.batch.running)
        return int(self.busy)

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
        for serving in list(self._serving.values()):
            serving.job.cancel()

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
        run = self._with_cache(request)
        gen = stream_generate(
            self.model,
            self.tokenizer,
            **vars(run),
            **self.kv,
            prompt_progress_callback=None if cancelled is None else _stop_when(cancelled),
        )
        pc = run.prompt_cache
        return gen if pc is None else self._returning(gen, pc)

    def _returning(self, gen, pc):
        ok = False
        try:
            yield from gen
            ok = True
        except (GeneratorExit, Cancelled):  # the caches hold what ran: consistent
            ok = True
            raise
        finally:
            gen.close()
            if ok:
                self.prompt_cache.release(pc)

    def _run(self):
        try:
            if self.decode_concurrency > 1:
                self._run_batch()
            else:
                self._run_one_at_a_time()
        finally:
            if self.distributed:  # the other ranks stop following
                if self.batch is not None:
                    self.batch.stop_followers()
                else:
                    share_request(self.model, None)

    def _run_one_at_a_time(self):
        while True:
            job = self.queue.get()
            if job is None:
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
        """Generate one job alone, to its end (or its client's leaving)."""
        serving = Serving(self, job)
        gen = self.generate(job.request, None if self.distributed else job.cancelled)
        try:
            for r in gen:
                if serving.on_response(r):
                    break
                if job.cancelled.is_set() and not self.distributed:
                    serving.finish = "cancelled"
                    break
        except Cancelled:
            serving.finish = "cancelled"
        finally:
            gen.close()
        serving.done()

    def _run_batch(self):
        """The batch loop: new jobs join between steps, each step advances every running row."""
        self.batch = batch = self._new_batch()
        stopping = False
        while not (stopping and not batch.running and not batch.waiting):
            idle = not batch.running and not batch.waiting
            while not stopping:
                try:
                    job = self.queue.get(block=idle)
                except queue.Empty:
                    break
                idle = False
                if job is None:
                    stopping = True
                elif not job.cancelled.is_set():
                    self._join(job)
            for serving in self._serving.values():
                if serving.job.cancelled.is_set() and not serving.row.cancelled:
                    serving.finish = serving.finish or "cancelled"
                    batch.cancel(serving.row)
            if not batch.running and not batch.waiting:
                continue
            try:
                events = batch.step()
            except Exception as e:  # the batch's state is unknown: fail its requests, start afresh
                log.exception("generation failed")
                for serving in self._serving.values():
                    serving.job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
                self._serving.clear()
                batch.close()
                self.batch = batch = self._new_batch()
                continue
            for row, responses in events:
                serving = self._serving.get(row.uid)
                if serving is None:
                    continue
                if serving.started is None:
                    serving.started = row.started or time.perf_counter()
                for r in responses:
                    if serving.finish is None and serving.on_response(r) and not row.done:
                        batch.cancel(row)  # a stop string: the row ends before the next pass
                if serving.finish and not serving.reported:
                    serving.done()
                if row.done:
                    self._leave(serving, row)
        batch.close()

    def _new_batch(self) -> BatchEngine:
        return BatchEngine(
            self.model,
            self.tokenizer,
            decode_concurrency=self.decode_concurrency,
            prompt_concurrency=self.prompt_concurrency,
            **self.kv,
        )

    def _with_cache(self, req: GenRequest) -> BatchRequest:
        """The request as a generation runs it (`stream_generate`'s arguments, a batch row's),
        with the prompt cache store's conversation sharing the longest prefix, if any (a server
        started with --no-draft-mtp keeps no MTP state: a request that drafts anyway runs
        without the cache)."""
        pc, prompt = None, req.prompt
        if self.prompt_cache is not None and (self.prompt_cache.draft_mtp or not req.draft_mtp):
            pc, prompt = self.prompt_cache.acquire(req.prompt)
        return BatchRequest(
            prompt,
            req.max_tokens,
            sampler=req.sampler,
            logits_processors=req.processors,
            draft_mtp=req.draft_mtp,
            num_draft=req.num_draft,
            draft_min_confidence=req.draft_min_confidence,
            seed=req.seed,
            prompt_cache=pc,
            checkpoints=req.checkpoints,
        )

    def _join(self, job: Job):
        req = job.request
        run = self._with_cache(req)
        row = self.batch.insert(run, shared={**req.shared(), **self.kv} if self.distributed else None)
        pc = run.prompt_cache
        serving = Serving(self, job, row, pc)
        serving.started = None  # the clock starts when the row is admitted
        self._serving[row.uid] = serving

    def _leave(self, serving: "Serving", row):
        """A row has left the batch: its prompt cache goes back to the store (its caches are
        consistent: the batch ended the row between passes)."""
        del self._serving[row.uid]
        if row.error:
            serving.job.emit(Failed(row.error))
            return
        if serving.pc is not None:
            self.prompt_cache.release(serving.pc)
        if not serving.reported:
            serving.finish = serving.finish or row.finish
            serving.done()

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


class Serving:
    """One job's generation as its client sees it: text held back while a stop string may be
    starting, logprobs, the first token's time, and the final Finished event (with metrics and
    a log line). Fed GenerationResponses by either loop of the Engine."""

    def __init__(self, engine: Engine, job: Job, row=None, pc=None):
        self.engine, self.job, self.row, self.pc = engine, job, row, pc
        self.started = time.perf_counter()
        self.first = self.last = None
        self.stops = StopStrings(job.request.stop)
        self.finish: Optional[str] = None
        self.n = 0
        self.r: Optional[GenerationResponse] = None
        self.reported = False  # the Finished event is out

    def on_response(self, r: GenerationResponse) -> bool:
        """Emit the response's text; True once the generation is finished."""
        req, metrics = self.job.request, self.engine.metrics
        self.r, self.n = r, r.generation_tokens
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last
            if metrics:
                metrics.first_token(self.first - self.started)
        text, hit = self.stops.feed(r.text)
        self.finish = "stop" if hit else r.finish_reason
        if self.finish and not hit:
            text += self.stops.flush()
        lps = [self.engine._logprob(r, req.top_logprobs)] if req.top_logprobs is not None else []
        self.job.emit(Piece(text, [r.token], lps))
        return self.finish is not None

    def done(self):
        self.reported = True
        req, engine = self.job.request, self.engine
        finish = self.finish or "length"  # (a generator that ends without a reason: cannot happen today)
        cached = self.r.cached_tokens if self.r is not None else (self.pc.cached_tokens if self.pc else 0)
        started = self.started if self.started is not None else time.perf_counter()
        done = Finished(
            finish_reason=finish,
            prompt_tokens=len(req.prompt),
            completion_tokens=self.n,
            cached_tokens=cached,
            queued_s=started - self.job.created,
            prompt_s=(self.first or time.perf_counter()) - started,
            decode_s=(self.last - self.first) if self.first is not None else 0.0,
            stats=self.r.stats if self.r is not None else SpecStats(),
        )
        if engine.metrics:
            engine.metrics.finished(done)
        log.info(  # one line per request: how much of each prompt the prompt cache saved
            "finished (%s): %d prompt tokens, %d of them cached; %d generated; %.2f s to the first token",
            finish,
            done.prompt_tokens,
            done.cached_tokens,
            self.n,
            done.prompt_s,
        )
        stopping = finish == "cancelled" and engine.stopping
        self.job.emit(Failed("the server is shutting down") if stopping else done)


def _stop_when(cancelled: threading.Event):
    def progress(processed: int, total: int):
        if cancelled.is_set():
            raise Cancelled()

    return progress
