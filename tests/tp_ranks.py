"""What each rank computes in the tensor-parallel tests; run as

    mlx.launch --backend ring -n 2 -- python tests/tp_ranks.py OUT_DIR PATH:KIND...

(every rank writes OUT_DIR/rank{R}.json) or called in one process for the reference; with
`--die PATH` rank 1 kills itself mid-generation and rank 0 must report it.
`results(path, group)` is the same code in both cases, so the test compares like with like.
"""

import json
import os
import resource
import signal
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_step35 import load, make_sampler, stream_generate
from mlx_step35.cache import FullKVCache
from mlx_step35.distributed import PeerLost, exit_when_terminated, peer_errors, world
from mlx_step35.draft_policy import AutoDraft
from mlx_step35.follow import follow, request_kwargs
from mlx_step35.generation import generate_step
from mlx_step35.lockstep import share_request
from mlx_step35.speculative import SpecStats

PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 500, size=12)]
MAX_TOKENS = 16  # with the 12-token prompt, past three of the tests' sliding windows of 8
DRAFTS = (None, 1, 2, 3, "auto")
# checkpoint spec suffix -> load() arguments: float32 as stored, quantized on load (group 32),
# or (no suffix) a conversion, loaded as converted
LOAD_ARGS = {
    "f32": dict(quantize=False, dtype="float32"),
    "q32": dict(q_group_size=32, dtype="float32"),
    "conv": dict(dtype="float32"),
}


def scattered_auto(rank: int):
    """AutoDraft.choose as if each rank measured different timings: depths 0..3, per rank."""
    calls = [0]

    def choose(self):
        calls[0] += 1
        return (calls[0] + rank) % (self.K + 1)

    return choose


GATE = 0.25  # a confidence gate that stops some of the f32 checkpoint's chains, not all


# Quantized KV: 8 bits in groups of 32 (the q32 checkpoint's head_dim), from position 6 on,
# so the prompt's prefill runs both parts and every decoded token reads quantized positions.
KV = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=6)


def tokens(model, num_draft, sampler=None, seed=None, gate=0.0, stats=None, **kv):
    if seed is not None:
        mx.random.seed(seed)
    gen = generate_step(
        model,
        PROMPT,
        max_tokens=MAX_TOKENS,
        sampler=sampler,
        draft_mtp=num_draft is not None,
        num_draft=num_draft or "auto",
        draft_min_confidence=gate,
        stats=stats,
        **kv,
    )
    return [t for t, _, _ in gen]


def _full_caches(model):
    """Spy on the model's cache factories: the list gets every full-attention cache that
    generation makes (trunk, then MTP blocks), as made."""
    made = []
    for name in ("make_cache", "make_mtp_cache"):
        orig = getattr(model, name)

        def spy(*a, _orig=orig, **k):
            caches = _orig(*a, **k)
            made.extend(c for c in caches if isinstance(c, FullKVCache))
            return caches

        setattr(model, name, spy)
    return made


def _kv_state(cache: FullKVCache, quant) -> dict:
    """A full-attention cache's entries as float lists: 16-bit ones and the dequantized rest."""
    fp = cache.fp_len
    keys = cache.keys[..., :fp, :] if fp else None
    deq = [
        mx.dequantize(*(a[..., : cache.q_len, :] for a in t), group_size=quant.group_size, bits=quant.bits)
        for t in (cache.qkeys, cache.qvalues)
    ]
    return {
        "fp_len": fp,
        "q_len": cache.q_len,
        "fp_keys": None if keys is None else np.array(keys).tolist(),
        "q_keys": np.array(deq[0]).tolist(),
        "q_values": np.array(deq[1]).tolist(),
        "max_scale": float(max(mx.max(t[1]).item() for t in (cache.qkeys, cache.qvalues))),
    }


def kv_results(model) -> dict:
    """Greedy generation with KV, plain and drafting at depth 2, and the full-attention
    caches each run left (what this process holds of them)."""
    out = {}
    for n in (None, 2):
        made = _full_caches(model)
        try:
            out[str(n)] = {"tokens": tokens(model, n, **KV)}
        finally:
            del model.make_cache, model.make_mtp_cache  # the class's own again
        quant = made[0].quant
        out[str(n)]["caches"] = [_kv_state(c, quant) for c in made]
    return out


def loaded(path, group=None, **load_args):
    """The model, its parameter bytes by name, and the process's peak RSS (KiB) after loading."""
    model, _ = load(path, group=group, **load_args)
    params = {k: v.nbytes for k, v in tree_flatten(model.parameters())}
    return model, params, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def results(path, group=None, full=True, kv=False, **load_args) -> dict:
    rank = group.rank() if group is not None else 0
    model, params, _ = loaded(path, group, **load_args)
    ids = mx.array([PROMPT + PROMPT[:6]])
    out = {
        "logits": np.array(model(ids)[0]).tolist(),
        "mtp_logits": [np.array(x[0]).tolist() for x in model.mtp_logits(ids)],
        "param_bytes": params,
        "merged": sorted(n for n, m in model.named_modules() if getattr(m, "merged", None) is not None),
    }
    orig = AutoDraft.choose
    AutoDraft.choose = scattered_auto(rank)
    try:
        out["greedy"] = {str(n): tokens(model, n) for n in (DRAFTS if full else (None, "auto"))}
    finally:
        AutoDraft.choose = orig
    if kv:
        out["kv"] = kv_results(model)
    if full:
        stats = SpecStats()  # gated: rank 0's verdicts, so every rank cuts the same chains
        out["greedy"]["3-gated"] = tokens(model, 3, gate=GATE, stats=stats)
        out["gated_steps"] = [stats.gated, stats.verify_steps]
        sampler = make_sampler(temp=1.0, top_p=0.95)
        out["sampled"] = {str(n): tokens(model, n, sampler, seed=11) for n in (None, 2)}
        out["sampled"]["2-gated"] = tokens(model, 2, sampler, seed=11, gate=GATE)
    return out


REQUESTS = [
    {"prompt": PROMPT, "max_tokens": 10, "draft_mtp": True, "num_draft": 2},
    {"prompt": PROMPT[:5], "max_tokens": 8, "sampler": {"temp": 0.8}, "seed": 3, "repetition_penalty": 1.2},
]


def serve(path, group=None):
    """Rank 0 shares REQUESTS and runs them (the server's side); the others follow."""
    model, tokenizer = load(path, group=group, **LOAD_ARGS["f32"])
    if group is not None and group.rank() != 0:
        return {"served": follow(model, tokenizer)}
    texts = []
    for request in REQUESTS:
        request = share_request(model, request)
        texts.append("".join(r.text for r in stream_generate(model, tokenizer, **request_kwargs(request))))
    share_request(model, None)
    return {"texts": texts}


def die_midway(path, group):
    """Rank 1 is killed after a few tokens; rank 0 must stop with a clear message: its own
    (the backend's error) or, blocked in a collective, when mlx.launch terminates it."""
    exit_when_terminated(f"rank {group.rank()}: stopped, another rank exited")
    model, _ = load(path, group=group, **LOAD_ARGS["f32"])
    try:
        with peer_errors(group.rank()):
            for i, _ in enumerate(generate_step(model, PROMPT, max_tokens=100_000)):
                if i == 5 and group.rank() == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
    except PeerLost as e:
        print(e, flush=True)
        sys.exit(3)
    print("finished without noticing the lost rank", flush=True)


def main():
    """OUT_DIR SPEC...: SPEC is PATH:KIND (KIND: a LOAD_ARGS key; `rss` loads only, first,
    for the peak RSS; `full`: f32 with every draft depth and sampling); with several ranks,
    then the lost-rank check on the last checkpoint (or only that: `--die PATH`)."""
    out, *specs = sys.argv[1:]
    group = world()
    if out == "--die":
        return die_midway(specs[0], group)
    rank = group.rank() if group else 0
    res = {}
    path = None
    for spec in specs:
        path, _, kind = spec.rpartition(":")
        if kind == "rss":
            _, params, peak = loaded(path, group, quantize=False)
            res["rss"] = {"param_bytes": params, "peak_rss_load": peak}
        else:
            full = kind == "full"
            kv = kind == "q32"  # head_dim 32: quantized KV in groups of 32 fits
            res[spec] = results(path, group, full, kv, **LOAD_ARGS["f32" if full else kind])
            if full:
                res["serve"] = serve(path, group)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    if group is not None:  # last: the lost-rank check ends the run
        die_midway(path, group)


if __name__ == "__main__":
    main()
