"""Generation in three layers, as in mlx-lm: a token generator (with optional MTP
speculative decoding), a stream of GenerationResponse, and `generate()` joining text."""

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import KV_GROUP_SIZE, QUANTIZED_KV_START, grow_slack, kv_name, kv_of, kv_quant, rewind
from .draft_policy import BUCKETS, AutoDraft, FixedDraft
from .lockstep import lockstep
from .memory import DECODE_CLEAR_EVERY, clearing_cache, wired_limit
from .prompt_cache import CHECKPOINT_BEFORE_END, PromptCache
from .sampling import Sampler, as_sampler, process
from .speculative import PREFILL_STEP, MTPDrafter, SpecStats, accept, draft_bytes_ratio

MAX_DRAFT = 3
MAX_TOKENS = 256  # defaults of the API, also used by generate.py
NUM_DRAFT = "auto"
DRAFT_MIN_CONFIDENCE = "auto"  # learnt under num_draft="auto"; GATE_DEFAULT at a fixed depth
GATE_DEFAULT = 0.15  # at a fixed depth, scaled per block by speculative.GATE_RULES (RESULTS 14)


@dataclass
class GenerationResponse:
    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None
    stats: SpecStats = field(default_factory=SpecStats)
    cached_tokens: int = 0  # prompt tokens reused from a prompt cache


def check_num_draft(num_draft):
    if num_draft == "auto" or (isinstance(num_draft, int) and 1 <= num_draft <= MAX_DRAFT):
        return num_draft
    raise ValueError(f"num_draft must be 1, 2, 3 or 'auto' (the model has 3 MTP blocks), got {num_draft!r}")


def check_min_confidence(value):
    if value == "auto" or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    ):
        return value
    raise ValueError(f"draft_min_confidence must be in [0, 1) or 'auto', got {value!r}")


def parse_min_confidence(text: str):
    """A command line's --draft-min-confidence: 'auto' or a number in [0, 1) (ValueError else)."""
    try:
        return check_min_confidence(text if text == "auto" else float(text))
    except ValueError:
        raise ValueError(
            f"--draft-min-confidence must be 'auto' or a number in [0, 1), got {text!r}"
        ) from None


def generate_step(
    model,
    prompt: Sequence[int],
    *,
    max_tokens: int = MAX_TOKENS,
    sampler: Optional[Sampler] = None,
    logits_processors=None,
    draft_mtp: bool = False,
    num_draft: Union[int, str] = NUM_DRAFT,
    prefill_step_size: int = PREFILL_STEP,
    stats: Optional[SpecStats] = None,
    prompt_cache: Optional[PromptCache] = None,
    checkpoints: Sequence[int] = (),
    draft_min_confidence: Union[float, str] = DRAFT_MIN_CONFIDENCE,
    kv_bits: Optional[int] = None,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs [V], from_draft) until max_tokens tokens.

    With `draft_mtp`, each step drafts `num_draft` tokens with the chained MTP blocks
    ("auto": the depth, 0 included, that the measured acceptance and step times favour),
    verifies them with one trunk pass and keeps the accepted prefix plus the trunk's
    own next token (see `speculative.accept`): sampled output is distributed exactly like
    plain decoding's, greedy output is the trunk's argmax at every token. `draft_min_confidence`
    stops a step's chain before the first MTP block less sure than it (see
    `speculative.confidence`; 0.0: never; "auto", the default: learnt with the depth under
    num_draft="auto", `GATE_DEFAULT` at a fixed depth); the rule above holds whatever the
    chain's length.
    What "identical" means per dtype: in float32, greedy drafting gives plain decoding's tokens
    (tested); in bf16 (and fp16) a verify pass over n+1 rows rounds differently from a one-row
    pass (on the CPU backend too), so where the two best tokens are near-tied the argmax can
    flip and the texts part there: both are the model's greedy output within bf16 rounding
    (measured on the demo: see README, "What lossless means").

    With a `prompt_cache` (see `prompt_cache.make_prompt_cache`), `prompt` continues the
    conversation it holds; only the tokens not cached yet run, and the cache is updated in
    place. `checkpoints` are positions (in the whole conversation) where the prefill
    snapshots the sliding state, so a later prompt that branches there reuses the prefix.

    `prompt_progress_callback(processed, total)` (mlx-lm's name) is called after each prefill
    chunk, with the prompt tokens run so far and in all (those a prompt cache already holds not
    counted); an exception it raises ends the generation there, and a prompt cache then holds
    the chunks already run (the server stops a cancelled request's long prefill this way).

    With `kv_bits` (mlx-lm's names and defaults), the full-attention caches store the
    positions from `quantized_kv_start` on quantized (`kv_bits` per value, groups of
    `kv_group_size`); the sliding windows stay 16-bit. Unlike mlx-lm, the first
    `quantized_kv_start` positions stay 16-bit for good, so rewinds and prompt-cache
    branches stay exact; drafting is lossless against this quantized trunk.
    """
    kv = kv_quant(kv_bits, kv_group_size, quantized_kv_start)
    sampler = as_sampler(sampler)
    stats = stats if stats is not None else SpecStats()
    _release_at_thread_end()
    if not prompt:
        raise ValueError("the prompt is empty")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be a positive integer, got {prefill_step_size!r}")
    if draft_mtp:
        num_draft = check_num_draft(num_draft)
        draft_min_confidence = check_min_confidence(draft_min_confidence)
        if not model.num_mtp:
            warnings.warn(
                "this model has no MTP weights: --draft-mtp ignored, decoding plainly", stacklevel=2
            )
            draft_mtp = False
    policy = None
    if draft_mtp:
        learn = draft_min_confidence == "auto"
        if num_draft == "auto":
            gates = BUCKETS if learn else (draft_min_confidence,)
            policy = AutoDraft(model.num_mtp, draft_bytes_ratio(model), thresholds=gates)
        else:
            policy = FixedDraft(
                min(num_draft, model.num_mtp), GATE_DEFAULT if learn else draft_min_confidence
            )
    slack = (policy.max_depth if policy else 0) + 1  # tokens a verify step may rewind, plus one
    slack0 = 1 if isinstance(policy, AutoDraft) else slack
    tokens = [int(t) for t in prompt]
    if prompt_cache is None:
        cache = model.make_cache(slack=slack0, kv=kv)
        drafter = MTPDrafter(model, slack, prefill_step_size, kv) if draft_mtp else None
        start, marks = 0, None
    else:
        if draft_mtp and prompt_cache.drafter is None:
            raise ValueError(
                "this prompt cache holds no MTP state (made with draft_mtp=False, or by generate.py "
                "without --draft-mtp): continue it without drafting, or start it again with drafting"
            )
        if kv_of(prompt_cache.cache) != kv:
            raise ValueError(
                f"this prompt cache holds {kv_name(kv_of(prompt_cache.cache))} KV, "
                f"the generation asks for {kv_name(kv)}: pass the same kv_bits, kv_group_size "
                "and quantized_kv_start as when it was made"
            )
        tokens = prompt_cache.history + tokens
        start = prompt_cache.reuse(tokens)
        cache, drafter = prompt_cache.cache, prompt_cache.drafter  # a drafter is kept fed
        grow_slack(cache, slack0)
        marks = (sorted(set(checkpoints) | {len(tokens) - CHECKPOINT_BEFORE_END}), prompt_cache)
    try:
        # Weights stay wired while generating (on Metal); restored when the generator ends or is closed.
        with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
            tic = time.perf_counter()
            h = _prefill(model, tokens, cache, drafter, prefill_step_size, start, marks, prompt_progress_callback)
            logprobs = process(model.logits(h[:, -1]), tokens, logits_processors)
            tok = int(lockstep(model).array(sampler(logprobs)).item())  # rank 0's token, every rank
            tokens.append(tok)
            if policy:
                policy.observe_prefill(len(tokens) - 1 - start, time.perf_counter() - tic)
            yield tok, logprobs[0], False
            if policy is None:
                rest = _plain_run(model, tokens, cache, sampler, logits_processors, max_tokens - 1, drafter)
            else:
                rest = _speculative(
                    model, tokens, cache, drafter, sampler, logits_processors, policy, max_tokens - 1, stats
                )
            # The first token is out: clear MLX's buffer cache after every DECODE_CLEAR_EVERY-th.
            yield from clearing_cache(rest, DECODE_CLEAR_EVERY, first=2)
    finally:
        if prompt_cache is not None:
            prompt_cache.finish(tokens)


# One generation stream per thread, as mlx-lm: MLX streams belong to the thread that made them.
generation_stream = mx.new_thread_local_stream(mx.default_device())
_thread_state = threading.local()


class _ReleaseAtThreadEnd:
    """Calls `mx.clear_streams()` when its thread's Python state is cleared (before
    `Thread.join()` returns). MLX asks every worker thread to do so before it ends: the
    thread's compile cache and random key hold Python objects, and if their C++ thread-exit
    destructors find the interpreter finalizing they abort the process ("terminate called
    without an active exception", exit 134)."""

    def __del__(self):
        mx.clear_streams()


def _release_at_thread_end():
    if threading.current_thread() is not threading.main_thread() and not hasattr(_thread_state, "release"):
        _thread_state.release = _ReleaseAtThreadEnd()


def _prefill(model, tokens, cache, drafter, step, start=0, marks=None, progress=None):
    """Run tokens[start:] through the trunk in chunks of `step` tokens; returns the last
    token's hidden states. Each chunk is evaluated before the next is built: the trunk's KV
    caches and, with a drafter, the MTP blocks' work on the chunk (their caches and the
    hidden rows they still need), so no prompt work is left for the first draft. Without a
    drafter the last token goes through after the loop, so only KV caches are evaluated (as
    mlx-lm). `marks` = (positions, prompt_cache): chunks also end there, and the cache
    checkpoints. `progress(processed, total)` after each chunk."""
    positions, pc = marks or ((), None)
    end = len(tokens) - (drafter is None)
    cuts = sorted({*range(start, end, step), *(p for p in positions if start < p < end)}) + [end]
    for s, e in zip(cuts, cuts[1:]):
        h = model.hidden(mx.array([tokens[s:e]]), cache)
        if drafter is not None:
            drafter.add_trunk(h)
            drafter.commit(tokens)
        mx.eval([c.arrays() for c in cache], drafter.state() if drafter else [])
        mx.clear_cache()  # free the chunk's activations now, as mlx-lm does
        if pc is not None and e in positions:
            pc.tokens = tokens[:e]
            pc.checkpoint()
        if progress is not None:
            progress(e - start, len(tokens) - start)
    if drafter is None:
        h = model.hidden(mx.array([tokens[-1:]]), cache)
    return h


def plain_step(model, y, cache, sampler, processors=None, hist=None):
    """The graph of one plain decoding step on token y [1] (hist: the tokens before y and y,
    for the processors): (next token [1] uint32 as samplers give it, its logprobs [V], hidden
    states [1, 1, H])."""
    h = model.hidden(y[None], cache)
    lp = process(model.logits(h)[:, -1], hist, processors)
    return sampler(lp), lp.squeeze(0), h  # squeeze: a view, where lp[0] is a gather


def _plain_run(model, tokens, cache, sampler, processors, count, drafter=None, policy=None, stats=None):
    """Plain decoding of up to `count` tokens after tokens[-1] (verified, not yet through
    the trunk), pipelined: the next step's graph is built while this one computes.
    With a policy (--num-draft auto), every `policy.plain_check` tokens it gets their time
    and is asked for the next depth; it is asked before the next pass is queued, from the
    tokens already out, so the pipeline never stalls and no pass is wasted. Returns the
    (depth, gate threshold) that ended the run, or None when `count` tokens are out."""
    hist = mx.array(tokens[:-1], dtype=mx.uint32)  # the samplers' dtype: no casts per step
    sync = lockstep(model)

    def step(y):
        nonlocal hist
        if processors:
            hist = mx.concatenate([hist, y])
        tok, lp, h = plain_step(model, y, cache, sampler, processors, hist)
        return sync.array(tok), lp, h  # rank 0's token on every rank (tensor parallel)

    nxt = step(mx.array(tokens[-1:], dtype=mx.uint32))
    mx.async_eval(nxt)
    since = last = time.perf_counter()
    timed = 0  # tokens out since `since`
    queued = None  # hidden states of a pass queued for a token already out
    try:
        for i in range(count):
            y, lp, h = nxt
            more = i + 1 < count
            choice = None
            if more and policy and timed >= policy.plain_check:
                policy.update_plain(timed, last - since)
                since, timed = last, 0
                choice = _choose(sync, policy)  # timings differ per rank: rank 0 decides
                more = choice[0] == 0
            if more:
                nxt = step(y)
                mx.async_eval(nxt)
            tok = int(y.item())
            last = time.perf_counter()
            timed += 1
            tokens.append(tok)
            if drafter:
                drafter.add_trunk(h)
            if stats:
                stats.plain_tokens += 1
            queued = nxt[2] if more else None
            yield tok, lp, False
            queued = None
            if not more:
                return choice
    finally:  # closed early: the caches hold the queued pass, so the drafter gets its row
        if drafter and queued is not None:
            drafter.add_trunk(queued)


def verify_step(model, tokens, drafts, cache, processors=None):
    """The graph of one trunk pass over [tokens[-1], d_1..d_n]: (hidden states [1, n+1, H],
    logprobs [n+1, V] of the token after each)."""
    inp = mx.concatenate([mx.array(tokens[-1:], dtype=mx.int32), drafts])
    h = model.hidden(inp[None], cache)
    logits = model.logits(h).squeeze(0)
    if not processors:
        return h, process(logits, None, None)
    hist = mx.array(tokens, dtype=mx.int32)
    rows = [
        process(logits[i : i + 1], mx.concatenate([hist, drafts[:i]]), processors) for i in range(len(inp))
    ]
    return h, mx.concatenate(rows)


def _speculative(model, tokens, cache, drafter, sampler, processors, policy, max_new, stats):
    """Draft, verify, accept, rewind; yields the accepted tokens of each step.

    Pipelined, with one sync per step (in `accept`): a step is queued as soon as it is
    built (its drafts before its trunk pass is built, so the device drafts meanwhile), and
    the next step is built and queued from the tokens just accepted before they are
    yielded, so the device is busy while the caller handles them."""
    n_out = 0
    sync = lockstep(model)
    slack = policy.max_depth + 1
    choice = None  # (depth, gate threshold) of the next step, when already chosen
    step = None  # the next step, already queued: (depth, drafts, dists, confs, h, logprobs, start time)
    try:
        while n_out < max_new:
            if step is None:
                n, gate = choice or _choose(sync, policy)
                n = min(n, max_new - n_out - 1)
                choice = None
                if n == 0 and policy.plain_check:  # pipelined plain decoding, until the policy says
                    start = len(tokens)
                    choice = yield from _plain_run(
                        model, tokens, cache, sampler, processors, max_new - n_out, drafter, policy, stats
                    )
                    n_out += len(tokens) - start
                    continue
                if n and slack:  # auto decodes plainly with slack 1 (as plain decoding does) until it drafts
                    grow_slack(cache, slack)
                    slack = 0
                step = _queue_step(model, tokens, cache, drafter, n, gate, sampler, processors)
            n, drafts, dists, confs, h, lp, tic = step
            n_acc, nxt = sync.ints(list(accept(drafts, dists, lp, sampler)))  # rank 0 decides
            rewind(cache, n - n_acc)
            step = None
            drafter.add_trunk(h[:, : n_acc + 1])
            confs = confs.tolist()  # computed with the drafts
            policy.update(n, n_acc, time.perf_counter() - tic, confs)
            stats.record(n, n_acc, max(n, len(confs)))
            stats.verify_steps += 1
            new = drafts[:n_acc].tolist() + [nxt]
            tokens.extend(new)
            left = max_new - n_out - len(new)  # tokens still wanted after these
            if left > 0:
                n, gate = choice = _choose(sync, policy)
                n = min(n, left - 1)
                if n or not policy.plain_check:
                    step = _queue_step(model, tokens, cache, drafter, n, gate, sampler, processors)
                    choice = None
            for i, t in enumerate(new):
                yield t, lp[i], i < n_acc
                n_out += 1
                if n_out >= max_new:
                    return
    finally:  # a step queued when the caller stops: its trunk entries go
        if step is not None:
            rewind(cache, step[0] + 1)


def _choose(sync, policy) -> Tuple[int, float]:
    """Rank 0's policy choice, on every rank: (depth, gate threshold, in millionths)."""
    n = policy.choose()
    n, micro = sync.ints([n, round(policy.min_confidence * 1e6)])
    return n, micro / 1e6


def _queue_step(model, tokens, cache, drafter, n, gate, sampler, processors):
    """Build and queue one speculative step after tokens[-1] (verified, not yet through the
    trunk): up to n drafts (fewer where the gate stops the chain), then the trunk pass
    verifying them and its processed log-probabilities."""
    tic = time.perf_counter()
    if n:
        drafts, dists, confs = drafter.draft(tokens, n, sampler, processors, gate)
        mx.async_eval(drafts, dists, confs)
    else:
        drafts, dists, confs = mx.array([], dtype=mx.int32), [], mx.array([])
    h, lp = verify_step(model, tokens, drafts, cache, processors)
    mx.async_eval(lp)
    return drafts.shape[0], drafts, dists, confs, h, lp, tic


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = MAX_TOKENS,
    *,
    sampler: Optional[Sampler] = None,
    logits_processors=None,
    draft_mtp: bool = False,
    num_draft: Union[int, str] = NUM_DRAFT,
    prefill_step_size: int = PREFILL_STEP,
    stop_strings: Sequence[str] = (),
    prompt_cache: Optional[PromptCache] = None,
    checkpoints: Sequence[int] = (),
    draft_min_confidence: Union[float, str] = DRAFT_MIN_CONFIDENCE,
    kv_bits: Optional[int] = None,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream GenerationResponse objects like mlx_lm.stream_generate; `prompt` is a
    string (tokenized as is: apply a chat template first if you want one) or token ids.
    Stops at max_tokens, at any EOS id of the tokenizer, or after a stop string.
    With a `prompt_cache`, `prompt` continues its conversation (see `generate_step`)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    detok = tokenizer.detokenizer
    detok.reset()
    stats = SpecStats()
    eos = set(tokenizer.eos_token_ids)
    tic = time.perf_counter()
    prompt_tps = 0.0
    text = ""
    gen = generate_step(
        model,
        ids,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        draft_mtp=draft_mtp,
        num_draft=num_draft,
        prefill_step_size=prefill_step_size,
        stats=stats,
        prompt_cache=prompt_cache,
        checkpoints=checkpoints,
        draft_min_confidence=draft_min_confidence,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prompt_progress_callback=prompt_progress_callback,
    )
    n = 0
    for n, (tok, logprobs, from_draft) in enumerate(gen, start=1):
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        finish = "stop" if tok in eos else ("length" if n == max_tokens else None)
        if tok not in eos:
            detok.add_token(tok)
        if finish:
            detok.finalize()
        segment = detok.last_segment
        before = len(text)
        text += segment
        hits = [text.find(x, max(0, before - len(x))) for x in stop_strings]
        hits = [i for i in hits if i >= 0]
        if hits:  # cut the text at the earliest stop string
            segment = segment[: max(0, min(hits) - before)]
            finish = "stop"
        yield GenerationResponse(
            text=segment,
            token=tok,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=_peak_gb(),
            finish_reason=finish,
            stats=stats,
            cached_tokens=prompt_cache.cached_tokens if prompt_cache is not None else 0,
        )
        if finish:
            gen.close()
            break


def generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = MAX_TOKENS,
    *,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The generated text; with verbose=True, streams it and prints stats like mlx_lm.generate."""
    text = ""
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print()
        print("=" * 10)
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    lines = [
        f"Prompt: {r.prompt_tokens} tokens"
        + (f" (after {r.cached_tokens} reused from the prompt cache)" if r.cached_tokens else "")
        + f", {r.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
    ]
    s = r.stats
    if s.verify_steps or s.plain_tokens:
        passes = 1 + s.verify_steps + s.plain_tokens
        lines.append(
            f"Tokens per trunk pass: {r.generation_tokens / passes:.2f} "
            f"({s.verify_steps} verify steps, {s.plain_tokens} plain steps)"
        )
        if s.gated:
            lines.append(f"Confidence gate: stopped the chain early in {s.gated} of {s.verify_steps} steps")
        if s.drafted:
            lines.append(
                "MTP acceptance by depth: "
                + ", ".join(
                    f"{d + 1}: {a:.1%} ({s.accepted[d]}/{s.drafted[d]})" for d, a in enumerate(s.acceptance)
                )
            )
        elif s.gated:
            lines.append("MTP drafts: none (the confidence gate stopped every chain at block 1)")
        else:
            lines.append("MTP drafts: none (auto: drafting was not expected to pay on this machine)")
    lines.append(f"Peak memory: {r.peak_memory:.3f} GB")
    return "\n".join(lines)


def build_prompt(
    tokenizer,
    prompt: str,
    *,
    system: Optional[str] = None,
    chat_template: bool = True,
    history: Sequence[dict] = (),
    generation_prompt: bool = True,
) -> List[int]:
    """Token ids for `prompt`, wrapped in the tokenizer's chat template (as mlx_lm.generate
    does) after the `history` messages of the conversation so far."""
    if chat_template and getattr(tokenizer, "has_chat_template", False):
        messages = list(history) or ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)
