"""Record which routed experts every pass uses, per MoE layer (`generate.py --trace-experts`),
for `benchmarks/expert_cache.py replay` to size and tune the expert cache."""

import os
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


class ExpertTrace:
    """Records each pass's routed experts per MoE layer (hooked into the model's MoE layers);
    `save` writes them as npz: experts [rows, moe_layers, top_k] (int16), pass_rows [passes]."""

    def __init__(self, model):
        self.moe = {i: layer.mlp for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "switch_mlp")}
        self.rows: Dict[int, List[np.ndarray]] = {i: [] for i in self.moe}
        self.args = model.args
        self.expert_bytes = expert_bytes(model)
        for moe in self.moe.values():
            moe.on_route = self.record

    def record(self, layer: int, idx: mx.array):
        self.rows[layer].append(np.array(idx).reshape(-1, idx.shape[-1]).astype(np.int16))

    def close(self):
        for moe in self.moe.values():
            moe.on_route = None

    def arrays(self) -> Dict[str, np.ndarray]:
        layers = sorted(self.rows)
        lengths = [[len(r) for r in self.rows[i]] for i in layers]
        if any(n != lengths[0] for n in lengths):
            raise RuntimeError("expert trace: MoE layers saw different passes")
        k = self.args.moe_top_k
        experts = [
            np.concatenate(self.rows[i]) if self.rows[i] else np.zeros((0, k), np.int16) for i in layers
        ]
        return dict(
            experts=np.stack(experts, axis=1),
            pass_rows=np.array(lengths[0], np.int32),
            layers=np.array(layers, np.int32),
            num_experts=np.int32(self.args.moe_num_experts),
            expert_bytes=np.int64(self.expert_bytes),
        )

    def save(self, file, **meta):
        """Write the trace (and scalar `meta`, e.g. prompt_tokens) to `file` atomically."""
        file = Path(file)
        tmp = file.with_name(f".{file.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **self.arrays(), **{k: np.asarray(v) for k, v in meta.items()})
        os.replace(tmp, file)


def trace_experts(model) -> ExpertTrace:
    """Start recording the routed experts of every pass of `model` (resident or cached)."""
    return ExpertTrace(model)


def expert_bytes(model) -> int:
    """Bytes of one routed expert of one layer as loaded (all its tensors)."""
    if getattr(model, "expert_cache", None) is not None:
        return model.expert_cache.expert_bytes
    for layer in model.layers:
        sw = getattr(layer.mlp, "switch_mlp", None)
        if sw is not None:
            return sum(w.nbytes for _, w in tree_flatten(sw.parameters())) // sw.gate_proj.weight.shape[0]
    return 0
