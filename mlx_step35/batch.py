"""The batch engine: several generations advance together, one trunk pass per step over all
of them (continuous batching), each with its own MTP drafting.

Each step packs, for every running row, the tokens it needs to run: a prompt chunk while
it prefills (at most `prompt_concurrency` rows at once, sharing one chunk's worth of tokens,
`prefill_step_size`, per step: a long prompt delays the others by one chunk per step, and
short prompts all start in the step they join), else its last verified token and its own
drafts (0 to 3, its own depth, gate and policy). The pass reads the weights once for all
rows (`steps.verify_rows`); attention runs per row over the row's own caches, so sliding
windows, rewinds, quantized KV and prompt caches stay per row and exact. Then each row
accepts its drafts by the lossless rule with its own sampler and random stream, and rewinds
its caches by what it rejected. Rows join between steps and leave when they finish or are
cancelled.

A row's tokens are those it gets alone (`generation.generate_step`): the same step
functions, the same decisions and, with a seed, the same random draws (`RandomStream`); in
float32 the packed pass gives each row the bits of its own pass (tested). Under
tensor parallelism, rank 0 decides what joins, leaves and is admitted (`Plan`, shared each
step), and every decision inside a step is rank 0's as in `generate_step`.
"""

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import KV_GROUP_SIZE, QUANTIZED_KV_START, kv_quant, rewind
from .generation import GenerationResponse, Responses
from .lockstep import lockstep
from .memory import DECODE_CLEAR_EVERY, Device, headroom, kv_bytes, wired_limit
from .sampling import Sampler
from .speculative import PREFILL_STEP, accept
from .steps import (
    DRAFT_MIN_CONFIDENCE,
    MAX_TOKENS,
    NUM_DRAFT,
    Generation,
    checkpoint_at,
    choose,
    generation_stream,
    prefill_cuts,
    prefill_done,
    prefill_state,
    prepare,
    process_rows,
    sample,
    verify_rows,
)

DECODE_CONCURRENCY = 8  # rows decoded together (mlx_lm.server's default)
PROMPT_CONCURRENCY = 8  # rows prefilled together, sharing one chunk's tokens per step (mlx_lm.server's 8)


@dataclass
class BatchRequest:
    """One generation: `generate_step` / `stream_generate`'s arguments."""

    prompt: List[int]
    max_tokens: int = MAX_TOKENS
    sampler: Optional[Sampler] = None
    logits_processors: Optional[list] = None
    draft_mtp: bool = False
    num_draft: object = NUM_DRAFT
    draft_min_confidence: object = DRAFT_MIN_CONFIDENCE
    seed: Optional[int] = None
    stop_strings: Sequence[str] = ()
    prompt_cache: Optional[object] = None
    checkpoints: Sequence[int] = ()


@dataclass
class Row:
    """A request in the batch: waiting, prefilling, decoding, or done."""

    uid: int
    request: BatchRequest
    g: Optional[Generation] = None
    out: Optional[Responses] = None
    cuts: List[Tuple[int, int]] = field(default_factory=list)  # prefill chunks still to run
    reserved: int = 0  # KV bytes counted against the memory budget
    decoding: bool = False
    plain: bool = False  # under num_draft="auto": decoding plainly until the policy says
    plain_timed: int = 0  # tokens since the policy last heard of the plain run's speed
    plain_since: float = 0.0
    choice: Optional[Tuple[int, float]] = None  # (depth, gate) the policy chose to end a plain run
    started: float = 0.0
    finish: Optional[str] = None  # "stop", "length", "cancelled" or "error"
    error: Optional[str] = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish is not None


@dataclass
class Plan:
    """What rank 0 decided before a step: rows to cancel and rows to admit (uids), requests
    that joined (as `follow.request_kwargs` takes them: the other ranks insert them in the
    same order, so uids agree), and whether the other ranks stop following."""

    cancel: List[int]
    admit: List[int]
    new: List[dict] = field(default_factory=list)
    stop: bool = False


class BatchEngine:
    """Continuous batching over one model (see the module docstring).

    `insert(request)` queues a row; `step()` admits waiting rows while there is room (at most
    `decode_concurrency` rows running, `prompt_concurrency` of them prefilling, and their KV
    within `memory_budget` bytes: a row whose KV would not fit waits; one row alone always
    runs, as a single request does), runs one pass over every running row and returns the
    GenerationResponses it produced, per row; `cancel(row)` ends a row at the next step.
    Call `step()` from one thread (MLX's streams belong to their thread)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        decode_concurrency: int = DECODE_CONCURRENCY,
        prompt_concurrency: int = PROMPT_CONCURRENCY,
        prefill_step_size: int = PREFILL_STEP,
        kv_bits: Optional[int] = None,
        kv_group_size: int = KV_GROUP_SIZE,
        quantized_kv_start: int = QUANTIZED_KV_START,
        memory_budget: Optional[int] = None,
        rebuild: Optional[Callable[[dict], BatchRequest]] = None,
    ):
        for name, v in (
            ("decode_concurrency", decode_concurrency),
            ("prompt_concurrency", prompt_concurrency),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.model, self.tokenizer = model, tokenizer
        self.decode_concurrency, self.prompt_concurrency = decode_concurrency, prompt_concurrency
        self.prefill_step_size = prefill_step_size
        self.kv = kv_quant(kv_bits, kv_group_size, quantized_kv_start)
        self.memory_budget = memory_budget if memory_budget is not None else default_budget()
        self.sync = lockstep(model)
        self.rebuild = rebuild  # the other ranks: rank 0's shared request -> BatchRequest
        self.waiting: List[Row] = []
        self.running: List[Row] = []
        self._uids = itertools.count()
        self.steps = 0
        self.batch_sizes: Dict[int, int] = {}  # rows per pass -> passes
        self._wired = contextlib.ExitStack()
        self._new: List[dict] = []  # requests inserted since the last plan, for the other ranks
        self.following = True  # (the other ranks) until rank 0's plan says stop

    # -- requests ---------------------------------------------------------------------
    def insert(self, request: BatchRequest, shared: Optional[dict] = None) -> Row:
        """Queue a request. Under tensor parallelism, rank 0 also gives it as `shared`, the
        JSON form the other ranks rebuild it from (`follow.request_kwargs`)."""
        row = Row(next(self._uids), request)
        self.waiting.append(row)
        if shared is not None:
            self._new.append(shared)
        return row

    def cancel(self, row: Row):
        """End `row` before the next step (its prompt cache keeps what ran)."""
        row.cancelled = True

    @property
    def reserved(self) -> int:
        return sum(r.reserved for r in self.running)

    def kv_need(self, request: BatchRequest) -> int:
        """Bytes of KV a request's row can grow to (the pre-flight's count)."""
        context = len(request.prompt) + request.max_tokens
        if request.prompt_cache is not None:
            context += len(request.prompt_cache.history)
        dtype = self.model.model.embed_tokens.weight.dtype
        return kv_bytes(self.model.args, context, draft=request.draft_mtp, itemsize=dtype.size, kv=self.kv)[0]

    # -- one step ---------------------------------------------------------------------
    def plan(self) -> Plan:
        """Rank 0's cancellations and admissions for the next step, on every rank."""
        cancel = [r.uid for r in self.running + self.waiting if r.cancelled]
        admit, room = [], self.decode_concurrency - len(self.running)
        prefilling = sum(not r.decoding for r in self.running)
        reserved = self.reserved
        alone = not self.running
        for r in self.waiting:
            if r.cancelled or room <= 0 or prefilling >= self.prompt_concurrency:
                continue
            need = self.kv_need(r.request)
            if not alone and reserved + need > self.memory_budget:
                break  # first come, first served: a later, smaller request does not overtake
            admit.append(r.uid)
            room, prefilling, reserved, alone = room - 1, prefilling + 1, reserved + need, False
        return self._share(Plan(cancel, admit, self._new))

    def _share(self, plan: Plan) -> Plan:
        """Rank 0's plan on every rank (one process: the plan itself); the other ranks insert
        its new requests."""
        self._new = []
        plan = Plan(
            **self.sync.payload(dict(cancel=plan.cancel, admit=plan.admit, new=plan.new, stop=plan.stop))
        )
        if not self.sync.leader:
            for shared in plan.new:
                self.insert(self.rebuild(shared))
            self.following = not plan.stop
        return plan

    def stop_followers(self):
        """Rank 0: tell the other ranks, waiting in their next step, to stop following."""
        self._share(Plan([], [], [], stop=True))

    def step(self) -> List[Tuple[Row, List[GenerationResponse]]]:
        """One pass over the running rows; returns each row's new responses (a row that
        finished has its last one, with a finish_reason; a row that failed to start has
        none and its `error`). Finished rows leave the batch."""
        plan = self.plan()
        events: Dict[int, Tuple[Row, List[GenerationResponse]]] = {}
        if plan.admit and not self.running:  # weights wired while rows run (on Metal), as generate_step
            self._wired.enter_context(wired_limit(self.model, [generation_stream]))
        with mx.stream(generation_stream):
            for uid in plan.cancel:
                row = self._find(uid)
                if row is not None:
                    self._end(row, "cancelled")
                    events[row.uid] = (row, [])
            for uid in plan.admit:
                row = self._find(uid)
                self.waiting.remove(row)
                if self._start(row):
                    self.running.append(row)
                else:
                    events[row.uid] = (row, [])
            if self.running:
                for row, responses in self._pass():
                    if row.uid in events:
                        events[row.uid][1].extend(responses)
                    else:
                        events[row.uid] = (row, responses)
        self.running = [r for r in self.running if not r.done]
        if not self.running:
            self._wired.close()
        return list(events.values())

    def close(self):
        """Cancel every row now (their prompt caches keep what ran) and restore the wired limit."""
        for row in self.running + self.waiting:
            if not row.done:
                self._end(row, "cancelled")
        self.running, self.waiting = [], []
        self._wired.close()

    def _find(self, uid: int) -> Optional[Row]:
        return next((r for r in self.running + self.waiting if r.uid == uid), None)

    def _start(self, row: Row) -> bool:
        q = row.request
        try:
            row.g = prepare(
                self.model,
                q.prompt,
                sampler=q.sampler,
                draft_mtp=q.draft_mtp,
                num_draft=q.num_draft,
                draft_min_confidence=q.draft_min_confidence,
                prefill_step_size=self.prefill_step_size,
                stats=None,
                prompt_cache=q.prompt_cache,
                checkpoints=q.checkpoints,
                kv=self.kv,
                seed=q.seed,
            )
        except ValueError as e:
            row.finish, row.error = "error", str(e)
            return False
        row.out = Responses(
            self.tokenizer, len(q.prompt), q.max_tokens, q.stop_strings, row.g.stats, q.prompt_cache
        )
        row.cuts = prefill_cuts(row.g, self.prefill_step_size)
        row.started = time.perf_counter()
        row.reserved = self.kv_need(q)
        row.plain = row.g.policy is not None and row.g.policy.plain_check > 0
        return True

    def _end(self, row: Row, finish: str):
        row.finish = finish
        if row.g is not None and row.g.prompt_cache is not None:
            row.g.prompt_cache.finish(row.g.tokens)
        if row in self.waiting:
            self.waiting.remove(row)

    # -- the pass ---------------------------------------------------------------------
    def _share_prefill(self):
        """Cut this step's prompt chunks so that together they hold at most `prefill_step_size`
        tokens: the prefilling rows share them, shortest remaining prompt first, each taking at
        most an even share of what is left (at least one token). Short prompts then all start
        in the step they join; a long one goes on at the chunk size when alone; the decoding
        rows wait for one chunk's worth per step. (Where chunks end does not change a row's
        tokens: each position's result is the same whatever the chunk.)"""
        rows = [r for r in self.running if r.cuts]
        budget = self.prefill_step_size
        for k, row in enumerate(sorted(rows, key=lambda r: sum(e - s for s, e in r.cuts))):
            s, e = row.cuts[0]
            n = min(e - s, max(1, budget // (len(rows) - k)))
            if n < e - s:
                row.cuts[0:1] = [(s, s + n), (s + n, e)]
            budget -= n

    def _pass(self):
        tic = time.perf_counter()
        self._share_prefill()
        inputs = []  # per running row: (tokens [n] int32, logits wanted, what it is)
        for row in self.running:
            g = row.g
            if row.cuts:
                s, e = row.cuts[0]
                last = e == len(g.tokens)  # with a drafter the last chunk ends the prompt
                inputs.append((mx.array(g.tokens[s:e], dtype=mx.int32), "last" if last else None, ("chunk",)))
            elif not row.decoding:  # without a drafter: the last prompt token's own pass
                inputs.append((mx.array(g.tokens[-1:], dtype=mx.int32), "last", ("first",)))
            else:
                n, gate, drafts, dists, confs = self._draft(row)
                inp = mx.concatenate([mx.array(g.tokens[-1:], dtype=mx.int32), drafts])
                inputs.append((inp, "all", ("decode", n, drafts, dists, confs)))
        self.steps += 1
        self.batch_sizes[len(inputs)] = self.batch_sizes.get(len(inputs), 0) + 1
        passes = verify_rows(
            self.model, [(t, r.g.cache, want) for (t, want, _), r in zip(inputs, self.running)]
        )
        mx.async_eval([lg for _, lg in passes if lg is not None])
        lazy = [
            self._lazy(row, what, h, lg) for row, (_, _, what), (h, lg) in zip(self.running, inputs, passes)
        ]
        mx.eval([a for arrays, _ in lazy for a in arrays])  # one sync for every row's chunk and plain token
        results = []
        for row, (t, want, what), (h, logits), (_, pick) in zip(self.running, inputs, passes, lazy):
            results.append((row, self._after(row, what, h, logits, pick, tic)))
        if any(what[0] == "chunk" for _, _, what in inputs) or self.steps % DECODE_CLEAR_EVERY == 0:
            mx.clear_cache()  # a chunk's activations now (as prefill does), else as decoding does
        return results

    def _draft(self, row: Row):
        """The row's drafts for this step (rank 0's depth and gate): (n, gate, drafts, dists, confs)."""
        g = row.g
        empty = (mx.array([], dtype=mx.int32), [], mx.array([]))
        if g.policy is None or row.plain:
            return (0, 0.0, *empty)
        n, gate = row.choice or choose(self.sync, g.policy)
        row.choice = None
        n = min(n, row.request.max_tokens - row.out.n - 1)
        if n == 0 and g.policy.plain_check:  # auto chose plain decoding: a plain run starts
            row.plain, row.plain_timed, row.plain_since = True, 0, time.perf_counter()
            return (0, 0.0, *empty)
        if not n:
            return (0, gate, *empty)
        g.ready_to_draft()
        drafts, dists, confs = g.drafter.draft(
            g.tokens, n, g.sampler, row.request.logits_processors, gate, g.rng
        )
        return (drafts.shape[0], gate, drafts, dists, confs)  # the gate may stop the chain early

    def _lazy(self, row: Row, what: tuple, h: mx.array, logits: Optional[mx.array]):
        """The row's work before any sync, as lazy arrays that `_pass` evaluates for all rows
        at once: a chunk's prefill bookkeeping (its state), and the token of a row that takes
        one without drafts (its first, or a plain step). Returns (arrays, (lp, token) or None)."""
        g, kind = row.g, what[0]
        arrays = []
        if kind == "chunk":
            prefill_done(g, h, row.cuts[0][1])
            arrays = prefill_state(g)
        plain = kind == "decode" and (g.policy is None or (what[1] == 0 and g.policy.plain_check))
        if logits is None or not (kind != "decode" or plain):
            return arrays, None
        drafts = what[2] if kind == "decode" else mx.array([], dtype=mx.int32)
        lp = process_rows(logits, g.tokens, drafts, row.request.logits_processors)
        tok = sample(self.sync, g, lp)
        return arrays + [tok], (lp, tok)

    def _after(self, row: Row, what: tuple, h: mx.array, logits: Optional[mx.array], pick, tic: float):
        """The row's share of the pass: prefill bookkeeping, or its next tokens (`pick`:
        `_lazy`'s token, evaluated)."""
        g, procs = row.g, row.request.logits_processors
        kind = what[0]
        if kind == "chunk":
            s, e = row.cuts.pop(0)
            checkpoint_at(g, e)
            if logits is None:
                return []
        if kind in ("chunk", "first"):
            lp, tok = pick[0], int(pick[1].item())
            row.decoding = True
            if g.policy:
                g.policy.observe_prefill(len(g.tokens) - g.start, time.perf_counter() - row.started)
            g.tokens.append(tok)
            if row.plain:
                row.plain_since = time.perf_counter()
            return self._emit(row, [(tok, lp[0], False)])
        _, n, drafts, dists, confs = what
        policy = g.policy
        if pick is not None:  # a plain step, as plain_step samples
            lp, tok = pick[0], int(pick[1].item())
            if g.drafter is not None:
                g.drafter.add_trunk(h)
            g.tokens.append(tok)
            if policy is not None:
                g.stats.plain_tokens += 1
                self._plain_report(row)
            return self._emit(row, [(tok, lp[0], False)])
        lp = process_rows(logits, g.tokens, drafts, procs)
        n_acc, nxt = self.sync.ints(list(accept(drafts, dists, lp, g.sampler, g.rng)))  # rank 0 decides
        rewind(g.cache, n - n_acc)
        g.drafter.add_trunk(h[:, : n_acc + 1])
        confs = confs.tolist()
        policy.update(n, n_acc, time.perf_counter() - tic, confs)
        g.stats.record(n, n_acc, max(n, len(confs)))
        g.stats.verify_steps += 1
        new = drafts[:n_acc].tolist() + [nxt]
        g.tokens.extend(new)
        return self._emit(row, [(t, lp[i], i < n_acc) for i, t in enumerate(new)])

    def _plain_report(self, row: Row):
        """Under auto: every `plain_check` plain tokens the policy hears their speed and may
        end the plain run."""
        row.plain_timed += 1
        policy = row.g.policy
        if row.plain_timed >= policy.plain_check and row.out.n + 1 < row.request.max_tokens:
            now = time.perf_counter()
            policy.update_plain(row.plain_timed, now - row.plain_since)
            row.plain_timed, row.plain_since = 0, now
            row.choice = choose(self.sync, policy)
            row.plain = row.choice[0] == 0
            if row.plain:
                row.choice = None

    def _emit(self, row: Row, tokens) -> List[GenerationResponse]:
        out = []
        for tok, lp, from_draft in tokens:
            r = row.out(tok, lp, from_draft)
            out.append(r)
            if r.finish_reason:
                self._end(row, r.finish_reason)
                break
        return out


def default_budget() -> int:
    """Bytes the rows' KV may take: the GPU's recommended working set (else the memory) less
    what is allocated now (the weights) and the pre-flight's headroom."""
    d = Device.current()
    limit = d.recommended or d.memory
    used = mx.get_active_memory()
    return max(0, limit - used - headroom(used))


def batch_generate(
    model,
    tokenizer,
    prompts: List[List[int]],
    max_tokens: int = MAX_TOKENS,
    *,
    decode_concurrency: int = DECODE_CONCURRENCY,
    prompt_concurrency: int = PROMPT_CONCURRENCY,
    prefill_step_size: int = PREFILL_STEP,
    kv_bits: Optional[int] = None,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
    **kwargs,
) -> List[str]:
    """The texts of several prompts (token ids) generated together, like mlx-lm's
    batch_generate; `kwargs` (sampler, draft_mtp, num_draft, seed, ...) apply to each, as
    `BatchRequest`'s fields. Each text is what `generate` gives for its prompt alone."""
    engine = BatchEngine(
        model,
        tokenizer,
        decode_concurrency=decode_concurrency,
        prompt_concurrency=prompt_concurrency,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    rows = [engine.insert(BatchRequest(list(p), max_tokens, **kwargs)) for p in prompts]
    texts = {r.uid: "" for r in rows}
    while engine.running or engine.waiting:
        for row, responses in engine.step():
            if row.error:
                raise ValueError(row.error)
            texts[row.uid] += "".join(r.text for r in responses)
    return [texts[r.uid] for r in rows]
