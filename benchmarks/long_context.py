"""Long prompts with 16-bit vs 8-bit vs 4-bit full-attention KV, measured on this machine.

Speed: at each context length, the prefill rate of the last 1024 prompt tokens, the decode
rate after them and peak memory, the three KV formats interleaved round by round (order
rotated), medians. The caches of the context before those tokens hold random 16-bit entries
(attention's cost does not see the values), and each format's caches are made from them (same
sizes and layout as a run in that format): a shared 2-core machine could not afford a real
32K prefill per format. Quality: one teacher-forced pass
over a long text per format (prefill chunks as generate_step runs them): mean cross-entropy,
and against the 16-bit KV's distributions the mean KL divergence, the largest |d logprob| of
the actual next token and top-1 agreement.

The model is the bundled demo; when its config allows fewer positions than asked, a copy with
max_position_embeddings raised runs (its weights unchanged). The text is this repository's
own Python sources (not in the demo's training corpus), repeated if too short.

    python benchmarks/long_context.py [--contexts 4096,16384,32768] [--rounds 2] [--decode 32]
        [--quality 16384] [--kv-group-size 32] [--quantized-kv-start 0]
    python benchmarks/long_context.py --skip-speed --quality 4096 [--metal-like] [--bf16-scores]

--metal-like: 16-bit attention computed in float32 and rounded to the model's dtype, as Metal's
fused kernel does (MLX's CPU fallback rounds its scores to bf16). --bf16-scores: the quantized
attention as before float32 scores (kv_scores.bf16_scores), for the A/B.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import ROOT, demo_model, median
from kv_scores import bf16_scores

import mlx_step35.model
from mlx_step35 import load
from mlx_step35.cache import FullKVCache, KVQuant, attention
from mlx_step35.speculative import PREFILL_STEP

ARMS = (None, 8, 4)  # kv_bits
CHUNK = 1024  # prompt tokens timed at each context


def model_for(context: int, tmp: Path) -> Path:
    src = demo_model()
    cfg = json.loads((src / "config.json").read_text())
    if cfg["max_position_embeddings"] >= context:
        return src
    dst = tmp / "demo-long"
    shutil.copytree(src, dst)
    cfg["max_position_embeddings"] = max(65536, context)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def long_text_tokens(tokenizer, n: int):
    files = sorted(
        p for d in ("mlx_step35", "tests", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")
    )
    ids = tokenizer.encode("\n\n".join(p.read_text() for p in files))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def converted(cache, bits, a):
    """The 16-bit caches as a run in format `bits` holds them (same layout and sizes; values
    quantized from the 16-bit run's, which only timing and memory need), copied so that the
    measured step leaves `cache` as it was."""
    out = []
    kv = None if bits is None else KVQuant(bits, a.kv_group_size, a.quantized_kv_start)
    for c in cache:
        if kv is None or not isinstance(c, FullKVCache):
            out.append(c.copy())
            continue
        new = FullKVCache(kv)
        new.offset = c.offset
        if new.fp_len:
            new.keys, new.values = c.keys[..., : new.fp_len, :], c.values[..., : new.fp_len, :]
        if new.q_len:
            q = dict(group_size=kv.group_size, bits=kv.bits)
            new.qkeys = tuple(mx.quantize(c.keys[..., new.fp_len : c.offset, :], **q))
            new.qvalues = tuple(mx.quantize(c.values[..., new.fp_len : c.offset, :], **q))
        out.append(new)
    mx.eval([x.arrays() for x in out])
    return out


def measure(model, cache, chunk, bits, a):
    """(prefill tok/s of `chunk` after the cache's context, decode tok/s of a.decode tokens
    after it, peak GB, full-attention KV MB after it)."""
    arm = converted(cache, bits, a)
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    logits = model.logits(model.hidden(mx.array([chunk]), arm)[:, -1])
    mx.eval(logits, [c.arrays() for c in arm])
    t1 = time.perf_counter()

    def step(y):
        return model(y[None], arm)[:, -1].argmax(-1)

    nxt = step(logits.argmax(-1))
    mx.async_eval(nxt)
    for i in range(a.decode):  # pipelined, as plain decoding
        y = nxt
        if i + 1 < a.decode:
            nxt = step(y)
            mx.async_eval(nxt)
        y.item()
    t2 = time.perf_counter()
    kv = sum(c.nbytes for c in arm if isinstance(c, FullKVCache))
    return len(chunk) / (t1 - t0), a.decode / (t2 - t1), mx.get_peak_memory() / 1e9, kv / 1e6


def synthetic_cache(model, n: int):
    """16-bit caches holding n random entries per layer (sliding ones keep their window):
    attention's cost does not depend on the values, and a real n-token prefill per context
    was more than this shared machine could afford."""
    cache = model.make_cache(slack=1)
    dtype = model.model.norm.weight.dtype
    for layer, c in zip(model.layers, cache):
        shape = (1, layer.self_attn.num_kv_heads, n, model.args.head_dim)
        c.update_and_fetch(mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype))
    mx.eval([c.arrays() for c in cache])
    return cache


def speed(model, ids, a):
    """At each context C: caches of C - a.chunk tokens (synthetic, 16-bit, shared), then per
    format (interleaved, order rotated each round) the next a.chunk prompt tokens (prefill rate
    at context C) and a.decode greedy tokens after them (decode rate)."""
    results = {}
    for context in a.contexts:
        done = context - a.chunk
        cache = synthetic_cache(model, done)
        base = sum(c.nbytes for c in cache) / 1e6
        for r in range(a.rounds):
            for bits in ARMS[r % 3 :] + ARMS[: r % 3]:
                row = measure(model, cache, ids[done:context], bits, a)
                results.setdefault((context, bits), []).append(row)
                print(f"  measured: context {context}, {bits or 16}-bit, round {r}: {row}", flush=True)
        results[context] = base
        del cache
    print(
        f"Speed: the {a.chunk} prompt tokens ending at each context (prefill tok/s there), then {a.decode} "
        f"greedy tokens (decode tok/s); {a.rounds} round(s), formats interleaved, medians; KV quantized "
        f"from position {a.quantized_kv_start} (group {a.kv_group_size}). Peak memory includes the weights "
        "and the shared 16-bit prefix caches each format's copy is made from (the last column)\n"
    )
    print("| context | KV | prefill tok/s | decode tok/s | peak memory GB | full-attention KV MB | base MB |")
    print("|---|---|---|---|---|---|---|")
    for context in a.contexts:
        for bits in ARMS:
            rows = results[context, bits]
            cols = [median([row[i] for row in rows]) for i in range(4)]
            print(
                f"| {context} | {bits or 16}-bit | {cols[0]:.0f} | {cols[1]:.1f} | {cols[2]:.3f} | {cols[3]:.2f} "
                f"| {results[context]:.1f} |"
            )


def teacher_forced(model, ids, bits, a):
    """Log-probabilities [n - 1, V] (float32) of every next token, prefilled in chunks."""
    kv = None if bits is None else KVQuant(bits, a.kv_group_size, a.quantized_kv_start)
    cache = model.make_cache(slack=1, kv=kv)
    out = []
    for s in range(0, len(ids) - 1, PREFILL_STEP):
        chunk = mx.array([ids[s : min(s + PREFILL_STEP, len(ids) - 1)]])
        logits = model(chunk, cache)[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(np.array(lp))
    return np.concatenate(out)


def quality(model, ids, a):
    ids = ids[: a.quality]
    target = np.array(ids[1:])
    ref = teacher_forced(model, ids, None, a)
    rows = np.arange(len(target))
    print(
        f"\nQuality: teacher-forced over {len(ids)} tokens of this repository's Python sources; KV "
        f"quantized from position {a.quantized_kv_start} (group {a.kv_group_size}); model dtype "
        f"{model.model.norm.weight.dtype}\n"
    )
    print(
        "| KV | CE (nats/token) | mean KL(16-bit ‖ this) | max abs d logprob of the next token | top-1 = 16-bit's |"
    )
    print("|---|---|---|---|---|")
    for bits in ARMS:
        lp = ref if bits is None else teacher_forced(model, ids, bits, a)
        ce = -lp[rows, target].mean()
        kl = (np.exp(ref) * (ref - lp)).sum(-1).mean()
        dmax = np.abs(lp[rows, target] - ref[rows, target]).max()
        agree = (lp.argmax(-1) == ref.argmax(-1)).mean()
        print(f"| {bits or 16}-bit | {ce:.4f} | {kl:.2e} | {dmax:.2e} | {agree:.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--decode", type=int, default=16, help="tokens decoded after each prompt")
    ap.add_argument("--quality", type=int, default=16384, help="tokens of the teacher-forced text (0: skip)")
    ap.add_argument("--kv-group-size", type=int, default=32, help="the demo's head_dim is 32")
    ap.add_argument("--quantized-kv-start", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="prompt tokens timed at each context")
    ap.add_argument(
        "--metal-like", action="store_true", help="16-bit attention in float32, as Metal's kernel"
    )
    ap.add_argument("--bf16-scores", action="store_true", help="quantized attention as before float32 scores")
    a = ap.parse_args()
    if a.metal_like:
        fused = mx.fast.scaled_dot_product_attention

        def fused_f32(q, k, v, **kw):
            return fused(*(x.astype(mx.float32) for x in (q, k, v)), **kw).astype(q.dtype)

        mx.fast.scaled_dot_product_attention = fused_f32
    if a.bf16_scores:

        def before(queries, keys, values, scale, mask=None, quant=None):
            if isinstance(keys, tuple) and quant.start == 0:  # the A/B covers start 0 only
                return bf16_scores(queries, keys, values, scale, mask, quant)
            if isinstance(keys, tuple):
                raise SystemExit("--bf16-scores: with --quantized-kv-start 0 only")
            return attention(queries, keys, values, scale, mask, quant)

        mlx_step35.model.attention = before
    a.contexts = [int(x) for x in a.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = model_for(max(a.contexts + [a.quality]) + a.decode, Path(tmp))
        model, tokenizer = load(path)
        ids = long_text_tokens(tokenizer, max(a.contexts + [a.quality]))
        print(f"Model: {path.name} (max_position_embeddings {model.args.max_position_embeddings})")
        if not a.skip_speed:
            speed(model, ids, a)
        if a.quality:
            quality(model, ids, a)


if __name__ == "__main__":
    main()
