"""Bad inputs: every one raises an exception naming the file or key, and the CLIs turn it into
one line on stderr with exit status 2 (no traceback). A failed convert leaves no output."""

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_step35 import CheckpointError, ConfigError, convert, load

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY) if VENV_PY.exists() else sys.executable


def _script(name):
    """The root CLI script `name`.py as a module (they live outside the package)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_cli", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHARD1, SHARD2 = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite_shard(path, name, edit):
    """Rewrite shard `name` with `edit(dict of torch tensors)` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / name))
    edit(tensors)
    save_file(tensors, str(path / name), metadata={"format": "pt"})


def _shard_of(path, key):
    return _index(path)["weight_map"][key]


def truncated(p):
    f = p / SHARD2
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return SHARD2


def corrupt_header(p):
    f = p / SHARD1
    data = bytearray(f.read_bytes())
    data[8:40] = b"this is not json at all, really!"
    f.write_bytes(bytes(data))
    return SHARD1


def missing_shard(p):
    (p / SHARD2).unlink()
    return SHARD2


KEY = "model.layers.1.self_attn.q_proj.weight"


def missing_key(p):  # gone from its shard and from the index
    _rewrite_shard(p, _shard_of(p, KEY), lambda t: t.pop(KEY))
    index = _index(p)
    del index["weight_map"][KEY]
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return KEY


EXPERTS = "model.layers.3.moe.gate_proj.weight"


def missing_experts(p):  # a renamed, quantized-on-load tensor: named as the checkpoint names it
    _rewrite_shard(p, _shard_of(p, EXPERTS), lambda t: t.pop(EXPERTS))
    index = _index(p)
    del index["weight_map"][EXPERTS]
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return EXPERTS


def key_not_in_shard(p):  # the index still lists it
    _rewrite_shard(p, _shard_of(p, KEY), lambda t: t.pop(KEY))
    return KEY


def wrong_shape(p):
    key = "model.layers.1.self_attn.k_proj.weight"

    def edit(t):
        t[key] = t[key][:-1].clone()

    _rewrite_shard(p, _shard_of(p, key), edit)
    return key


def _edit_config(p, edit):
    cfg = json.loads((p / "config.json").read_text())
    edit(cfg)
    (p / "config.json").write_text(json.dumps(cfg))


def bad_model_type(p):
    _edit_config(p, lambda c: c.update(model_type="llama"))
    return "llama"


def no_config(p):
    (p / "config.json").unlink()
    return "config.json"


def missing_field(p):
    _edit_config(p, lambda c: c.pop("hidden_size"))
    return "hidden_size"


CASES = {  # name -> (mutation, exception type)
    "truncated": (truncated, CheckpointError),
    "corrupt_header": (corrupt_header, CheckpointError),
    "missing_shard": (missing_shard, CheckpointError),
    "missing_key": (missing_key, CheckpointError),
    "missing_experts": (missing_experts, CheckpointError),
    "key_not_in_shard": (key_not_in_shard, CheckpointError),
    "wrong_shape": (wrong_shape, CheckpointError),
    "bad_model_type": (bad_model_type, ConfigError),
    "no_config": (no_config, ConfigError),
    "missing_field": (missing_field, ConfigError),
}


# The 15 hostile / broken copies of issue 16, each refused before any tensor is read.
NORM_A, NORM_B = "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"


def _edit_header(p, name, edit):
    """Rewrite the JSON header of shard `name` (data section untouched) with `edit(header)`."""
    f = p / name
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header = edit(header) or header
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _edit_entry(p, key, edit):
    name = _shard_of(p, key)

    def change(header):
        header[key] = edit(header[key])

    _edit_header(p, name, change)
    return name, key


def header_length_past_file(p):
    f = p / SHARD1
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) + 100) + data[8:])
    return SHARD1


def negative_shape(p):
    return _edit_entry(p, KEY, lambda e: {**e, "shape": [-e["shape"][0], *e["shape"][1:]]})


def shape_string(p):
    return _edit_entry(p, KEY, lambda e: {**e, "shape": ",".join(map(str, e["shape"]))})


def config_not_json(p):
    (p / "config.json").write_text('{"model_type": "step3p5",')
    return "config.json"


def hidden_size_negative(p):
    _edit_config(p, lambda c: c.update(hidden_size=-64))
    return "hidden_size", "-64"


def zero_layers(p):
    _edit_config(p, lambda c: c.update(num_hidden_layers=0))
    return "num_hidden_layers", "0"


def empty_shard(p):
    (p / SHARD2).write_bytes(b"")
    return SHARD2


def negative_offsets(p):
    """The first tensor of the data section moved 8 bytes back, into the header."""
    first = {}

    def edit(header):
        key = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin - 8, end - 8]
        first["key"] = key

    _edit_header(p, SHARD1, edit)
    return SHARD1, first["key"]


def overlapping_offsets(p):
    """Two same-size tensors: the second points at the first one's bytes."""
    assert _shard_of(p, NORM_A) == _shard_of(p, NORM_B)

    def edit(header):
        header[NORM_B]["data_offsets"] = header[NORM_A]["data_offsets"]

    _edit_header(p, _shard_of(p, NORM_A), edit)
    return _shard_of(p, NORM_A), NORM_B


def index_outside_folder(p):
    outside = p.parent / f"{p.name}-{SHARD2}"
    shutil.copy(p / SHARD2, outside)
    index = _index(p)
    index["weight_map"] = {
        k: (f"../{outside.name}" if v == SHARD2 else v) for k, v in index["weight_map"].items()
    }
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.safetensors.index.json", f"../{outside.name}"


def header_list(p):
    _edit_header(p, SHARD1, lambda h: [h])
    return SHARD1


def no_data_offsets(p):
    return _edit_entry(p, KEY, lambda e: {k: v for k, v in e.items() if k != "data_offsets"})


def entry_string(p):
    return _edit_entry(p, KEY, lambda e: "F32")


def weight_map_list(p):
    index = _index(p)
    index["weight_map"] = list(index["weight_map"].items())
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.safetensors.index.json", "weight_map"


def vocab_size_string(p):
    _edit_config(p, lambda c: c.update(vocab_size="512"))
    return "vocab_size", "'512'"


ISSUE_16 = {
    "header_length_past_file": (header_length_past_file, CheckpointError),
    "negative_shape": (negative_shape, CheckpointError),
    "shape_string": (shape_string, CheckpointError),
    "config_not_json": (config_not_json, ConfigError),
    "hidden_size_negative": (hidden_size_negative, ConfigError),
    "zero_layers": (zero_layers, ConfigError),
    "empty_shard": (empty_shard, CheckpointError),
    "negative_offsets": (negative_offsets, CheckpointError),
    "overlapping_offsets": (overlapping_offsets, CheckpointError),
    "index_outside_folder": (index_outside_folder, CheckpointError),
    "header_list": (header_list, CheckpointError),
    "no_data_offsets": (no_data_offsets, CheckpointError),
    "entry_string": (entry_string, CheckpointError),
    "weight_map_list": (weight_map_list, CheckpointError),
    "vocab_size_string": (vocab_size_string, ConfigError),
}
CASES.update(ISSUE_16)


def _culprits(culprit):
    """The strings an error message must contain (a file, or a file and a tensor / field and value)."""
    return (culprit,) if isinstance(culprit, str) else culprit


@pytest.fixture(scope="module")
def broken(tiny_ckpt, tmp_path_factory):
    """name -> (checkpoint directory, the name the error must mention)."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, (mutate, _) in CASES.items():
        path = root / name / "model"
        shutil.copytree(tiny_ckpt, path)
        out[name] = (path, mutate(path))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_load_names_the_problem(broken, case):
    path, culprit = broken[case]
    with pytest.raises(CASES[case][1]) as e:
        load(path, quantize=False, dtype="float32")
    assert all(c in str(e.value) for c in _culprits(culprit)), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", list(CASES))
def test_convert_names_the_problem_and_leaves_nothing(broken, case, tmp_path):
    path, culprit = broken[case]
    out = tmp_path / "out"
    with pytest.raises(CASES[case][1]) as e:
        convert(path, out, quantize=True)
    assert all(c in str(e.value) for c in _culprits(culprit)), str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither `out` nor a hidden `.out.incomplete`


def _check_cli(rc, stderr, culprit, prog):
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error:"), lines[0]
    assert all(c in lines[0] for c in _culprits(culprit)), lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_cli_main_one_line_exit_2(broken, case, tmp_path, capsys):
    """Both CLIs' main(), in-process (every case; the subprocess test below runs a few)."""
    convert_cli, generate_cli = _script("convert"), _script("generate")
    path, culprit = broken[case]
    for prog, mod, argv in (
        ("generate.py", generate_cli, ["--model", str(path), "--max-tokens", "2"]),
        ("convert.py", convert_cli, ["--hf-path", str(path), "--mlx-path", str(tmp_path / "out"), "--quiet"]),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        _check_cli(e.value.code, capsys.readouterr().err, culprit, prog)
    assert list(tmp_path.iterdir()) == []


# (script, case): each run spends ~3 s importing, so one per script (every case runs through both
# main()s in-process above): a shard error, and a failure in the middle of writing shards
SUBPROCESS_CASES = [
    ("generate.py", "truncated"),
    ("convert.py", "wrong_shape"),
]


def test_cli_subprocesses(broken, tmp_path):
    """The real scripts, run as users run them (launched together)."""
    runs = []
    for prog, case in SUBPROCESS_CASES:
        path, culprit = broken[case]
        if prog == "generate.py":
            args = ["--model", str(path), "--max-tokens", "2"]
        else:
            args = ["--hf-path", str(path), "--mlx-path", str(tmp_path / case), "-q"]
        proc = subprocess.Popen(
            [PYTHON, prog, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs.append((proc, culprit, prog))
    for proc, culprit, prog in runs:
        _, stderr = proc.communicate(timeout=120)
        _check_cli(proc.returncode, stderr, culprit, prog)
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_model_dir(tmp_path, capsys):
    convert_cli = _script("convert")
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "out")])
    _check_cli(e.value.code, capsys.readouterr().err, "nope", "convert.py")


def test_cli_existing_output(tiny_ckpt, tmp_path, capsys):
    convert_cli = _script("convert")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["--hf-path", str(tiny_ckpt), "--mlx-path", str(tmp_path / "out"), "--quiet"])
    _check_cli(e.value.code, capsys.readouterr().err, str(tmp_path / "out"), "convert.py")


def _state(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trunk_conversion(tiny_ckpt_nomtp, tmp_path_factory):
    return convert(tiny_ckpt_nomtp, tmp_path_factory.mktemp("graft") / "trunk_q", quantize=True)


@pytest.mark.parametrize("case", list(ISSUE_16))
def test_mtp_only_refuses_and_leaves_the_target(broken, case, trunk_conversion, capsys):
    """`convert.py --mtp-only` with a broken source: one line, exit 2, the conversion untouched."""
    path, culprit = broken[case]
    before = _state(trunk_conversion)
    argv = ["--hf-path", str(path), "--mlx-path", str(trunk_conversion), "--mtp-only", "--quiet"]
    with pytest.raises(SystemExit) as e:
        _script("convert").main(argv)
    _check_cli(e.value.code, capsys.readouterr().err, culprit, "convert.py")
    assert _state(trunk_conversion) == before


def test_stored_dtype_must_fit_the_parameter(tiny_ckpt, tmp_path):
    """Bytes relabelled with a same-width integer dtype pass the header checks but are not weights."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    key = "model.layers.2.moe.router_bias"  # F32 in the checkpoint
    name, _ = _edit_entry(path, key, lambda e: {**e, "dtype": "I32"})
    with pytest.raises(CheckpointError, match=f"{name}: tensor {key} has dtype I32"):
        load(path, quantize=False, dtype="float32")


def test_conversion_read_by_mlx_only_after_validation(trunk_conversion, tmp_path, monkeypatch):
    """A conversion's tensors come from mx.load, one call per shard, and a shard whose header
    fails our checks never reaches it."""
    calls = []
    real = mx.load
    monkeypatch.setattr(mx, "load", lambda f, *a, **k: calls.append(Path(f).name) or real(f, *a, **k))
    load(trunk_conversion)
    shards = sorted(f.name for f in trunk_conversion.glob("*.safetensors"))
    assert sorted(calls) == shards
    bad = tmp_path / "bad"
    shutil.copytree(trunk_conversion, bad)
    calls.clear()
    overlapping_offsets_in(bad, shards[0])
    with pytest.raises(CheckpointError, match="overlaps"):
        load(bad)
    assert calls == []


def overlapping_offsets_in(p, name):
    """The last tensor of shard `name` pointed at the first one's bytes (resized to match)."""

    def edit(header):
        keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        first, last = header[keys[0]], header[keys[-1]]
        last["data_offsets"] = first["data_offsets"]
        last["shape"], last["dtype"] = first["shape"], first["dtype"]
        return header

    _edit_header(p, name, edit)


@pytest.mark.parametrize("target", ["config.json", SHARD1, "model.safetensors.index.json"])
def test_json_integer_too_long_to_convert(tiny_ckpt, tmp_path, target):
    """Python refuses to convert integers of more than 4300 digits: still one named error."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    huge = "1" + "0" * 5000
    if target == "config.json":
        _edit_config(path, lambda c: c.update(hidden_size=0))
        (path / target).write_text(
            (path / target).read_text().replace('"hidden_size": 0', f'"hidden_size": {huge}')
        )
    elif target == SHARD1:
        _edit_header(path, SHARD1, lambda h: h.setdefault("__metadata__", {}).update(x="HUGE"))
        data = (path / SHARD1).read_bytes().replace(b'"HUGE"', huge.encode())
        n = struct.unpack("<Q", data[:8])[0] + len(huge) - len('"HUGE"')
        (path / SHARD1).write_bytes(struct.pack("<Q", n) + data[8:])
    else:
        index = (path / target).read_text()
        (path / target).write_text(index.replace('"metadata": {', f'"metadata": {{"n": {huge}, ', 1))
    with pytest.raises((CheckpointError, ConfigError), match=target):
        load(path, quantize=False)
