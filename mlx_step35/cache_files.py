"""Prompt-cache files: safetensors files that cannot be restored damaged, written off the
generation thread, and an index of a directory of them (`CacheDir`).

Every file's `__metadata__` holds `checksum` = "crc32:<header>:<data>", two CRC-32s in hex: of
the 8-byte header length and the JSON header (with these 16 digits read as zeros), and of the
data section (every tensor byte). Together they cover every byte of the file; the header's
alone lets an index trust a header without reading the data. CRC-32 was chosen by measured
speed (benchmarks/checksum_speed.py, 1 GB: within ~10% of zlib.adler32, 1.6x hashlib's sha256,
4x blake2b) and detects every error burst of up to 32 bits, so any one damaged byte.
`read` checks both over the open file's pages (mmap) before MLX's reader loads any tensor
from that same open file.

`snapshot` runs on the thread that computed the arrays (MLX streams are per thread): it
evaluates them and takes host views of their memory, without a copy; `write` then runs on any
thread (`Writer`: one background thread) and is atomic: a temporary name, fsync, `os.replace`.
A write killed midway leaves only the temporary file, whose checksum digits are still zeros.
"""

import json
import logging
import mmap
import os
import re
import struct
import threading
import warnings
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .safetensors_io import DTYPES, CheckpointError, read_header

CHECKSUM = "checksum"
_ZERO = "crc32:00000000:00000000"
_FIELD = b'"checksum":"crc32:'  # quotes inside JSON strings are escaped: this occurs once
_DIGITS = 17  # "hhhhhhhh:dddddddd" after _FIELD
CHUNK = 16 << 20  # bytes per CRC call
TMP_SUFFIX = ".tmp.safetensors"  # temporary files: "." + name + "." + pid + TMP_SUFFIX
_STORAGE = {mx_t: name for name, (_, mx_t) in DTYPES.items() if name != "F64"}  # mlx dtype -> name

log = logging.getLogger("mlx_step35.prompt_cache")


class PromptCacheError(ValueError):
    """A prompt cache (file) that cannot be used with this model; the message says why."""


class ChecksumError(PromptCacheError):
    """A prompt-cache file whose bytes are not those that were written (damaged)."""


@dataclass
class Snapshot:
    """Tensors to write: name -> (safetensors dtype, host view of evaluated memory)."""

    tensors: Dict[str, Tuple[str, np.ndarray]]
    metadata: Dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.tensors.values())


def snapshot(arrays: Dict[str, mx.array], metadata: Dict[str, str]) -> Snapshot:
    """Evaluate `arrays` on this thread and view their memory from the host (no copy; a later
    in-place update of a cache then copies its buffer, never changing what is written)."""
    if CHECKSUM in metadata:
        raise ValueError(f"prompt cache: the metadata key {CHECKSUM!r} is reserved")
    bad = next((k for k, a in arrays.items() if a.dtype not in _STORAGE), None)
    if bad is not None:
        raise TypeError(f"prompt cache: tensor {bad!r} of dtype {arrays[bad].dtype} cannot be saved")
    bits = {k: a.view(mx.uint16) if a.dtype == mx.bfloat16 else a for k, a in arrays.items()}
    mx.eval(list(bits.values()))
    tensors = {k: (_STORAGE[a.dtype], np.asarray(bits[k])) for k, a in arrays.items()}
    return Snapshot(tensors, dict(metadata))


def _blocks(a: np.ndarray) -> Iterator[memoryview]:
    """`a`'s bytes in row-major order, as few contiguous blocks of its own memory as possible."""
    if a.flags.c_contiguous:
        yield memoryview(a.reshape(-1).view(np.uint8))
    elif a.ndim > 1 and a.nbytes > 1 << 20:  # e.g. [B, H, T, D] sliced along T: one block per head
        for row in a:
            yield from _blocks(row)
    else:
        yield memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _header(snap: Snapshot) -> bytes:
    entries, offset = {}, 0
    for k in sorted(snap.tensors):
        name, a = snap.tensors[k]
        entries[k] = {"dtype": name, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    meta = dict(snap.metadata)
    meta[CHECKSUM] = _ZERO
    raw = _json({"__metadata__": meta, **entries})
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors writers do
    return struct.pack("<Q", len(raw)) + raw


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def write(path, snap: Snapshot, fsync: bool = True):
    """Write `snap` to `path` atomically, with its checksum; any thread may call it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    head = _header(snap)
    at = head.index(_FIELD) + len(_FIELD)
    crc = 0
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for k in sorted(snap.tensors):
                for block in _blocks(snap.tensors[k][1]):
                    f.write(block)
                    crc = zlib.crc32(block, crc)
            f.seek(at)
            f.write(b"%08x:%08x" % (zlib.crc32(head), crc))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync and hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power loss
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _header_crc(f, data_start: int, stated: str) -> bytes:
    """Check the header CRC of open file `f`, whose checksum is `stated`; returns the data
    CRC's stated digits."""
    f.seek(0)
    head = bytearray(f.read(data_start))
    at = head.find(_FIELD) + len(_FIELD)
    digits = bytes(head[at : at + _DIGITS])
    if at < len(_FIELD) or stated != "crc32:" + digits.decode("ascii", "replace"):
        raise ChecksumError(f"checksum field {stated!r} is malformed: damaged")
    head[at : at + _DIGITS] = _ZERO[6:].encode()
    if f"{zlib.crc32(head):08x}".encode() != digits[:8]:
        raise ChecksumError(f"header checksum mismatch (stated {stated}): damaged")
    return digits[9:]


def _validated(path: Path) -> Tuple[Dict[str, str], int]:
    try:
        _, meta, data_start = read_header(path)
    except CheckpointError as e:
        raise ChecksumError(f"damaged or not a prompt cache ({e})") from None
    return meta, data_start


def read_metadata(path) -> Dict[str, str]:
    """The header's metadata, validated and, if it has a checksum, checked against it
    (ChecksumError); the tensor data is not read."""
    meta, data_start = _validated(Path(path))
    if CHECKSUM in meta:
        with open(path, "rb") as f:
            _header_crc(f, data_start, meta[CHECKSUM])
    return meta


def read(path) -> Tuple[Dict[str, mx.array], Dict[str, str]]:
    """The tensors (evaluated) and metadata of a file written by `write`, loaded only after
    both checksums match (ChecksumError otherwise; PromptCacheError if it has none). The CRC
    runs over the open file's pages (mmap: no copy) and MLX's reader then loads the tensors
    from the same open file."""
    path = Path(path)
    meta, data_start = _validated(path)
    if CHECKSUM not in meta:
        raise PromptCacheError("has no checksum (written before format 2), so it cannot be verified")
    with open(path, "rb") as f:
        stated = _header_crc(f, data_start, meta[CHECKSUM])
        crc = 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
            for i in range(data_start, len(view), CHUNK):
                crc = zlib.crc32(view[i : i + CHUNK], crc)
        if f"{crc:08x}".encode() != stated:
            raise ChecksumError(
                f"checksum mismatch of the data (stated {meta[CHECKSUM]}, computed {crc:08x}): damaged"
            )
        f.seek(0)
        arrays = mx.load(f, format="safetensors")
        mx.eval(list(arrays.values()))
    return arrays, meta


class Writer:
    """One background thread that writes snapshots in the order given. A request never
    waits for it: beyond `max_pending` queued files the oldest queued one is dropped
    (it is only a cache). `close` waits for what is queued (up to a timeout)."""

    def __init__(self, max_pending: int = 4):
        self.max_pending = max_pending
        self._queue: Deque[Tuple[Path, Snapshot, Callable]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.writing: Optional[Path] = None
        self._thread = threading.Thread(target=self._run, name="prompt-cache-writer", daemon=True)
        self._thread.start()

    def submit(self, path: Path, snap: Snapshot, done: Callable[[Optional[Exception]], None]):
        """Queue `snap` for `path`; `done(error or None)` runs on the writer thread after it."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the prompt-cache writer is closed")
            self._queue.append((Path(path), snap, done))
            while len(self._queue) > self.max_pending:
                dropped = self._queue.popleft()[0]
                log.warning("prompt cache: writes fall behind; not writing %s", dropped)
            self._cond.notify_all()

    def pending(self) -> set:
        """Paths queued or being written."""
        with self._cond:
            return {p for p, _, _ in self._queue} | ({self.writing} if self.writing else set())

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                path, snap, done = self._queue.popleft()
                self.writing = path
            err = None
            try:
                write(path, snap)
            except OSError as e:  # a full disk loses a cache file, never an answer
                err = e
            except Exception as e:  # the thread must outlive a bug, or every flush would hang
                log.exception("prompt cache: writing %s", path)
                err = e
            finally:
                del snap  # its views pin cache memory: let it go now
            try:
                done(err)
            except Exception:  # the thread must outlive one bad callback
                log.exception("prompt cache: after writing %s", path)
            finally:
                with self._cond:
                    self.writing = None
                    self._cond.notify_all()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued file is written; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self.writing is None, timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Write what is queued, then end the thread; after `timeout` seconds the rest is
        abandoned (a write cut short by the process' exit leaves only a temporary file)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()


@dataclass
class _File:
    tokens: Optional[Tuple[int, ...]]  # None: not usable here (another model or format)
    size: int
    mtime: float


_OWN = re.compile(r"[0-9a-f]{24}\.safetensors")  # the only names a CacheDir reads or deletes


class CacheDir:
    """A directory of cache files named `<24 hex digits>.safetensors`, indexed once at start
    from their headers (`tokens_of(metadata)`: the tokens a file holds, None if not usable
    here), written by a `Writer` and indexed when written, bounded by `max_bytes` (least
    recently used files go first). A file whose header is damaged is deleted with a warning;
    files with other names are never touched."""

    def __init__(self, directory, tokens_of: Callable[[Dict[str, str]], Optional[tuple]], max_bytes: int):
        self.dir, self.tokens_of, self.max_bytes = Path(directory), tokens_of, max_bytes
        self._index: Dict[str, _File] = {}  # file name -> what it holds
        self._lock = threading.RLock()  # the index, and the files it names, between threads
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*" + TMP_SUFFIX):  # left by a crash mid-write
            if not _writer_alive(stale.name):  # (not another live store's write in progress)
                stale.unlink(missing_ok=True)
        for f in sorted(self.dir.glob("*.safetensors")):
            if _OWN.fullmatch(f.name):
                self._add(f)
        self._writer = Writer()

    def _add(self, f: Path):
        try:
            meta, st = read_metadata(f), f.stat()
            tokens = self.tokens_of(meta)
        except (PromptCacheError, KeyError, TypeError, ValueError) as e:
            warnings.warn(f"prompt cache: deleting {f}: {e}", stacklevel=4)
            f.unlink(missing_ok=True)
            return
        except OSError:  # gone meanwhile
            return
        self._index[f.name] = _File(tokens, st.st_size, st.st_mtime)

    def path(self, key: str) -> Path:
        return self.dir / f"{key[:24]}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a usable file of `key` is written or being written (marking it most recently
        used); an older format's file of that name is not, and is replaced when written."""
        f = self.path(key)
        return f in self._writer.pending() or self._touch(f)

    def _touch(self, f: Path) -> bool:
        with self._lock:
            if f.name not in self._index or self._index[f.name].tokens is None:
                return False
            try:
                os.utime(f)
                self._index[f.name].mtime = f.stat().st_mtime
            except OSError:  # removed behind our back: written again
                del self._index[f.name]
                return False
            return True

    def submit(self, key: str, tokens: Tuple[int, ...], snap: Snapshot):
        f = self.path(key)
        self._writer.submit(f, snap, lambda err: self._written(f, tokens, err))

    def _written(self, f: Path, tokens, err: Optional[Exception]):
        """On the writer thread: index the new file and bound the directory."""
        if err is not None:
            warnings.warn(f"prompt cache: could not write {f}: {err}", stacklevel=2)
            return
        st = f.stat()
        with self._lock:
            self._index[f.name] = _File(tokens, st.st_size, st.st_mtime)
            total = sum(e.size for e in self._index.values())
            for name in sorted(self._index, key=lambda n: self._index[n].mtime):
                if total <= self.max_bytes:
                    break
                total -= self._index.pop(name).size
                (self.dir / name).unlink(missing_ok=True)

    @contextmanager
    def longest_prefix(self, tokens: Sequence[int]) -> Iterator[Optional[Path]]:
        """The indexed file holding the longest proper prefix of `tokens` (None if none),
        kept from eviction until the block ends."""
        with self._lock:
            best = max(
                (
                    (len(e.tokens), name)
                    for name, e in self._index.items()
                    if e.tokens is not None
                    and len(e.tokens) < len(tokens)
                    and tuple(tokens[: len(e.tokens)]) == e.tokens
                ),
                default=None,
            )
            f = None if best is None else self.dir / best[1]
            yield f
            if f is not None:
                self._touch(f)

    def delete(self, f: Path):
        with self._lock:
            self._index.pop(f.name, None)
            f.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._index.values())

    def flush(self, timeout: Optional[float] = None) -> bool:
        return self._writer.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        return self._writer.close(timeout)


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that names temporary file `tmp_name` (".NAME.PID.TID" + TMP_SUFFIX)
    still runs: its write may be in progress (another server on the same directory)."""
    try:
        pid = int(tmp_name[: -len(TMP_SUFFIX)].split(".")[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
