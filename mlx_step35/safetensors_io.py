"""Read safetensors checkpoints with clear errors: the one reader every loader shares.

Every header is validated as strictly as the safetensors library validates it before any tensor
is read (a checkpoint from the internet is untrusted input), and the index is checked against
the model folder. Whole tensors are then read by MLX's own reader (`mx.load`, lazy, multi-threaded);
a row range of a tensor (a slice of stacked experts, one rank's rows) is read straight from disk.
"""

import json
import math
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
# safetensors dtype -> (numpy storage dtype, mlx dtype it holds)
DTYPES = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    "F64": (np.float64, mx.float32),
    "I64": (np.int64, mx.int64),
    "I32": (np.int32, mx.int32),
    "I16": (np.int16, mx.int16),
    "I8": (np.int8, mx.int8),
    "U64": (np.uint64, mx.uint64),
    "U32": (np.uint32, mx.uint32),
    "U16": (np.uint16, mx.uint16),
    "U8": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; the message names it."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _strict_json(raw, where):
    """JSON with no duplicate keys and no NaN/Infinity; errors name `where`."""

    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            dup = next(k for i, (k, _) in enumerate(items) if any(k == j for j, _ in items[:i]))
            raise CheckpointError(f"{where}: duplicate key {dup!r}")
        return out

    def constant(name):
        raise CheckpointError(f"{where}: {name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or an integer too long to convert
        raise CheckpointError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None


def _check_entry(path: Path, key: str, info) -> Tuple[int, int]:
    """(begin, end) of a tensor entry whose dtype, shape and offsets are well formed."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry is a {type(info).__name__}, expected an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise CheckpointError(f"{where}: entry has no {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets {offsets} end before they begin")
    size = math.prod(shape) * np.dtype(DTYPES[dtype][0]).itemsize  # Python ints: no overflow
    if size != end - begin:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes but {dtype} x {shape} needs {size}"
        )
    return begin, end


def read_header(path) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """(tensor entries, `__metadata__`, byte offset of the data section) of safetensors file
    `path`, after the safetensors library's checks: the header is a JSON object of well-formed
    entries whose byte ranges are in order, do not overlap and cover the data section exactly."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header length ({n} bytes, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt safetensors header (does not start with '{{')")
    header = _strict_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans = sorted((_check_entry(path, key, info), key) for key, info in header.items())
    for ((b0, e0), k0), ((b1, e1), k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"{path}: invalid data_offsets: tensor {k1!r} [{b1}, {e1}] overlaps tensor {k0!r} [{b0}, {e0}]"
            )
    expected = 0
    for (begin, end), key in spans:
        if begin != expected:
            raise CheckpointError(
                f"{path}: invalid data_offsets: no tensor holds bytes [{expected}, {begin}) before tensor {key!r}"
            )
        expected = end
    data = size - 8 - n
    if expected > data:
        raise CheckpointError(
            f"{path}: truncated (tensor data ends at byte {expected}, the file holds {data}); "
            "re-download or re-copy this shard"
        )
    if expected != data:
        raise CheckpointError(
            f"{path}: {data - expected} bytes after the last tensor (corrupt or not safetensors)"
        )
    return header, metadata, 8 + n


class ShardReader:
    """One validated safetensors file. `tensors[key]` holds its header entry (dtype, shape,
    data_offsets relative to `data_start`)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._mmap = None
        self._lazy = None  # mx.load's lazy arrays not handed out yet

    def keys(self) -> List[str]:
        return list(self.tensors)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def dtype(self, key: str) -> mx.Dtype:
        return DTYPES[self.tensors[key]["dtype"]][1]

    def nbytes(self, key: str) -> int:
        begin, end = self.tensors[key]["data_offsets"]
        return end - begin

    def byte_range(self, key: str) -> Tuple[int, int]:
        """[start, end) of tensor `key`'s bytes in the file."""
        begin, end = self.tensors[key]["data_offsets"]
        return self.data_start + begin, self.data_start + end

    def read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> mx.array:
        """Tensor `key`, or its rows [start:stop] along the first axis. The whole tensor is a
        lazy array from MLX's reader (evaluate it to read); a row range is read now."""
        shape = list(self.shape(key))
        if shape:
            start, stop, _ = slice(start, stop).indices(shape[0])
        if not shape or (start, stop) == (0, shape[0]):
            return self._whole(key)
        return self._rows(key, start, stop)

    def _whole(self, key: str) -> mx.array:
        if self._lazy is None or key not in self._lazy:
            try:
                self._lazy = mx.load(str(self.path))
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: MLX cannot read this file ({e})") from None
        if key not in self._lazy:
            raise CheckpointError(f"{self.path}: tensor {key!r} is not found by MLX's reader of this file")
        arr = self._lazy.pop(key)  # handed out once: the reader keeps no evaluated tensor alive
        if tuple(arr.shape) != self.shape(key):
            raise CheckpointError(
                f"{self.path}: tensor {key!r}: MLX reads shape {arr.shape}, header says {self.shape(key)}"
            )
        want = self.dtype(key)
        return arr if arr.dtype == want else arr.astype(want)

    def _rows(self, key: str, start: int, stop: int) -> mx.array:
        np_dtype, mx_dtype = DTYPES[self.tensors[key]["dtype"]]
        shape = list(self.shape(key))
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        row = math.prod(shape[1:]) * np.dtype(np_dtype).itemsize
        shape[0] = stop - start
        offset = self.byte_range(key)[0] + start * row
        raw = np.frombuffer(self._mmap, dtype=np_dtype, count=math.prod(shape), offset=offset)
        arr = mx.array(np.array(raw).reshape(shape))  # copy out of the map
        if mx_dtype == mx.bfloat16:
            return arr.view(mx.bfloat16)
        return arr if arr.dtype == mx_dtype else arr.astype(mx_dtype)

    def close(self):
        self._mmap = None
        self._lazy = None


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_index(path: Path) -> Dict[str, str]:
    """The `weight_map` of `path`'s index: tensor name -> plain file name inside `path`, each present."""
    index = path / INDEX
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    obj = _strict_json(raw, str(index))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{index}: is a JSON {type(obj).__name__}, expected an object")
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: 'weight_map' is {type(weight_map).__name__}, expected an object mapping "
            "tensor names to shard file names"
        )
    for key, name in weight_map.items():
        if not _plain_name(name):
            raise CheckpointError(
                f"{index}: weight_map[{key!r}] = {name!r} is not a plain file name inside the model folder"
            )
    for name in dict.fromkeys(weight_map.values()):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: listed in {INDEX} but missing")
    return weight_map


def shard_files(path: Path) -> Tuple[List[Path], Dict[str, str]]:
    """Shard paths (index order) and the key -> file map; checks the index against the disk."""
    path = Path(path)
    if (path / INDEX).exists():
        weight_map = read_index(path)
        return [path / f for f in dict.fromkeys(weight_map.values())], weight_map
    files = sorted(f for f in path.glob("model*.safetensors") if f.is_file())
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors shards found")
    return files, {}


def open_shards(path: Path) -> List[ShardReader]:
    """A validated reader for every shard of checkpoint `path`, after checking that each tensor
    the index lists is in the shard it names: nothing is read before everything is checked."""
    files, weight_map = shard_files(path)
    readers = [ShardReader(f) for f in files]
    listed: Dict[str, List[str]] = {}
    for key, name in weight_map.items():
        listed.setdefault(name, []).append(key)
    for reader in readers:
        missing = sorted(k for k in listed.get(reader.path.name, ()) if k not in reader.tensors)
        if missing:
            raise CheckpointError(
                f"{reader.path}: missing tensor(s) listed in the index: {', '.join(missing[:5])}"
            )
    return readers


def iter_shards(path: Path) -> Iterator[ShardReader]:
    for reader in open_shards(path):
        yield reader
        reader.close()
