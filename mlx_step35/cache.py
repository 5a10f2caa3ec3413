"""KV caches that stay exact after a rewind, including sliding-window ones that have wrapped.

mlx-lm's RotatingKVCache keeps exactly `window` entries, so once it has wrapped a rewind
cannot restore the entries that the rejected tokens overwrote. SlidingKVCache keeps
`slack` extra entries and masks by absolute position, so a rewind of up to `slack`
tokens is exact at any offset.
"""

from typing import List

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache


class FullKVCache(KVCache):
    """mlx-lm's KVCache whose trim refuses to do less than asked."""

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise ValueError(f"cannot rewind {n} tokens: the cache holds {self.offset}")
        self.offset -= n
        return n


class SlidingKVCache:
    """Ring buffer of the last `window - 1 + slack` keys/values, slot = position % capacity.

    `make_mask(n)`, called before `update_and_fetch` of those n tokens (as mlx-lm models
    do), gives the boolean mask over the keys that `update_and_fetch` will return.
    """

    def __init__(self, window: int, slack: int = 4):
        if window < 1 or slack < 1:
            raise ValueError("window and slack must be positive")
        self.window = window
        self.slack = slack
        self.capacity = window - 1 + slack
        self.keys = None
        self.values = None
        self.offset = 0  # absolute position of the next token
        self.stored = 0  # valid entries in the ring (the positions offset-stored .. offset-1)

    def set_slack(self, slack: int):
        """Change how many tokens can be rewound; the entries held are kept (the newest
        `window - 1 + slack` of them when shrinking)."""
        if slack < 1:
            raise ValueError("slack must be positive")
        keys, values = self._ordered()
        self.slack, self.capacity = slack, self.window - 1 + slack
        self.keys = self.values = None
        if keys is not None:
            self.stored = min(self.stored, self.capacity)
            self._store(keys[:, :, -self.stored :], values[:, :, -self.stored :])

    def reset(self, offset: int = 0):
        """Empty the cache; the next token is at position `offset`."""
        self.keys = self.values = None
        self.offset, self.stored = offset, 0

    def _in_place(self, n: int) -> bool:
        # The n oldest slots are not needed by any of the n new queries when n <= slack.
        return self.keys is not None and n <= self.slack and self.keys.shape[2] == self.capacity

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        if self._in_place(n):
            # slots first.. (wrapping once at most): slice updates, no index arrays to build
            first = self.offset % self.capacity
            head = min(n, self.capacity - first)
            self.keys[:, :, first : first + head] = keys[:, :, :head]
            self.values[:, :, first : first + head] = values[:, :, :head]
            if head < n:
                self.keys[:, :, : n - head] = keys[:, :, head:]
                self.values[:, :, : n - head] = values[:, :, head:]
            self.offset += n
            self.stored = min(self.stored + n, self.capacity)
            return self.keys, self.values
        old_k, old_v = self._ordered()
        all_k = keys if old_k is None else mx.concatenate([old_k, keys], axis=2)
        all_v = values if old_v is None else mx.concatenate([old_v, values], axis=2)
        self.offset += n
        self.stored = min(self.stored + n, self.capacity)
        self._store(all_k[:, :, -self.stored :], all_v[:, :, -self.stored :])
        return all_k, all_v

    def _ordered(self):
        """Valid entries in position order, or (None, None)."""
        if self.keys is None or self.stored == 0:
            return None, None
        first = (self.offset - self.stored) % self.keys.shape[2]
        end = first + self.stored
        if end <= self.keys.shape[2]:  # one run of slots: a view
            return self.keys[:, :, first:end], self.values[:, :, first:end]
        end -= self.keys.shape[2]
        return tuple(
            mx.concatenate([a[:, :, first:], a[:, :, :end]], axis=2) for a in (self.keys, self.values)
        )

    def _store(self, keys: mx.array, values: mx.array):
        # keys hold positions offset-stored .. offset-1; lay them out at slot p % capacity
        B, H, n, D = keys.shape
        if n < self.capacity:
            pad = mx.zeros((B, H, self.capacity - n, D), dtype=keys.dtype)
            keys = mx.concatenate([keys, pad], axis=2)
            values = mx.concatenate([values, pad.astype(values.dtype)], axis=2)
        shift = (self.offset - n) % self.capacity
        self.keys = mx.roll(keys, shift, axis=2)
        self.values = mx.roll(values, shift, axis=2)

    def make_mask(self, n: int, window_size=None, return_array: bool = False):
        in_place = self._in_place(n)
        if in_place and n == 1 and self.capacity <= self.window and self.stored + n >= self.capacity:
            return None  # one query, every slot valid and inside its window (plain decoding)
        # built on the host from Python ints: a constant input of the step, no kernels
        q = np.arange(self.offset, self.offset + n)[:, None]
        if not in_place:
            k = np.arange(self.offset - self.stored, self.offset + n)[None]
            return mx.array((k <= q) & (q - k < self.window))
        end = self.offset + n  # offset and stored after the update
        stored = min(self.stored + n, self.capacity)
        slots = np.arange(self.capacity)
        k = (end - 1 - (end - 1 - slots) % self.capacity)[None]  # newest position in each slot
        return mx.array((k >= end - stored) & (k <= q) & (q - k < self.window))

    def can_trim(self, n: int) -> bool:
        # the window of the next query must still be complete after the rewind
        if n == 0:
            return True
        return 0 < n <= self.offset and self.stored - n >= min(self.offset - n, self.window - 1)

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise ValueError(
                f"cannot rewind {n} tokens: a sliding cache (window {self.window}, slack "
                f"{self.slack}) holding {self.stored} of {self.offset} tokens cannot restore them"
            )
        self.offset -= n
        self.stored -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self):
        return self._ordered()

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def rewind(caches: List, n: int) -> int:
    """Remove the last n tokens from every cache, or from none: raises if any cannot."""
    caches = [c for c in caches if c is not None]
    bad = next((c for c in caches if not c.can_trim(n)), None)
    if bad is not None:
        bad.trim(n)  # raises with the reason
    for c in caches:
        c.trim(n)
    return n


def grow_slack(caches: List, slack: int):
    """Let every sliding cache rewind `slack` tokens (full caches always can)."""
    for c in caches:
        if isinstance(c, SlidingKVCache) and c.slack < slack:
            c.set_slack(slack)
