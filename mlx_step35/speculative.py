"""Drafting with the chained MTP blocks, and the lossless acceptance rule.

Block k at position t reads token x_{t+k} and h_{k-1,t} (h_0 = trunk hidden before the
final norm) and predicts x_{t+k+1}. A position is *committed* to block k's cache once
x_{t+k} is verified; positions that read a draft are computed for the draft only and
rewound at once, so block k's cache always holds exactly the teacher-forced entries
(`Model.mtp_logits`) of the verified tokens.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KVQuant, rewind
from .lockstep import lockstep
from .sampling import RandomStream, Sampler, process

PREFILL_STEP = 2048  # prompt tokens per prefill chunk, as mlx-lm


@dataclass
class SpecStats:
    """Acceptance statistics of one generation."""

    verify_steps: int = 0  # speculative steps (one trunk pass each)
    plain_tokens: int = 0  # tokens decoded plainly, one trunk pass each (--num-draft auto)
    drafted: List[int] = field(default_factory=list)  # per MTP depth
    accepted: List[int] = field(default_factory=list)
    gated: int = 0  # steps whose chain the confidence gate stopped before the chosen depth
    # (drafts verified, MTP blocks run, drafts accepted) -> steps: what a bandwidth model needs
    steps: Dict[Tuple[int, int, int], int] = field(default_factory=dict)

    def record(self, n_drafted: int, n_accepted: int, blocks: Optional[int] = None):
        while len(self.drafted) < n_drafted:
            self.drafted.append(0)
            self.accepted.append(0)
        for d in range(n_drafted):
            self.drafted[d] += 1
            self.accepted[d] += d < n_accepted
        key = (n_drafted, n_drafted if blocks is None else blocks, n_accepted)
        self.steps[key] = self.steps.get(key, 0) + 1
        self.gated += key[1] > n_drafted

    def merge(self, other: "SpecStats"):
        self.verify_steps += other.verify_steps
        self.plain_tokens += other.plain_tokens
        self.gated += other.gated
        for key, count in other.steps.items():
            self.steps[key] = self.steps.get(key, 0) + count
        for d, (n, a) in enumerate(zip(other.drafted, other.accepted)):
            if d == len(self.drafted):
                self.drafted.append(0)
                self.accepted.append(0)
            self.drafted[d] += n
            self.accepted[d] += a

    @property
    def acceptance(self) -> List[float]:
        """Per depth: accepted / drafted (depth d is only drafted when d-1 was)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def rejected(self) -> int:
        """Drafted tokens that were verified and not kept."""
        return sum(self.drafted) - sum(self.accepted)


class MTPDrafter:
    def __init__(self, model, slack: int, chunk: int = PREFILL_STEP, kv: Optional[KVQuant] = None):
        self.model = model
        self.K = model.num_mtp
        self.kv = kv  # full-attention blocks' KV quantization (the trunk's rule per layer type)
        self.cache = model.make_mtp_cache(slack, kv)
        self.chunk = chunk
        self.done = [0] * (self.K + 1)  # done[0]: trunk positions; done[k]: block k's committed
        # hidden[k]: rows of h_k at positions [done[k+1], done[k]) that block k+1 still needs
        self.hidden: List[Optional[mx.array]] = [None] * (self.K + 1)
        self._rows = []  # trunk rows not yet joined into hidden[0]
        windows = [getattr(c, "window", None) for c in self.cache]
        # a block at position t depends on positions > t - k (W - 1) only, when all slide
        self.horizon = self.K * (max(windows) - 1) + 1 if all(windows) else None

    def add_trunk(self, h: mx.array):
        """Trunk hidden states [1, n, H] of the next n verified positions."""
        self._rows.append(h)
        self.done[0] += h.shape[1]
        if self.horizon and self.done[0] - min(self.done[1:]) > 2 * self.horizon:
            self._skip_ahead(self.done[0] - self.horizon)

    def state(self) -> List[mx.array]:
        """Every array the drafter holds: its blocks' KV caches and the hidden rows kept."""
        kv = [a for c in self.cache for a in c.arrays()]
        return kv + [h for h in self.hidden + self._rows if h is not None]

    def _trunk_rows(self):
        if self._rows:
            self.hidden[0] = _cat(self.hidden[0], mx.concatenate(self._rows, axis=1))
            self._rows = []

    def _skip_ahead(self, start: int):
        """Blocks left far behind (plain decoding under --num-draft auto) restart at `start`:
        with sliding-window blocks, no position before it can reach a later draft, so the
        entries they hold from then on are exactly the teacher-forced ones."""
        self._trunk_rows()
        for k in range(1, self.K + 1):
            if self.done[k] >= start:
                continue
            prev = self.hidden[k - 1]
            if prev is None or self.done[k - 1] <= start:  # block k-1 restarted here too
                self.hidden[k - 1] = None
            else:
                self.hidden[k - 1] = prev[:, start - self.done[k] :]
            self.done[k] = start
            self.cache[k - 1].reset(start)
            if k == self.K:
                self.hidden[k] = None
        if self.hidden[0] is not None:  # the kept trunk rows, evaluated without a sync, stop
            mx.async_eval(self.hidden[0])  # holding the graph that joined every earlier row

    def _run(self, k: int, toks: mx.array, h_prev: mx.array) -> mx.array:
        """Block k over len(toks) positions (tokens x_{t+k}, rows h_{k-1,t}), in chunks."""
        outs = []
        for s in range(0, toks.shape[0], self.chunk):
            e = s + self.chunk
            outs.append(self.model.mtp_hidden(k, toks[None, s:e], h_prev[:, s:e], self.cache[k - 1]))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def commit(self, seq: List[int], depth: Optional[int] = None):
        """Advance blocks 1..depth (default all) over the positions whose inputs are all
        verified. A block left behind catches up later in one multi-row pass."""
        self._trunk_rows()
        for k in range(1, (depth or self.K) + 1):
            t0 = self.done[k]
            t1 = min(len(seq) - k, self.done[k - 1])
            if t1 <= t0:
                continue
            toks = mx.array(seq[t0 + k : t1 + k], dtype=mx.int32)
            out = self._run(k, toks, self.hidden[k - 1][:, : t1 - t0])
            self.hidden[k] = _cat(self.hidden[k], out)
            self.hidden[k - 1] = self.hidden[k - 1][:, t1 - t0 :]  # block k is past these rows
            self.done[k] = t1
        last = self.hidden[self.K]
        if last is not None and last.shape[1] > 1:
            self.hidden[self.K] = last[:, -1:]

    def draft(
        self,
        seq: List[int],
        n: int,
        sampler: Sampler,
        processors=None,
        min_confidence: Union[float, Sequence[float]] = 0.0,
        rng: Optional[RandomStream] = None,
    ) -> Tuple[mx.array, List[mx.array], mx.array]:
        """Chain blocks 1..n at position P-1 (P = trunk positions; seq[P] is the last
        verified token). Returns the drafts as an int32 array [m <= n], per draft the
        distribution it was drawn from [1, V], and the gate values of the blocks run [m, or
        m + 1 when the gate stopped the chain].

        The gate reads a signal from each block's distribution (`confidence`, under the rule
        `GATE_RULES` gives this sampler) and stops the chain before the first block whose
        signal is below its threshold: that block's draft is not kept (one host sync per
        gated block; rank 0 decides). A number `min_confidence` t gives block k the threshold
        t x factor_k, and its gate value is signal / factor_k (inf where factor_k = 0: never
        gated), so the chain stops at the first value below t; a sequence gives one threshold
        per block, and the values are the signals. Blocks with threshold 0 do not wait: their
        drafts are queued (`mx.async_eval`) as soon as they are built. Sampled drafts draw their
        keys from `rng` (default: MLX's global generator)."""
        rng = rng or RandomStream()
        self.commit(seq, n)
        P = self.done[0]
        if len(seq) != P + 1:
            raise ValueError("draft() needs exactly one verified token beyond the trunk")
        drafts, dists, confs = [], [], []
        history = mx.array(seq, dtype=mx.int32) if processors else None
        prev = None  # block k-1's rows [done[k-1], P), computed for this draft only
        chain = None  # q_j(d_j) of the drafts kept, multiplied (signal "product")
        signal, factors = gate_rule(sampler)
        limits, scale = gate_limits(min_confidence, n, factors)
        try:
            for k in range(1, n + 1):
                t0 = self.done[k]
                if t0 == P:  # all rows committed: the draft reads the last committed h_k
                    h_k, prev = self.hidden[k][:, -1:], None
                else:  # rows [t0, P) read x_{t+k}: verified up to seq[P], then drafts 1..k-1
                    toks = mx.concatenate([mx.array(seq[t0 + k :], dtype=mx.int32)] + drafts)
                    prev = self._run(k, toks, _cat(self.hidden[k - 1], prev))
                    h_k = prev[:, -1:]
                logits = self.model.mtp[k - 1].shared_head(h_k)[:, -1]
                hist = mx.concatenate([history] + drafts) if processors else None
                lp = process(logits, hist, processors)
                dist = None if sampler.greedy else sampler.probs(lp)
                tok = (
                    lp.argmax(axis=-1) if dist is None else mx.random.categorical(mx.log(dist), key=rng())
                ).astype(mx.int32)
                conf = confidence(dist, lp, sampler, chain, signal)
                value = conf / scale[k - 1] if scale[k - 1] > 0 else mx.array([float("inf")])
                confs.append(value)
                if limits[k - 1] > 0:  # rank 0's draft and verdict, on every rank
                    below = (value < limits[k - 1]).astype(mx.int32)
                    both = lockstep(self.model).array(mx.concatenate([tok, below]))
                    tok, stop = both[:1], both[1].item()
                    if stop:
                        break
                    chain = conf if signal == "product" else None
                else:
                    tok = lockstep(self.model).array(tok)  # rank 0's draft feeds the next block on every rank
                    chain = conf if signal == "product" else None
                if not sampler.greedy:
                    dists.append(dist)
                    if chain is not None:  # the kept draft's own probability joins the product
                        chain = chain / mx.max(dist) * mx.take(dist[0], tok)
                drafts.append(tok)
                mx.async_eval(tok, dists[-1:])  # queued: block k computes while k+1 is built
        finally:  # keep only committed entries, whatever happened
            for k in range(1, self.K + 1):
                rewind([self.cache[k - 1]], self.cache[k - 1].offset - self.done[k])
        empty = mx.array([], dtype=mx.int32)
        return (
            (mx.concatenate(drafts) if drafts else empty),
            dists,
            mx.concatenate(confs) if confs else mx.array([]),
        )


# The draft gate's rule per regime: the signal read from each block's distribution (greedy:
# the softmax of its processed log-probabilities; sampled: the distribution the draft is drawn
# from) and per block the factor of draft_min_confidence that is its threshold (0: never
# gated; the last factor for deeper blocks). Signals: "own", the top probability; "margin",
# the top probability minus the second; "entropy", exp(-entropy); "product", the top
# probability times q(d) of each draft kept before it in the chain. On the demo no rule met
# issue 23's goal in both regimes on held-out prompts (benchmarks/RESULTS.md section 14), so
# both keep the block's own top probability at every block.
GATE_RULES = {"greedy": ("own", (1.0,)), "sampled": ("own", (1.0,))}
SIGNALS = ("own", "margin", "entropy", "product")


def gate_rule(sampler: Sampler) -> Tuple[str, Tuple[float, ...]]:
    """(signal, per-block factors) of the gate for this sampler's regime."""
    signal, factors = GATE_RULES["greedy" if sampler.greedy else "sampled"]
    if signal not in SIGNALS or not factors:
        raise ValueError(f"speculative.GATE_RULES: need a signal of {SIGNALS} and factors, got {signal!r}")
    return signal, tuple(factors)


def gate_limits(min_confidence: Union[float, Sequence[float]], n: int, factors: Sequence[float]):
    """(limits, scales) of blocks 1..n: block k stops the chain when signal / scale_k < limit_k.
    A number t: scales are the factors, limits t (0 where the factor is 0: never gated); a
    sequence: its thresholds (the last for deeper blocks) as limits, scales 1."""
    pad = lambda xs: tuple(float(xs[min(k, len(xs) - 1)]) for k in range(n))  # noqa: E731
    if isinstance(min_confidence, (int, float)):
        return pad([min_confidence if f > 0 else 0.0 for f in factors]), pad(factors)
    if not len(min_confidence):
        raise ValueError("min_confidence: need a number or at least one threshold")
    return pad(min_confidence), (1.0,) * n


def confidence(
    dist: mx.array, lp: mx.array, sampler: Sampler, chain: Optional[mx.array], signal: str = "own"
) -> mx.array:
    """A block's gate signal [1] (see GATE_RULES), read from the distribution the draft is
    drawn from (greedy: the softmax of the processed log-probabilities, whose top probability
    is the drafted token's own), times `chain` when given. It depends on that distribution
    only, never on the token drawn from it: whether position k is drafted is then decided by
    the verified tokens before it, so the acceptance rule stays exact. (Dropping a sampled
    draft for its own low q(d) would not: the verified tokens would be biased towards
    confident drafts.)"""
    q = mx.softmax(lp, axis=-1) if sampler.greedy and signal in ("margin", "entropy") else dist
    if signal == "margin":
        top2 = mx.topk(q, 2, axis=-1)  # [1, 2], in no particular order
        conf = top2.max(axis=-1) - top2.min(axis=-1)
    elif signal == "entropy":
        conf = mx.exp((q * mx.log(mx.maximum(q, 1e-30))).sum(axis=-1))
    elif signal in ("own", "product"):  # greedy: the drafted token's, exp of its log-probability
        conf = mx.exp(lp.max(axis=-1)) if sampler.greedy else q.max(axis=-1)
    else:
        raise ValueError(f"gate signal must be one of {SIGNALS}, got {signal!r}")
    return conf if chain is None else conf * chain


def _cat(a: Optional[mx.array], b: Optional[mx.array]) -> Optional[mx.array]:
    if a is None or a.shape[1] == 0:
        return b
    if b is None or b.shape[1] == 0:
        return a
    return mx.concatenate([a, b], axis=1)


def accept(
    drafts: mx.array,
    dists: List[mx.array],
    logprobs: mx.array,
    sampler: Sampler,
    rng: Optional[RandomStream] = None,
) -> Tuple[int, int]:
    """Lossless acceptance (Leviathan et al. / Chen et al.), evaluated in one sync.

    `logprobs` [n+1, V] are the trunk's processed log-probabilities at the n draft
    positions and the one after. Draft d_i, drawn from q_i, is accepted with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from
    normalize(max(0, p_i - q_i)); if all n are accepted a bonus token is drawn from p_n.
    The output is then distributed exactly as the trunk's own samples. Greedy: p and q
    are one-hot, so d_i is accepted iff it equals the trunk's argmax, which follows it.
    (`logprobs` come from an (n+1)-row pass: in bf16 or fp16 on any backend, and on Metal in
    any dtype, its rounding can differ from a one-row pass's, so at a near-tie its argmax can
    differ from plain decoding's; in float32 on the CPU backend it does not.)
    Returns (number of drafts accepted, the token that follows them). Random keys come
    from `rng` (default: MLX's global generator).
    """
    n = drafts.shape[0]
    if sampler.greedy:
        target = logprobs.argmax(axis=-1)
        mx.eval(target, drafts)
        t, d = target.tolist(), drafts.tolist()
        n_acc = next((i for i in range(n) if d[i] != t[i]), n)
        return n_acc, t[n_acc]
    rng = rng or RandomStream()
    p = sampler.probs(logprobs)  # [n+1, V]
    bonus = mx.random.categorical(mx.log(p[n]), key=rng())
    if n == 0:
        return 0, int(bonus.item())
    q = mx.concatenate(dists)  # [n, V]
    idx = drafts[:, None]
    ratio = mx.take_along_axis(p[:n], idx, axis=-1)[:, 0] / mx.take_along_axis(q, idx, axis=-1)[:, 0]
    ok = mx.random.uniform(shape=(n,), key=rng()) < ratio
    residual = mx.maximum(p[:n] - q, 0)
    mass = residual.sum(axis=-1)
    resample = mx.random.categorical(mx.log(mx.where(mass[:, None] > 0, residual, p[:n])), key=rng())
    mx.eval(ok, resample, bonus)
    ok = ok.tolist()
    n_acc = next((i for i in range(n) if not ok[i]), n)
    return n_acc, (resample.tolist()[n_acc] if n_acc < n else int(bonus.item()))


def draft_bytes_ratio(model) -> Tuple[float, float]:
    """Weight bytes of one MTP block's body and of its head, over the trunk's per-token bytes
    (everything but the routed experts, plus top_k / num_experts of those)."""
    a = model.args
    trunk = routed = 0
    for name, w in tree_flatten(model.model.parameters()):
        if "switch_mlp" in name:
            routed += w.nbytes
        elif "embed_tokens" not in name:
            trunk += w.nbytes
    trunk += sum(w.nbytes for _, w in tree_flatten(model.lm_head.parameters()))
    trunk += routed * a.moe_top_k / a.moe_num_experts
    block = model.mtp[0]
    head = sum(w.nbytes for _, w in tree_flatten(block.shared_head.output.parameters()))
    body = sum(w.nbytes for _, w in tree_flatten(block.parameters())) - head
    return body / trunk, head / trunk
