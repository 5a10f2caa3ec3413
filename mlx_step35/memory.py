"""Memory on a Mac: the wired limit held while generating, how often MLX's buffer cache is
cleared, and the pre-flight that says before loading whether a model fits and what to set.

Metal answers `mx.device_info()` with `memory_size` and `max_recommended_working_set_size`
(the GPU's share, raised by `sudo sysctl iogpu.wired_limit_mb=N`); the CPU backend answers
neither, so the wired-limit part is skipped there. Nothing here prints: `assess` returns a
`Preflight` whose `text()` the CLIs print and the API puts in a warning or an error.
"""

import math
import os
import threading
import warnings
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .cache import KVQuant

GIB = 1 << 30  # sizes are printed in GiB, as Apple counts a Mac's memory; the sysctl takes MiB
MIB = 1 << 20
DECODE_CLEAR_EVERY = 256  # tokens between buffer-cache clears while decoding (as mlx-lm)
# Allowance (not measured) for prefill activations, logits and MLX's buffer cache: a quarter of
# the weights, at most this.
HEADROOM = 4 << 30
OS_RESERVE = 8 << 30  # left to macOS when the wired limit is raised
KV_SLACK = 4  # rewindable tokens of the sliding caches when drafting 3 tokens (MAX_DRAFT + 1)


class InsufficientMemoryError(ValueError):
    """The model certainly cannot fit in this machine's memory; the message says what would."""


class MemoryWarning(UserWarning):
    """The model does not fit the GPU's working set as configured; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Wired limit


_lock = threading.Lock()
_holders = 0
_saved: Optional[int] = None  # the limit to restore when the last holder leaves


@contextmanager
def wired_limit(model=None, streams: Optional[List] = None):
    """Raise MLX's wired limit to the GPU's recommended working set while inside, so macOS
    keeps the weights resident, as mlx-lm's `wired_limit` does; restore it on leaving (also
    on an exception or a generator closed early), after synchronising `streams`.

    Reference-counted across threads: a server can hold it for its whole life while each
    generation enters it too, and the limit is restored only when the last holder leaves.
    No-op on the CPU backend. Warns when `model` is over 90% of the recommended size.
    """
    global _holders, _saved
    with _lock:
        first = _holders == 0
        if first:
            _saved = maybe_set_recommended_wired_limit()  # None: no Metal device
        _holders += 1
        raised = _saved is not None
    if first and raised and model is not None:
        _warn_if_close(model)
    try:
        yield
    finally:
        if raised and streams:  # the limit must not change under a running evaluation
            for s in streams:
                mx.synchronize(s)
        elif raised:
            mx.synchronize()
        with _lock:
            _holders -= 1
            if _holders == 0 and _saved is not None:
                mx.set_wired_limit(_saved)
                _saved = None


def _warn_if_close(model):
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rec = mx.device_info().get("max_recommended_working_set_size") or 0
    if size > 0.9 * rec:
        warnings.warn(
            f"the model takes {gb(size)}, close to or over the GPU's recommended working set "
            f"({gb(rec)}): decoding can be slow or stall; "
            f"{_close_fix(size + headroom(size), _total_memory())}",
            MemoryWarning,
            stacklevel=4,
        )


def gb(b: int) -> str:
    return f"{b / GIB:.1f} GiB" if b >= 0.1 * GIB else f"{b / MIB:.1f} MiB"


def _close_fix(need: int, total: int) -> str:
    if need <= total - OS_RESERVE:
        return wired_fix(need, total)
    return "this Mac's memory cannot hold it with macOS: use fewer bits (--q-bits)"


def headroom(resident: int) -> int:
    return min(HEADROOM, resident // 4)


def wired_fix(need: int, total: int) -> str:
    """The sysctl that lets the GPU wire `need` bytes (in whole GiB, at most total - OS_RESERVE)."""
    mb = min(math.ceil(need / GIB) * 1024, (total - OS_RESERVE) // MIB)
    return f"sudo sysctl iogpu.wired_limit_mb={mb}"


def clearing_cache(items: Iterator, every: int, first: int = 1) -> Iterator:
    """Yield from `items`, clearing MLX's buffer cache after item number `every`, 2 * `every`,
    ... (numbered from `first`), so freed buffers do not pile up on top of the model, as
    mlx-lm's decoding loop does. Closing this closes `items` (their cleanup runs)."""
    with closing(items):
        for n, item in enumerate(items, start=first):
            yield item
            if n % every == 0:
                mx.clear_cache()


# ---------------------------------------------------------------------------------------------
# What a load needs


@dataclass
class Needs:
    """Bytes a generation needs resident. `weights` includes the MTP blocks if loaded."""

    weights: int
    mtp: int
    experts: int  # routed experts, part of `weights` (or the expert cache standing in for them)
    kv_cache: int
    kv_per_token: int  # growth of the full-attention layers' caches per token of context
    context: int
    expert_cache: int = 0  # hook for issue 12: an expert cache replaces resident experts
    headroom: int = HEADROOM

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.expert_cache + self.headroom


def param_bytes(model, dtype=mx.bfloat16) -> Dict[str, int]:
    """Bytes of every parameter of `model` once loaded, without materialising anything.
    A lazily built model holds float32 stand-ins: they count at `dtype` (the dtype loading
    casts to; quantization scales and biases come out in it too), except what
    `model.cast_predicate` keeps in float32 (the router bias)."""
    keep = model.cast_predicate
    return {
        name: w.size * (dtype.size if w.dtype == mx.float32 and keep(name) else w.dtype.size)
        for name, w in tree_flatten(model.parameters())
    }


def weight_bytes(model, dtype=mx.bfloat16) -> Dict[str, int]:
    """Total, routed-expert and MTP-block bytes of `model`'s parameters (see `param_bytes`)."""
    sizes = param_bytes(model, dtype)
    return {
        "total": sum(sizes.values()),
        "experts": sum(b for n, b in sizes.items() if ".switch_mlp." in n),
        "mtp": sum(b for n, b in sizes.items() if n.startswith("mtp.")),
    }


def conversion_bytes(model, source_shapes: Dict[str, tuple], dtype, max_shard_bytes: int) -> int:
    """Working memory of `convert`: the output shard being filled, the largest checkpoint
    tensor as read (bf16), and the largest output module twice (its quantized slices and
    their concatenation). `model` is built lazily as the conversion writes it."""
    modules: Dict[str, int] = {}
    for name, b in param_bytes(model, dtype).items():
        module = name.rpartition(".")[0]
        modules[module] = modules.get(module, 0) + b
    largest_read = max(math.prod(s) for s in source_shapes.values()) * 2
    return max_shard_bytes + largest_read + 2 * max(modules.values())


def recipe_weights(args, recipe, *, mtp: bool = True, dtype=mx.bfloat16) -> Dict[str, int]:
    """`weight_bytes` of the model `args` describes, quantized by `recipe` (None: unquantized),
    built lazily: nothing is allocated."""
    import mlx.nn as nn

    from .model import Model

    model = Model(args, mtp=mtp)
    if recipe:
        nn.quantize(model, class_predicate=lambda p, m: recipe.params(p, m) or False)
    return weight_bytes(model, dtype)


def _kv_token_bytes(args, layer: int, itemsize: int) -> int:
    _, kv_heads = args.heads(layer)
    return 2 * kv_heads * args.head_dim * itemsize  # keys and values


def kv_bytes(args, context: int, *, draft: bool, itemsize: int = 2, kv: Optional[KVQuant] = None) -> tuple:
    """(bytes, bytes per further token) of the KV caches for `context` tokens: full-attention
    layers grow per token (mlx-lm's KVCache allocates in steps of KVCache.step), sliding
    layers stop at the window (plus the rewind slack); the MTP blocks' caches when drafting.
    With `kv`, full-attention positions from kv.start on take kv.bytes_per_value per value
    (packed values, scales and biases), also allocated in steps."""
    full_len = _steps(context)
    quantized = 0 if kv is None else _steps(max(0, context - kv.start))
    if kv is not None:
        full_len = _steps(min(context, kv.start))
    sliding_len = min(_steps(context), args.sliding_window - 1 + KV_SLACK)
    layers = list(range(args.num_hidden_layers))
    if draft:
        layers += [args.num_hidden_layers + j for j in range(args.num_nextn_predict_layers)]
    total = per_token = 0
    for i in layers:
        b = _kv_token_bytes(args, i, itemsize)
        if args.is_sliding(i):
            total += b * sliding_len
            continue
        bq = 0 if kv is None else round(b / itemsize * kv.bytes_per_value(itemsize))
        total += b * full_len + bq * quantized
        per_token += b if kv is None else bq  # the growth of a long context
    return total, per_token


def estimate(
    model,
    args,
    *,
    context: int,
    draft: bool,
    dtype=mx.bfloat16,
    expert_cache_gb: Optional[float] = None,
    kv_quant: Optional[KVQuant] = None,
) -> Needs:
    """What generating `context` tokens with `model` (built lazily, as loading will fill it)
    needs. `expert_cache_gb`: with an expert cache (issue 12) only that many GB (1e9 bytes)
    of routed experts are resident instead of all of them. `kv_quant`: the KV format."""
    w = weight_bytes(model, dtype)
    kv, per_token = kv_bytes(args, context, draft=draft, itemsize=dtype.size, kv=kv_quant)
    weights, cache = w["total"], 0
    if expert_cache_gb is not None:
        weights, cache = weights - w["experts"], int(expert_cache_gb * 1e9)
    return Needs(weights, w["mtp"], w["experts"], kv, per_token, context, cache, headroom(weights + cache))


# ---------------------------------------------------------------------------------------------
# The verdict


@dataclass
class Device:
    memory: int  # bytes of unified memory
    recommended: Optional[int]  # the GPU's recommended working set; None without Metal

    @classmethod
    def current(cls) -> "Device":
        info = mx.device_info()
        return cls(info.get("memory_size") or _total_memory(), info.get("max_recommended_working_set_size"))


def _total_memory() -> int:
    info = mx.device_info()
    if info.get("memory_size"):
        return info["memory_size"]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Preflight:
    needs: Needs
    device: Device
    verdict: str  # "fits", "raise-wired-limit", "tight" (over what macOS can spare), "cannot-fit"
    fixes: List[str] = field(default_factory=list)

    @property
    def refuse(self) -> bool:
        return self.verdict == "cannot-fit"

    @property
    def ok(self) -> bool:
        return self.verdict == "fits"

    def text(self) -> str:
        n, d = self.needs, self.device
        lines = [
            f"memory pre-flight: needs {gb(n.total)} = weights {gb(n.weights)}"
            + (f" (MTP blocks {gb(n.mtp)})" if n.mtp else "")
            + (f" + expert cache {gb(n.expert_cache)}" if n.expert_cache else "")
            + f" + KV cache {gb(n.kv_cache)} for {n.context} tokens + {gb(n.headroom)} headroom",
        ]
        if d.recommended is None:
            lines.append(f"  CPU backend (no Metal): no wired limit to raise; {gb(d.memory)} of memory")
        else:
            lines.append(f"  this Mac: {gb(d.memory)}, GPU recommended working set {gb(d.recommended)}")
        lines.append("  " + VERDICTS[self.verdict])
        lines += [f"  {'fix' if i == 0 else 'or'}: {f}" for i, f in enumerate(self.fixes)]
        return "\n".join(lines)


VERDICTS = {
    "fits": "fits",
    "raise-wired-limit": "does not fit in the GPU's working set: raise the wired limit (resets at reboot)",
    "tight": "does not fit in what macOS can spare (it keeps about 8 GiB): expect swapping or stalls",
    "cannot-fit": "cannot fit: it needs more than the machine's total memory",
}


def assess(needs: Needs, device: Device, smaller: Optional[Dict[int, int]] = None) -> Preflight:
    """Compare `needs` with `device`. `smaller`: {bits: weight bytes} of lower-bit variants,
    offered as a fix when one fits. Refuses (verdict "cannot-fit") only when the weights and
    caches alone exceed the machine's memory."""
    need = needs.total
    if device.recommended is None:  # CPU backend: only the machine's memory counts
        verdict = "fits" if need <= device.memory else "cannot-fit"
    elif need <= device.recommended:
        verdict = "fits"
    elif need - needs.headroom > device.memory:
        verdict = "cannot-fit"
    elif need <= device.memory - OS_RESERVE:
        verdict = "raise-wired-limit"
    else:
        verdict = "tight"
    if verdict == "fits":
        return Preflight(needs, device, verdict)
    fixes = [wired_fix(need, device.memory)] if verdict == "raise-wired-limit" else []
    others = need - needs.weights
    for bits, weights in sorted((smaller or {}).items(), reverse=True):
        if _fit(others + weights, device):
            fixes.append(
                f"{bits}-bit weights ({gb(weights)}): --q-bits {bits} (for a conversion: "
                f"convert.py -q --q-bits {bits}){_fit(others + weights, device)}"
            )
            break
    cache_gb = _expert_cache_fit(needs, device)
    if cache_gb:
        fixes.append(
            f"--expert-cache-gb {cache_gb} (a quantized conversion: the routed experts stay on disk "
            "and are read on demand; slower)"
        )
    tokens = _max_context(needs, device)
    if tokens:
        at = needs.total - needs.kv_per_token * (_steps(needs.context) - tokens)
        fixes.append(f"a shorter context: at most {tokens} tokens (prompt + max tokens){_fit(at, device)}")
    return Preflight(needs, device, verdict, fixes)


def _expert_cache_fit(needs: Needs, device: Device) -> int:
    """GB (1e9) of expert cache that fits beside everything else without raising the wired
    limit (issue 12's `expert_cache_gb`); 0 when experts are already cached or under 4 GB fit."""
    if needs.expert_cache or not needs.experts:
        return 0
    budget = device.recommended if device.recommended is not None else device.memory - OS_RESERVE
    room = budget - (needs.total - needs.experts)
    return int(min(room, needs.experts) // 1e9) if room >= 4e9 else 0


def _max_context(needs: Needs, device: Device) -> int:
    """The longest context (a multiple of KVCache.step) that fits without raising the wired
    limit, else with it raised; 0 when shortening the context is not enough."""
    step = KVCache.step
    if not needs.kv_per_token:
        return 0
    fixed = needs.total - needs.kv_per_token * _steps(needs.context)
    budgets = [device.memory] if device.recommended is None else [device.recommended]
    budgets += [] if device.recommended is None else [device.memory - OS_RESERVE]
    for budget in budgets:
        tokens = (budget - fixed) // needs.kv_per_token // step * step
        if step <= tokens < needs.context:
            return tokens
    return 0


def _steps(tokens: int) -> int:
    """Tokens a full-attention cache allocates for `tokens` (mlx-lm's KVCache grows by `step`)."""
    return math.ceil(tokens / KVCache.step) * KVCache.step


def _fit(need: int, device: Device) -> str:
    """'' when `need` does not fit; else how it fits (as is, or with the wired limit raised)."""
    if device.recommended is None:
        return " fits" if need <= device.memory else ""
    if need <= device.recommended:
        return " fits as is"
    if need <= device.memory - OS_RESERVE:
        return f" fits with {wired_fix(need, device.memory)}"
    return ""
