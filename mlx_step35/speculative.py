"""Drafting with the chained MTP blocks, and the lossless acceptance rule.

Block k at position t reads token x_{t+k} and h_{k-1,t} (h_0 = trunk hidden before the
final norm) and predicts x_{t+k+1}. A position is *committed* to block k's cache once
x_{t+k} is verified; positions that read a draft are computed for the draft only and
rewound at once, so block k's cache always holds exactly the teacher-forced entries
(`Model.mtp_logits`) of the verified tokens.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import mlx.core as mx

from .cache import rewind
from .sampling import Sampler, process


@dataclass
class SpecStats:
    """Acceptance statistics of one generation."""

    verify_steps: int = 0  # trunk forward passes after the prompt
    drafted: List[int] = field(default_factory=list)  # per MTP depth
    accepted: List[int] = field(default_factory=list)

    def record(self, n_drafted: int, n_accepted: int):
        while len(self.drafted) < n_drafted:
            self.drafted.append(0)
            self.accepted.append(0)
        for d in range(n_drafted):
            self.drafted[d] += 1
            self.accepted[d] += d < n_accepted

    def merge(self, other: "SpecStats"):
        self.verify_steps += other.verify_steps
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


class MTPDrafter:
    def __init__(self, model, slack: int, chunk: int = 512):
        self.model = model
        self.K = model.num_mtp
        self.cache = model.make_mtp_cache(slack)
        self.chunk = chunk
        self.done = [0] * (self.K + 1)  # done[0]: trunk positions; done[k]: block k's committed
        # hidden[k]: rows of h_k at positions [done[k+1], done[k]) that block k+1 still needs
        self.hidden: List[Optional[mx.array]] = [None] * (self.K + 1)

    def add_trunk(self, h: mx.array):
        """Trunk hidden states [1, n, H] of the next n verified positions."""
        self.hidden[0] = _cat(self.hidden[0], h)
        self.done[0] += h.shape[1]

    def _run(self, k: int, t0: int, t1: int, seq: List[int], h_prev: mx.array) -> mx.array:
        """Block k over positions [t0, t1) in chunks; returns h_k rows [1, t1 - t0, H]."""
        outs = []
        for s in range(t0, t1, self.chunk):
            e = min(t1, s + self.chunk)
            toks = mx.array([seq[s + k : e + k]])
            h, _ = self.model.mtp_step(k, toks, h_prev[:, s - t0 : e - t0], self.cache[k - 1])
            outs.append(h)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def commit(self, seq: List[int], depth: Optional[int] = None):
        """Advance blocks 1..depth (default all) over the positions whose inputs are all
        verified. A block left behind catches up later in one multi-row pass."""
        for k in range(1, (depth or self.K) + 1):
            t0 = self.done[k]
            t1 = min(len(seq) - k, self.done[k - 1])
            if t1 > t0:
                out = self._run(k, t0, t1, seq, self.hidden[k - 1][:, : t1 - t0])
                self.hidden[k] = _cat(self.hidden[k], out)
                self.done[k] = t1
            if self.hidden[k - 1] is not None:  # block k no longer needs rows before done[k]
                self.hidden[k - 1] = self.hidden[k - 1][:, self.done[k] - t0 :] if t1 > t0 else self.hidden[k - 1]
        last = self.hidden[self.K]
        if last is not None and last.shape[1] > 1:
            self.hidden[self.K] = last[:, -1:]

    def draft(self, seq: List[int], n: int, sampler: Sampler, processors=None
              ) -> Tuple[List[int], List[mx.array]]:
        """Chain blocks 1..n at position P-1 (P = trunk positions; seq[P] is the last
        verified token); returns the drafts and the distributions they were drawn from."""
        self.commit(seq, n)
        P = self.done[0]
        if len(seq) != P + 1:
            raise ValueError("draft() needs exactly one verified token beyond the trunk")
        drafts, dists = [], []
        ext = list(seq)
        prev = None  # block k-1's rows [done[k-1], P), computed for this draft only
        try:
            for k in range(1, n + 1):
                t0 = self.done[k]
                if t0 == P:  # all rows committed: the draft reads the last committed h_k
                    h_k, prev = self.hidden[k][:, -1:], None
                else:  # rows [t0, P) read drafts: computed now, rewound below
                    prev = self._run(k, t0, P, ext, _cat(self.hidden[k - 1], prev))
                    h_k = prev[:, -1:]
                logits = self.model.mtp[k - 1].shared_head(h_k)[:, -1]
                dist = sampler.probs(process(logits, ext, processors))
                tok = int(dist.argmax().item()) if sampler.greedy else int(
                    mx.random.categorical(mx.log(dist)).item())
                drafts.append(tok)
                dists.append(dist)
                ext.append(tok)
        finally:  # keep only committed entries, whatever happened
            for k in range(1, self.K + 1):
                rewind([self.cache[k - 1]], self.cache[k - 1].offset - self.done[k])
        return drafts, dists


def _cat(a: Optional[mx.array], b: Optional[mx.array]) -> Optional[mx.array]:
    if a is None or a.shape[1] == 0:
        return b
    if b is None or b.shape[1] == 0:
        return a
    return mx.concatenate([a, b], axis=1)


def accept(drafts: List[int], dists: List[mx.array], target: List[mx.array], sampler: Sampler
           ) -> Tuple[int, int]:
    """Lossless acceptance (Leviathan et al. / Chen et al.).

    Draft d_i, drawn from q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i))
    where p_i is the trunk's processed distribution at that position; at the first
    rejection the token is drawn from normalize(max(0, p_i - q_i)); if all are accepted
    a bonus token is drawn from the trunk's next distribution. The output is then
    distributed exactly as the trunk's own samples. Greedy: p and q are one-hot, so a
    draft is accepted iff it equals the trunk's argmax, and the trunk's argmax follows.
    Returns (number of drafts accepted, the token that follows them).
    """
    for i, (d, q) in enumerate(zip(drafts, dists)):
        p = target[i]
        if sampler.greedy:
            ok = int(p.argmax().item()) == d
        else:
            ratio = (p[0, d] / q[0, d]).item()
            ok = ratio >= 1 or mx.random.uniform().item() < ratio
        if not ok:
            if sampler.greedy:
                return i, int(p.argmax().item())
            residual = mx.maximum(p - q, 0)
            return i, int(mx.random.categorical(mx.log(residual / residual.sum())).item())
    last = target[len(drafts)]
    if sampler.greedy:
        return len(drafts), int(last.argmax().item())
    return len(drafts), int(mx.random.categorical(mx.log(last)).item())


class FixedDraft:
    """Always draft `n` tokens."""

    def __init__(self, n: int):
        self.n = self.max_depth = n

    def choose(self) -> int:
        return self.n

    def update(self, n: int, n_accepted: int, seconds: float):
        pass


class AutoDraft:
    """Pick the draft depth (0 = plain step) that maximises expected tokens per second.

    Expected tokens of a step drafting n: 1 + sum_{i<=n} prod_{j<=i} a_j, with a_j the
    measured acceptance of depth j given depths < j were accepted (Laplace-smoothed).
    Cost: the measured wall time of steps at that depth (EMA), which captures the
    drafting passes and the wider verify pass on whatever machine this runs on. Each
    depth is measured twice at the start, then a neighbouring depth is re-probed every
    `probe_every` steps so the estimates follow the text.
    """

    def __init__(self, max_depth: int, probe_every: int = 16, ema: float = 0.2):
        self.K = self.max_depth = max_depth
        self.tries = [0] * (max_depth + 1)  # index j: depth j drafted with 1..j-1 accepted
        self.hits = [0] * (max_depth + 1)
        self.time = [None] * (max_depth + 1)  # EMA seconds per step, by depth
        self.seen = [0] * (max_depth + 1)
        self.steps = 0
        self.probe_every = probe_every
        self.ema = ema
        self.best = max_depth

    def expected_tokens(self, n: int) -> float:
        total, p = 1.0, 1.0
        for j in range(1, n + 1):
            p *= (self.hits[j] + 1) / (self.tries[j] + 2)
            total += p
        return total

    def choose(self) -> int:
        self.steps += 1
        for n in range(self.K, -1, -1):  # warm-up: the first sample of each depth is discarded
            if self.seen[n] < 3:
                return n
        rates = [self.expected_tokens(n) / self.time[n] for n in range(self.K + 1)]
        self.best = max(range(self.K + 1), key=rates.__getitem__)
        if self.steps % self.probe_every == 0:
            return self.best + 1 if self.best < self.K else self.best - 1
        return self.best

    def update(self, n: int, n_accepted: int, seconds: float):
        for j in range(1, min(n, n_accepted + 1) + 1):
            self.tries[j] += 1
            self.hits[j] += j <= n_accepted
        self.seen[n] += 1
        if self.seen[n] == 1:
            return  # first step at a depth pays one-time compilation and allocation
        t = self.time[n]
        self.time[n] = seconds if t is None else (1 - self.ema) * t + self.ema * seconds
