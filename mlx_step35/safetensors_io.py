"""Read safetensors shards one tensor (or one slice of rows) at a time, with clear errors.

The reader parses the header itself so it can read a row range of a tensor (a slice of
stacked experts) straight from disk, in any dtype including bfloat16, and so that a
truncated or corrupt file is reported with its name before anything is loaded.
"""

import json
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

# safetensors dtype -> (numpy storage dtype, mlx dtype it holds)
DTYPES = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    "F64": (np.float64, mx.float32),
    "I64": (np.int64, mx.int64),
    "I32": (np.int32, mx.int32),
    "U32": (np.uint32, mx.uint32),
    "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
    "BOOL": (np.bool_, mx.bool_),
}


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; the message names it."""


class ShardReader:
    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{self.path}: corrupt safetensors header length")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: shard file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors = header
        for key, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            itemsize = np.dtype(DTYPES[info["dtype"]][0]).itemsize
            if end - begin != int(np.prod(info["shape"], dtype=np.int64)) * itemsize:
                raise CheckpointError(f"{self.path}: tensor {key} has inconsistent size")
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated (tensor {key} ends past the end of the file); "
                    "re-download or re-copy this shard"
                )
        self._mmap = None

    def keys(self) -> List[str]:
        return list(self.tensors)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self.tensors[key]["data_offsets"]
        return end - begin

    def read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> mx.array:
        """Tensor `key`, or its rows [start:stop] along the first axis."""
        info = self.tensors[key]
        np_dtype, mx_dtype = DTYPES[info["dtype"]]
        shape = list(info["shape"])
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, _ = info["data_offsets"]
        row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if shape:
            start, stop, _ = slice(start, stop).indices(shape[0])
            shape[0] = stop - start
        else:
            start = 0
        offset = self.data_start + begin + start * row
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.frombuffer(self._mmap, dtype=np_dtype, count=count, offset=offset)
        arr = mx.array(np.array(raw).reshape(shape))  # copy out of the map
        if mx_dtype == mx.bfloat16:
            arr = arr.view(mx.bfloat16)
        elif arr.dtype != mx_dtype:
            arr = arr.astype(mx_dtype)
        return arr

    def close(self):
        self._mmap = None


def shard_files(path: Path) -> Tuple[List[Path], Dict[str, str]]:
    """Shard paths (index order) and the key -> file map; checks the index against the disk."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if not (path / name).exists():
                raise CheckpointError(f"{path / name}: listed in {index.name} but missing")
        return [path / f for f in files], weight_map
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors shards found")
    return files, {}


def iter_shards(path: Path) -> Iterator[ShardReader]:
    files, weight_map = shard_files(path)
    for f in files:
        reader = ShardReader(f)
        expected = [k for k, v in weight_map.items() if v == f.name]
        missing = sorted(set(expected) - set(reader.tensors))
        if missing:
            raise CheckpointError(f"{f}: missing tensor(s) listed in the index: {', '.join(missing[:5])}")
        yield reader
        reader.close()
