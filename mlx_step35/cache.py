"""KV caches that stay exact after a rewind, including sliding-window ones that have wrapped.

mlx-lm's RotatingKVCache keeps exactly `window` entries, so once it has wrapped a rewind
cannot restore the entries that the rejected tokens overwrote. SlidingKVCache keeps
`slack` extra entries and masks by absolute position, so a rewind of up to `slack`
tokens is exact at any offset.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode takes
KV_GROUP_SIZE = 64  # mlx-lm's defaults
QUANTIZED_KV_START = 5000


@dataclass(frozen=True)
class KVQuant:
    """How full-attention caches store keys and values: positions from `start` on are kept
    quantized (`mx.quantize`, `bits` per value, one fp16 scale and bias per `group_size`
    values); the first `start` positions stay 16-bit."""

    bits: int
    group_size: int = KV_GROUP_SIZE
    start: int = QUANTIZED_KV_START

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS} or None, got {self.bits!r}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"kv_group_size must be 32, 64 or 128, got {self.group_size!r}")
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"quantized_kv_start must be a non-negative integer, got {self.start!r}")

    def bytes_per_value(self, itemsize: int = 2) -> float:
        """Stored bytes per key or value element (packed values plus scale and bias)."""
        return self.bits / 8 + 2 * itemsize / self.group_size


def kv_name(kv: Optional[KVQuant]) -> str:
    return "16-bit" if kv is None else f"{kv.bits}-bit (group {kv.group_size}, from position {kv.start})"


def kv_quant(
    kv_bits: Optional[int], kv_group_size: int = KV_GROUP_SIZE, quantized_kv_start: int = QUANTIZED_KV_START
) -> Optional[KVQuant]:
    """mlx-lm's three arguments as one KVQuant, or None for 16-bit KV (kv_bits None)."""
    return None if kv_bits is None else KVQuant(kv_bits, kv_group_size, quantized_kv_start)


class FullKVCache(KVCache):
    """mlx-lm's KVCache whose trim refuses to do less than asked; with a KVQuant, the
    positions from `quant.start` on are stored quantized (`qkeys`, `qvalues`: mx.quantize's
    (packed, scales, biases), [B, H, n, ...]).

    Whether a position is quantized depends on the position only, never on when it was
    written: a rewind, a prompt-cache checkpoint or a restore at any position stays exact,
    and `attention` treats every query by its own position, so a pass over many tokens gives
    what one-token passes give."""

    def __init__(self, quant: Optional[KVQuant] = None):
        super().__init__()
        self.quant = quant
        self.qkeys = self.qvalues = None

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise ValueError(f"cannot rewind {n} tokens: the cache holds {self.offset}")
        self.offset -= n
        return n

    @property
    def fp_len(self) -> int:
        """Entries held at 16 bits (positions 0 .. fp_len-1)."""
        return self.offset if self.quant is None else min(self.offset, self.quant.start)

    @property
    def q_len(self) -> int:
        """Entries held quantized (positions quant.start .. offset-1)."""
        return self.offset - self.fp_len

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Store n new entries. Returns (keys, values) as mlx-lm's KVCache does while every
        entry is 16-bit; once some are quantized, ((fp, quantized) keys, (fp, quantized)
        values), fp None when quant.start is 0: `attention` takes either."""
        if self.quant is None:
            return super().update_and_fetch(keys, values)
        n = keys.shape[2]
        split = min(n, max(0, self.quant.start - self.offset))
        if split:
            fk, fv = super().update_and_fetch(keys[:, :, :split], values[:, :, :split])
            if split == n:
                return fk, fv
        if split < n:
            self._put_quantized(keys[:, :, split:], values[:, :, split:])
        fp = self.fp_len
        fk = fv = None
        if fp:
            fk, fv = self.keys[..., :fp, :], self.values[..., :fp, :]
        q = self.q_len
        qk = tuple(a[..., :q, :] for a in self.qkeys)
        qv = tuple(a[..., :q, :] for a in self.qvalues)
        return (fk, qk), (fv, qv)

    def _put_quantized(self, keys: mx.array, values: mx.array):
        # entries at positions offset.. (all >= quant.start), in slots offset - start ..
        g, b = self.quant.group_size, self.quant.bits
        qk, qv = mx.quantize(keys, group_size=g, bits=b), mx.quantize(values, group_size=g, bits=b)
        prev, n = self.q_len, keys.shape[2]
        if self.qkeys is None or prev + n > self.qkeys[0].shape[2]:
            steps = (n + self.step - 1) // self.step * self.step

            def grown(old, new):
                room = mx.zeros((*new.shape[:2], steps, new.shape[3]), dtype=new.dtype)
                return room if old is None else mx.concatenate([old[..., :prev, :], room], axis=2)

            self.qkeys = tuple(grown(o, x) for o, x in zip(self.qkeys or (None,) * 3, qk))
            self.qvalues = tuple(grown(o, x) for o, x in zip(self.qvalues or (None,) * 3, qv))
        for a, x in zip(self.qkeys + self.qvalues, tuple(qk) + tuple(qv)):
            a[..., prev : prev + n, :] = x
        self.offset += n

    def arrays(self) -> List[mx.array]:
        """Every array the cache holds (to evaluate or count)."""
        out = [] if self.keys is None else [self.keys, self.values]
        return out + ([] if self.qkeys is None else [*self.qkeys, *self.qvalues])

    def copy(self) -> "FullKVCache":
        """A cache whose arrays later updates of this one cannot change."""
        new = copy.copy(self)
        if self.keys is not None:
            new.keys, new.values = self.keys[...], self.values[...]
        if self.qkeys is not None:
            new.qkeys = tuple(a[...] for a in self.qkeys)
            new.qvalues = tuple(a[...] for a in self.qvalues)
        return new

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


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

    def arrays(self) -> List[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def copy(self) -> "SlidingKVCache":
        new = copy.copy(self)
        if self.keys is not None:
            new.keys, new.values = self.keys[...], self.values[...]
        return new

    @property
    def state(self):
        return self._ordered()

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def kv_of(caches: List) -> Optional[KVQuant]:
    """The KV quantization of a list of caches (that of its full-attention ones)."""
    return next((c.quant for c in caches if isinstance(c, FullKVCache)), None)


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


def attention(queries: mx.array, keys, values, scale: float, mask=None, quant: Optional[KVQuant] = None):
    """Scaled dot-product attention over what a cache's `update_and_fetch` returned.
    Plain arrays: MLX's fused kernel. FullKVCache's (fp, quantized) pairs: each query
    attends by its own position, so a pass over many tokens matches one-token passes:
    queries before `quant.start` over the 16-bit entries only, with the fused kernel (as
    before any entry was quantized); later ones over the 16-bit prefix and the quantized
    rest with `mx.quantized_matmul`, as mlx-lm's quantized attention (which this is when
    the prefix is empty). `mask`: None or "causal" (full attention)."""
    if not isinstance(keys, tuple):
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    if mask is not None and not isinstance(mask, str):
        raise ValueError("quantized KV: full-attention layers take a causal mask only")
    (fk, qk), (fv, qv) = keys, values
    L = queries.shape[2]
    fp = 0 if fk is None else fk.shape[2]
    first = fp + qk[0].shape[2] - L  # position of the first query
    low = min(L, max(0, quant.start - first))  # queries before quant.start
    outs = []
    if low:
        causal = "causal" if low > 1 else None  # the low queries end exactly at position fp - 1
        outs.append(
            mx.fast.scaled_dot_product_attention(queries[:, :, :low], fk, fv, scale=scale, mask=causal)
        )
    if low < L:
        # Scores, softmax and weighted sum in float32, as the fused kernel keeps them on Metal
        # (a bf16 quantized_matmul rounds every score). A new array: mlx-lm's function scales
        # its queries in place.
        q = queries[:, :, low:].astype(mx.float32)
        causal = "causal" if L - low > 1 else None
        if fk is None:
            out = quantized_scaled_dot_product_attention(
                q, qk, qv, scale, causal, quant.group_size, quant.bits
            )
        else:
            out = _mixed_attention(q, fk, fv, qk, qv, scale, causal, quant)
        outs.append(out.astype(queries.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _mixed_attention(queries, fk, fv, qk, qv, scale, causal, quant: KVQuant):
    """Float32 queries at or after quant.start over 16-bit keys [0, fp) and quantized ones
    after; float32 scores, softmax and output, except the 16-bit prefix's two matmuls, which
    run in the cache's dtype (a float32 operand would copy the whole prefix every step)."""
    B, n_heads, L, D = queries.shape
    n_kv = fk.shape[1]
    rep = n_heads // n_kv
    q = (queries * scale).reshape(B, n_kv, rep, L, D)  # [B, kv_heads, rep, L, D]
    fk, fv = fk[:, :, None], fv[:, :, None]
    qk, qv = [tuple(a[:, :, None] for a in t) for t in (qk, qv)]
    g, b = quant.group_size, quant.bits
    s_fp = (q.astype(fk.dtype) @ fk.swapaxes(-1, -2)).astype(q.dtype)  # [B, kv_heads, rep, L, fp]
    s_q = mx.quantized_matmul(q, *qk, transpose=True, group_size=g, bits=b)  # [.., L, n_quantized]
    if causal is not None:  # the 16-bit keys all precede these queries; mask the quantized part
        n = s_q.shape[-1]
        visible = mx.arange(n - L, n)[:, None] >= mx.arange(n)[None]
        s_q = mx.where(visible, s_q, mx.finfo(s_q.dtype).min)
    p = mx.softmax(mx.concatenate([s_fp, s_q], axis=-1), axis=-1, precise=True)
    fp = s_fp.shape[-1]
    out = (p[..., :fp].astype(fv.dtype) @ fv).astype(p.dtype)
    out = out + mx.quantized_matmul(p[..., fp:], *qv, transpose=False, group_size=g, bits=b)
    return out.reshape(B, n_heads, L, D)
