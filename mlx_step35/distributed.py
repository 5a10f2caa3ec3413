"""Tensor parallelism over an `mx.distributed` group (several Macs), with decisions in lockstep.

`load(path, group=group)` calls `shard(model, plan, group)` between building the model and
streaming its weights: attention heads (q, k, v and the head-wise gate) are split by rows and
o_proj by columns; dense, shared-expert and every routed expert's MLP along the intermediate
dimension; one all-sum after attention and one after each MLP / MoE; router, norms, embedding,
lm_head and the MTP blocks' eh_proj and heads are replicated. The same holds for the MTP blocks.
Each rank reads only its own slice of every split tensor from disk.

Every decision that steers computation (sampled tokens, accepted counts, auto's draft depth) is
taken on rank 0 and broadcast through the model's `lockstep`, so all ranks run the same passes.
"""

import json
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .config import ConfigError, ModelArgs
from .model import MLP, MoE
from .safetensors_io import DTYPES, CheckpointError
from .weights import to_internal

ROWS, COLUMNS = "rows", "columns"
BACKEND_ERRORS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]")  # how the backends start their errors
# Internal parameter name -> how it is split (rows: output features; columns: input features).
SPLITS = [
    (re.compile(r"\.self_attn\.[qkvg]_proj\."), ROWS),
    (re.compile(r"\.self_attn\.o_proj\."), COLUMNS),
    (re.compile(r"\.(mlp|share_expert|switch_mlp)\.(gate|up)_proj\."), ROWS),
    (re.compile(r"\.(mlp|share_expert|switch_mlp)\.down_proj\."), COLUMNS),
]


def split_of(internal: str) -> Optional[str]:
    """ROWS, COLUMNS or None (replicated) for an internal parameter name."""
    if ".mlp.gate." in internal:  # the MoE router
        return None
    return next((kind for pattern, kind in SPLITS if pattern.search(internal)), None)


def world(group: Optional[mx.distributed.Group] = None) -> Optional[mx.distributed.Group]:
    """`group`, or the group `mlx.launch` started this process in; None for one process."""
    group = group or mx.distributed.init()
    return group if group.size() > 1 else None


# ---------------------------------------------------------------------------------------------
# what can be split


def check_splittable(args: ModelArgs, n: int, quant: Optional[dict] = None) -> None:
    """Raise ConfigError naming what cannot be split over `n` ranks and why. `quant` maps module
    paths to their quantization parameters: a quantized column split needs whole groups per rank."""
    problems = []
    for i in range(args.num_layers_total):
        heads, kv = args.heads(i)
        if heads % n or kv % n:
            kind = "sliding" if args.is_sliding(i) else "full"
            problems.append(
                f"layer {i} ({kind} attention) has {heads} query and {kv} KV heads: "
                f"each rank must hold whole heads, so both must be divisible by {n}"
            )
            break
    widths = {
        "intermediate_size": args.intermediate_size,
        "moe_intermediate_size": args.moe_intermediate_size,
        "share_expert_dim": args.share_expert_dim,
    }
    problems += [f"{k} = {v} is not divisible by {n}" for k, v in widths.items() if v % n]
    for path, params in sorted((quant or {}).items()):
        if not path.endswith(("o_proj", "down_proj")):
            continue
        width = _input_width(args, path)
        if width % n or (width // n) % params["group_size"]:
            problems.append(
                f"{path}: its input width {width} split over {n} ranks is not a whole number of "
                f"quantization groups of {params['group_size']}"
            )
            break
    if problems:
        raise ConfigError(f"cannot split this model over {n} ranks: " + "; ".join(problems))


def _input_width(args: ModelArgs, path: str) -> int:
    if path.endswith("o_proj"):
        m = re.search(r"(layers|mtp)\.(\d+)\.", path)
        i = int(m.group(2)) + (args.num_hidden_layers if m.group(1) == "mtp" else 0)
        return args.heads(i)[0] * args.head_dim
    if "switch_mlp" in path:
        return args.moe_intermediate_size
    if "share_expert" in path:
        return args.share_expert_dim
    return args.intermediate_size


# ---------------------------------------------------------------------------------------------
# the model


def shard_modules(model, group: mx.distributed.Group) -> None:
    """Replace the split linears of every trunk layer and MTP block by their sharded versions
    (mlx.nn's AllToSharded / ShardedToAll, quantized or not) and set the MoE all-sum group.
    Parameters are only sliced lazily here; `load` replaces them with the rank's slices."""
    n = group.size()
    for layer in list(model.layers) + list(model.mtp):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
            if name in attn:
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.num_heads //= n
        attn.num_kv_heads //= n
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        elif isinstance(mlp, MoE):
            for part in (mlp.switch_mlp, mlp.share_expert):
                shard_inplace(part.gate_proj, "all-to-sharded", group=group)
                shard_inplace(part.up_proj, "all-to-sharded", group=group)
                shard_inplace(part.down_proj, "sharded-to-all", group=group)
            mlp.sharding_group = group  # one all-sum of routed + shared partial sums
    model.lockstep = Lockstep(group)


class ShardedPlan:
    """A WeightPlan whose split tensors are read as this rank's slice only."""

    def __init__(self, plan, group: mx.distributed.Group):
        self.plan, self.rank, self.size = plan, group.rank(), group.size()

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def tensors(self, reader, key: str):
        internal = to_internal(key, self.plan.args, self.plan.nested)
        kind = split_of(internal) if internal else None
        if kind is None:
            return self.plan.tensors(reader, key)
        return self.plan.tensors(SliceReader(reader, kind, self.rank, self.size), key)


def shard(model, plan, group: mx.distributed.Group) -> ShardedPlan:
    """Check that the model can be split over `group`, shard its modules, and return the plan
    that loads this rank's slices. Raises ConfigError before anything is read."""
    check_splittable(plan.args, group.size(), plan.quant)
    shard_modules(model, group)
    return ShardedPlan(plan, group)


# ---------------------------------------------------------------------------------------------
# reading a slice


class SliceReader:
    """A ShardReader view that returns this rank's rows or columns of every tensor read: the
    shape it reports is the stored one (so the plan checks it), the arrays it returns are the
    slice. Quantized tensors (weight, scales, biases) slice alike: the split axis holds whole
    groups (checked by `check_splittable`). Stacked experts are [E, out, in]."""

    def __init__(self, reader, kind: str, rank: int, size: int):
        self.reader, self.kind, self.rank, self.size = reader, kind, rank, size
        self.path = reader.path

    def __getattr__(self, name):  # dtype, tensors, ...: the stored tensor's
        return getattr(self.reader, name)

    def shape(self, key):
        return self.reader.shape(key)

    def nbytes(self, key):
        return self.reader.nbytes(key)

    def read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> mx.array:
        shape = self.reader.shape(key)
        if len(shape) < 2:
            raise CheckpointError(f"{self.path}: tensor {key} is split but has shape {list(shape)}")
        axis = len(shape) - (2 if self.kind == ROWS else 1)
        width = shape[axis]
        if width % self.size:
            raise CheckpointError(
                f"{self.path}: tensor {key} has {width} {self.kind}, not divisible by {self.size} ranks"
            )
        part = width // self.size
        index = [slice(None)] * len(shape)
        index[axis] = slice(self.rank * part, (self.rank + 1) * part)
        rows = slice(start, stop).indices(shape[0])[:2]
        if rows != (0, shape[0]):
            if axis == 0:  # the plan reads 2-D tensors whole; only stacked experts in slices
                raise CheckpointError(f"{self.path}: tensor {key}: row range of a row-split 2-D tensor")
            index[0] = slice(*rows)
        return read_block(self.reader, key, tuple(index))


def read_block(reader, key: str, index: tuple) -> mx.array:
    """tensor[index] (a tuple of slices) read from its shard through a memory map: only the
    pages that hold the block are touched."""
    info = reader.tensors[key]
    np_dtype, mx_dtype = DTYPES[info["dtype"]]
    begin = info["data_offsets"][0]
    view = np.memmap(
        reader.path, dtype=np_dtype, mode="r", offset=reader.data_start + begin, shape=tuple(info["shape"])
    )
    arr = mx.array(np.ascontiguousarray(view[index]))  # copy out of the map
    del view
    if mx_dtype == mx.bfloat16:
        return arr.view(mx.bfloat16)
    return arr if arr.dtype == mx_dtype else arr.astype(mx_dtype)


# ---------------------------------------------------------------------------------------------
# lockstep


class Lockstep:
    """Rank 0's decisions, broadcast to every rank (an all-sum where the others add zeros)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.leader = group.rank() == 0

    def array(self, x: mx.array) -> mx.array:
        """Rank 0's value of a (lazy) integer array, lazily: it stays in the graph. The others
        send x * 0, not zeros, so they still evaluate what x depends on (its collectives)."""
        x = x.astype(mx.int32)
        return mx.distributed.all_sum(x if self.leader else x * 0, group=self.group)

    def ints(self, values: List[int]) -> List[int]:
        """Rank 0's values of a list of Python ints (one round trip)."""
        return self.array(mx.array(values, dtype=mx.int32)).tolist()

    def payload(self, obj=None):
        """Rank 0's JSON-serialisable `obj` (the others pass nothing)."""
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8) if self.leader else None
        (n,) = self.ints([len(data) if self.leader else 0])
        buf = mx.array(data.astype(np.int32)) if self.leader else mx.zeros((n,), dtype=mx.int32)
        out = np.array(self.array(buf), dtype=np.uint8)
        return json.loads(out.tobytes().decode())


class _OneProcess:
    """The lockstep of a model in one process: every value is already rank 0's."""

    leader = True

    def array(self, x):
        return x

    def ints(self, values):
        return list(values)

    def payload(self, obj=None):
        return obj


ONE_PROCESS = _OneProcess()


def lockstep(model) -> "Lockstep":
    return getattr(model, "lockstep", None) or ONE_PROCESS


def exit_when_terminated(message: str):
    """When one rank exits, mlx.launch terminates the others (SIGTERM). A rank blocked in a
    collective cannot run a Python handler (that waits for the main thread), so a watcher thread
    reads the signal from the wakeup fd, prints `message` and exits at once (status 1)."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # installs the C handler that feeds the fd
    signal.set_wakeup_fd(write)

    def watch():
        if os.read(read, 1):
            print(message, file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watch, daemon=True, name="sigterm-watch").start()


class PeerLost(RuntimeError):
    """Another rank of the group exited, was killed or lost its connection."""


@contextmanager
def peer_errors(rank: Optional[int] = None):
    """Turn the backend's error for a vanished peer into PeerLost with a clear message
    (ring raises at the next collective once a peer's socket closes)."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith(BACKEND_ERRORS):
            raise
        who = f"rank {rank}: " if rank is not None else ""
        raise PeerLost(
            f"{who}another rank exited, was killed or lost its connection ({e}); stopping this rank too"
        ) from None


# ---------------------------------------------------------------------------------------------
# serving: rank 0 takes requests, the other ranks follow


def share_request(model, request: Optional[dict] = None) -> Optional[dict]:
    """Rank 0 passes a JSON-serialisable generation request (see `request_kwargs`), or None to
    stop the followers; every rank gets rank 0's request back. One process: returns `request`."""
    return lockstep(model).payload(request)


def request_kwargs(request: dict) -> dict:
    """stream_generate keyword arguments (prompt as token ids included) for a shared request:
    {"prompt": [ids], "max_tokens", "sampler": make_sampler kwargs, "repetition_penalty",
    "presence_penalty", "frequency_penalty", "draft_mtp", "num_draft", "stop_strings", "seed",
    "kv_bits", "kv_group_size", "quantized_kv_start"}; every rank builds the same call (each
    rank's caches hold its own KV heads, quantized alike)."""
    from .sampling import make_logits_processors, make_sampler

    if request.get("seed") is not None:
        mx.random.seed(request["seed"])
    penalties = {k: request.get(k) for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")}
    kwargs = {k: request[k] for k in ("prompt", "max_tokens", "draft_mtp", "num_draft") if k in request}
    kwargs.update({k: request[k] for k in ("kv_bits", "kv_group_size", "quantized_kv_start") if k in request})
    kwargs["stop_strings"] = tuple(request.get("stop_strings") or ())
    kwargs["sampler"] = make_sampler(**(request.get("sampler") or {}))
    kwargs["logits_processors"] = make_logits_processors(**penalties) if any(penalties.values()) else None
    return kwargs


def follow(model, tokenizer) -> int:
    """The loop of every rank but 0 while rank 0 serves: take each shared request and run the
    same generation to its end (rank 0 must also run each to its end, even if its client left,
    or the ranks fall out of step). Returns the number of requests served, when rank 0 shares None."""
    from .generation import stream_generate

    served = 0
    while (request := share_request(model)) is not None:
        for _ in stream_generate(model, tokenizer, **request_kwargs(request)):
            pass
        served += 1
    return served
