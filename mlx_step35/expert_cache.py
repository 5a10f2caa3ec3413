"""Routed experts streamed from disk through a bounded cache of expert slots, exactly.

Everything but the routed experts stays resident. Each MoE layer's `switch_mlp` becomes a
`CachedSwitchGLU`: a fixed pool of expert slots (the same quantized arrays mlx-lm's
SwitchGLU uses, with `slots` rows instead of `num_experts`), filled on demand by parallel
`pread`s of one expert's rows of each stacked tensor of our conversion (safetensors stores
[E, ...] row-major, so expert e is one contiguous byte range per tensor), and `gather_qmm`
over the pool with the routed expert ids remapped to slots. A pass that touches more experts
than the pool holds runs over groups of experts that fit; no expert is ever skipped, so the
output is that of the fully resident model. Entry points: `plan_expert_cache` (pre-flight,
reads headers only) and `attach_expert_cache` (used by `load(..., expert_cache_gb=X)`);
traces of the routing for tuning are in `expert_trace`.
"""

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from .config import load_config, parse_config
from .safetensors_io import DTYPES, CheckpointError, ShardReader
from .weights import checkpoint_keys, has_mtp_weights, to_internal

GB = 1e9
PROJS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
READ_THREADS = 16  # reads in flight: 8+ reach full SSD bandwidth on recent Macs
POLICIES = ("lru", "lfu")
EXPERT_CACHE_POLICY = "lfu"  # the default: higher hit rates than lru on recorded traces (RESULTS.md)
LFU_DECAY = 0.95  # per pass: a frequency that forgets old routing within ~20 passes


@dataclass
class ExpertTensor:
    """Where one stacked tensor of one MoE layer lies on disk: expert e occupies bytes
    [offset + e * stride, offset + (e + 1) * stride) of `file`."""

    key: str
    file: Path
    offset: int
    stride: int
    shape: Tuple[int, ...]  # one expert's shape
    dtype: str  # safetensors dtype name


@dataclass
class ExpertCachePlan:
    """What `load(..., expert_cache_gb=X)` will keep resident and cache (from the headers)."""

    path: Path
    budget_bytes: int
    num_experts: int
    top_k: int
    layers: Dict[int, Dict[str, ExpertTensor]]  # MoE layer -> "gate_proj.weight" -> tensor
    expert_bytes: int  # one expert of one layer, all its tensors
    resident_bytes: int  # every other tensor
    min_slots: int  # one decoding step's working set in one layer
    slots: int = field(init=False)

    def __post_init__(self):
        per_slot = len(self.layers) * self.expert_bytes
        self.slots = min(self.num_experts, int(self.budget_bytes // per_slot))

    @property
    def cache_bytes(self) -> int:
        return self.slots * len(self.layers) * self.expert_bytes

    @property
    def min_budget_bytes(self) -> int:
        return self.min_slots * len(self.layers) * self.expert_bytes

    def read_bytes_per_token(self, hit_rate: float) -> float:
        """Bytes read from disk per token (one-token pass) at a given hit rate."""
        return (1 - hit_rate) * self.top_k * len(self.layers) * self.expert_bytes

    def describe(self) -> str:
        n, e = len(self.layers), self.expert_bytes
        reads = ", ".join(f"{self.read_bytes_per_token(h) / GB:.3g} GB at {h:.0%}" for h in (0.5, 0.7, 0.9))
        return "\n".join(
            [
                f"Resident (everything but the routed experts): {self.resident_bytes / GB:.3g} GB",
                f"Expert cache: {self.cache_bytes / GB:.3g} GB = {self.slots} of {self.num_experts} experts "
                f"x {n} MoE layers x {e / 1e6:.2f} MB "
                f"({self.slots / self.num_experts:.0%} of {self.num_experts * n * e / GB:.3g} GB of experts)",
                f"Projected disk reads per token by hit rate: {reads}",
            ]
        )


def _expert_tensors(path: Path, keys, readers, i: int, E: int) -> Dict[str, ExpertTensor]:
    out = {}
    for proj in PROJS:
        for part in PARTS:
            key = f"model.layers.{i}.mlp.switch_mlp.{proj}.{part}"
            if key not in keys:
                if part == "biases":
                    continue  # quantization modes without biases
                what = "tensor" if part == "weight" else "quantization scales"
                raise CheckpointError(
                    f"{path}: no {what} {key}: the expert cache streams experts from a quantized "
                    "MLX conversion (convert.py -q)"
                )
            f = keys[key]
            reader = readers[f]
            info = reader.tensors[key]
            shape = tuple(info["shape"])
            if len(shape) < 2 or shape[0] != E:
                raise CheckpointError(f"{f}: tensor {key} has shape {list(shape)}, expected [{E}, ...]")
            begin, end = info["data_offsets"]
            # safetensors data is row-major: the stacked tensor is E equal contiguous blocks
            out[f"{proj}.{part}"] = ExpertTensor(
                key, f, reader.data_start + begin, (end - begin) // E, shape[1:], info["dtype"]
            )
    return out


def plan_expert_cache(path, expert_cache_gb: float, mtp: bool = True) -> ExpertCachePlan:
    """Pre-flight of `load(path, expert_cache_gb=...)` from config.json and the shard headers
    (no tensor is read). Raises ValueError when the budget is below one decoding step's working
    set: the experts one verify pass (1 + the MTP blocks' drafts, top_k each) touches in a layer."""
    path = Path(path)
    if not expert_cache_gb or expert_cache_gb <= 0:
        raise ValueError(f"expert_cache_gb must be a positive number of GB, got {expert_cache_gb!r}")
    config = load_config(path)
    args = parse_config(config)
    keys = checkpoint_keys(path)
    E, k = args.moe_num_experts, args.moe_top_k
    readers = {f: ShardReader(f) for f in set(keys.values())}
    layers = {
        i: _expert_tensors(path, keys, readers, i, E) for i in range(args.num_hidden_layers) if args.is_moe(i)
    }
    if not layers:
        raise ValueError(f"{path}: the model has no MoE layers: nothing for an expert cache to hold")
    sizes = {i: sum(t.stride for t in ts.values()) for i, ts in layers.items()}
    if len(set(sizes.values())) != 1:
        raise CheckpointError(
            f"{path}: MoE layers store experts of different sizes: {sorted(set(sizes.values()))}"
        )
    expert = next(iter(sizes.values()))
    with_mtp = mtp and args.num_nextn_predict_layers > 0 and has_mtp_weights(keys, args, False)
    total = sum(
        readers[f].nbytes(key)
        for key, f in keys.items()
        if with_mtp or not (to_internal(key, args, False) or "").startswith("mtp.")
    )
    plan = ExpertCachePlan(
        path=path,
        budget_bytes=round(expert_cache_gb * GB),
        num_experts=E,
        top_k=k,
        layers=layers,
        expert_bytes=expert,
        resident_bytes=total - E * expert * len(layers),
        min_slots=min(E, k * (1 + (args.num_nextn_predict_layers if with_mtp else 0))),
    )
    if plan.slots < plan.min_slots:
        raise ValueError(
            f"--expert-cache-gb {expert_cache_gb:g} is below one decoding step's working set: "
            f"at least {plan.min_budget_bytes / GB:.3g} GB ({plan.min_slots} experts x {len(layers)} MoE "
            f"layers x {expert / 1e6:.3g} MB) is needed"
        )
    return plan


class SlotTable:
    """Which expert each slot of one layer's pool holds, and what to evict: bookkeeping only,
    so the replay benchmark runs the same policy without any I/O. Policies: "lru" evicts the
    least recently used slot; "lfu" the slot whose expert has the lowest decayed use count
    (ties: least recently used)."""

    def __init__(self, num_experts: int, slots: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.slot_of = np.full(num_experts, -1, np.int64)
        self.expert_in = np.full(slots, -1, np.int64)
        self.last_use = np.zeros(slots, np.int64)
        self.freq = np.zeros(num_experts)
        self.clock = 0
        self.hits = self.misses = 0

    @property
    def slots(self) -> int:
        return len(self.expert_in)

    def groups(self, experts) -> List[np.ndarray]:
        """A pass's distinct experts in groups that fit the pool, the cached ones first."""
        experts = np.asarray(experts, np.int64)
        cached = self.slot_of[experts] >= 0
        order = np.concatenate([experts[cached], experts[~cached]])
        return [order[s : s + self.slots] for s in range(0, len(order), self.slots)]

    def assign(self, experts) -> List[Tuple[int, int]]:
        """Give each of `experts` (distinct, at most `slots`) a slot; returns the (expert, slot)
        pairs to read, evicting only slots that this group does not use."""
        experts = np.asarray(experts, np.int64)
        start = self.clock + 1  # each use gets its own stamp, in the order given: hits, then misses
        self.clock += len(experts)
        self.freq *= LFU_DECAY
        self.freq[experts] += 1
        slots = self.slot_of[experts]
        hit = slots >= 0
        n_hit = int(hit.sum())
        self.last_use[slots[hit]] = start + np.arange(n_hit)
        missing = experts[~hit]
        self.hits += n_hit
        self.misses += len(missing)
        if not len(missing):
            return []
        free = np.flatnonzero(self.last_use < start)  # slots this group does not use
        held = self.expert_in[free]
        recency = np.where(held < 0, -1, self.last_use[free])  # empty slots go first
        if self.policy == "lru":
            order = np.argsort(recency, kind="stable")
        else:
            order = np.lexsort((recency, np.where(held < 0, -np.inf, self.freq[np.maximum(held, 0)])))
        victims = free[order[: len(missing)]]
        old = self.expert_in[victims]
        self.slot_of[old[old >= 0]] = -1
        self.expert_in[victims] = missing
        self.slot_of[missing] = victims
        self.last_use[victims] = start + n_hit + np.arange(len(missing))
        return list(zip(missing.tolist(), victims.tolist()))

    def forget(self, experts):
        """Mark experts as not cached (their slots' contents are not valid)."""
        for e in experts:
            s = self.slot_of[e]
            if s >= 0:
                self.expert_in[s] = -1
                self.slot_of[e] = -1


class ExpertReader:
    """Parallel `pread`s of expert byte ranges from open shard files, counting the bytes.
    Each batch checks that no file changed on disk since it was opened (size, mtime, inode),
    before and after reading, so a truncated or replaced shard is an error, never a token."""

    def __init__(self, files, threads: int = READ_THREADS):
        self.files = {}
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            self.files[f] = (fd, os.fstat(fd))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="expert-read")
        self.bytes_read = 0
        self._closer = weakref.finalize(self, _close_all, [fd for fd, _ in self.files.values()])

    def _check(self, files):
        for f in files:
            fd, st = self.files[f]
            now = os.fstat(fd)
            try:
                disk = os.stat(f)
            except FileNotFoundError:
                raise CheckpointError(f"{f}: removed while the model is running; reload the model") from None
            if (now.st_size, now.st_mtime_ns, disk.st_ino, disk.st_dev) != (
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                st.st_dev,
            ):
                raise CheckpointError(
                    f"{f}: changed on disk since the model was loaded (truncated, rewritten or "
                    "replaced); reload the model"
                )

    def read(self, jobs):
        """jobs: (file, offset, nbytes, dest uint8 array, stored dtype or None to copy as is)."""
        files = {j[0] for j in jobs}
        self._check(files)
        for fut in [self.pool.submit(self._pread, *j) for j in jobs]:
            fut.result()  # re-raises the first failure
        self._check(files)
        self.bytes_read += sum(j[2] for j in jobs)

    def _pread(self, file, offset, nbytes, dest, widen_from):
        fd = self.files[file][0]
        buf = memoryview(dest) if widen_from is None else memoryview(bytearray(nbytes))
        done = 0
        while done < nbytes:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [buf[done:]], offset + done)
            else:
                chunk = os.pread(fd, nbytes - done, offset + done)
                got = len(chunk)
                buf[done : done + got] = chunk
            if got == 0:
                raise CheckpointError(
                    f"{file}: truncated (an expert's bytes {offset}-{offset + nbytes} lie past the end "
                    "of the file); re-copy or reconvert this shard"
                )
            done += got
        if widen_from is not None:
            dest[:] = _widen(np.frombuffer(buf, np.uint8), widen_from).view(np.uint8)

    def close(self):
        self.pool.shutdown(wait=True)
        self._closer()  # closes the files once (also run when the reader is garbage-collected)
        self.files = {}


def _close_all(fds):
    for fd in fds:
        os.close(fd)


def _widen(raw: np.ndarray, stored: str) -> np.ndarray:
    """bf16 / f16 bytes -> float32 values (exact), as `astype(float32)` on load does."""
    if stored == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16).astype(np.float32)


class ExpertCache:
    """The slot pools of every MoE layer, their reader, and the counters."""

    def __init__(self, plan: ExpertCachePlan, policy: str = EXPERT_CACHE_POLICY, threads: int = READ_THREADS):
        self.plan = plan
        self.policy = policy
        files = {t.file for ts in plan.layers.values() for t in ts.values()}
        self.reader = ExpertReader(sorted(files), threads)
        self.tables: Dict[int, SlotTable] = {}
        self.grouped_passes = 0

    @property
    def expert_bytes(self) -> int:
        return self.plan.expert_bytes

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def hits(self) -> int:
        return sum(t.hits for t in self.tables.values())

    @property
    def misses(self) -> int:
        return sum(t.misses for t in self.tables.values())

    def stats(self) -> dict:
        h, m = self.hits, self.misses
        return dict(
            hits=h,
            misses=m,
            hit_rate=h / max(h + m, 1),
            bytes_read=self.bytes_read,
            grouped_passes=self.grouped_passes,
        )

    def summary(self, tokens: int) -> str:
        """One line of counters, with the bytes read per generated token (prompt included)."""
        s = self.stats()
        return (
            f"Expert cache: hit rate {s['hit_rate']:.1%} ({s['hits']} hits, {s['misses']} misses), "
            f"{s['bytes_read'] / 1e6:.1f} MB read ({s['bytes_read'] / 1e6 / max(tokens, 1):.2f} MB per "
            "generated token, prompt included)"
        )

    def close(self):
        self.reader.close()


class CachedSwitchGLU(SwitchGLU):
    """mlx-lm's quantized SwitchGLU over a pool of `slots` experts, filled on demand: called
    like the resident one, (x, expert ids [.., top_k]) -> [.., top_k, H], with the same result."""

    def __init__(self, base: SwitchGLU, layer: int, cache: ExpertCache, dtype: Optional[mx.Dtype]):
        super().__init__(1, 1, 1, activation=base.activation)  # shapes replaced below
        plan = cache.plan
        self.layer = layer
        self.cache = cache
        self.table = cache.tables[layer] = SlotTable(plan.num_experts, plan.slots, cache.policy)
        # Plain attributes, not module state (nn.Module would hold dicts as parameter trees).
        object.__setattr__(self, "tensors", plan.layers[layer])
        object.__setattr__(self, "views", {})  # writable bytes of each pool, [slots, bytes]
        object.__setattr__(self, "widen", {})  # stored dtype to widen from, or None
        for proj in PROJS:
            ref = getattr(base, proj)
            lin = QuantizedSwitchLinear(
                ref.group_size, 1, 1, bias=False, group_size=ref.group_size, bits=ref.bits, mode=ref.mode
            )
            for part in PARTS:
                t = self.tensors.get(f"{proj}.{part}")
                setattr(lin, part, None if t is None else self._pool(f"{proj}.{part}", t, plan.slots, dtype))
            setattr(self, proj, lin)

    def _pool(self, name: str, t: ExpertTensor, slots: int, dtype: Optional[mx.Dtype]) -> mx.array:
        stored = DTYPES[t.dtype][1]
        want = stored if dtype is None or t.dtype in ("U32", "U8") else dtype
        if want != stored and not (want == mx.float32 and t.dtype in ("BF16", "F16")):
            raise ValueError(f"expert cache: experts stored as {t.dtype} cannot be loaded as {want}")
        pool = mx.zeros((slots, *t.shape), dtype=want)
        mx.eval(pool)
        # Writable bytes of the pool's own buffer: preads land in it with no copy.
        self.views[name] = np.frombuffer(memoryview(pool), dtype=np.uint8).reshape(slots, -1)
        self.widen[name] = None if want == stored else t.dtype
        return pool

    def _fetch(self, experts) -> np.ndarray:
        """Make `experts` resident (reading the misses); returns the expert -> slot table."""
        misses = self.table.assign(experts)
        if misses:
            jobs = [
                (t.file, t.offset + e * t.stride, t.stride, self.views[name][s], self.widen[name])
                for e, s in misses
                for name, t in self.tensors.items()
            ]
            try:
                self.cache.reader.read(jobs)
            except BaseException:
                self.table.forget([e for e, _ in misses])
                raise
        return self.table.slot_of

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        ids = np.array(indices)  # [B, L, top_k]: the routing must be known to fetch experts
        groups = self.table.groups(np.unique(ids))
        if len(groups) == 1:
            slots = self._fetch(groups[0])[ids]
            out = super().__call__(x, mx.array(slots.astype(np.uint32)))
            mx.eval(out)  # nothing lazy may read the pool once a later fetch can overwrite it
            return out
        # More experts than slots: one pass per group that fits; each (token, k) row is
        # computed in exactly one group, as it would be in one pass.
        self.cache.grouped_passes += 1
        out = None
        for g in groups:
            inside = np.isin(ids, g)
            slots = np.where(inside, self._fetch(g)[ids], 0).astype(np.uint32)
            y = super().__call__(x, mx.array(slots))
            out = y if out is None else mx.where(mx.array(inside)[..., None], y, out)
            mx.eval(out)  # done with these slots before the next group overwrites them
        return out


def attach_expert_cache(
    model, plan: ExpertCachePlan, *, dtype: Optional[mx.Dtype] = None, policy: str = EXPERT_CACHE_POLICY
) -> ExpertCache:
    """Replace each MoE layer's switch_mlp (still unloaded) with a CachedSwitchGLU over slot
    pools; `model.expert_cache` then holds the cache and its counters."""
    cache = ExpertCache(plan, policy)
    for i in plan.layers:
        moe = model.layers[i].mlp
        moe.switch_mlp = CachedSwitchGLU(moe.switch_mlp, i, cache, dtype)
    model.expert_cache = cache
    return cache


def is_streamed(plan: ExpertCachePlan):
    """Predicate on parameter names: True for the tensors the cache reads on demand."""
    prefixes = tuple(f"model.layers.{i}.mlp.switch_mlp." for i in plan.layers)
    return lambda name: name.startswith(prefixes)
