"""`convert()`: round trips into our `load` and stock `mlx_lm.load`, size-limited shards with a
correct index, atomic output, the --mtp-only graft, and the CLI."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from factory import PER_LAYER_FIELDS
from mlx.utils import tree_flatten

from mlx_step35 import convert, load
from mlx_step35.conversion import ShardWriter
from mlx_step35.safetensors_io import ShardReader

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _np(x):
    return np.array(x.astype(mx.float32))


def _header(path: Path) -> dict:
    """The safetensors header of a file, parsed here (independently of ShardReader)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _outputs(model, x):
    return [_np(model(x))] + ([_np(m) for m in model.mtp_logits(x)] if model.num_mtp else [])


@pytest.fixture(scope="module")
def conversions(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return {
        "f32": convert(tiny_ckpt, root / "f32", dtype="float32"),
        "q": convert(tiny_ckpt, root / "q", quantize=True, dtype="float32"),
    }


@pytest.mark.parametrize("kind,quantize", [("f32", False), ("q", True)])
def test_roundtrip_equals_loading_the_hf_checkpoint(tiny_ckpt, conversions, tokens, kind, quantize):
    direct, _ = load(tiny_ckpt, quantize=quantize, dtype="float32")
    conv, _ = load(conversions[kind], dtype="float32")  # a conversion loads as converted
    assert conv.num_mtp == direct.num_mtp == 3
    x = mx.array(tokens)[None]
    for a, b in zip(_outputs(conv, x), _outputs(direct, x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["f32", "q"])
def test_stock_mlx_lm_loads_the_trunk(conversions, tokens, kind):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(conversions[kind]))
    ours, _ = load(conversions[kind], dtype="float32")
    x = mx.array(tokens)[None]
    a, b = _np(theirs(x)), _np(ours(x))
    assert np.abs(a - b).max() < 1e-4 * (b.max() - b.min())  # two implementations, float32
    np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))


def test_shards_are_size_limited_with_a_correct_index(tiny_ckpt, tmp_path):
    limit = 64 << 10
    out = convert(tiny_ckpt, tmp_path / "out", quantize=True, max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    listed = set(index["weight_map"].values())
    on_disk = {p.name for p in out.glob("*.safetensors")}
    assert listed == on_disk and len(on_disk) > 3
    n = len(on_disk)
    assert on_disk == {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    seen, total = {}, 0
    for name in sorted(on_disk):
        header = _header(out / name)
        sizes = [info["data_offsets"][1] - info["data_offsets"][0] for info in header.values()]
        assert sum(sizes) <= limit or len(sizes) == 1, name  # only a single huge tensor may exceed it
        total += sum(sizes)
        for key in header:
            assert key not in seen, f"{key} in {seen.get(key)} and {name}"
            seen[key] = name
    assert seen == index["weight_map"]  # every key in exactly the file the index names
    assert index["metadata"]["total_size"] == total
    assert not list(tmp_path.glob(".*"))  # no temporary directory left next to it


def test_tokenizer_and_config(tiny_ckpt, conversions):
    out = conversions["q"]
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["mlx_step35"]["format_version"] >= 1
    q = cfg["quantization"]
    assert q == cfg["quantization_config"]
    assert (q["bits"], q["group_size"]) == (4, 64)
    assert q["model.layers.3.mlp.gate.gate"]["bits"] == 8
    assert q["lm_head"]["bits"] == 6 and q["model.embed_tokens"]["bits"] == 6
    assert q["mtp.0.shared_head.output"]["bits"] == 6
    for key in ("num_hidden_layers", "num_nextn_predict_layers", "layer_types", "rope_theta"):
        assert cfg[key] == src[key], key
    assert "quantization" not in json.loads((conversions["f32"] / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# atomicity


def test_failure_mid_conversion_leaves_nothing_and_rerun_succeeds(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_add, calls = ShardWriter.add, []

    def failing_add(self, name, arr):
        calls.append(name)
        if len(calls) == 20:
            raise RuntimeError("disk full (injected)")
        real_add(self, name, arr)

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="injected"):
        convert(tiny_ckpt, out, max_shard_bytes=16 << 10)  # some shards were already written
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial shards are gone too
    monkeypatch.setattr(ShardWriter, "add", real_add)
    convert(tiny_ckpt, out)
    model, _ = load(out)
    assert model.num_mtp == 3


def test_stale_incomplete_dir_is_replaced(tiny_ckpt, tmp_path):
    stale = tmp_path / ".out.incomplete"  # what a killed run leaves
    stale.mkdir()
    (stale / "model-part00000.safetensors").write_bytes(b"garbage")
    out = convert(tiny_ckpt, tmp_path / "out")
    assert not stale.exists()
    assert {p.name for p in out.glob("*.safetensors")} == {"model.safetensors"}
    load(out)


def test_existing_output_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(out)):
        convert(tiny_ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# --mtp-only: graft the MTP blocks onto a conversion that lacks them


def _drop_mtp(src: Path, dst: Path, edit_config: bool = True) -> Path:
    """The same checkpoint without its MTP layers (the factory puts them in the last shard)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    assert all(int(k.split(".")[2]) >= 5 for k, f in index["weight_map"].items() if f == last)
    (dst / last).unlink()
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f != last}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    if not edit_config:
        return dst
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    for key in PER_LAYER_FIELDS:
        cfg[key] = cfg[key][:5]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _spy_reads(monkeypatch):
    reads = set()
    real = ShardReader.read

    def spy(self, key, start=None, stop=None):
        reads.add(self.path.name)
        return real(self, key, start, stop)

    monkeypatch.setattr(ShardReader, "read", spy)
    return reads


def test_mtp_only_graft_matches_direct_conversion(tiny_ckpt, conversions, tokens, tmp_path, monkeypatch):
    trunk_hf = _drop_mtp(tiny_ckpt, tmp_path / "trunk_hf")
    target = convert(trunk_hf, tmp_path / "trunk_q", quantize=True, dtype="float32")
    model, _ = load(target)
    assert model.num_mtp == 0
    reads = _spy_reads(monkeypatch)
    convert(tiny_ckpt, target, mtp_only=True, dtype="float32")
    assert reads == {"model-00003-of-00003.safetensors"}  # only the shard holding layers 5-7
    grafted, _ = load(target, dtype="float32")
    direct, _ = load(conversions["q"], dtype="float32")
    assert grafted.num_mtp == 3
    x = mx.array(tokens)[None]
    for a, b in zip(_outputs(grafted, x), _outputs(direct, x)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="already has MTP"):
        convert(tiny_ckpt, target, mtp_only=True)


def test_mtp_only_graft_onto_mlx_lm_conversion(tiny_ckpt, conversions, tokens, tmp_path):
    """The use case: a community mlx-lm 4-bit conversion (trunk only) gains the MTP blocks."""
    from mlx_lm.convert import convert as mlx_lm_convert

    target = tmp_path / "mlx_lm_4bit"
    mlx_lm_convert(str(tiny_ckpt), str(target), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    stored = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(".layers.5." in k for k in stored)  # mlx-lm dropped the MTP layers
    convert(tiny_ckpt, target, mtp_only=True, dtype="float32")
    grafted, _ = load(target, dtype="float32")
    direct, _ = load(conversions["q"], dtype="float32")
    assert grafted.num_mtp == 3
    g = dict(tree_flatten(grafted.parameters()["mtp"]))
    d = dict(tree_flatten(direct.parameters()["mtp"]))
    assert g.keys() == d.keys()
    for k in d:  # the MTP blocks are quantized as a direct conversion quantizes them
        assert mx.array_equal(g[k], d[k]).item(), k
    # the trunk is still mlx-lm's, and stock mlx-lm still loads the directory
    import mlx_lm

    theirs, _ = mlx_lm.load(str(target))
    x = mx.array(tokens)[None]
    a, b = _np(theirs(x)), _np(grafted(x))
    assert np.abs(a - b).max() < 1e-4 * (b.max() - b.min())
    assert len(grafted.mtp_logits(x)) == 3


def test_convert_checkpoint_whose_config_promises_missing_mtp(tiny_ckpt, tmp_path):
    """MTP weights stripped, config untouched (3 MTP layers, 8-entry per-layer arrays)."""
    src = _drop_mtp(tiny_ckpt, tmp_path / "src", edit_config=False)
    with pytest.warns(UserWarning, match="no MTP weights"):
        out = convert(src, tmp_path / "out")
    model, _ = load(out)
    assert model.num_mtp == 0


# ---------------------------------------------------------------------------------------------
# CLI


def test_convert_cli(tiny_ckpt, tmp_path, tokens):
    out = tmp_path / "cli_out"
    r = subprocess.run(
        [
            sys.executable,
            "convert.py",
            "--hf-path",
            str(tiny_ckpt),
            "--mlx-path",
            str(out),
            "-q",
            "--q-bits",
            "8",
            "--dtype",
            "float32",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    model, _ = load(out, dtype="float32")
    direct, _ = load(tiny_ckpt, q_bits=8, dtype="float32")
    x = mx.array(tokens)[None]
    for a, b in zip(_outputs(model, x), _outputs(direct, x)):
        np.testing.assert_array_equal(a, b)
