"""Generation in three layers, as in mlx-lm: a token generator (with optional MTP
speculative decoding), a stream of GenerationResponse, and `generate()` joining text."""

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import KV_GROUP_SIZE, QUANTIZED_KV_START, kv_quant, rewind
from .lockstep import lockstep
from .memory import DECODE_CLEAR_EVERY, clearing_cache, wired_limit
from .prompt_cache import PromptCache
from .sampling import Sampler
from .speculative import PREFILL_STEP, SpecStats, accept
from .steps import (  # noqa: F401  (the API's names and defaults, importable from here as before)
    DRAFT_MIN_CONFIDENCE,
    GATE_DEFAULT,
    MAX_DRAFT,
    MAX_TOKENS,
    NUM_DRAFT,
    check_min_confidence,
    check_num_draft,
    choose,
    first_token,
    generation_stream,
    parse_min_confidence,
    plain_step,
    prefill,
    prepare,
    release_at_thread_end,
    verify_step,
)


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
    seed: Optional[int] = None,
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

    With a `seed`, every random draw of this generation comes from its own stream (see
    `sampling.RandomStream`): the same tokens as after `mx.random.seed(seed)`, whatever else
    runs (the batch engine's rows draw the same way). Without one, MLX's global generator.
    """
    release_at_thread_end()
    g = prepare(
        model,
        prompt,
        sampler=sampler,
        draft_mtp=draft_mtp,
        num_draft=num_draft,
        draft_min_confidence=draft_min_confidence,
        prefill_step_size=prefill_step_size,
        stats=stats,
        prompt_cache=prompt_cache,
        checkpoints=checkpoints,
        kv=kv_quant(kv_bits, kv_group_size, quantized_kv_start),
        seed=seed,
    )
    tokens, policy = g.tokens, g.policy
    try:
        # Weights stay wired while generating (on Metal); restored when the generator ends or is closed.
        with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
            tic = time.perf_counter()
            h = prefill(model, g, prefill_step_size, prompt_progress_callback)
            tok, logprobs = first_token(model, g, h[:, -1], logits_processors)
            tokens.append(tok)
            if policy:
                policy.observe_prefill(len(tokens) - 1 - g.start, time.perf_counter() - tic)
            yield tok, logprobs[0], False
            if policy is None:
                rest = _plain_run(model, g, logits_processors, max_tokens - 1)
            else:
                rest = _speculative(model, g, logits_processors, max_tokens - 1)
            # The first token is out: clear MLX's buffer cache after every DECODE_CLEAR_EVERY-th.
            yield from clearing_cache(rest, DECODE_CLEAR_EVERY, first=2)
    finally:
        if prompt_cache is not None:
            prompt_cache.finish(tokens)


def _plain_run(model, g, processors, count, policy=None):
    """Plain decoding of up to `count` tokens after tokens[-1] (verified, not yet through
    the trunk), pipelined: the next step's graph is built while this one computes.
    With a policy (--num-draft auto), every `policy.plain_check` tokens it gets their time
    and is asked for the next depth; it is asked before the next pass is queued, from the
    tokens already out, so the pipeline never stalls and no pass is wasted. Returns the
    (depth, gate threshold) that ended the run, or None when `count` tokens are out."""
    tokens, cache, drafter = g.tokens, g.cache, g.drafter
    stats = g.stats if policy else None
    hist = mx.array(tokens[:-1], dtype=mx.uint32)  # the samplers' dtype: no casts per step
    sync = lockstep(model)

    def step(y):
        nonlocal hist
        if processors:
            hist = mx.concatenate([hist, y])
        tok, lp, h = plain_step(model, y, cache, g.sampler, processors, hist, g.key())
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
                choice = choose(sync, policy)  # timings differ per rank: rank 0 decides
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


def _speculative(model, g, processors, max_new):
    """Draft, verify, accept, rewind; yields the accepted tokens of each step.

    Pipelined, with one sync per step (in `accept`): a step is queued as soon as it is
    built (its drafts before its trunk pass is built, so the device drafts meanwhile), and
    the next step is built and queued from the tokens just accepted before they are
    yielded, so the device is busy while the caller handles them."""
    tokens, cache, drafter, policy, stats = g.tokens, g.cache, g.drafter, g.policy, g.stats
    n_out = 0
    sync = lockstep(model)
    choice = None  # (depth, gate threshold) of the next step, when already chosen
    step = None  # the next step, already queued: (depth, drafts, dists, confs, h, logprobs, start time)
    try:
        while n_out < max_new:
            if step is None:
                n, gate = choice or choose(sync, policy)
                n = min(n, max_new - n_out - 1)
                choice = None
                if n == 0 and policy.plain_check:  # pipelined plain decoding, until the policy says
                    start = len(tokens)
                    choice = yield from _plain_run(model, g, processors, max_new - n_out, policy)
                    n_out += len(tokens) - start
                    continue
                if n:
                    g.ready_to_draft()
                step = _queue_step(model, g, n, gate, processors)
            n, drafts, dists, confs, h, lp, tic = step
            n_acc, nxt = sync.ints(list(accept(drafts, dists, lp, g.sampler, g.rng)))  # rank 0 decides
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
                n, gate = choice = choose(sync, policy)
                n = min(n, left - 1)
                if n or not policy.plain_check:
                    step = _queue_step(model, g, n, gate, processors)
                    choice = None
            for i, t in enumerate(new):
                yield t, lp[i], i < n_acc
                n_out += 1
                if n_out >= max_new:
                    return
    finally:  # a step queued when the caller stops: its trunk entries go
        if step is not None:
            rewind(cache, step[0] + 1)


def _queue_step(model, g, n, gate, processors):
    """Build and queue one speculative step after tokens[-1] (verified, not yet through the
    trunk): up to n drafts (fewer where the gate stops the chain), then the trunk pass
    verifying them and its processed log-probabilities."""
    tic = time.perf_counter()
    if n:
        drafts, dists, confs = g.drafter.draft(g.tokens, n, g.sampler, processors, gate, g.rng)
        mx.async_eval(drafts, dists, confs)
    else:
        drafts, dists, confs = mx.array([], dtype=mx.int32), [], mx.array([])
    h, lp = verify_step(model, g.tokens, drafts, g.cache, processors)
    mx.async_eval(lp)
    return drafts.shape[0], drafts, dists, confs, h, lp, tic


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


class Responses:
    """One generation's tokens as GenerationResponse objects, as stream_generate yields them
    (and each row of the batch engine): text from the tokenizer's streaming detokenizer (a
    copy per generation); finished at an EOS id, at `max_tokens`, or after a stop string (the
    text cut before it)."""

    def __init__(
        self, tokenizer, prompt_tokens: int, max_tokens: int, stop_strings=(), stats=None, prompt_cache=None
    ):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.stop_strings = tuple(stop_strings)
        self.stats = stats if stats is not None else SpecStats()
        self.prompt_cache = prompt_cache
        self.tic = time.perf_counter()
        self.prompt_tps = 0.0
        self.text = ""
        self.n = 0

    def __call__(self, tok: int, logprobs: mx.array, from_draft: bool) -> GenerationResponse:
        self.n = n = self.n + 1
        if n == 1:
            self.prompt_tps = self.prompt_tokens / (time.perf_counter() - self.tic)
            self.tic = time.perf_counter()
        finish = "stop" if tok in self.eos else ("length" if n == self.max_tokens else None)
        if tok not in self.eos:
            self.detok.add_token(tok)
        if finish:
            self.detok.finalize()
        segment = self.detok.last_segment
        before = len(self.text)
        self.text += segment
        hits = [self.text.find(x, max(0, before - len(x))) for x in self.stop_strings]
        hits = [i for i in hits if i >= 0]
        if hits:  # cut the text at the earliest stop string
            segment = segment[: max(0, min(hits) - before)]
            finish = "stop"
        pc = self.prompt_cache
        return GenerationResponse(
            text=segment,
            token=tok,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - self.tic, 1e-9),
            peak_memory=_peak_gb(),
            finish_reason=finish,
            stats=self.stats,
            cached_tokens=pc.cached_tokens if pc is not None else 0,
        )


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
    seed: Optional[int] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream GenerationResponse objects like mlx_lm.stream_generate; `prompt` is a
    string (tokenized as is: apply a chat template first if you want one) or token ids.
    Stops at max_tokens, at any EOS id of the tokenizer, or after a stop string.
    With a `prompt_cache`, `prompt` continues its conversation (see `generate_step`)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    out = Responses(tokenizer, len(ids), max_tokens, stop_strings, prompt_cache=prompt_cache)
    gen = generate_step(
        model,
        ids,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        draft_mtp=draft_mtp,
        num_draft=num_draft,
        prefill_step_size=prefill_step_size,
        stats=out.stats,
        prompt_cache=prompt_cache,
        checkpoints=checkpoints,
        draft_min_confidence=draft_min_confidence,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prompt_progress_callback=prompt_progress_callback,
        seed=seed,
    )
    for tok, logprobs, from_draft in gen:
        r = out(tok, logprobs, from_draft)
        yield r
        if r.finish_reason:
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
