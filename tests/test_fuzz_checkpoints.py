"""Property-based fuzzing of the checkpoint reader (issue 16): random mutations of the safetensors
headers, the index and config.json of a tiny checkpoint (HF layout and our conversion) either
load exactly the original weights or raise CheckpointError / ConfigError naming the file or field.

Never mutated: the tensor bytes (no checksum exists to catch them), and the labels that no reader
can check either: a dtype swapped for another floating dtype of the same width (BF16 <-> F16) and
two same-size tensors' offsets exchanged. Each example applies one mutation, so a structurally
valid re-layout cannot arise (moving one entry's offsets always leaves a gap or an overlap).
"""

import json
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import pytest
from factory import make_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from mlx_step35 import CheckpointError, ConfigError, convert, load

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 120_000  # our conversion of the tiny checkpoint in 2 shards

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3000)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FILE_NAMES = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../model.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
        "a\\b",
        "nope.safetensors",
    ]
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(folder, load kwargs, the weights it loads) for the HF checkpoint and our conversion."""
    root = tmp_path_factory.mktemp("fuzz")
    hf = make_checkpoint(
        root / "hf", num_hidden_layers=3, num_nextn_predict_layers=1, vocab_size=300, moe_num_experts=4,
        num_shards=2,
    )  # fmt: skip
    conv = convert(hf, root / "conv", quantize=True, max_shard_bytes=SHARD_BYTES)
    out = {}
    for name, path, kwargs in (("hf", hf, {"quantize": False}), ("conv", conv, {})):
        model, _ = load(path, **kwargs)
        out[name] = Pristine(path, kwargs, dict(tree_flatten(model.parameters())))
    assert len(list(conv.glob("*.safetensors"))) == 2
    return out


class Pristine(tuple):
    def __new__(cls, *fields):
        return super().__new__(cls, fields)

    def __repr__(self):  # hypothesis prints the arguments of a failing example
        return f"Pristine({self[0].name})"


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8 : 8 + n], data[8 + n :]


@st.composite
def header_edit(draw, header: dict):
    """A JSON-level change of one shard header (returns the new header object)."""
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    entry = dict(header[key])
    kind = draw(
        st.sampled_from(
            ["field", "drop_field", "entry", "nudge_offset", "nudge_shape", "metadata", "whole", "extra"]
        )
    )
    if kind == "field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = draw(
            st.sampled_from(["F32", "I32", "U32", "U8", "F64", "X9", "bf16"]) if field == "dtype" else JSON
        )
        same_width = {"BF16": "F16", "F16": "BF16"}  # undetectable relabel, see the module docstring
        if value == same_width.get(entry["dtype"]):
            value = "I32"
        entry[field] = value
    elif kind == "drop_field":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "entry":
        entry = draw(JSON)
    elif kind == "nudge_offset":
        i = draw(st.integers(0, 1))
        entry["data_offsets"] = list(entry["data_offsets"])
        entry["data_offsets"][i] += draw(st.integers(-64, 64).filter(bool))
    elif kind == "nudge_shape":
        shape = list(entry["shape"]) or [1]
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.sampled_from([0, -shape[i], shape[i] + 1, shape[i] * 2, 2**40, 2**64]))
        entry["shape"] = shape
    elif kind == "metadata":
        return {**header, "__metadata__": draw(JSON)}
    elif kind == "whole":
        return draw(JSON)
    else:
        return {**header, draw(st.text(min_size=1, max_size=8)): draw(JSON)}
    return {**header, key: entry}


@st.composite
def mutation(draw, folder: Path):
    """Apply one random mutation to checkpoint `folder`; returns a short description."""
    shards = sorted(f.name for f in folder.glob("*.safetensors"))
    target = draw(st.sampled_from(["header", "header_bytes", "index", "config"]))
    if target in ("header", "header_bytes"):
        f = folder / draw(st.sampled_from(shards))
        data = f.read_bytes()
        n, raw, rest = _split(data)
        if target == "header":
            new = json.dumps(draw(header_edit(json.loads(raw)))).encode()
            f.write_bytes(struct.pack("<Q", len(new)) + new + rest)
        elif draw(st.booleans()):  # one byte of the length field or the header
            i = draw(st.integers(0, 8 + n - 1))
            value = draw(st.integers(0, 255).filter(lambda b: b != data[i]))
            f.write_bytes(data[:i] + bytes([value]) + data[i + 1 :])
        else:
            f.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
        return f"{target} of {f.name}"
    if target == "index":
        index = json.loads((folder / INDEX).read_text())
        key = draw(st.sampled_from(sorted(index["weight_map"])))
        kind = draw(st.sampled_from(["name", "other_shard", "value", "drop", "weight_map", "whole"]))
        if kind == "name":
            index["weight_map"][key] = draw(FILE_NAMES)
        elif kind == "other_shard":
            index["weight_map"][key] = draw(st.sampled_from(shards))
        elif kind == "value":
            index["weight_map"][key] = draw(JSON)
        elif kind == "drop":
            del index["weight_map"][key]
        elif kind == "weight_map":
            index["weight_map"] = draw(JSON)
        else:
            index = draw(JSON)
        (folder / INDEX).write_text(json.dumps(index))
        return f"index: {kind} {key}"
    config = json.loads((folder / "config.json").read_text())
    field = draw(st.sampled_from(sorted(config)))
    if draw(st.booleans()):
        config[field] = draw(JSON)
    else:
        del config[field]
    (folder / "config.json").write_text(json.dumps(config))
    return f"config: {field}"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data(), which=st.sampled_from(["hf", "conv"]))
def test_mutations_load_the_original_or_name_the_culprit(pristine, data, which):
    original, kwargs, weights = pristine[which]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(original, folder)
        what = data.draw(mutation(folder), label="mutation")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _ = load(folder, **kwargs)
        except CheckpointError as e:
            event("CheckpointError")  # --hypothesis-show-statistics: how the mutations ended
            assert str(folder) in str(e), (what, str(e))  # names a file of the checkpoint
            return
        except ConfigError as e:
            event("ConfigError")
            assert "config.json" in str(e), (what, str(e))
            fields = json.loads((original / "config.json").read_text())
            assert any(f in str(e) for f in fields), (what, str(e))  # and a field of it
            return
        event("loaded")
        got = dict(tree_flatten(model.parameters()))
        assert got.keys() == weights.keys(), what
        for k, v in weights.items():
            assert got[k].dtype == v.dtype and mx.array_equal(got[k], v).item(), (what, k)
