"""Decisions in lockstep across tensor-parallel ranks: every choice that steers computation
(sampled tokens, accepted counts, auto's draft depth, a shared request) is rank 0's, broadcast
through the model's `lockstep`. One process: a no-op stand-in. Below the step functions, which
use it, and the distributed module, which attaches it to a sharded model."""

import json
from typing import List, Optional

import mlx.core as mx
import numpy as np


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


def share_request(model, request: Optional[dict] = None) -> Optional[dict]:
    """Rank 0 passes a JSON-serialisable generation request (see `follow.request_kwargs`), or
    None to stop the followers; every rank gets rank 0's request back. One process: returns `request`."""
    return lockstep(model).payload(request)
