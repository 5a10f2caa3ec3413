"""`convert()`: HF checkpoint -> MLX shards, streaming tensor by tensor, written atomically."""

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
from tqdm import tqdm

from .config import (
    FORMAT_KEY,
    FORMAT_VERSION,
    ConfigError,
    load_config,
    parse_config,
    text_config,
)
from .loading import build, make_recipe, parse_dtype, resolve_path
from .memory import Device, InsufficientMemoryError, conversion_bytes, gb
from .safetensors_io import CheckpointError
from .weights import QuantRecipe, checkpoint_keys, stream, to_internal, to_storage

MAX_SHARD_BYTES = 5 << 30
PER_LAYER_FIELDS = (
    "layer_types",
    "partial_rotary_factors",
    "rope_theta",
    "swiglu_limits",
    "swiglu_limits_shared",
)
TOKENIZER_FILES = (
    "*.jinja",
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
)


class ShardWriter:
    """Writes tensors into shards of at most `max_bytes` as soon as each fills up."""

    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES, prefix: str = "model"):
        self.folder, self.max_bytes, self.prefix = folder, max_bytes, prefix
        self.pending: Dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files = []  # (temporary file name, keys)
        self.total = 0

    def add(self, name: str, arr: mx.array):
        if self.pending and self.pending_bytes + arr.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = arr
        self.pending_bytes += arr.nbytes
        self.total += arr.nbytes

    def flush(self):
        if not self.pending:
            return
        name = f"{self.prefix}-part{len(self.files):05d}.safetensors"
        mx.save_safetensors(str(self.folder / name), self.pending, metadata={"format": "mlx"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> Dict[str, str]:
        """Give the shards their final names; returns the weight map."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files):
            final = (
                f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
                if n > 1 or self.prefix != "model"
                else "model.safetensors"
            )
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update({k: final for k in keys})
        return weight_map


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled)


def _output_config(config: dict, args, quant: Optional[dict], dtype: mx.Dtype, mtp_layers: int) -> dict:
    out = dict(text_config(config))  # Step-3.7: our shards hold the text model under model.*
    out["model_type"] = "step3p5"
    out["num_nextn_predict_layers"] = mtp_layers
    n = args.num_hidden_layers + mtp_layers  # MTP weights absent: drop their per-layer entries too
    for key in PER_LAYER_FIELDS:
        if isinstance(out.get(key), list) and len(out[key]) > n:
            out[key] = out[key][:n]
    out["torch_dtype"] = str(dtype).split(".")[-1]
    out.pop("quantization_config", None)
    if quant:
        out["quantization"] = quant
        out["quantization_config"] = quant
    out[FORMAT_KEY] = {"format_version": FORMAT_VERSION, "norms": "one_plus_w"}
    return out


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    *,
    quantize: Union[bool, QuantRecipe] = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str = "bfloat16",
    mtp_only: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
    on_tensor: Optional[Callable[[str], None]] = None,
    force: bool = False,
) -> Path:
    """Convert an HF Step-3.5/3.7-Flash checkpoint into MLX shards at `mlx_path`.

    Reads one tensor at a time and writes each output shard when full, so memory stays at
    about one shard plus one tensor. Writes into a hidden sibling directory and renames
    it at the end: an interrupted run leaves nothing that looks complete. With
    `mtp_only=True`, `mlx_path` is an existing MLX conversion without MTP weights and
    only the MTP layers of `hf_path` are read, quantized like it, and added to it.
    Raises InsufficientMemoryError, before writing anything, when that working memory
    (`working_memory`) exceeds the machine's memory, unless `force`.
    """
    src = resolve_path(hf_path)
    if mtp_only:
        return graft_mtp(
            src, Path(mlx_path), q_bits=q_bits, q_group_size=q_group_size, dtype=dtype, progress=progress
        )
    out = Path(mlx_path).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists; remove it or choose another --mlx-path")
    recipe = make_recipe(quantize, q_bits, q_group_size)
    dt = parse_dtype(dtype)
    model, args, config, keys, plan = build(src, recipe=recipe, dtype=dt, mtp=True)
    need, device = conversion_bytes(model, plan.shapes, dt, max_shard_bytes), Device.current()
    if need > device.memory and not force:
        raise InsufficientMemoryError(
            f"converting needs about {gb(need)} of working memory, more than this machine's "
            f"{gb(device.memory)}; a smaller max_shard_bytes lowers it (force=True converts anyway)"
        )
    tmp = out.parent / f".{out.name}.incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted run
    tmp.mkdir(parents=True)
    try:
        _write_conversion(
            src, tmp, model, args, config, keys, plan, recipe, dt, max_shard_bytes, progress, on_tensor
        )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves no partial shards behind
        raise
    return out


def working_memory(
    hf_path: Union[str, Path],
    *,
    quantize: Union[bool, QuantRecipe] = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str = "bfloat16",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Tuple[int, Device]:
    """(bytes of working memory `convert` needs with these arguments, this machine)."""
    dt = parse_dtype(dtype)
    model, _, _, _, plan = build(
        resolve_path(hf_path), recipe=make_recipe(quantize, q_bits, q_group_size), dtype=dt, mtp=True
    )
    return conversion_bytes(model, plan.shapes, dt, max_shard_bytes), Device.current()


def _write_conversion(
    src, tmp, model, args, config, keys, plan, recipe, dt, max_shard_bytes, progress, on_tensor
):
    writer = ShardWriter(tmp, max_shard_bytes)
    seen = set()
    total = sum(os.path.getsize(f) for f in set(keys.values()))
    with _progress(total, progress, "converting") as bar:
        for name, arr in stream(plan, src, keys, skip_mtp=not model.mtp, on_tensor=bar.update):
            if name in seen:
                raise CheckpointError(f"{src}: tensor {name} appears twice in the checkpoint")
            seen.add(name)
            writer.add(to_storage(name, args), arr)
            if on_tensor:
                on_tensor(name)
    missing = plan.checkpoint_names(plan.missing(seen))
    if missing:
        raise CheckpointError(f"{src}: missing tensor(s) {', '.join(missing[:5])}")
    weight_map = writer.finish()
    _write_json(
        tmp / "model.safetensors.index.json",
        {"metadata": {"total_size": writer.total}, "weight_map": weight_map},
    )
    cfg = _output_config(config, args, plan.quantization_config(recipe), dt, len(model.mtp))
    _write_json(tmp / "config.json", cfg)
    _copy_tokenizer(src, tmp)


def _copy_tokenizer(src: Path, dst: Path):
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def graft_mtp(
    src: Path, target: Path, *, q_bits=4, q_group_size=64, dtype="bfloat16", progress=False
) -> Path:
    """Add the MTP layers of HF checkpoint `src` to MLX conversion `target` (in place, atomically)."""
    target = resolve_path(target)
    tcfg = load_config(target)
    targs = parse_config(tcfg, source=str(target / "config.json"))
    tkeys = checkpoint_keys(target)
    if any(to_internal(k, targs, False).startswith("mtp.") for k in tkeys if to_internal(k, targs, False)):
        raise ValueError(f"{target}: already has MTP weights; nothing to graft")
    tq = tcfg.get("quantization") or {}
    recipe = (
        QuantRecipe(bits=tq.get("bits", q_bits), group_size=tq.get("group_size", q_group_size))
        if tq
        else None
    )
    model, args, config, keys, plan = build(src, recipe=recipe, dtype=parse_dtype(dtype), mtp=True)
    if not model.mtp:
        raise CheckpointError(f"{src}: has no MTP layers (model.layers.{args.num_hidden_layers}+) to graft")
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(args, field) != getattr(targs, field):
            raise ConfigError(
                f"{target}: {field} differs from {src} ({getattr(targs, field)} vs {getattr(args, field)})"
            )
    writer = _write_mtp_shards(src, target, args, keys, plan, progress)
    index_path = target / "model.safetensors.index.json"
    index = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"metadata": {}, "weight_map": {k: Path(f).name for k, f in tkeys.items()}}
    )
    for i, (tmp, names) in enumerate(writer.files):
        final = f"model-mtp-{i + 1:05d}.safetensors"
        os.replace(target / tmp, target / final)
        index["weight_map"].update({k: final for k in names})
    index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + writer.total
    new_cfg = dict(tcfg)
    text = text_config(config)
    for key in ("num_nextn_predict_layers",) + PER_LAYER_FIELDS:
        if key in text:
            new_cfg[key] = text[key]
    quant = plan.quantization_config(recipe)
    if quant:
        merged = dict(tq)
        merged.update({k: v for k, v in quant.items() if k.startswith("mtp.")})
        new_cfg["quantization"] = new_cfg["quantization_config"] = merged
    new_cfg[FORMAT_KEY] = {"format_version": FORMAT_VERSION, "norms": "one_plus_w"}
    _write_json(target / "config.json", new_cfg)
    _write_json(index_path, index)  # last: until the index lists them, the new shards are unused
    return target


def _write_mtp_shards(src, target, args, keys, plan, progress) -> ShardWriter:
    """Stream the MTP layers of `src` into hidden shards in `target` (removed on failure)."""
    mtp_files = {f for k, f in keys.items() if (to_internal(k, args, plan.nested) or "").startswith("mtp.")}
    writer = ShardWriter(target, MAX_SHARD_BYTES, prefix=".mtp-graft")
    seen = set()
    try:
        with _progress(sum(os.path.getsize(f) for f in mtp_files), progress, "grafting MTP") as bar:
            for name, arr in stream(plan, src, keys, only=mtp_files, on_tensor=bar.update):
                if name.startswith("mtp."):
                    seen.add(name)
                    writer.add(to_storage(name, args), arr)
        missing = plan.checkpoint_names([k for k in plan.missing(seen) if k.startswith("mtp.")])
        if missing:
            raise CheckpointError(f"{src}: missing MTP tensor(s) {', '.join(missing[:5])}")
        writer.flush()
    except BaseException:
        for tmp, _ in writer.files:
            (target / tmp).unlink(missing_ok=True)
        raise
    return writer
