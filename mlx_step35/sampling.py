"""Samplers that expose their distribution, which lossless speculative sampling needs.

The filters are mlx-lm's own (`apply_top_p`, `apply_min_p`, `apply_top_k`), applied in
mlx-lm's order, so `make_sampler(...)` samples exactly like `mlx_lm.sample_utils.make_sampler`.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
)

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class Sampler:
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    min_tokens_to_keep: int = 1

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def filtered(self, logprobs: mx.array) -> mx.array:
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution this sampler draws from, [..., V] (one-hot when greedy)."""
        if self.greedy:
            V = logprobs.shape[-1]
            return (mx.arange(V) == logprobs.argmax(axis=-1, keepdims=True)).astype(mx.float32)
        return mx.softmax(self.filtered(logprobs).astype(mx.float32) / self.temp, axis=-1)

    def __call__(self, logprobs: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """A token drawn from the distribution (`key`: an explicit random key, else MLX's
        global generator); greedy: the argmax."""
        if self.greedy:
            return logprobs.argmax(axis=-1)
        return mx.random.categorical(self.filtered(logprobs) * (1 / self.temp), key=key)


class RandomStream:
    """One generation's own random numbers. Called, it returns the next key: with a seed,
    keys split off `mx.random.key(seed)` exactly as MLX's global generator splits its key
    after `mx.random.seed(seed)` (so a seeded generation draws what it would draw alone,
    whatever runs beside it in a batch); without one, None: the draw then uses MLX's global
    generator, as mlx-lm's samplers do."""

    def __init__(self, seed: Optional[int] = None):
        self.key = None if seed is None else mx.random.key(seed)

    def __call__(self) -> Optional[mx.array]:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


def make_sampler(
    temp: float = 0.0, top_p: float = 0.0, min_p: float = 0.0, top_k: int = 0, min_tokens_to_keep: int = 1
) -> Sampler:
    """Like mlx_lm.sample_utils.make_sampler (same arguments and behaviour), but its
    distribution can be read, so speculative sampling with MTP drafts stays lossless."""
    if temp < 0 or not 0 <= top_p <= 1 or not 0 <= min_p <= 1 or top_k < 0:
        raise ValueError("need temp >= 0, 0 <= top_p <= 1, 0 <= min_p <= 1 and top_k >= 0")
    return Sampler(temp, top_p, min_p, top_k, min_tokens_to_keep)


def as_sampler(sampler) -> Sampler:
    if sampler is None:
        return Sampler()
    if isinstance(sampler, Sampler):
        return sampler
    raise TypeError(
        "sampler must come from mlx_step35.make_sampler (same arguments as mlx-lm's): "
        "speculative sampling needs the sampler's distribution, not only its samples"
    )


def process(logits: mx.array, history, processors: Optional[List[LogitsProcessor]]) -> mx.array:
    """Apply logits processors for one row (history: token ids so far, list or array),
    then return log-probabilities [1, V]."""
    logits = logits.astype(mx.float32)
    if processors:
        hist = history if isinstance(history, mx.array) else mx.array(history)
        for proc in processors:
            logits = proc(hist, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


__all__ = ["RandomStream", "Sampler", "make_sampler", "make_logits_processors", "process"]
