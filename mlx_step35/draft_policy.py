"""How deep to draft each step: a fixed depth, or `auto`, which picks the depth and the
confidence gate's threshold that maximise expected tokens per second on this machine.
A policy's `choose()` gives the depth and sets `min_confidence`, the gate threshold for
that step (see `speculative.MTPDrafter.draft`)."""

from typing import Optional, Sequence, Tuple

# Edges of the confidence buckets `auto` learns acceptance in; its gate thresholds are these.
BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


class FixedDraft:
    """Always draft up to `n` tokens, stopping the chain where the gate says (0.0: never)."""

    plain_check = 0  # never decodes plainly

    def __init__(self, n: int, min_confidence: float = 0.0):
        self.n = self.max_depth = n
        self.min_confidence = min_confidence

    def choose(self) -> int:
        return self.n

    def update(self, n: int, n_accepted: int, seconds: float, confidences: Sequence[float] = ()):
        pass

    def update_plain(self, tokens: int, seconds: float):
        pass

    def observe_prefill(self, tokens: int, seconds: float):
        pass


class AutoDraft:
    """Pick the draft depth n (0 = plain decoding) and the gate threshold t that maximise
    expected tokens/second.

    Tokens per step at depth n, ungated: E(n) = 1 + sum_{i<=n} prod_{j<=i} a_j, with a_j the
    acceptance at depth j given depths < j were accepted, measured (prior 0.6, weight 2).
    Gated at t: a_j becomes the measured chance that block j's confidence is >= t and its draft
    is accepted (acceptance learnt per confidence bucket, prior: the bucket's midpoint, i.e. a
    calibrated block), and the pass is as wide as the drafts that pass the gate, whose share
    per depth is measured too; every `explore`-th drafting step runs ungated, so the buckets
    below t keep being measured.
    Seconds per step: c(1), the measured time per plain-decoding token, and for n >= 1
    the measured EMA step time at that depth; until a depth has been measured it is
    modelled as c(1) + n * c_batch + draft(n), with c_batch the marginal cost of a token
    in a wider pass (from the prompt's prefill) and draft(n) = c(1) times the MTP weight
    bytes that n drafts read over the trunk's per-token bytes. On a bandwidth-bound Mac
    a wider pass costs little and drafting wins; where passes cost per token (a CPU),
    drafting never pays and this stays with plain decoding: the pipelined plain loop,
    with the trunk caches' rewind slack at 1 until the first draft, so it does exactly
    the work of plain decoding; it reports every `plain_check` tokens (the first two
    reports measure c(1): warm-up, then a clean figure) and is asked whether to go on.
    """

    plain_check = 16
    explore = 16

    def __init__(
        self,
        max_depth: int,
        draft_bytes_ratio: Tuple[float, float] = (0.05, 0.05),
        prior: float = 0.6,
        prior_weight: float = 2.0,
        ema: float = 0.3,
        thresholds: Sequence[float] = BUCKETS,
    ):
        self.K = self.max_depth = max_depth
        self.body, self.head = draft_bytes_ratio  # MTP block body / head bytes over trunk bytes
        self.prior, self.prior_weight, self.ema = prior, prior_weight, ema
        self.tries = [0] * (max_depth + 1)  # index j: depth j drafted with 1..j-1 accepted
        self.hits = [0] * (max_depth + 1)
        self.step_time = [None] * (max_depth + 1)  # EMA seconds per step, by depth
        self.seen = [0] * (max_depth + 1)
        self.c1 = None  # seconds per plain token
        self.prefill = None  # (tokens, seconds)
        self.plain_reports = 0
        self.thresholds = tuple(thresholds)  # the gate thresholds to choose from (0.0: no gate)
        self._gates = [(t, bucket(t) if t > 0 else 0) for t in self.thresholds]
        self.min_confidence = 0.0  # the threshold of the step last chosen
        nb = len(BUCKETS)
        # [depth][bucket]: blocks run, those whose earlier drafts were all accepted, and of
        # these the ones verified and accepted
        self.conf_all = [[0] * nb for _ in range(max_depth + 1)]
        self.conf_reached = [[0] * nb for _ in range(max_depth + 1)]
        self.conf_tries = [[0] * nb for _ in range(max_depth + 1)]
        self.conf_hits = [[0] * nb for _ in range(max_depth + 1)]
        self.drafting_steps = 0

    def acceptance(self, j: int) -> float:
        return (self.hits[j] + self.prior * self.prior_weight) / (self.tries[j] + self.prior_weight)

    def bucket_acceptance(self, j: int, b: int) -> float:
        hi = BUCKETS[b + 1] if b + 1 < len(BUCKETS) else 1.0
        mid = (BUCKETS[b] + hi) / 2
        return (self.conf_hits[j][b] + mid * self.prior_weight) / (self.conf_tries[j][b] + self.prior_weight)

    def gate_table(self) -> dict:
        """{(j, b0): (share of block j's confidences in buckets >= b0, chance that it is there
        and its draft accepted given depths < j were)}: (1, a_j) ungated or before any data.
        One pass per depth (suffix sums), so `choose` stays cheap on the host."""
        table = {}
        for j in range(1, self.K + 1):
            total, reached = sum(self.conf_all[j]), sum(self.conf_reached[j])
            table[(j, 0)] = (1.0, self.acceptance(j))
            share = acc = 0.0
            for b in range(len(BUCKETS) - 1, 0, -1):
                share += self.conf_all[j][b]
                acc += self.conf_reached[j][b] * self.bucket_acceptance(j, b)
                table[(j, b)] = (share / total, acc / reached) if total and reached else table[(j, 0)]
        return table

    def gated(self, j: int, b0: int) -> Tuple[float, float]:
        return self.gate_table()[(j, b0)]

    def expected_tokens(self, n: int, b0: int = 0, table: Optional[dict] = None) -> float:
        table = table or self.gate_table()
        total, p = 1.0, 1.0
        for j in range(1, n + 1):
            p *= table[(j, b0)][1]
            total += p
        return total

    def expected_cost(self, n: int, b0: int = 0, table: Optional[dict] = None) -> float:
        if b0 == 0 or n == 0:
            return self.cost(n)
        table = table or self.gate_table()
        total, p = 0.0, 1.0  # p: chance that the pass holds at least L drafts
        for L in range(n + 1):
            nxt = p * table[(L + 1, b0)][0] if L < n else 0.0
            step = self.cost(L) if L else self.cost(0) * (1 + self.body + self.head)  # gated at block 1
            total += (p - nxt) * step
            p = nxt
        return total

    def cost(self, n: int) -> float:
        if n == 0:
            return self.c1
        if self.step_time[n] is not None:
            return self.step_time[n]
        tokens, seconds = self.prefill or (1, self.c1)
        batch = max(0.0, (seconds - self.c1) / (tokens - 1)) if tokens > 1 else 0.5 * self.c1
        draft = self.c1 * ((2 * n - 1) * self.body + n * self.head)
        return self.c1 + n * batch + draft

    def choose(self) -> int:
        """The depth of the next step; sets `min_confidence`, the gate threshold to use with it."""
        self.min_confidence = 0.0
        if self.c1 is None or self.plain_reports < 2:
            return 0  # measure plain decoding first (the first report includes warm-up)
        best, choice = -1.0, (0, 0)
        table = self.gate_table()
        for n in range(self.K + 1):
            for t, b0 in self._gates if n else ((0.0, 0),):
                rate = self.expected_tokens(n, b0, table) / self.expected_cost(n, b0, table)
                if rate > best:
                    best, choice = rate, (n, t)
        n, t = choice
        if n:
            self.drafting_steps += 1
            if len(self.thresholds) == 1 or self.drafting_steps % self.explore:
                self.min_confidence = t
        return n

    def observe_prefill(self, tokens: int, seconds: float):
        self.prefill = (tokens, seconds)

    def update_plain(self, tokens: int, seconds: float):
        self.plain_reports += 1
        t = seconds / tokens
        if self.c1 is None or self.plain_reports == 2:
            self.c1 = t
        elif self.plain_reports > 2:
            self.c1 = (1 - self.ema) * self.c1 + self.ema * t

    def update(self, n: int, n_accepted: int, seconds: float, confidences: Sequence[float] = ()):
        """One step: n drafts verified, n_accepted kept; `confidences` of the blocks run
        (one more than n when the gate stopped the chain)."""
        for j in range(1, min(n, n_accepted + 1) + 1):
            self.tries[j] += 1
            self.hits[j] += j <= n_accepted
        for j, c in enumerate(confidences, start=1):
            b = bucket(c)
            self.conf_all[j][b] += 1
            if j <= n_accepted + 1:
                self.conf_reached[j][b] += 1
                if j <= n:
                    self.conf_tries[j][b] += 1
                    self.conf_hits[j][b] += j <= n_accepted
        self.seen[n] += 1
        if n == 0 or self.seen[n] == 1:
            return  # the first step at a depth pays one-time compilation
        t = self.step_time[n]
        self.step_time[n] = seconds if t is None else (1 - self.ema) * t + self.ema * seconds


def bucket(c: float) -> int:
    """Index of the confidence bucket holding c."""
    return max(i for i, edge in enumerate(BUCKETS) if c >= edge or i == 0)


__all__ = ["AutoDraft", "FixedDraft", "BUCKETS", "bucket"]
