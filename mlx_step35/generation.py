"""Generation in three layers, as in mlx-lm: a token generator (with optional MTP
speculative decoding), a stream of GenerationResponse, and `generate()` joining text."""

import time
import warnings
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import rewind
from .sampling import Sampler, as_sampler, process
from .speculative import AutoDraft, FixedDraft, MTPDrafter, SpecStats, accept

PREFILL_STEP = 512
MAX_DRAFT = 3


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


def check_num_draft(num_draft):
    if num_draft == "auto" or (isinstance(num_draft, int) and 1 <= num_draft <= MAX_DRAFT):
        return num_draft
    raise ValueError(f"num_draft must be 1, 2, 3 or 'auto' (the model has 3 MTP blocks), got {num_draft!r}")


def generate_step(
    model,
    prompt: Sequence[int],
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors=None,
    draft_mtp: bool = False,
    num_draft: Union[int, str] = "auto",
    prefill_step_size: int = PREFILL_STEP,
    stats: Optional[SpecStats] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs [V], from_draft) until max_tokens tokens.

    With `draft_mtp`, each step drafts `num_draft` tokens with the chained MTP blocks
    ("auto": the depth, 0 included, that the measured acceptance and step times favour),
    verifies them with one trunk pass and keeps the accepted prefix plus the trunk's
    own next token (see `speculative.accept`): the output is exactly that of plain
    decoding (greedy) or distributed exactly like it (sampling).
    """
    sampler = as_sampler(sampler)
    stats = stats if stats is not None else SpecStats()
    if not prompt:
        raise ValueError("the prompt is empty")
    if draft_mtp:
        num_draft = check_num_draft(num_draft)
        if not model.num_mtp:
            warnings.warn("this model has no MTP weights: --draft-mtp ignored, decoding plainly", stacklevel=2)
            draft_mtp = False
    policy = None
    if draft_mtp:
        depth = model.num_mtp if num_draft == "auto" else min(num_draft, model.num_mtp)
        policy = AutoDraft(depth) if num_draft == "auto" else FixedDraft(depth)
    slack = (policy.max_depth if policy else 0) + 1
    cache = model.make_cache(slack=slack)
    drafter = MTPDrafter(model, slack, prefill_step_size) if draft_mtp else None
    tokens = [int(t) for t in prompt]
    with mx.stream(_stream()):
        h = _prefill(model, tokens, cache, drafter, prefill_step_size)
        logprobs = process(model.logits(h[:, -1]), tokens, logits_processors)
        if drafter is None:
            yield from _plain(model, tokens, cache, sampler, logits_processors, logprobs, max_tokens)
            return
        tok = int(sampler(logprobs).item())
        tokens.append(tok)
        yield tok, logprobs[0], False
        yield from _speculative(model, tokens, cache, drafter, sampler, logits_processors,
                                policy, max_tokens - 1, stats)


_STREAM = []


def _stream():
    if not _STREAM:  # one generation stream, as mlx-lm uses, created on first use
        _STREAM.append(mx.new_stream(mx.default_device()))
    return _STREAM[0]


def _prefill(model, tokens, cache, drafter, step):
    """Run the prompt through the trunk in chunks; returns the last chunk's hidden states."""
    for s in range(0, len(tokens), step):
        h = model.hidden(mx.array([tokens[s : s + step]]), cache)
        if drafter:
            drafter.add_trunk(h)
            drafter.commit(tokens)
        mx.eval(h)
    return h


def _plain(model, tokens, cache, sampler, processors, logprobs, max_tokens):
    """Plain decoding, pipelined: the next step's graph is built while this one computes."""
    hist = mx.array(tokens)

    def step(y):
        nonlocal hist
        if processors:
            hist = mx.concatenate([hist, y])
        lp = process(model(y[None], cache)[:, -1], hist, processors)
        return sampler(lp), lp[0]

    y, lp = sampler(logprobs), logprobs[0]
    mx.async_eval(y, lp)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            nxt = step(y)
            mx.async_eval(*nxt)
        yield int(y.item()), lp, False
        if n + 1 < max_tokens:
            y, lp = nxt


def _speculative(model, tokens, cache, drafter, sampler, processors, policy, max_new, stats):
    """Draft, verify, accept, rewind; yields the accepted tokens of each step."""
    n_out = 0
    while n_out < max_new:
        tic = time.perf_counter()
        n = min(policy.choose(), max_new - n_out - 1)
        drafts, dists = drafter.draft(tokens, n, sampler, processors) if n else ([], [])
        h = model.hidden(mx.array([tokens[-1:] + drafts]), cache)  # verify: one trunk pass
        logits = model.logits(h)[0]
        rows, target = [], []
        for i in range(len(drafts) + 1):
            lp = process(logits[i : i + 1], tokens + drafts[:i], processors)
            rows.append(lp[0])
            target.append(sampler.probs(lp))
        n_acc, nxt = accept(drafts, dists, target, sampler)
        rewind(cache, len(drafts) - n_acc)
        drafter.add_trunk(h[:, : n_acc + 1])
        policy.update(n, n_acc, time.perf_counter() - tic)
        stats.record(len(drafts), n_acc)
        stats.verify_steps += 1
        new = drafts[:n_acc] + [nxt]
        tokens.extend(new)
        for i, t in enumerate(new):
            yield t, rows[i], i < n_acc
            n_out += 1
            if n_out >= max_new:
                return


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = 256,
    *,
    sampler: Optional[Sampler] = None,
    logits_processors=None,
    draft_mtp: bool = False,
    num_draft: Union[int, str] = "auto",
    prefill_step_size: int = PREFILL_STEP,
    stop_strings: Sequence[str] = (),
) -> Generator[GenerationResponse, None, None]:
    """Stream GenerationResponse objects like mlx_lm.stream_generate; `prompt` is a
    string (tokenized as is: apply a chat template first if you want one) or token ids.
    Stops at max_tokens, at any EOS id of the tokenizer, or after a stop string."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    detok = tokenizer.detokenizer
    detok.reset()
    stats = SpecStats()
    eos = set(tokenizer.eos_token_ids)
    tic = time.perf_counter()
    prompt_tps = 0.0
    text = ""
    gen = generate_step(model, ids, max_tokens=max_tokens, sampler=sampler,
                        logits_processors=logits_processors, draft_mtp=draft_mtp,
                        num_draft=num_draft, prefill_step_size=prefill_step_size, stats=stats)
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
            text=segment, token=tok, logprobs=logprobs, from_draft=from_draft,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9), peak_memory=_peak_gb(),
            finish_reason=finish, stats=stats,
        )
        if finish:
            gen.close()
            break


def generate(model, tokenizer, prompt: Union[str, List[int]], max_tokens: int = 256, *,
             verbose: bool = False, **kwargs) -> str:
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
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
    ]
    s = r.stats
    if s.drafted:
        lines.append(f"Tokens per verify step: {r.generation_tokens / max(s.verify_steps + 1, 1):.2f}")
        lines.append("MTP acceptance by depth: " + ", ".join(
            f"{d + 1}: {a:.1%} ({s.accepted[d]}/{s.drafted[d]})" for d, a in enumerate(s.acceptance)))
    lines.append(f"Peak memory: {r.peak_memory:.3f} GB")
    return "\n".join(lines)


def build_prompt(tokenizer, prompt: str, *, system: Optional[str] = None,
                 chat_template: bool = True) -> List[int]:
    """Token ids for `prompt`, wrapped in the tokenizer's chat template (as mlx_lm.generate does)."""
    if chat_template and getattr(tokenizer, "has_chat_template", False):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)
