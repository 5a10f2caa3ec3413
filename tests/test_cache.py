"""Rewindable KV caches against a hand-written reference: a plain list of every key/value
ever appended (minus the rewound ones) and an explicit sliding-window mask."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_step35.cache import FullKVCache, SlidingKVCache, rewind

B, H, D = 1, 2, 8


class ReferenceWindow:
    """All keys by absolute position; the query at p attends to positions p-window+1 .. p."""

    def __init__(self, window: int, slack: int):
        self.window, self.slack = window, slack
        self.keys, self.values = [], []
        self.kept = 0  # positions a ring of window - 1 + slack entries still holds

    def append(self, k, v):
        self.keys.extend(np.moveaxis(k, 2, 0))  # one [B, H, D] per position
        self.values.extend(np.moveaxis(v, 2, 0))
        self.kept = min(self.kept + k.shape[2], self.window - 1 + self.slack)

    def trim(self, n):
        del self.keys[len(self.keys) - n :], self.values[len(self.values) - n :]
        self.kept -= n

    @property
    def recoverable(self) -> int:
        # after a rewind of n the ring must still hold the window - 1 positions before the offset
        return self.kept - min(len(self.keys), self.window - 1)

    def attend(self, q, scale):
        """Attention of queries q [B, H, n, D] at the last n positions, float64."""
        n = q.shape[2]
        K = np.stack(self.keys, axis=2).astype(np.float64)  # [B, H, T, D]
        V = np.stack(self.values, axis=2).astype(np.float64)
        T = K.shape[2]
        out = np.zeros(q.shape)
        for i in range(n):
            p = T - n + i
            lo = max(0, p - self.window + 1)
            s = np.einsum("bhd,bhtd->bht", q[:, :, i].astype(np.float64), K[:, :, lo : p + 1]) * scale
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, :, i] = np.einsum("bht,bhtd->bhd", w, V[:, :, lo : p + 1])
        return out


def _step(cache, ref, rng, n):
    k = rng.standard_normal((B, H, n, D)).astype(np.float32)
    v = rng.standard_normal((B, H, n, D)).astype(np.float32)
    q = rng.standard_normal((B, H, n, D)).astype(np.float32)
    mask = cache.make_mask(n)  # before the update, as the model calls it
    keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
    ref.append(k, v)
    assert cache.offset == len(ref.keys)
    out = mx.fast.scaled_dot_product_attention(mx.array(q), keys, values, scale=D**-0.5, mask=mask)
    np.testing.assert_allclose(np.array(out), ref.attend(q, D**-0.5), atol=2e-5, rtol=1e-4)
    # the mask selects exactly the reference's window: count the visible keys per query
    # (no mask: every key returned is visible)
    visible = np.full(n, keys.shape[2]) if mask is None else np.array(mask).sum(-1)  # [n]
    T = len(ref.keys)
    want = [min(T - n + i + 1, ref.window) for i in range(n)]
    assert list(visible) == want


@pytest.mark.parametrize("window,slack,seed", [(5, 3, 0), (8, 4, 1), (4, 1, 2), (6, 6, 3)])
def test_sliding_cache_random_updates_and_rewinds(window, slack, seed):
    rng = np.random.default_rng(seed)
    cache, ref = SlidingKVCache(window, slack), ReferenceWindow(window, slack)
    trims = wrapped_trims = 0
    for _ in range(120):
        r = rng.random()
        if r < 0.3 and ref.recoverable > 0 and len(ref.keys) > 0:
            n = int(rng.integers(1, min(ref.recoverable, slack) + 1))
            wrapped = cache.offset > cache.capacity
            assert cache.trim(n) == n
            ref.trim(n)
            trims += 1
            wrapped_trims += wrapped
        elif r < 0.8:
            _step(cache, ref, rng, int(rng.integers(1, slack + 1)))  # in place once the ring exists
        else:
            _step(cache, ref, rng, int(rng.integers(slack + 1, 3 * window)))  # a prefill-sized chunk
    assert trims > 10 and wrapped_trims > 5  # the sequence really rewound past the wrap point


@pytest.mark.parametrize("window,seed", [(5, 0), (8, 1)])
def test_sliding_cache_slack_changes_keep_entries(window, seed):
    """Growing the slack (--num-draft auto starts drafting) or shrinking it keeps the
    entries; rewinds up to the new slack stay exact, including after the wrap."""
    rng = np.random.default_rng(seed)
    cache, ref = SlidingKVCache(window, 1), ReferenceWindow(window, 1)
    changes = trims = 0
    for _ in range(200):
        r = rng.random()
        if r < 0.1:
            slack = int(rng.integers(1, 6))
            cache.set_slack(slack)
            ref.slack, ref.kept = slack, min(ref.kept, window - 1 + slack)
            changes += 1
        elif r < 0.35 and ref.recoverable > 0:
            n = int(rng.integers(1, min(ref.recoverable, cache.slack) + 1))
            assert cache.trim(n) == n
            ref.trim(n)
            trims += 1
        elif r < 0.9:
            _step(cache, ref, rng, int(rng.integers(1, cache.slack + 1)))
        else:
            _step(cache, ref, rng, int(rng.integers(cache.slack + 1, 3 * window)))
    assert changes > 5 and trims > 10


@pytest.mark.parametrize("window,slack", [(5, 3), (8, 2)])
def test_sliding_cache_rewind_slack_at_every_offset(window, slack):
    """Decode one token at a time; at every offset rewind `slack` tokens and redo them."""
    rng = np.random.default_rng(7)
    cache, ref = SlidingKVCache(window, slack), ReferenceWindow(window, slack)
    _step(cache, ref, rng, 2)
    for _ in range(3 * (window + slack)):
        for _ in range(slack):
            _step(cache, ref, rng, 1)
        assert cache.trim(slack) == slack
        ref.trim(slack)
        for _ in range(slack + 1):
            _step(cache, ref, rng, 1)


def test_sliding_cache_trim_beyond_recoverable_raises():
    window, slack = 5, 3
    rng = np.random.default_rng(0)
    cache, ref = SlidingKVCache(window, slack), ReferenceWindow(window, slack)
    for _ in range(20):  # wraps the ring (capacity 7) several times
        _step(cache, ref, rng, 1)
    with pytest.raises(ValueError, match="rewind"):
        cache.trim(slack + 1)
    assert cache.offset == 20  # a refused trim changes nothing
    _step(cache, ref, rng, 1)
    assert cache.trim(slack) == slack
    ref.trim(slack)
    with pytest.raises(ValueError):
        cache.trim(1)  # the slack is used up until new tokens arrive
    _step(cache, ref, rng, 2)
    with pytest.raises(ValueError):
        cache.trim(3)
    assert cache.trim(2) == 2
    ref.trim(2)
    _step(cache, ref, rng, 1)
    with pytest.raises(ValueError):
        SlidingKVCache(window, slack).trim(1)  # empty cache


def test_sliding_cache_short_history_rewinds_fully():
    """Before the ring fills, every token is kept: any rewind up to the offset is exact."""
    rng = np.random.default_rng(5)
    cache, ref = SlidingKVCache(6, 2), ReferenceWindow(6, 2)
    _step(cache, ref, rng, 4)
    assert cache.trim(4) == 4
    ref.trim(4)
    assert cache.offset == 0
    _step(cache, ref, rng, 3)
    _step(cache, ref, rng, 1)


def test_full_cache_trim():
    cache = FullKVCache()
    k = mx.ones((B, H, 5, D))
    cache.update_and_fetch(k, k)
    with pytest.raises(ValueError, match="6"):
        cache.trim(6)
    assert cache.offset == 5
    assert cache.trim(2) == 2 and cache.offset == 3
    keys, _ = cache.update_and_fetch(mx.zeros((B, H, 1, D)), mx.zeros((B, H, 1, D)))
    assert keys.shape[2] == 4  # the trimmed entries are gone from what attention sees


def test_rewind_returns_n_and_raises_when_any_cache_cannot():
    full, sliding = FullKVCache(), SlidingKVCache(4, 2)
    x = mx.ones((B, H, 10, D))
    full.update_and_fetch(x, x)
    sliding.update_and_fetch(x, x)
    assert rewind([full, None, sliding], 2) == 2
    assert full.offset == sliding.offset == 8
    with pytest.raises(ValueError):
        rewind([full, sliding], 3)  # the sliding cache's slack (2) is spent
