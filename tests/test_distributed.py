"""Tensor parallelism over 2 local ranks (`mlx.launch --backend ring -n 2`) against one process.

The ranks are started once for the module (tp_ranks.py does every check's rank-side work);
one process computes the same things with the same code for the reference.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tp_ranks
from factory import make_checkpoint

from mlx_step35 import ConfigError, convert, load
from mlx_step35.config import load_config, parse_config
from mlx_step35.distributed import COLUMNS, ROWS, SliceReader, check_splittable, split_of
from mlx_step35.safetensors_io import ShardReader, iter_shards
from mlx_step35.weights import to_internal

ROOT = Path(__file__).resolve().parents[1]


def launch(port: int):
    """mlx.launch of 2 local ranks; concurrent launches need their own ports."""
    return [
        str(Path(sys.executable).parent / "mlx.launch"),
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(port),
        "--",
    ]


def free_port_base(count: int = 4) -> int:
    """A base port with `count` free ports above it."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65536 and all(_free(base + i) for i in range(count)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


SMALL = dict(num_hidden_layers=4, sliding_window=8)
# Widths that a 2-way column split leaves as whole quantization groups of 32.
WIDE4 = dict(
    SMALL,
    head_dim=32,
    attention_other_setting={"num_attention_heads": 6, "num_attention_groups": 2, "head_dim": 32},
    intermediate_size=128,
    moe_intermediate_size=64,
    share_expert_dim=64,
)
# Experts big enough (~100 MB of bf16) that a rank's peak RSS shows what it loads.
BIG = dict(SMALL, hidden_size=256, moe_num_experts=32, moe_intermediate_size=1024, share_expert_dim=256)
# What tensor parallelism splits (the list), written out independently of the code.
SPLIT = re.compile(r"\.(self_attn\.[qkvgo]_proj|mlp\.(gate|up|down)_proj|share_expert\.|switch_mlp\.)")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    f32 = make_checkpoint(d / "f32", dtype="float32", **SMALL)
    bf16 = make_checkpoint(d / "bf16", seed=1, **WIDE4)
    conv = convert(bf16, d / "conv", quantize=True, q_group_size=32, dtype="float32")
    big = make_checkpoint(d / "big", seed=2, mtp=False, num_shards=2, **BIG)
    return dict(f32=f32, q32=bf16, conv=conv, big=big, dir=d)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))


@pytest.fixture(scope="module")
def ranks(ckpts):
    """Start the 2-rank run, the one-process RSS reference and generate.py (2 ranks) together."""
    d = ckpts["dir"]
    specs = [f"{ckpts['big']}:rss", f"{ckpts['q32']}:q32", f"{ckpts['conv']}:conv", f"{ckpts['f32']}:full"]
    (d / "tp").mkdir()
    (d / "one").mkdir()
    script = str(ROOT / "tests" / "tp_ranks.py")
    gen = [str(ROOT / "generate.py"), "--model", str(ckpts["f32"]), "--no-quantize", "--dtype", "float32"]
    gen += ["-m", "24", "--draft-mtp", "--num-draft", "2", "--prompt", "hello world"]
    base = free_port_base()
    procs = {
        "tp": [*launch(base), sys.executable, script, str(d / "tp"), *specs],
        "one": [sys.executable, script, str(d / "one"), specs[0]],
        "gen": [*launch(base + 2), sys.executable, *gen],
    }
    started = {
        k: subprocess.Popen(v, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k, v in procs.items()
    }
    tic = time.perf_counter()
    out = {}
    for k, p in started.items():
        try:
            out[k] = p.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            for q in started.values():
                q.kill()
            pytest.fail(f"{k}: the ranks did not finish within 600 s (deadlock?)")
    out["seconds"] = time.perf_counter() - tic
    res = {k: json.loads((d / "tp" / f"rank{k}.json").read_text()) for k in (0, 1)}
    res["one"] = json.loads((d / "one" / "rank0.json").read_text())
    return res, out


@pytest.fixture(scope="module")
def reference(ckpts):
    return {
        kind: tp_ranks.results(ckpts[kind], None, kind == "f32", kind == "q32", **tp_ranks.LOAD_ARGS[kind])
        for kind in ("f32", "q32", "conv")
    }


def _spec(ckpts, kind):
    return f"{ckpts[kind]}:{'full' if kind == 'f32' else kind}"


@pytest.mark.parametrize("kind", ["f32", "q32", "conv"])
def test_logits_match_one_process(ranks, reference, ckpts, kind):
    res, _ = ranks
    ref = reference[kind]
    assert ref["merged"]  # q/k/v/g and gate/up merged (fusion.py), on each rank after sharding too
    for rank in (0, 1):
        got = res[rank][_spec(ckpts, kind)]
        assert got["merged"] == ref["merged"], (kind, rank)
        for a, b in [(got["logits"], ref["logits"])] + list(zip(got["mtp_logits"], ref["mtp_logits"])):
            a, b = np.array(a), np.array(b)
            assert a.shape == b.shape
            spread = b.max() - b.min()
            assert np.abs(a - b).max() <= 1e-4 * spread, (kind, rank, np.abs(a - b).max() / spread)


@pytest.mark.parametrize("kind", ["f32", "q32", "conv"])
def test_greedy_identical_to_one_process(ranks, reference, ckpts, kind):
    """Plain, drafting k=1..3 and auto (each rank's policy choosing other depths) past the window."""
    res, _ = ranks
    ref = reference[kind]["greedy"]
    assert set(ref) == ({"None", "1", "2", "3", "auto", "3-gated"} if kind == "f32" else {"None", "auto"})
    for rank in (0, 1):
        assert res[rank][_spec(ckpts, kind)]["greedy"] == ref
    assert len(ref["None"]) == tp_ranks.MAX_TOKENS
    assert all(toks == ref["None"] for toks in ref.values())  # drafting is lossless
    if kind == "f32":  # the gate cut some chains, the same ones on every rank as in one process
        gated, steps = reference[kind]["gated_steps"]
        assert 0 < gated < steps
        assert res[0][_spec(ckpts, kind)]["gated_steps"] == res[1][_spec(ckpts, kind)]["gated_steps"]


def test_quantized_kv_greedy_identical_and_split_by_heads(ranks, reference, ckpts):
    """kv_bits 8, groups of 32, from position 6 (head_dim 32): greedy tokens, plain and
    drafting, equal one process's with the same KV; each rank's full-attention caches (trunk
    and MTP block) hold its own half of the KV heads, quantized past position 6, and equal
    that half of one process's cache."""
    res, _ = ranks
    ref = reference["q32"]["kv"]
    assert ref["None"]["tokens"] == ref["2"]["tokens"]  # drafting lossless with quantized KV
    assert len(ref["None"]["tokens"]) == tp_ranks.MAX_TOKENS
    n_kv = parse_config(load_config(ckpts["q32"])).num_attention_groups
    for rank in (0, 1):
        got = res[rank][_spec(ckpts, "q32")]["kv"]
        assert set(got) == {"None", "2"}
        for n in ("None", "2"):
            assert got[n]["tokens"] == ref[n]["tokens"], (rank, n)
            assert len(got[n]["caches"]) == len(ref[n]["caches"]) == (1 if n == "None" else 2)
            for c, one in zip(got[n]["caches"], ref[n]["caches"]):
                assert (c["fp_len"], c["q_len"]) == (one["fp_len"], one["q_len"])
                assert c["fp_len"] == tp_ranks.KV["quantized_kv_start"] and c["q_len"] > 0
                heads = slice(rank * n_kv // 2, (rank + 1) * n_kv // 2)
                for key in ("fp_keys", "q_keys", "q_values"):
                    a, b = np.array(c[key]), np.array(one[key])
                    assert a.shape[1] == n_kv // 2 and b.shape[1] == n_kv, (key, a.shape, b.shape)
                    # one quantization step: a value next to a rounding boundary may round apart
                    tol = 1e-4 if key == "fp_keys" else 1.01 * max(c["max_scale"], one["max_scale"])
                    np.testing.assert_allclose(a, b[:, heads], atol=tol, rtol=0, err_msg=f"{rank} {n} {key}")


def test_sampled_identical_on_both_ranks(ranks, reference, ckpts):
    res, _ = ranks
    a, b = (res[r][_spec(ckpts, "f32")]["sampled"] for r in (0, 1))
    assert a == b
    assert a == reference["f32"]["sampled"]  # and as one process with the same seed
    assert a["None"] != reference["f32"]["greedy"]["None"]  # really sampled


def test_followers_run_the_requests_rank_0_shares(ranks, ckpts):
    """The server's hooks: rank 0 shares each request, the other ranks follow in lockstep."""
    res, _ = ranks
    assert res[1]["serve"] == {"served": len(tp_ranks.REQUESTS)}
    assert res[0]["serve"] == tp_ranks.serve(ckpts["f32"])  # as one process serves them


def test_each_rank_holds_half_the_split_weights(ranks):
    res, _ = ranks
    one = res["one"]["rss"]["param_bytes"]
    split = sum(v for k, v in one.items() if SPLIT.search(k) and ".mlp.gate." not in k)
    for rank in (0, 1):
        got = res[rank]["rss"]["param_bytes"]
        assert set(got) == set(one)
        for k, v in one.items():
            expect = v / 2 if SPLIT.search(k) and ".mlp.gate." not in k else v
            assert got[k] == expect, k
        assert sum(got.values()) == sum(one.values()) - split / 2
    assert split > 0.9 * sum(one.values())


def test_peak_rss_of_a_rank_below_one_process(ranks):
    res, _ = ranks
    one = res["one"]["rss"]["peak_rss_load"]
    for rank in (0, 1):
        assert res[rank]["rss"]["peak_rss_load"] < one


def test_rank_killed_mid_generation(ranks):
    """Rank 1 kills itself after 6 tokens; rank 0 stops with a clear message instead of
    hanging (the fixture's timeout bounds the wait)."""
    _, out = ranks
    messages = ("rank 0: stopped, another rank exited", "rank 0: another rank exited, was killed")
    assert any(m in out["tp"] for m in messages), out["tp"][-2000:]
    assert "finished without noticing" not in out["tp"]


def test_generate_py_two_ranks_prints_once_like_one_process(ranks, ckpts, capsys):
    _, out = ranks
    gen = ["--model", str(ckpts["f32"]), "--no-quantize", "--dtype", "float32"]
    gen += ["-m", "24", "--draft-mtp", "--num-draft", "2", "--prompt", "hello world"]
    sys.path.insert(0, str(ROOT))
    import generate

    generate.main(gen)
    one = capsys.readouterr().out
    text = one.split("\n" + "=" * 10)[0]
    assert len(text) > 10
    assert out["gen"].count("=" * 10) == 1  # printed by rank 0 only
    assert out["gen"].split("\n" + "=" * 10)[0].endswith(text)


# ---------------------------------------------------------------------------------------------
# in one process: slicing and refusals


class FakeGroup:
    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("kind", ["q32", "conv"])
def test_rank_slices_reassemble_the_stored_tensor(ckpts, kind):
    """Rows / columns (quantized weights, scales and biases too, stacked experts by slices)."""
    args = parse_config(load_config(ckpts[kind]))
    seen = set()
    for reader in iter_shards(ckpts[kind]):
        for key in reader.keys():
            split = split_of(to_internal(key, args, False))
            if split is None:
                continue
            full = np.array(reader.read(key).astype(mx.float32))
            axis = full.ndim - (2 if split == ROWS else 1)
            rows = (0, 3) if full.ndim == 3 else (None, None)
            parts = [
                np.array(SliceReader(reader, split, r, 2).read(key, *rows).astype(mx.float32)) for r in (0, 1)
            ]
            want = full[rows[0] : rows[1]] if full.ndim == 3 else full
            np.testing.assert_array_equal(np.concatenate(parts, axis=axis), want)
            assert parts[0].shape[axis] * 2 == full.shape[axis]
            seen.add((split, full.ndim, key.rsplit(".", 1)[-1]))
    assert {(ROWS, 2), (COLUMNS, 2), (ROWS, 3), (COLUMNS, 3)} <= {s[:2] for s in seen}
    if kind == "conv":
        assert {"weight", "scales", "biases"} <= {s[2] for s in seen}


def test_refusals_name_what_cannot_split(ckpts):
    f32 = parse_config(load_config(ckpts["f32"]))
    with pytest.raises(ConfigError, match=r"4 query and 2 KV heads.*divisible by 3"):
        check_splittable(f32, 3)
    with pytest.raises(ConfigError, match=r"intermediate_size = 96 is not divisible by 5"):
        check_splittable(
            parse_config(
                dict(
                    load_config(ckpts["f32"]),
                    num_attention_heads=5,
                    num_attention_groups=5,
                    attention_other_setting=None,
                )
            ),
            5,
        )
    wide = parse_config(load_config(ckpts["q32"]))
    check_splittable(wide, 2, {"model.layers.1.self_attn.o_proj": {"group_size": 32}})
    with pytest.raises(
        ConfigError, match=r"model.layers.1.self_attn.o_proj: its input width 192 .* groups of 64"
    ):
        check_splittable(wide, 2, {"model.layers.1.self_attn.o_proj": {"group_size": 64}})


def test_load_refuses_before_reading_any_tensor(ckpts, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("a tensor was read before the refusal")

    monkeypatch.setattr(ShardReader, "read", no_reads)
    with pytest.raises(ConfigError, match="cannot split this model over 3 ranks"):
        load(ckpts["f32"], group=FakeGroup(3), quantize=False)
    with pytest.raises(ConfigError, match="groups of 64"):  # 4-bit group 64 on the wide model
        load(ckpts["q32"], group=FakeGroup(2))
