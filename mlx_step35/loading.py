"""`load()`: an HF checkpoint (quantized while loading, shard by shard) or our conversion."""

import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .cache import KV_GROUP_SIZE, QUANTIZED_KV_START, kv_quant
from .config import load_config, parse_config
from .distributed import shard
from .expert_cache import EXPERT_CACHE_POLICY, POLICIES, attach_expert_cache, is_streamed, plan_expert_cache
from .fusion import fuse
from .memory import (
    Device,
    InsufficientMemoryError,
    MemoryWarning,
    Preflight,
    assess,
    estimate,
    recipe_weights,
)
from .model import Model
from .safetensors_io import CheckpointError
from .weights import (
    QuantRecipe,
    WeightPlan,
    checkpoint_keys,
    has_mtp_weights,
    source_format,
    stream,
    warn_unused,
)

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


DEMO_MODEL = Path(__file__).parent / "demo"
CONTEXT = 32768  # tokens of context the pre-flight of load() budgets KV cache for


def resolve_path(path_or_repo: Union[str, Path, None]) -> Path:
    """A local directory, a Hugging Face repo id already in the local hub cache, or
    (None) the bundled demo model."""
    if path_or_repo is None:
        if not (DEMO_MODEL / "config.json").exists():
            raise CheckpointError("no model given and the bundled demo model is not installed")
        return DEMO_MODEL
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and "/" in str(path_or_repo) and not str(path_or_repo).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path_or_repo), local_files_only=True))
        except Exception:
            pass
    raise CheckpointError(
        f"{path_or_repo}: no such model directory (and not a Hugging Face repo in the local cache)"
    )


def parse_dtype(dtype) -> Optional[mx.Dtype]:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def make_recipe(quantize, q_bits: int = 4, q_group_size: int = 64) -> Optional[QuantRecipe]:
    if isinstance(quantize, QuantRecipe):
        return quantize
    return QuantRecipe(bits=q_bits, group_size=q_group_size) if quantize else None


def build(path: Path, *, recipe, dtype, mtp: bool):
    """Model with empty (lazy) weights, its args, config, checkpoint keys and weight plan."""
    config = load_config(path)
    args = parse_config(config, source=str(path / "config.json"))
    keys = checkpoint_keys(path)
    nested = config.get("model_type") == "step3p7"
    with_mtp = mtp and args.num_nextn_predict_layers > 0 and has_mtp_weights(keys, args, nested)
    if mtp and args.num_nextn_predict_layers > 0 and not with_mtp:
        warnings.warn(f"{path}: the checkpoint has no MTP weights; loading the trunk only", stacklevel=3)
    if source_format(config, keys) == "mlx":
        recipe = None  # a conversion loads as converted (quantized or not)
    elif dtype is None:
        dtype = mx.bfloat16
    model = Model(args, mtp=with_mtp)
    plan = WeightPlan(model, args, config, keys, recipe, dtype)
    warn_unused(keys, args, nested)
    return model, args, config, keys, plan


def preflight(
    path: Union[str, Path, None] = None,
    *,
    quantize: Union[bool, QuantRecipe] = True,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Union[str, mx.Dtype, None] = None,
    mtp: bool = True,
    context: int = CONTEXT,
    draft: Optional[bool] = None,
    expert_cache_gb: Optional[float] = None,
    device: Optional[Device] = None,
    group: Optional[mx.distributed.Group] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
) -> Preflight:
    """Whether loading `path` as `load()` would (same arguments) and generating `context`
    tokens fits this machine, from the config and the index alone; see `memory.assess`.
    `draft` (default: when the MTP blocks load) adds their KV caches. With a `group`, this
    rank's share of the weights. `kv_bits` etc.: the KV format (see `generate_step`)."""
    kv = kv_quant(kv_bits, kv_group_size, quantized_kv_start)
    path = resolve_path(path)
    recipe = make_recipe(quantize, q_bits, q_group_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the checkpoint lacks or skips, load() says
        model, args, config, _, plan = build(path, recipe=recipe, dtype=parse_dtype(dtype), mtp=mtp)
    if group is not None and group.size() > 1:
        plan = shard(model, plan, group)
    return _assess(model, args, config, plan, recipe, dtype, context, draft, expert_cache_gb, device, kv)


def _assess(
    model, args, config, plan, recipe, dtype, context, draft, expert_cache_gb, device, kv=None
) -> Preflight:
    torch_dtype = config.get("torch_dtype")
    dt = parse_dtype(dtype) or (DTYPES.get(torch_dtype) if isinstance(torch_dtype, str) else None)
    dt = dt or mx.bfloat16
    draft = bool(model.mtp) if draft is None else draft and bool(model.mtp)
    needs = estimate(
        model, args, context=context, draft=draft, dtype=dt, expert_cache_gb=expert_cache_gb, kv_quant=kv
    )
    device = device or Device.current()
    if needs.total <= (device.recommended or device.memory):
        return assess(needs, device)
    if plan.fmt == "mlx":  # a conversion loads as converted: its own bits
        recipe = None
    stored = config.get("quantization") or {}
    group = stored.get("group_size") or (recipe.group_size if recipe else 64)
    bits = stored.get("bits") or (recipe.bits if recipe else 16)
    smaller = {  # offered as a fix: lower --q-bits (for a conversion: reconverting)
        b: recipe_weights(args, QuantRecipe(bits=b, group_size=group), mtp=bool(model.mtp), dtype=dt)["total"]
        for b in (3, 4, 6, 8)
        if b < bits
    }
    return assess(needs, device, smaller)


def load(
    path: Union[str, Path, None] = None,
    *,
    quantize: Union[bool, QuantRecipe] = True,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Union[str, mx.Dtype, None] = None,
    mtp: bool = True,
    context: int = CONTEXT,
    force: bool = False,
    group: Optional[mx.distributed.Group] = None,
    expert_cache_gb: Optional[float] = None,
    expert_cache_policy: str = EXPERT_CACHE_POLICY,
) -> Tuple[Model, TokenizerWrapper]:
    """Load a Step-3.5/3.7-Flash model and its tokenizer.

    `path` is an original HF checkpoint (BF16 shards + index), a directory written by
    `convert`, or an mlx-lm conversion. Full-precision weights are quantized while they
    stream in, one tensor (stacked experts: one slice) at a time, following `QuantRecipe`
    (`quantize=False` keeps `dtype`, default bfloat16). A conversion loads as it was
    converted, in its stored dtype unless `dtype` is given. With
    `mtp=False`, or a checkpoint without MTP layers, the model is trunk-only.

    Before reading any weight, a memory pre-flight (see `preflight`) for `context` tokens
    warns (MemoryWarning) when the model does not fit the GPU's working set, naming the fix,
    and raises InsufficientMemoryError when it needs more than the machine's memory, unless
    `force`.

    With `expert_cache_gb`, the routed experts of a quantized conversion stay on disk and
    are read on demand into per-layer slot pools of at most that many GB in all (see
    `expert_cache`; the output is the same as with every expert resident). A budget
    below one decoding step's working set is refused before anything is loaded.

    With a `group` of N > 1 ranks (`mx.distributed.init()` under `mlx.launch`), the model is
    tensor-parallel over it and each rank reads only its slice of the split weights (see
    `mlx_step35.distributed`); every rank must then run the same generation calls.
    """
    path = resolve_path(path)
    cache_plan = None
    if expert_cache_gb is not None and group is not None and group.size() > 1:
        raise ValueError(
            "expert_cache_gb and a distributed group cannot be combined yet: each rank "
            "holds a slice of every expert, which the expert cache does not stream"
        )
    if expert_cache_gb is not None:
        if expert_cache_policy not in POLICIES:
            raise ValueError(
                f"expert_cache_policy {expert_cache_policy!r}: choose one of {', '.join(POLICIES)}"
            )
        cache_plan = plan_expert_cache(path, expert_cache_gb, mtp=mtp)
    recipe = make_recipe(quantize, q_bits, q_group_size)
    model, args = _read_model(path, recipe, dtype, mtp, context, force, group, expert_cache_gb, cache_plan)
    if cache_plan:
        attach_expert_cache(model, cache_plan, dtype=parse_dtype(dtype), policy=expert_cache_policy)
    model.eval()
    # q/k/v/g and gate/up as one matmul each, under the same parameter names. Before the
    # evaluation: a conversion's weights are still lazy, so a group's separate arrays are read
    # only to be copied into its merged buffer, never held alongside it (mlx_lm.load's peak).
    fuse(model)
    # Evaluate every array now (private ones such as RoPE frequencies included): a lazy one
    # would later be computed on the loading thread's stream, which another thread cannot use.
    mx.eval([v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)])
    return model, tokenizer_of(path, args)


def _read_model(path, recipe, dtype, mtp, context, force, group, expert_cache_gb, cache_plan):
    """(model with the checkpoint's weights, its args): built, sharded over `group`, checked by
    the pre-flight, then every tensor read into its place. The plan and the shard headers are
    dropped on return, before the tokenizer loads."""
    model, args, config, keys, plan = build(path, recipe=recipe, dtype=parse_dtype(dtype), mtp=mtp)
    if group is not None and group.size() > 1:
        plan = shard(model, plan, group)  # refuses an unsplittable model before reading
    # (after sharding, the pre-flight counts this rank's weights)
    report = _assess(model, args, config, plan, recipe, dtype, context, None, expert_cache_gb, None)
    if report.refuse and not force:
        raise InsufficientMemoryError(report.text() + "\n(force=True loads anyway)")
    if not report.ok:
        warnings.warn(report.text(), MemoryWarning, stacklevel=3)
    streamed = is_streamed(cache_plan) if cache_plan else None
    seen = set()
    # a conversion's tensors stay lazy: load() evaluates every array at once, as mlx_lm.load does
    for name, arr in stream(plan, path, keys, skip_mtp=not model.mtp, skip=streamed, lazy=True):
        if name in seen:
            raise CheckpointError(f"{path}: tensor {name} appears twice in the checkpoint")
        seen.add(name)
        _put(model, path, name, arr)
    missing = plan.checkpoint_names([k for k in plan.missing(seen) if not (streamed and streamed(k))])
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    return model, args


def _put(model, path: Path, name: str, arr: mx.array):
    """Set parameter `name` (a dotted path, list items by index) of `model` to `arr` in place: no
    tree of the weights is built."""
    *parents, leaf = name.split(".")
    node = model
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        current = node[leaf]
    except (KeyError, IndexError, ValueError, TypeError):
        current = None
    if not isinstance(current, mx.array):
        raise CheckpointError(f"{path}: {name} is not a parameter of the model")
    if current.shape != arr.shape:
        raise CheckpointError(f"{path}: {name} loads with shape {arr.shape}, expected {current.shape}")
    node[leaf] = arr


def tokenizer_of(path: Path, args) -> TokenizerWrapper:
    """The checkpoint's tokenizer. transformers also reads config.json and the tokenizer files,
    with checks of its own: whatever it refuses becomes one CheckpointError naming the folder."""
    try:
        return load_tokenizer(path, eos_token_ids=args.eos_token_ids or None)
    except Exception as e:  # a third-party reader of untrusted files: any failure is the files'
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{path}: cannot load the tokenizer ({detail[:300]})") from e
