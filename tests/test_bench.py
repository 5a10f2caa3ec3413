"""`python -m mlx_step35.bench`: the shape of its table and JSON, capping at the model's
context, and its flag errors (its numbers are measurements, not tested)."""

import json
import subprocess
import sys

import pytest
from factory import make_checkpoint

from mlx_step35 import bench


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """A tiny checkpoint with a 48-token context, so a long prompt length is capped."""
    return make_checkpoint(tmp_path_factory.mktemp("bench"), sliding_window=8, max_position_embeddings=48)


def test_table_and_json(short_ckpt, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        ["--model", str(short_ckpt), "--prompt-lengths", "16,4096", "--gen-tokens", "6", "--json", str(out)]
    )
    r = json.loads(out.read_text())
    for key in (
        "device",
        "mlx_version",
        "memory_bytes",
        "wired_limit_bytes",
        "load_s",
        "peak_memory_bytes",
        "context_length",
        "prefill",
        "decode",
        "decode_prompt_tokens",
        "gen_tokens",
        "gate",
        "notes",
    ):
        assert key in r, key
    assert r["context_length"] == 48
    assert [p["prompt_tokens"] for p in r["prefill"]] == [16, 42]  # 4096 capped at 48 - 6
    assert any("capped at 42" in n for n in r["notes"])
    assert list(r["decode"]) == list(bench.MODES)
    for name, d in r["decode"].items():
        assert d["tokens"] == 5 and d["tokens_per_s"] > 0  # the first of 6 comes from the prefill
        assert len(d["acceptance"]) == {"plain": 0, "depth 1": 1, "depth 2": 2}.get(
            name, len(d["acceptance"])
        )
        assert d["tokens_per_pass"] >= 1.0
    assert r["decode"]["plain"]["tokens_per_pass"] == 1.0
    assert len(r["decode"]["depth 3"]["acceptance"]) == 3
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows[-len(bench.MODES) :]] == list(bench.MODES)
    assert "| 16 |" in text and "| 42 |" in text and "note: prompt lengths capped" in text


@pytest.mark.parametrize(
    "bad",
    [
        ["--prompt-lengths", "12,x"],
        ["--gen-tokens", "0"],
        ["--gate", "1.5"],
        ["--modes", "plain,depth 9"],
        ["--json", "/nonexistent-dir/x.json"],
        ["--bogus"],
    ],
)
def test_bad_flags_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(bad)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m mlx_step35.bench: error:")


def test_missing_model_exits_2_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_step35.bench", "--quick", "--model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
