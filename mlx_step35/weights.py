"""Checkpoint key names, the quantization recipe, and the streaming tensor pipeline
shared by `load` (tensors go into the model) and `convert` (tensors go to new shards)."""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import FORMAT_KEY, ConfigError, ModelArgs
from .safetensors_io import CheckpointError, ShardReader, open_shards

# HF checkpoint name -> our module name (mlx-lm's step3p5 names, so conversions load there too).
RENAMES = [
    (".moe.gate_proj.", ".mlp.switch_mlp.gate_proj."),  # stacked experts feed SwitchGLU
    (".moe.up_proj.", ".mlp.switch_mlp.up_proj."),
    (".moe.down_proj.", ".mlp.switch_mlp.down_proj."),
    (".moe.gate.", ".mlp.gate.gate."),  # the router linear sits inside MoEGate
    (".moe.router_bias", ".mlp.gate.router_bias"),
    (".share_expert.", ".mlp.share_expert."),  # shared expert belongs to the MoE module
]
STEP37_PREFIX = "model.language_model."  # Step-3.7 may nest the text model under this prefix
TEXT_KEYS = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.", "model.lm_head.")
# Keys deliberately not loaded, with the reason.
SKIPPED = [
    (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), "RoPE buffers are recomputed from the config"),
]
SKIPPED_37 = "Step-3.7 vision tower / projector: this runtime is text-only"
MTP_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
SLICE_BYTES = 256 << 20  # read stacked experts in slices of about this size


@dataclass
class QuantRecipe:
    """Bits per module kind. Routed experts (97% of the weights) use `bits`; the router
    is tiny and decides discrete expert choices, so it keeps 8 bits; the vocab
    projections (embedding, lm_head, MTP heads) set the logits that drafts are accepted
    on, so they keep 6 bits; attention, dense and shared-expert MLPs and the MTP blocks,
    read on every token, use `bits` too so decoding stays bandwidth-light."""

    bits: int = 4
    group_size: int = 64
    router_bits: int = 8
    vocab_bits: int = 6
    mode: str = "affine"

    def params(self, path: str, module: nn.Module) -> Optional[dict]:
        if not hasattr(module, "to_quantized"):
            return None
        group = self.group_size
        while module.weight.shape[-1] % group and group > 32:
            group //= 2  # a narrow input dimension (tiny models) takes a smaller group
        if module.weight.shape[-1] % group:
            return None  # not quantizable: stays in full precision
        if path.endswith("mlp.gate.gate"):
            bits = self.router_bits
        elif path in ("model.embed_tokens", "lm_head") or path.endswith("shared_head.output"):
            bits = self.vocab_bits
        else:
            bits = self.bits
        return {"group_size": group, "bits": bits, "mode": self.mode}


def source_format(config: dict, keys) -> str:
    """'hf' (zero-centred norms, HF names) or 'mlx' (our or mlx-lm's conversion: norms are 1 + w)."""
    if FORMAT_KEY in config:
        return "mlx"
    if any(".mlp.switch_mlp." in k for k in keys):
        return "mlx"  # an mlx-lm conversion (its sanitize already added 1 to the norms)
    return "hf"


def to_internal(key: str, args: ModelArgs, nested: bool) -> Optional[str]:
    """Our module path for checkpoint key `key`, or None when the key is skipped on purpose."""
    if nested:
        if key.startswith(STEP37_PREFIX):
            key = "model." + key[len(STEP37_PREFIX) :]
        if not key.startswith(TEXT_KEYS):
            return None  # SKIPPED_37
    if any(p.search(key) for p, _ in SKIPPED):
        return None
    if key.startswith("model.lm_head."):
        key = key[len("model.") :]
    m = MTP_KEY.match(key)
    if m and int(m.group(1)) >= args.num_hidden_layers:
        j = int(m.group(1)) - args.num_hidden_layers
        rest = m.group(2).replace("transformer.shared_head.", "shared_head.")
        return f"mtp.{j}.{rest}"
    for src, dst in RENAMES:
        if src in key and dst not in key:  # converted shards already use our names
            return key.replace(src, dst)
    return key


def to_storage(internal: str, args: ModelArgs) -> str:
    """Name in our converted shards: mlx-lm's for the trunk, the checkpoint's for MTP
    layers (mlx-lm's step3p5 skips layers >= num_hidden_layers, so it loads the trunk)."""
    if internal.startswith("mtp."):
        _, j, rest = internal.split(".", 2)
        rest = rest.replace("shared_head.", "transformer.shared_head.")
        return f"model.layers.{args.num_hidden_layers + int(j)}.{rest}"
    return internal


class CheckpointKeys(dict):
    """Every tensor key -> its shard's path; `readers` are the validated shards the keys come
    from, which `stream` reads, so each header is parsed once per load."""

    def __init__(self, readers: List[ShardReader]):
        super().__init__()
        self.readers = readers
        for reader in readers:  # a key in two shards is refused while streaming
            for key in reader.tensors:
                self.setdefault(key, reader.path)


def checkpoint_keys(path: Path) -> CheckpointKeys:
    """Every tensor key -> its shard, from the shard headers; every header and the index are
    validated here, before anything is built or read."""
    return CheckpointKeys(open_shards(path))


def has_mtp_weights(keys, args: ModelArgs, nested: bool) -> bool:
    return any((to_internal(k, args, nested) or "").startswith("mtp.") for k in keys)


class WeightPlan:
    """What each tensor of `model` must look like, and how to get it from the checkpoint."""

    def __init__(self, model: nn.Module, args: ModelArgs, config: dict, keys, recipe, dtype):
        self.args = args
        self.nested = config.get("model_type") == "step3p7"
        self.fmt = source_format(config, keys)
        self.dtype = dtype
        self.cast = model.cast_predicate
        self.shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
        # zero-centred norms (an HF checkpoint's) become 1 + w; a conversion's already are
        hf = self.fmt == "hf"
        self.norms = {p for p, m in model.named_modules() if isinstance(m, nn.RMSNorm)} if hf else set()
        stored_quant = config.get("quantization") or {}
        self.names = {k: to_internal(k, args, self.nested) for k in keys}  # None: skipped on purpose
        scales = {name for k, name in self.names.items() if k.endswith(".scales")}
        self.quant = {}  # module path -> quantization params
        self.prequant = set()  # modules stored already quantized in the checkpoint

        def predicate(path, module):
            if f"{path}.scales" in scales:  # already quantized in the checkpoint
                self.prequant.add(path)
                params = stored_quant.get(path)
                if params is None:
                    params = {k: stored_quant[k] for k in ("group_size", "bits", "mode") if k in stored_quant}
                    params.setdefault("mode", "affine")
            else:
                params = recipe.params(path, module) if recipe else None
            if params:
                self.quant[path] = params
            return params or False

        try:
            nn.quantize(model, class_predicate=predicate)
        except ValueError as e:  # stored parameters MLX cannot apply (e.g. a group size that does not divide)
            raise ConfigError(f"config.json: quantization does not fit the model ({e})") from None
        self.expected = {k: v.shape for k, v in tree_flatten(model.parameters())}

    def tensors(self, reader: ShardReader, key: str) -> List[Tuple[str, mx.array]]:
        """The (internal key, array) pairs that checkpoint tensor `key` becomes."""
        internal = self.internal(key)
        if internal is None:
            return []
        module = internal.rpartition(".")[0]
        quantize = module in self.quant and module not in self.prequant
        want = (
            self.shapes.get(internal) if quantize or module not in self.quant else self.expected.get(internal)
        )
        if want is None:
            raise CheckpointError(f"{reader.path}: unexpected tensor {key} (no parameter {internal})")
        shape = reader.shape(key)
        if shape != tuple(want):
            raise CheckpointError(
                f"{reader.path}: tensor {key} has shape {list(shape)}, expected {list(want)}"
            )
        self._check_dtype(reader, key, module, internal)
        if quantize and internal.endswith(".weight"):
            return self._quantized(reader, key, internal, module)
        return [(internal, self._prepare(reader.read(key), internal, module))]

    def internal(self, key: str) -> Optional[str]:
        """`to_internal(key)`, translated once per plan for the checkpoint's keys."""
        return self.names[key] if key in self.names else to_internal(key, self.args, self.nested)

    def _check_dtype(self, reader: ShardReader, key: str, module: str, internal: str):
        """Packed quantized weights are uint32, every other stored weight floating-point."""
        stored = reader.dtype(key)
        if module in self.prequant:
            ok, what = (
                (stored == mx.uint32, "uint32 (packed quantized)")
                if internal.endswith(".weight")
                else (True, "")
            )
        else:
            ok, what = mx.issubdtype(stored, mx.floating), "a floating-point dtype"
        if not ok:
            raise CheckpointError(
                f"{reader.path}: tensor {key} has dtype {reader.tensors[key]['dtype']}, expected {what}"
            )

    def _prepare(self, w: mx.array, internal: str, module: str) -> mx.array:
        if self.fmt == "hf" and module in self.norms:
            w = w.astype(mx.float32) + 1.0  # zero-centred norm: applied as 1 + w
        if mx.issubdtype(w.dtype, mx.floating):
            dtype = (self.dtype or w.dtype) if self.cast(internal) else mx.float32
            w = w if w.dtype == dtype else w.astype(dtype)
        return w

    def _quantized(self, reader, key, internal, module):
        params = self.quant[module]
        shape = reader.shape(key)
        rows = shape[0]
        row_bytes = max(1, reader.nbytes(key) // max(rows, 1))
        step = rows if len(shape) < 3 else max(1, SLICE_BYTES // row_bytes)
        parts = []
        for start in range(0, rows, step):  # stacked experts: a slice of experts at a time
            w = self._prepare(reader.read(key, start, start + step), internal, module)
            q = mx.quantize(
                w, group_size=params["group_size"], bits=params["bits"], mode=params.get("mode", "affine")
            )
            mx.eval(q)
            parts.append(q)
            del w
        names = ("weight", "scales", "biases")
        out = []
        for i, name in enumerate(names[: len(parts[0])]):
            arr = parts[0][i] if len(parts) == 1 else mx.concatenate([p[i] for p in parts])
            out.append((f"{module}.{name}", arr))
        return out

    def missing(self, seen) -> List[str]:
        return sorted(set(self.expected) - set(seen))

    def checkpoint_names(self, internal: List[str]) -> List[str]:
        """The checkpoint keys behind internal parameter names (for error messages)."""
        names = {}
        for name in internal:
            module, _, param = name.rpartition(".")
            if module in self.quant and module not in self.prequant and param in ("scales", "biases"):
                name = f"{module}.weight"  # quantized here from the one checkpoint tensor
            name = to_storage(name, self.args)
            if self.fmt == "hf":
                for src, dst in RENAMES:
                    if dst in name:
                        name = name.replace(dst, src)
                        break
            names[name] = None
        return list(names)

    def quantization_config(self, recipe: Optional[QuantRecipe]) -> Optional[dict]:
        """config.json "quantization" block in mlx-lm's format (per-module overrides by path)."""
        if not self.quant:
            return None
        base = {"group_size": recipe.group_size, "bits": recipe.bits, "mode": recipe.mode} if recipe else None
        if base is None:
            first = next(iter(self.quant.values()))
            base = {k: first[k] for k in ("group_size", "bits", "mode") if k in first}
        block = dict(base)
        for path, params in self.quant.items():
            if params != base:
                block[path] = params
        return block


def stream(
    plan: WeightPlan,
    path: Path,
    keys: Dict[str, Path],
    skip_mtp: bool = False,
    only=None,
    on_tensor=None,
    skip=None,
    lazy: bool = False,
) -> Iterator[Tuple[str, mx.array]]:
    """Yield (internal key, evaluated array) for every checkpoint tensor the plan uses;
    `on_tensor(nbytes)` is called after each checkpoint tensor (progress bars); tensors whose
    internal key satisfies `skip` are not read (experts streamed by the expert cache). With
    `lazy`, a conversion's tensors come unevaluated, for the caller to read all at once (as
    mlx_lm.load does); an HF checkpoint's are still transformed one at a time."""
    wanted = None if only is None else {str(f) for f in only}
    readers = keys.readers if isinstance(keys, CheckpointKeys) else open_shards(path)
    for reader in readers:
        if wanted is not None and str(reader.path) not in wanted:
            continue
        batch = []  # a conversion's shard: MLX reads it in one evaluation
        for key in reader.tensors:
            internal = plan.internal(key)
            if internal is not None and skip_mtp and internal.startswith("mtp."):
                continue
            if internal is not None and skip is not None and skip(internal):
                continue
            for name, arr in plan.tensors(reader, key):
                if plan.fmt == "mlx" and lazy:
                    yield name, arr
                elif plan.fmt == "mlx":
                    batch.append((name, arr))
                else:  # transformed (and maybe quantized) one tensor at a time: bounded memory
                    mx.eval(arr)
                    yield name, arr
            if on_tensor:
                on_tensor(reader.nbytes(key))
        mx.eval([arr for _, arr in batch])
        yield from batch
        reader.close()


def warn_unused(keys, args, nested):
    if not nested:
        return  # Step-3.5 skips only RoPE buffers, recomputed from the config: nothing to say
    skipped = [k for k in keys if to_internal(k, args, nested) is None]
    if skipped:
        warnings.warn(f"skipping {len(skipped)} tensor(s) not used here ({SKIPPED_37})", stacklevel=3)
