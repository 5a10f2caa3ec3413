"""Quantized-KV attention with float32 scores (cache.attention) vs bf16 scores (before), on this machine.

Accuracy: one attention call against a float64 reference over the same dequantized keys
and values (max abs error of the output). Speed: one decode step's (1 query) and one
prefill chunk's attention at each context, the two formulations interleaved round by round
(order alternated), medians. Shapes: the demo model's full-attention layers (4 query and
2 KV heads x 32 dims, bf16), 8-bit KV in groups of 32, quantized from position 0 (mlx-lm's
quantized attention) or from --start (a 16-bit prefix, then quantized).

    python benchmarks/kv_scores.py [--contexts 8192,32768] [--rounds 5] [--start 5000]
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from common import median
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from mlx_step35.cache import FullKVCache, KVQuant, attention

H, KV, D = 4, 2, 32


def bf16_scores(queries, keys, values, scale, mask, quant):
    """The formulation before float32 scores: every matmul in the queries' dtype."""
    (fk, qk), (fv, qv) = keys, values
    g, b = quant.group_size, quant.bits
    if fk is None:
        return quantized_scaled_dot_product_attention(queries[...], qk, qv, scale, mask, g, b)
    B, n_heads, L, _ = queries.shape
    q = (queries * scale).reshape(B, KV, n_heads // KV, L, D)
    fk, fv = fk[:, :, None], fv[:, :, None]
    qk, qv = [tuple(a[:, :, None] for a in t) for t in (qk, qv)]
    s_q = mx.quantized_matmul(q, *qk, transpose=True, group_size=g, bits=b)
    if mask is not None:
        n = s_q.shape[-1]
        s_q = mx.where(mx.arange(n - L, n)[:, None] >= mx.arange(n)[None], s_q, mx.finfo(s_q.dtype).min)
    p = mx.softmax(mx.concatenate([q @ fk.swapaxes(-1, -2), s_q], axis=-1), axis=-1, precise=True)
    fp = fk.shape[-2]
    out = p[..., :fp] @ fv + mx.quantized_matmul(p[..., fp:], *qv, transpose=False, group_size=g, bits=b)
    return out.reshape(B, n_heads, L, D)


def filled(context, quant):
    mx.random.seed(context)
    k = mx.random.normal((1, KV, context, D)).astype(mx.bfloat16)
    v = mx.random.normal((1, KV, context, D)).astype(mx.bfloat16)
    cache = FullKVCache(quant)
    cache.update_and_fetch(k, v)
    mx.eval(cache.arrays())
    return cache, k, v


def reference(q, k, v, quant, scale):
    """float64 over the cache's own values: 16-bit before quant.start, dequantized after."""

    def f64(x):
        return np.array(x.astype(mx.float32), dtype=np.float64)

    s = quant.start
    w = [mx.quantize(x[:, :, s:], group_size=quant.group_size, bits=quant.bits) for x in (k, v)]
    deq = [
        mx.dequantize(
            a, sc.astype(mx.float32), bi.astype(mx.float32), group_size=quant.group_size, bits=quant.bits
        )
        for a, sc, bi in w
    ]
    k = np.concatenate([f64(k[:, :, :s]), f64(deq[0])], axis=2).repeat(H // KV, axis=1)
    v = np.concatenate([f64(v[:, :, :s]), f64(deq[1])], axis=2).repeat(H // KV, axis=1)
    sc = f64(q) @ k.swapaxes(-1, -2) * scale
    p = np.exp(sc - sc.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--start", type=int, default=5000, help="the mixed rows' quantized_kv_start")
    ap.add_argument("--chunk", type=int, default=256, help="queries of the prefill rows")
    a = ap.parse_args()
    arms = {"float32 scores (now)": attention, "bf16 scores (before)": bf16_scores}
    scale = D**-0.5
    print("| context | quantized from | queries | arm | max abs error vs float64 | ms per call (median) |")
    print("|---|---|---|---|---|---|")
    for context in [int(x) for x in a.contexts.split(",")]:
        for start in (0, a.start):
            quant = KVQuant(8, 32, start)
            cache, k, v = filled(context, quant)
            fetched = (cache.keys[..., : cache.fp_len, :] if cache.fp_len else None, cache.qkeys)
            fetched_v = (cache.values[..., : cache.fp_len, :] if cache.fp_len else None, cache.qvalues)
            for L in (1, a.chunk):
                q = (3 * mx.random.normal((1, H, L, D))).astype(mx.bfloat16)  # scores of a few units
                mask = "causal" if L > 1 else None
                ref = reference(q, k, v, quant, scale)[:, :, -L:] if L == 1 else None
                times = {name: [] for name in arms}
                for r in range(a.rounds + 1):  # round 0 warms up
                    for name in list(arms)[:: 1 if r % 2 else -1]:
                        t0 = time.perf_counter()
                        out = arms[name](q, fetched, fetched_v, scale, mask, quant)
                        mx.eval(out)
                        if r:
                            times[name].append(time.perf_counter() - t0)
                        elif ref is not None:
                            times[name + "err"] = np.abs(np.array(out.astype(mx.float32)) - ref).max()
                for name in arms:
                    err = times.get(name + "err")
                    print(
                        f"| {context} | {start} | {L} | {name} | {'-' if err is None else f'{err:.4f}'} | "
                        f"{1e3 * median(times[name]):.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
