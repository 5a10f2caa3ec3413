"""The step functions of generation, shared by the single-request loop (`generation`) and
the batch engine (`batch`): setting a generation up over its caches (and a prompt cache),
prefill chunks, a plain decoding step, a verify pass over drafts (for one sequence or packed
sequences), and rank 0's policy choice."""

import threading
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import grow_slack, kv_name, kv_of
from .draft_policy import BUCKETS, AutoDraft, FixedDraft
from .lockstep import lockstep
from .prompt_cache import CHECKPOINT_BEFORE_END, PromptCache
from .sampling import RandomStream, Sampler, as_sampler, process
from .speculative import MTPDrafter, SpecStats, draft_bytes_ratio

MAX_DRAFT = 3
MAX_TOKENS = 256  # defaults of the API, also used by generate.py
NUM_DRAFT = "auto"
DRAFT_MIN_CONFIDENCE = "auto"  # learnt under num_draft="auto"; GATE_DEFAULT at a fixed depth
GATE_DEFAULT = 0.15  # at a fixed depth, scaled per block by speculative.GATE_RULES (RESULTS 14)


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


@dataclass
class Generation:
    """One generation's state over its caches, as `prepare` sets it up: `tokens` are the whole
    conversation (prompt-cache history, prompt, then each verified token), of which the
    caches hold the first `start` before the prefill; `policy` is None without drafting."""

    tokens: List[int]
    cache: list
    drafter: Optional[MTPDrafter]
    policy: Optional[Union[FixedDraft, AutoDraft]]
    sampler: Sampler
    rng: RandomStream
    stats: SpecStats
    start: int
    slack: int  # rewind slack the trunk caches still need before a step drafts (0: granted)
    marks: Optional[tuple] = None  # (checkpoint positions, prompt cache)
    prompt_cache: Optional[PromptCache] = None

    def key(self) -> Optional[mx.array]:
        """The random key of the next sampled token (None when greedy: nothing is drawn)."""
        return None if self.sampler.greedy else self.rng()

    def ready_to_draft(self):
        """Before the first step that drafts: let the sliding caches rewind a verify step
        (`auto` decodes plainly with plain decoding's slack of 1 until it drafts)."""
        if self.slack:
            grow_slack(self.cache, self.slack)
            self.slack = 0


def prepare(
    model,
    prompt: Sequence[int],
    *,
    sampler: Optional[Sampler],
    draft_mtp: bool,
    num_draft,
    draft_min_confidence,
    prefill_step_size: int,
    stats: Optional[SpecStats],
    prompt_cache: Optional[PromptCache],
    checkpoints: Sequence[int],
    kv,
    seed: Optional[int] = None,
) -> Generation:
    """Check a generation's arguments and set up its caches, drafter and draft policy (see
    `generation.generate_step` for their meaning); raises ValueError on bad ones."""
    sampler = as_sampler(sampler)
    stats = stats if stats is not None else SpecStats()
    if not prompt:
        raise ValueError("the prompt is empty")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be a positive integer, got {prefill_step_size!r}")
    if draft_mtp:
        num_draft = check_num_draft(num_draft)
        draft_min_confidence = check_min_confidence(draft_min_confidence)
        if not model.num_mtp:
            warnings.warn(
                "this model has no MTP weights: --draft-mtp ignored, decoding plainly", stacklevel=3
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
    return Generation(
        tokens, cache, drafter, policy, sampler, RandomStream(seed), stats, start, slack, marks, prompt_cache
    )


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


def release_at_thread_end():
    if threading.current_thread() is not threading.main_thread() and not hasattr(_thread_state, "release"):
        _thread_state.release = _ReleaseAtThreadEnd()


def prefill_cuts(g: Generation, step: int) -> List[Tuple[int, int]]:
    """The chunks (start, end) in which g.tokens[g.start:] go through the trunk: at most
    `step` tokens each, also ending at the prompt cache's checkpoint positions. Without a
    drafter the last token is left out: it runs as the first decoding step (as in mlx-lm)."""
    positions = g.marks[0] if g.marks else ()
    end = len(g.tokens) - (g.drafter is None)
    cuts = sorted({*range(g.start, end, step), *(p for p in positions if g.start < p < end)}) + [end]
    return list(zip(cuts, cuts[1:]))


def prefill_done(g: Generation, h: mx.array, end: int):
    """After the trunk pass over a chunk ending at `end` (h: its hidden states): the drafter's
    MTP blocks run over it (queued, not evaluated)."""
    if g.drafter is not None:
        g.drafter.add_trunk(h)
        g.drafter.commit(g.tokens)


def prefill_state(g: Generation) -> list:
    """What to evaluate after a chunk: the trunk's caches and the drafter's state."""
    return [c.arrays() for c in g.cache] + (g.drafter.state() if g.drafter else [])


def checkpoint_at(g: Generation, end: int):
    """The prompt cache snapshots the state at `end`, when that is one of its positions
    (call once the chunk ending there is evaluated)."""
    if g.marks is not None and end in g.marks[0]:
        pc = g.marks[1]
        pc.tokens = g.tokens[:end]
        pc.checkpoint()


def prefill(model, g: Generation, step: int, progress=None) -> mx.array:
    """Run g.tokens[g.start:] through the trunk in chunks (`prefill_cuts`); returns the last
    token's hidden states. Each chunk is evaluated before the next is built: the trunk's KV
    caches and, with a drafter, the MTP blocks' work on the chunk (their caches and the
    hidden rows they still need), so no prompt work is left for the first draft. Without a
    drafter the last token goes through after the loop, so only KV caches are evaluated (as
    mlx-lm). At checkpoint positions the prompt cache snapshots. `progress(processed, total)`
    after each chunk."""
    for s, e in prefill_cuts(g, step):
        h = model.hidden(mx.array([g.tokens[s:e]]), g.cache)
        prefill_done(g, h, e)
        mx.eval(prefill_state(g))
        mx.clear_cache()  # free the chunk's activations now, as mlx-lm does
        checkpoint_at(g, e)
        if progress is not None:
            progress(e - g.start, len(g.tokens) - g.start)
    if g.drafter is None:
        h = model.hidden(mx.array([g.tokens[-1:]]), g.cache)
    return h


def sample(sync, g: Generation, logprobs: mx.array) -> mx.array:
    """The next token drawn from `logprobs` [1, V] by g's sampler, with g's own random key:
    rank 0's, on every rank (lazy)."""
    return sync.array(g.sampler(logprobs, g.key()))


def first_token(model, g: Generation, h: mx.array, processors=None) -> Tuple[int, mx.array]:
    """The token after the prompt, from the last prompt token's hidden states h [1, H]
    (rank 0's on every rank), with its log-probabilities [1, V]."""
    logprobs = process(model.logits(h), g.tokens, processors)
    return int(sample(lockstep(model), g, logprobs).item()), logprobs


def plain_step(model, y, cache, sampler, processors=None, hist=None, key=None):
    """The graph of one plain decoding step on token y [1] (hist: the tokens before y and y,
    for the processors; key: the sampler's random key): (next token [1] uint32 as samplers give it, its logprobs [V], hidden
    states [1, 1, H])."""
    h = model.hidden(y[None], cache)
    lp = process(model.logits(h)[:, -1], hist, processors)
    return sampler(lp, key), lp.squeeze(0), h  # squeeze: a view, where lp[0] is a gather


def verify_step(model, tokens, drafts, cache, processors=None):
    """The graph of one trunk pass over [tokens[-1], d_1..d_n]: (hidden states [1, n+1, H],
    logprobs [n+1, V] of the token after each)."""
    inp = mx.concatenate([mx.array(tokens[-1:], dtype=mx.int32), drafts])
    h = model.hidden(inp[None], cache)
    return h, process_rows(model.logits(h).squeeze(0), tokens, drafts, processors)


def verify_rows(model, rows) -> List[Tuple[mx.array, Optional[mx.array]]]:
    """One trunk pass over several sequences packed together (`Model.packed`); each row is
    (tokens [n] int32 array, its caches, logits wanted: "all", "last" or None). Returns per
    row its hidden states [1, n, H] and its logits (None, [1, V] or [n, V], float32 as the
    model gives them: `process` them per row). The weights are read once for all rows."""
    inp = mx.concatenate([t for t, _, _ in rows])[None]
    h = model.packed(inp, [(t.shape[0], c) for t, c, _ in rows])
    out, picks, s = [], [], 0
    for t, _, want in rows:
        n = t.shape[0]
        out.append(h[:, s : s + n])
        if want == "all":
            picks.append(h[0, s : s + n])
        elif want == "last":
            picks.append(h[0, s + n - 1 : s + n])
        s += n
    logits = model.logits(mx.concatenate(picks)[None])[0] if picks else None
    res, s = [], 0
    for (t, _, want), hr in zip(rows, out):
        k = 0 if want is None else (t.shape[0] if want == "all" else 1)
        res.append((hr, logits[s : s + k] if k else None))
        s += k
    return res


def process_rows(logits: mx.array, tokens: List[int], drafts: mx.array, processors=None) -> mx.array:
    """Log-probabilities [n+1, V] of the token after tokens[-1] and after each draft, from a
    verify pass's logits [n+1, V] (processors see each position's own history)."""
    if not processors:
        return process(logits, None, None)
    hist = mx.array(tokens, dtype=mx.int32)
    return mx.concatenate(
        [
            process(logits[i : i + 1], mx.concatenate([hist, drafts[:i]]), processors)
            for i in range(logits.shape[0])
        ]
    )


def choose(sync, policy) -> Tuple[int, float]:
    """Rank 0's policy choice, on every rank: (depth, gate threshold, in millionths)."""
    n = policy.choose()
    n, micro = sync.ints([n, round(policy.min_confidence * 1e6)])
    return n, micro / 1e6
