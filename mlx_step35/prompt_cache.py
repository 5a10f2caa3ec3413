"""Prompt caches that survive the sliding window: a conversation's caches plus checkpoints.

A `PromptCache` holds the trunk's KV caches (and, for drafting, the MTP drafter's caches
and rows) after `tokens` went through the trunk. The full-attention caches can be trimmed
to any length; the sliding-window rings, the MTP blocks' caches and the drafter's rows
cannot once they have wrapped, so their state is snapshotted at checkpoints. A checkpoint
keeps that state by reference (a slice of an MLX array is a value: a later in-place update
of the live ring copies, it never changes the snapshot) and no full-attention KV at all:
restoring it trims the live full caches to its position. Reusing a prefix that ends
between checkpoints restores the newest checkpoint before it and prefills the rest, so the
result is exactly the cold computation.
"""

import copy
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KV_GROUP_SIZE, QUANTIZED_KV_START, FullKVCache, KVQuant, SlidingKVCache, kv_of, kv_quant
from .cache_files import (
    CacheDir,
    ChecksumError,
    PromptCacheError,
    Snapshot,
    read,
    read_metadata,
    snapshot,
    write,
)
from .speculative import PREFILL_STEP, MTPDrafter

FORMAT_VERSION = 2  # 2: with a checksum (cache_files)
MAX_SLACK = 4  # rewind slack of the drafter's caches: any --num-draft (1-3) plus one
CHECKPOINT_BEFORE_END = 8  # each prompt is also snapshotted this many tokens before its end


def _copy_cache(c):
    """A cache object whose arrays cannot be changed by later updates of `c`."""
    return c.copy()


def _trimmed(c, pos: int):
    """A view of full-attention cache `c` holding its first `pos` entries (16-bit or
    quantized, by position: the view's offset says which)."""
    view = copy.copy(c)
    view.offset = pos
    return view


def _cache_arrays(c) -> List[mx.array]:
    return c.arrays()


@dataclass
class Checkpoint:
    pos: int  # tokens in the caches when it was taken
    sliding: Dict[int, SlidingKVCache]  # trunk layer index -> copy of its ring
    drafter: Optional[dict] = None  # the drafter's fields (caches copied)
    nbytes: int = 0


@dataclass
class PromptCache:
    """The state of one conversation (see the module docstring). Make one with
    `make_prompt_cache`, pass it to `stream_generate(..., prompt_cache=...)` repeatedly:
    each call's prompt continues the conversation (as in mlx-lm), and only the tokens
    that are not cached yet go through the model."""

    model: object
    cache: List
    drafter: Optional[MTPDrafter]
    tokens: List[int] = field(default_factory=list)  # tokens whose KV is in `cache`
    history: List[int] = field(default_factory=list)  # the whole conversation so far
    checkpoints: Dict[int, Checkpoint] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens the last generation did not recompute
    prompt_len: int = 0  # length of the last prompt (the whole conversation up to its reply)

    # -- checkpoints -----------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """Snapshot the state that cannot be trimmed, at the current position."""
        pos = len(self.tokens)
        sliding = {i: _copy_cache(c) for i, c in enumerate(self.cache) if isinstance(c, SlidingKVCache)}
        arrays = [a for c in sliding.values() for a in _cache_arrays(c)]
        drafter = None
        if self.drafter is not None:
            d = self.drafter
            d._trunk_rows()
            drafter = dict(cache=[_copy_cache(c) for c in d.cache], done=list(d.done), hidden=list(d.hidden))
            arrays += [a for c in drafter["cache"] for a in _cache_arrays(c)]
            arrays += [h for h in drafter["hidden"] if h is not None]
        mx.async_eval(arrays)
        cp = Checkpoint(pos, sliding, drafter, sum(a.nbytes for a in arrays))
        self.checkpoints[pos] = cp
        return cp

    def _restore(self, cp: Checkpoint):
        for i, c in enumerate(self.cache):
            if i in cp.sliding:
                self.cache[i] = _copy_cache(cp.sliding[i])
            else:  # full attention: the entries before cp.pos are those of this conversation
                c.trim(c.offset - cp.pos)
        if self.drafter is not None:
            d, s = self.drafter, cp.drafter
            d.cache = [_copy_cache(c) for c in s["cache"]]
            d.done, d.hidden, d._rows = list(s["done"]), list(s["hidden"]), []
        self._truncate(cp.pos)

    def _truncate(self, pos: int):
        self.tokens = self.tokens[:pos]
        self.checkpoints = {p: cp for p, cp in self.checkpoints.items() if p <= pos}

    def reset(self):
        """Forget everything (the caches hold no token)."""
        self._restore(Checkpoint(0, self._empty_sliding(), self._empty_drafter()))
        self.checkpoints = {}

    def _empty_sliding(self):
        return {
            i: SlidingKVCache(c.window, c.slack)
            for i, c in enumerate(self.cache)
            if isinstance(c, SlidingKVCache)
        }

    def _empty_drafter(self):
        if self.drafter is None:
            return None
        fresh = MTPDrafter(self.model, MAX_SLACK, self.drafter.chunk, self.drafter.kv)
        return dict(cache=fresh.cache, done=fresh.done, hidden=fresh.hidden)

    # -- reuse -----------------------------------------------------------------------
    def continuation(self, tokens: Sequence[int]) -> List[int]:
        """For a whole prompt (e.g. a re-rendered conversation): forget the part of the
        history it does not share and return the rest of it, to pass as the prompt."""
        c = min(common_prefix(self.history, tokens), len(tokens) - 1)
        self.history = self.history[:c]
        return list(tokens[c:])

    def reuse(self, tokens: Sequence[int]) -> int:
        """Bring the caches to the longest usable prefix of `tokens` (never all of them:
        the last token must run to give the next token's logits); returns its length."""
        common = common_prefix(self.tokens, tokens[:-1])
        if common < len(self.tokens):
            best = max((p for p in self.checkpoints if p <= common), default=None)
            if best is None:
                self.reset()
            else:
                self._restore(self.checkpoints[best])
        self.cached_tokens = len(self.tokens)
        self.prompt_len = len(tokens)
        return self.cached_tokens

    def finish(self, tokens: List[int]):
        """After a generation over `tokens` (prompt and output): record what the caches
        hold and checkpoint the end of the generation."""
        self.history = list(tokens)
        self.tokens = list(tokens[: self.cache[0].offset])
        if self.drafter is not None:
            if self.drafter.done[0] != len(self.tokens):
                raise RuntimeError("prompt cache: the drafter and the trunk caches disagree")
        self.checkpoint()

    def fork(self, pos: int) -> "PromptCache":
        """A new conversation starting from checkpoint `pos`; this one is left as it is
        (its full-attention KV is shared until the fork writes, when MLX copies it)."""
        view = self.at(pos)
        view.cache = [_copy_cache(c) for c in view.cache]
        if view.drafter is not None:
            view.drafter.cache = [_copy_cache(c) for c in view.drafter.cache]
        view.checkpoints = {p: cp for p, cp in self.checkpoints.items() if p <= pos}
        return view

    def at(self, pos: int) -> "PromptCache":
        """A read-only view of the state at checkpoint `pos` (for saving it)."""
        cp = self.checkpoints[pos]
        view = copy.copy(self)
        view.cache = [cp.sliding.get(i) or _trimmed(c, pos) for i, c in enumerate(self.cache)]
        view.tokens = self.tokens[:pos]
        view.history = view.tokens
        view.checkpoints = {}
        if self.drafter is not None:
            view.drafter = copy.copy(self.drafter)
            view.drafter.cache, view.drafter.done = list(cp.drafter["cache"]), list(cp.drafter["done"])
            view.drafter.hidden, view.drafter._rows = list(cp.drafter["hidden"]), []
        return view

    @property
    def nbytes(self) -> int:
        """Bytes held: the live caches and every checkpoint."""
        live = sum(c.nbytes for c in self.cache)
        if self.drafter is not None:
            live += sum(c.nbytes for c in self.drafter.cache)
            live += sum(h.nbytes for h in self.drafter.hidden if h is not None)
        return live + sum(cp.nbytes for cp in self.checkpoints.values())


def make_prompt_cache(
    model,
    draft_mtp: bool = True,
    prefill_step_size: int = PREFILL_STEP,
    kv_bits: Optional[int] = None,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
) -> PromptCache:
    """An empty prompt cache for `model`. With `draft_mtp` (and MTP weights) it also keeps
    the drafter's state, so any later generation on it may draft; without, none may.
    `kv_bits` etc.: its full-attention KV format (see `generate_step`); every generation on
    it must pass the same."""
    return _new_prompt_cache(
        model, draft_mtp, prefill_step_size, kv_quant(kv_bits, kv_group_size, quantized_kv_start)
    )


def _new_prompt_cache(model, draft_mtp: bool, prefill_step_size: int, kv: Optional[KVQuant]) -> PromptCache:
    drafter = MTPDrafter(model, MAX_SLACK, prefill_step_size, kv) if draft_mtp and model.num_mtp else None
    return PromptCache(model, model.make_cache(slack=1, kv=kv), drafter)


# -- files ---------------------------------------------------------------------------
def fingerprint(model, kv: Optional[KVQuant] = None) -> str:
    """A hash of the model's config and of a sample of every trunk weight (the trunk's
    caches do not depend on whether the MTP blocks were loaded), and of the KV format when
    quantized (16-bit KV hashes as before quantized KV existed)."""
    h = hashlib.sha256(json.dumps(vars(model.args), sort_keys=True, default=str).encode())
    if kv is not None:
        h.update(json.dumps(vars(kv), sort_keys=True).encode())
    for name, w in tree_flatten(model.parameters()):
        if name.startswith("mtp."):
            continue
        h.update(f"{name}{w.shape}{w.dtype}".encode())
        h.update(memoryview(w.reshape(-1)[:8].astype(mx.float32)))
    return h.hexdigest()[:32]


QUANTIZED_PARTS = ("w", "scales", "biases")  # mx.quantize's outputs, in order


def _put_cache(arrays: dict, meta: dict, prefix: str, c):
    if isinstance(c, SlidingKVCache):
        meta[prefix] = dict(kind="sliding", offset=c.offset, stored=c.stored, slack=c.slack, window=c.window)
        k, v = c.state
    else:
        meta[prefix] = dict(kind="full", offset=c.offset)
        fp = c.fp_len
        k, v = (None, None) if not fp else (c.keys[..., :fp, :], c.values[..., :fp, :])
        if c.q_len:  # the quantized entries as they are: packed values, scales, biases
            for name, parts in (("qkeys", c.qkeys), ("qvalues", c.qvalues)):
                for part, a in zip(QUANTIZED_PARTS, parts):
                    arrays[f"{prefix}.{name}.{part}"] = a[..., : c.q_len, :]
    if k is not None:
        arrays[prefix + ".keys"], arrays[prefix + ".values"] = k, v


def _get_cache(arrays: dict, meta: dict, prefix: str, like):
    m = meta[prefix]
    k, v = arrays.get(prefix + ".keys"), arrays.get(prefix + ".values")
    if isinstance(like, SlidingKVCache):
        if m["kind"] != "sliding" or m["window"] != like.window:
            raise PromptCacheError(f"{prefix}: not a sliding cache of window {like.window}")
        c = SlidingKVCache(like.window, m["slack"])
        c.offset = m["offset"]
        if k is not None:
            c.stored = m["stored"]
            if k.shape[2] != c.stored or c.stored > c.capacity:
                raise PromptCacheError(f"{prefix}: {k.shape[2]} entries, expected {c.stored}")
            c._store(k, v)
        return c
    if m["kind"] != "full":
        raise PromptCacheError(f"{prefix}: not a full-attention cache")
    c = FullKVCache(like.quant)
    c.offset = m["offset"]
    if k is not None or c.fp_len:
        if k is None or k.shape[2] != c.fp_len:
            raise PromptCacheError(
                f"{prefix}: {0 if k is None else k.shape[2]} 16-bit entries, expected {c.fp_len}"
            )
        c.keys, c.values = k, v
    if c.q_len:
        c.qkeys, c.qvalues = (
            tuple(arrays[f"{prefix}.{name}.{part}"] for part in QUANTIZED_PARTS)
            for name in ("qkeys", "qvalues")
        )
        if any(a.shape[2] != c.q_len for a in c.qkeys + c.qvalues):
            raise PromptCacheError(f"{prefix}: quantized entries are not {c.q_len}")
    return c


def save_prompt_cache(path, pc: PromptCache, metadata: Optional[Dict[str, str]] = None):
    """Write the cache's current state (not its checkpoints) to a safetensors file,
    atomically, with the format version, the model's fingerprint, the tokens and a
    checksum of the whole file (see cache_files)."""
    write(path, _snapshot(pc, metadata))


def _snapshot(
    pc: PromptCache, metadata: Optional[Dict[str, str]] = None, fp: Optional[str] = None
) -> Snapshot:
    """The arrays and metadata of a file for `pc`, evaluated on this thread (see snapshot)."""
    arrays, layout = {}, {}
    for i, c in enumerate(pc.cache):
        _put_cache(arrays, layout, f"trunk.{i}", c)
    d = pc.drafter
    if d is not None:
        d._trunk_rows()
        for k, c in enumerate(d.cache):
            _put_cache(arrays, layout, f"mtp.{k}", c)
        for k, h in enumerate(d.hidden):
            if h is not None:
                arrays[f"hidden.{k}"] = h
        layout["done"] = d.done
    meta = dict(metadata or {})
    meta.update(
        format="mlx_step35.prompt_cache",
        version=str(FORMAT_VERSION),
        fingerprint=fp or fingerprint(pc.model, kv_of(pc.cache)),
        kv=json.dumps(None if kv_of(pc.cache) is None else vars(kv_of(pc.cache))),
        tokens=json.dumps(pc.tokens),
        history=json.dumps(pc.history),
        layout=json.dumps(layout),
    )
    return snapshot(arrays, meta)


def load_prompt_cache(path, model, return_metadata: bool = False):
    """Read a file written by `save_prompt_cache` for `model`; raises PromptCacheError
    (naming the file) if it is not one, is damaged (ChecksumError, a PromptCacheError: its
    checksum is verified before any of it is used), or was made with another model."""
    path = Path(path)
    try:
        head = read_metadata(path)
        fp = fingerprint(model, _file_kv(head))  # the model's, with the file's KV format
        _check_meta(head, fp)  # a clear refusal before reading the data
        arrays, meta = read(path)
        pc = _from_arrays(model, arrays, meta, fp)
    except OSError as e:
        raise PromptCacheError(f"{path}: cannot read ({e.strerror or e})") from None
    except PromptCacheError as e:
        raise type(e)(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise PromptCacheError(f"{path}: damaged prompt cache ({type(e).__name__}: {e})") from None
    return (pc, meta) if return_metadata else pc


def _check_meta(meta: Dict[str, str], fp: str):
    if meta.get("format") != "mlx_step35.prompt_cache":
        raise PromptCacheError("not a prompt cache of mlx_step35")
    if meta.get("version") != str(FORMAT_VERSION):
        raise PromptCacheError(
            f"prompt-cache format {meta.get('version')}, this version reads {FORMAT_VERSION} only"
            + (" (format 1 files carry no checksum: delete it)" if meta.get("version") == "1" else "")
        )
    if meta.get("fingerprint") != fp:
        raise PromptCacheError("made with another model (fingerprint differs)")


def _file_kv(meta: Dict[str, str]) -> Optional[KVQuant]:
    """The KV format a file was written with (None: 16-bit)."""
    kv = json.loads(meta.get("kv", "null"))
    return None if kv is None else KVQuant(**kv)


def _from_arrays(model, arrays, meta, fp: str) -> PromptCache:
    _check_meta(meta, fp)  # as verified by the checksum
    kv = _file_kv(meta)
    layout = json.loads(meta["layout"])
    pc = _new_prompt_cache(model, "done" in layout, PREFILL_STEP, kv)  # MTP state unused without MTP blocks
    pc.cache = [_get_cache(arrays, layout, f"trunk.{i}", c) for i, c in enumerate(pc.cache)]
    pc.tokens = [int(t) for t in json.loads(meta["tokens"])]
    pc.history = [int(t) for t in json.loads(meta["history"])]
    if any(c.offset != len(pc.tokens) for c in pc.cache) or pc.history[: len(pc.tokens)] != pc.tokens:
        raise PromptCacheError("cache offsets and tokens disagree")
    if pc.drafter is not None:
        d = pc.drafter
        d.cache = [_get_cache(arrays, layout, f"mtp.{k}", c) for k, c in enumerate(d.cache)]
        d.done = [int(x) for x in layout["done"]]
        d.hidden = [arrays.get(f"hidden.{k}") for k in range(len(d.hidden))]
        if len(d.done) != d.K + 1 or d.done[0] != len(pc.tokens):
            raise PromptCacheError("drafter state and tokens disagree")
    pc.checkpoint()
    return pc


class PromptCacheStore:
    """The prompt caches of a server's conversations, bounded in bytes.

    `acquire(tokens)` hands out the cache that can reuse the longest prefix of `tokens`
    (a new one when none can), with the continuation to generate from; `release` puts it
    back. Each conversation keeps at most `max_checkpoints` checkpoints (dropping the one
    whose tokens are cheapest to recompute from the one before it); over `max_bytes`, the
    least recently used conversations go first. With `directory`, released conversations
    are also written there (their state a few tokens before the end of their last prompt
    and at the end of their last generation) by a background thread, and read back when
    memory has no match, e.g. after a restart. An index of the directory (tokens per file),
    built once, answers lookups (see cache_files.CacheDir). A file that is damaged (its
    checksum or header) is deleted with a warning and the prompt prefilled cold; one from
    another model or an older format is a miss. The directory is bounded by `max_dir_bytes`
    (least recently used files go first). `close()` waits for pending writes.
    """

    def __init__(
        self,
        model,
        max_bytes: int,
        *,
        draft_mtp: bool = True,
        prefill_step_size: int = PREFILL_STEP,
        max_checkpoints: int = 8,
        directory=None,
        max_dir_bytes: Optional[int] = None,
        kv_bits: Optional[int] = None,
        kv_group_size: int = KV_GROUP_SIZE,
        quantized_kv_start: int = QUANTIZED_KV_START,
    ):
        self.model, self.max_bytes, self.draft_mtp = model, max_bytes, draft_mtp
        self.prefill_step_size, self.max_checkpoints = prefill_step_size, max_checkpoints
        self.entries: List[PromptCache] = []  # least recently used first
        self.dir = Path(directory) if directory else None
        self.max_dir_bytes = max_dir_bytes if max_dir_bytes is not None else 4 * max_bytes
        self.kv = kv_quant(kv_bits, kv_group_size, quantized_kv_start)  # the KV format of every cache
        self._fingerprint = fingerprint(model, self.kv) if self.dir else None  # other formats' files: misses
        self._files = CacheDir(self.dir, self._tokens_of, self.max_dir_bytes) if self.dir else None

    def acquire(self, tokens: Sequence[int]) -> Tuple[PromptCache, List[int]]:
        best, best_n = None, 0
        for pc in self.entries:
            n = _usable(pc, tokens)
            if n > best_n:
                best, best_n = pc, n
        if best is None and self.dir:
            best = self._from_disk(tokens)
        if best is None:
            best = _new_prompt_cache(self.model, self.draft_mtp, self.prefill_step_size, self.kv)
        elif best in self.entries:
            if best_n < len(best.tokens) and best_n < best.prompt_len - CHECKPOINT_BEFORE_END:
                best = best.fork(best_n)  # another conversation branching off: keep this one
            else:  # the same conversation's next turn (or a regenerated reply): take it over
                self.entries.remove(best)
        return best, best.continuation(tokens)

    def release(self, pc: PromptCache):
        while len(pc.checkpoints) > self.max_checkpoints:
            pos = sorted(pc.checkpoints)
            gaps = {p: p - q for q, p in zip([0] + pos, pos) if p != pos[-1]}
            del pc.checkpoints[min(gaps, key=gaps.get)]
        self.entries.append(pc)
        if self.dir:
            self._to_disk(pc)
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.pop(0)

    @property
    def nbytes(self) -> int:
        return sum(pc.nbytes for pc in self.entries)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for the pending writes; False if `timeout` passed first."""
        return self._files is None or self._files.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Finish the pending writes (abandoning what is left after `timeout`: only
        temporary files, removed at the next start) and stop the writer."""
        return self._files is None or self._files.close(timeout)

    # -- the directory -------------------------------------------------------------
    def _tokens_of(self, meta: Dict[str, str]) -> Optional[Tuple[int, ...]]:
        try:
            _check_meta(meta, self._fingerprint)
        except PromptCacheError:
            return None  # another model's or format's: kept, never loaded
        return tuple(int(t) for t in json.loads(meta["tokens"]))

    def _to_disk(self, pc: PromptCache):
        """Hand the files of `pc` to the writer: arrays evaluated here, written there."""
        last = max(pc.checkpoints)
        before = max((p for p in pc.checkpoints if p < last and p <= len(pc.tokens) - 1), default=None)
        for pos in sorted({last, before} - {None}):
            tokens = tuple(pc.tokens[:pos])
            name = hashlib.sha256((self._fingerprint + json.dumps(list(tokens))).encode()).hexdigest()
            if not self._files.has(name):  # else the same model and tokens: the same state
                self._files.submit(name, tokens, _snapshot(pc.at(pos), fp=self._fingerprint))

    def _from_disk(self, tokens) -> Optional[PromptCache]:
        with self._files.longest_prefix(tokens) as f:  # no eviction while it is read
            if f is None:
                return None
            try:
                return load_prompt_cache(f, self.model)
            except PromptCacheError as e:  # damaged: never usable again
                warnings.warn(f"prompt cache: deleting {e}", stacklevel=3)
                self._files.delete(f)
                return None


def _usable(pc: PromptCache, tokens: Sequence[int]) -> int:
    """How many tokens of `tokens` `pc` could reuse."""
    common = common_prefix(pc.tokens, tokens[:-1])
    if common == len(pc.tokens):
        return common
    return max((p for p in pc.checkpoints if p <= common), default=0)


def default_store_gb() -> float:
    """A server's default prompt-cache budget: 5% of the machine's memory, 0.5-8 GB (one
    30K-token conversation of the real model holds ~1.5 GB of full-attention KV)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return round(min(8.0, max(0.5, 0.05 * total / 1e9)), 1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


__all__ = [
    "PromptCache",
    "PromptCacheStore",
    "PromptCacheError",
    "ChecksumError",
    "make_prompt_cache",
    "save_prompt_cache",
    "load_prompt_cache",
    "fingerprint",
]
