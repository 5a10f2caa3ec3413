"""Experts streamed from disk through a bounded cache: the same tokens and float32 logits as the
fully resident model (plain and drafting, past the sliding window), bytes read equal to misses
under an LRU written here, bounded peak memory, and clear errors for a changed shard or a
budget too small."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import SLIDING_WINDOW
from factory import make_checkpoint

from mlx_step35 import CheckpointError, convert, load
from mlx_step35.expert_cache import ExpertReader, SlotTable, plan_expert_cache
from mlx_step35.expert_trace import trace_experts
from mlx_step35.generation import generate_step
from mlx_step35.safetensors_io import ShardReader
from mlx_step35.speculative import SpecStats

ROOT = Path(__file__).resolve().parents[1]
E, K, N_MTP = 32, 2, 3
MOE_LAYERS = (2, 3, 4)  # the factory's default 5-layer model
MIN_SLOTS = K * (1 + N_MTP)  # a verify pass of 1 + 3 drafted tokens: 8 experts = E / 4
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 500, 20)]
GEN = 60  # 80 positions: 10 sliding windows of 8
PARTS = [f"{p}.{q}" for p in ("gate_proj", "up_proj", "down_proj") for q in ("weight", "scales", "biases")]


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    make_checkpoint(root / "hf", sliding_window=SLIDING_WINDOW, moe_num_experts=E, moe_top_k=K)
    return convert(root / "hf", root / "q4", quantize=True)


@pytest.fixture(scope="module")
def expert_size(conv):
    """Bytes of one expert of one layer, from MLX's own safetensors reader."""
    tensors = {}
    for f in conv.glob("*.safetensors"):
        tensors.update(mx.load(str(f)))
    sizes = {sum(tensors[f"model.layers.{i}.mlp.switch_mlp.{p}"].nbytes for p in PARTS) for i in MOE_LAYERS}
    assert len(sizes) == 1
    return sizes.pop() // E


@pytest.fixture(scope="module")
def budget_gb(expert_size):
    return MIN_SLOTS * len(MOE_LAYERS) * expert_size / 1e9  # the experts are 4x the budget


@pytest.fixture(scope="module")
def resident(conv):
    return load(conv, dtype="float32")[0]


@pytest.fixture(scope="module")
def cached(conv, budget_gb):
    return load(conv, dtype="float32", expert_cache_gb=budget_gb)[0]


def test_each_experts_rows_are_one_contiguous_range(conv, expert_size):
    plan = plan_expert_cache(conv, 1.0)
    assert sorted(plan.layers) == list(MOE_LAYERS) and plan.expert_bytes == expert_size
    for i, tensors in plan.layers.items():
        assert sorted(tensors) == sorted(PARTS)
        for t in tensors.values():
            full = mx.load(str(t.file))[t.key]
            with open(t.file, "rb") as f:
                for e in (0, 13, E - 1):
                    f.seek(t.offset + e * t.stride)
                    ref = full[e].view(mx.uint16) if full.dtype == mx.bfloat16 else full[e]
                    assert f.read(t.stride) == np.array(ref).tobytes()


def test_plan_cache_size_and_resident_bytes(conv, expert_size, budget_gb):
    plan = plan_expert_cache(conv, budget_gb)
    total = sum(ShardReader(f).nbytes(k) for f in conv.glob("*.safetensors") for k in ShardReader(f).keys())
    assert plan.slots == MIN_SLOTS
    assert plan.resident_bytes == total - E * len(MOE_LAYERS) * expert_size
    assert plan.cache_bytes == MIN_SLOTS * len(MOE_LAYERS) * expert_size
    assert plan_expert_cache(conv, budget_gb, mtp=False).min_slots == K  # no drafting: top_k


@pytest.mark.parametrize("num_draft", [None, 1, 2, 3])
def test_same_tokens_and_logits_as_resident(resident, cached, num_draft):
    # ungated: every verify pass is 1 + num_draft tokens wide
    kw = {} if num_draft is None else dict(draft_mtp=True, num_draft=num_draft, draft_min_confidence=0.0)
    before, stats = cached.expert_cache.stats(), SpecStats()
    want = list(generate_step(resident, PROMPT, max_tokens=GEN, **kw))
    got = list(generate_step(cached, PROMPT, max_tokens=GEN, stats=stats, **kw))
    assert [(t, d) for t, _, d in got] == [(t, d) for t, _, d in want]
    for (_, a, _), (_, b, _) in zip(want, got):
        assert a.dtype == b.dtype == mx.float32 and mx.array_equal(a, b).item()
    after = cached.expert_cache.stats()
    assert after["misses"] - before["misses"] > 2 * MIN_SLOTS * len(MOE_LAYERS)  # experts were evicted
    assert after["grouped_passes"] > before["grouped_passes"]  # the prompt needs more experts than slots
    if num_draft is not None:  # verify passes of 1 + num_draft tokens, then rewinds
        assert stats.verify_steps > 0 and len(stats.drafted) == num_draft


def test_long_teacher_forced_pass_same_logits(resident, cached):
    tokens = mx.array(np.random.default_rng(3).integers(3, 500, (1, 4 * SLIDING_WINDOW)))
    assert mx.array_equal(cached(tokens), resident(tokens)).item()  # every expert, over groups
    assert mx.array_equal(cached.mtp_logits(tokens)[2], resident.mtp_logits(tokens)[2]).item()


def lru_misses(experts, pass_rows, slots):
    """Misses of a per-layer LRU where each pass loads the union of its tokens' experts."""
    misses = 0
    for layer in range(experts.shape[1]):
        cache = OrderedDict()
        for rows in np.split(experts[:, layer], np.cumsum(pass_rows)[:-1]):
            need = sorted(set(rows.ravel().tolist()))
            for e in need:
                if e in cache:
                    cache.move_to_end(e)
            for e in need:
                if e not in cache:
                    misses += 1
                    if len(cache) >= slots:
                        cache.popitem(last=False)
                    cache[e] = True
    return misses


def test_bytes_read_are_misses_times_expert_size(conv, budget_gb, expert_size):
    model = load(conv, expert_cache_gb=budget_gb, expert_cache_policy="lru")[0]
    trace = trace_experts(model)
    out = [t for t, _, _ in generate_step(model, PROMPT, max_tokens=30, prefill_step_size=4)]
    cache, arrays = model.expert_cache, trace.arrays()
    assert len(out) == 30 and cache.stats()["grouped_passes"] == 0  # 4-token chunks fit the pool
    assert arrays["experts"].shape == (len(PROMPT) + 29, len(MOE_LAYERS), K)
    assert cache.misses == lru_misses(arrays["experts"], arrays["pass_rows"], MIN_SLOTS) > 0
    assert cache.bytes_read == cache.misses * expert_size


@pytest.mark.parametrize("policy, evicted", [("lru", 0), ("lfu", 1)])
def test_policy_evicts_least_recent_or_least_frequent(policy, evicted):
    table = SlotTable(4, 2, policy)
    for need in ([0], [0], [0], [1]):  # 0 used often but longest ago, 1 once but last
        table.assign(need)
    assert table.assign([2]) == [(2, int(table.slot_of[2]))] and table.slot_of[evicted] == -1
    assert table.slot_of[1 - evicted] >= 0 and (table.hits, table.misses) == (2, 3)


def _shard_of_layer(path, layer=2):
    return plan_expert_cache(path, 1.0).layers[layer]["gate_proj.weight"]


def _truncate(t):
    os.truncate(t.file, t.offset + t.stride)  # expert 0 of one tensor left


def _rewrite(t):
    with open(t.file, "r+b") as f:  # same size, same inode, other expert bytes
        f.seek(t.offset)
        f.write(b"\x11" * t.stride * E)


def _replace(t):
    new = t.file.with_name(t.file.name + ".new")
    shutil.copyfile(t.file, new)
    with open(new, "r+b") as f:
        f.seek(t.offset)
        f.write(b"\x22" * t.stride * E)
    os.replace(new, t.file)


@pytest.mark.parametrize("fault", [_truncate, _rewrite, _replace])
def test_shard_changed_while_running_is_an_error_not_a_token(conv, resident, budget_gb, tmp_path, fault):
    path = shutil.copytree(conv, tmp_path / "q4")
    model = load(path, dtype="float32", expert_cache_gb=budget_gb)[0]
    want = [t for t, _, _ in generate_step(resident, PROMPT, max_tokens=GEN)]
    gen = generate_step(model, PROMPT, max_tokens=GEN)
    got = [next(gen)[0] for _ in range(3)]
    t = _shard_of_layer(path)
    fault(t)
    with pytest.raises(CheckpointError, match=re.escape(str(t.file))):
        for tok, _, _ in gen:
            got.append(tok)
    assert 3 <= len(got) < GEN and got == want[: len(got)]


def test_short_read_names_the_file(tmp_path):
    f = tmp_path / "model-00001-of-00002.safetensors"
    f.write_bytes(b"\0" * 100)
    reader = ExpertReader([f])
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: truncated")):
        reader.read([(f, 80, 64, np.zeros(64, np.uint8), None)])
    reader.close()


def test_no_stacked_expert_tensor_is_ever_read_whole(conv, budget_gb, monkeypatch):
    read, jobs = [], []
    original_read, original_jobs = ShardReader.read, ExpertReader.read
    monkeypatch.setattr(
        ShardReader, "read", lambda self, key, *a: read.append(key) or original_read(self, key, *a)
    )
    monkeypatch.setattr(ExpertReader, "read", lambda self, js: jobs.extend(js) or original_jobs(self, js))
    model = load(conv, expert_cache_gb=budget_gb)[0]
    list(generate_step(model, PROMPT, max_tokens=8))
    assert read and not [k for k in read if "switch_mlp" in k]
    stride = {t.stride for ts in model.expert_cache.plan.layers.values() for t in ts.values()}
    assert jobs and {nbytes for _, _, nbytes, _, _ in jobs} <= stride  # one expert's rows per read


def test_budget_too_small_refused_before_loading(conv, expert_size, monkeypatch):
    minimum = MIN_SLOTS * len(MOE_LAYERS) * expert_size

    def no_read(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(ShardReader, "read", no_read)
    with pytest.raises(ValueError, match=re.escape(f"at least {minimum / 1e9:.3g} GB ({MIN_SLOTS} experts")):
        load(conv, expert_cache_gb=(minimum - len(MOE_LAYERS) * expert_size) / 1e9)


def test_needs_a_quantized_conversion(conv):
    with pytest.raises(CheckpointError, match="convert.py -q"):
        load(conv.parent / "hf", expert_cache_gb=1.0)


def _generate_cli():
    spec = importlib.util.spec_from_file_location("_generate_cli", ROOT / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_cache_and_trace(conv, budget_gb, tmp_path, capsys):
    main = _generate_cli().main
    with pytest.raises(SystemExit) as e:
        main(["--model", str(conv), "--expert-cache-gb", "1e-6", "--max-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "at least" in err
    trace = tmp_path / "trace.npz"
    argv = ["--model", str(conv), "--expert-cache-gb", str(budget_gb), "--trace-experts", str(trace)]
    main(argv + ["--max-tokens", "10", "--ignore-chat-template", "--prompt", "def f(x):"])
    out = capsys.readouterr().out
    assert "Expert cache: hit rate" in out and "Resident (everything but the routed experts)" in out
    t = np.load(trace)
    assert t["experts"].shape == (int(t["prompt_tokens"]) + 9, len(MOE_LAYERS), K)
    assert t["pass_rows"].sum() == len(t["experts"]) and int(t["generated_tokens"]) == 10


RSS_SCRIPT = """
import json, os, resource, subprocess, sys
import mlx.core as mx
from mlx_step35 import load
from mlx_step35.generation import generate_step

def status(field):  # Linux: this process's own counters (ru_maxrss survives exec from pytest)
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def rss():
    if os.path.exists("/proc/self/status"):
        return status("VmRSS:")
    return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(os.getpid())])) * 1024

def peak():
    if os.path.exists("/proc/self/status"):
        return status("VmHWM:")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS

mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
base = rss()
model, _ = load(sys.argv[1], expert_cache_gb=float(sys.argv[2]))
tokens = [t for t, _, _ in generate_step(model, json.loads(sys.argv[3]), max_tokens=24)]
print(json.dumps(dict(grown=peak() - base, tokens=tokens, stats=model.expert_cache.stats())))
"""
RSS_MARGIN = 32e6  # activations, tokenizer, read threads, allocator slack (measured ~12 MB)


def test_peak_memory_bounded_with_experts_far_larger_than_budget(tmp_path):
    """128 experts x 4 MoE layers: 113 MB of 4-bit experts on disk, a 10 MB budget (scaled
    down from a 2 GB-class checkpoint to keep CI fast: the ratio, not the size, is the point)."""
    shape = dict(moe_num_experts=128, num_hidden_layers=6, hidden_size=256, moe_intermediate_size=512)
    make_checkpoint(tmp_path / "hf", sliding_window=SLIDING_WINDOW, moe_top_k=K, num_shards=2, **shape)
    path = convert(tmp_path / "hf", tmp_path / "q4", quantize=True)
    plan = plan_expert_cache(path, 0.01)
    experts = plan.num_experts * len(plan.layers) * plan.expert_bytes
    bound = plan.resident_bytes + plan.budget_bytes + RSS_MARGIN
    assert experts > 2 * bound  # holding the experts would break the bound twice over
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), "0.01", json.dumps(PROMPT[:12])],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert plan.cache_bytes < res["grown"] < bound  # the pools are really allocated, nothing more
    assert res["stats"]["bytes_read"] > plan.budget_bytes and len(res["tokens"]) == 24  # evictions
