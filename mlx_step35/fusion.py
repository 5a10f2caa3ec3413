"""Merged projections: one matmul where the checkpoint has several that read the same input.

Attention's q, k, v and g projections read the same normed input, and so do the gate and up
projections of each MLP (the dense layers' and the shared experts'). `fuse(model)` (called by
`load`) concatenates each group's weights, and their quantization scales and biases, along the
output rows into one array and makes every original parameter a view of its rows: parameter
names, shapes, sizes and values stay as they were (saving, fingerprints, memory figures and
sharding see the same model) and memory is not doubled. Each output element is the same dot
product as before, so the merged call gives the same numbers (bit for bit on the CPU backend,
tested); a decode step then launches one kernel per group instead of two to four.

A module's projections go through `project`, which falls back to the separate projections
when the module was not merged or when any of its parameters has since been replaced
(`model.update`, `load_weights`, re-quantizing): the merged copy is then dropped.

The routed experts' gate and up are not merged: that would copy two thirds of the model's
bytes at every load (measured: +7-16% load time on a 453 MiB conversion) to save one kernel
per MoE layer.
"""

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

# Layers whose call is exactly `x @ W.T` (quantized or not) when they have no bias; the
# all-to-sharded ones of tensor parallelism compute their rank's rows locally, like a Linear.
DENSE = (nn.Linear, AllToShardedLinear)
DENSE_Q = (nn.QuantizedLinear, QuantizedAllToShardedLinear)
PARTS = ("weight", "scales", "biases")
FEW_ROWS = 16  # tokens per call up to which the merged matmul is used


class Merged:
    """Several projections of one input as one matmul over their concatenated rows."""

    def __init__(self, layers: Sequence[nn.Module], quant: Optional[tuple]):
        self.quant = quant  # (group_size, bits, mode), or None for float weights
        self.keys = [k for k in PARTS if layers[0].get(k) is not None]
        self.arrays = {k: mx.concatenate([layer[k] for layer in layers], axis=-2) for k in self.keys}
        self.bounds, start = [], 0
        for layer in layers:
            rows = layer["weight"].shape[-2]
            self.bounds.append((start, start + rows))
            start += rows
        for layer, (a, b) in zip(layers, self.bounds):
            for k in self.keys:
                layer[k] = self.arrays[k][..., a:b, :]  # a view: shares the merged buffer
        self.views = [(layer, k, layer[k]) for layer in layers for k in self.keys]
        mx.eval(self.arrays, [v for _, _, v in self.views])  # the old buffers are freed here

    def intact(self) -> bool:
        """Whether every original parameter is still the view made here."""
        return all(layer.get(k) is v for layer, k, v in self.views)

    def _split(self, y: mx.array) -> List[mx.array]:
        return [y[..., a:b] for a, b in self.bounds]

    def __call__(self, x: mx.array) -> List[mx.array]:
        w = self.arrays
        if self.quant is None:
            return self._split(x @ w["weight"].T)
        group_size, bits, mode = self.quant
        y = mx.quantized_matmul(
            x,
            w["weight"],
            scales=w["scales"],
            biases=w.get("biases"),
            transpose=True,
            group_size=group_size,
            bits=bits,
            mode=mode,
        )
        return self._split(y)


def _kind(layer) -> Optional[tuple]:
    """(family, quantization) of a layer that can be merged, else None."""
    if "bias" in layer or layer.get("global_scale") is not None:
        return None
    if type(layer) in DENSE:
        return "dense", None
    if type(layer) in DENSE_Q:
        return "quantized", (layer.group_size, layer.bits, layer.mode)
    return None


def _mergeable(layers) -> Optional[tuple]:
    kinds = {_kind(layer) for layer in layers}
    if len(kinds) != 1 or None in kinds:
        return None
    keys = {tuple(k for k in PARTS if layer.get(k) is not None) for layer in layers}
    shapes = {(layer["weight"].shape[-1], layer["weight"].dtype) for layer in layers}
    return kinds.pop() if len(keys) == 1 and len(shapes) == 1 else None


def _modules(module: nn.Module):
    """The module and all below it (a plain walk: `named_modules` builds a dict per module)."""
    yield module
    for value in module.values():
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, nn.Module):
                yield from _modules(child)


def fuse(model: nn.Module) -> int:
    """Merge the projections named by each module's `MERGE` (in that order) where they share
    one input, one kind of layer and one quantization; returns how many groups were merged."""
    n = 0
    for module in _modules(model):
        names = getattr(module, "MERGE", None)
        if not names or getattr(module, "merged", None) is not None:
            continue
        layers = [module[name] for name in names if name in module]
        kind = _mergeable(layers) if len(layers) > 1 else None
        if kind is not None:
            module.merged = Merged(layers, kind[1])
            n += 1
    if n:
        mx.clear_cache()  # the separate buffers just freed would otherwise stay in MLX's cache
    return n


def _live(module) -> Optional[Merged]:
    merged = getattr(module, "merged", None)
    if merged is not None and not merged.intact():
        module.merged = merged = None  # a parameter was replaced: drop the stale copy
    return merged


def project(module: nn.Module, x: mx.array) -> Tuple[List[mx.array], bool]:
    """The outputs of `module`'s projections `MERGE` (those it has) on x, in that order, and
    whether they are slices of one merged output. Only calls of up to FEW_ROWS tokens (decode
    and verify steps) take the merged matmul: a prompt's chunk is compute-bound, and its
    slices, strided between rows, would cost copies (on the CPU, prefill measured 2% slower)."""
    merged = _live(module) if x.size <= FEW_ROWS * x.shape[-1] else None
    if merged is not None:
        return merged(x), True
    return [module[name](x) for name in module.MERGE if name in module], False
