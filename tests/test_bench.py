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
    """A tiny checkpoint with a 48-token context, so a long prompt length is capped; heads of
    32 dimensions, so its KV can be quantized in groups of 32."""
    return make_checkpoint(
        tmp_path_factory.mktemp("bench"),
        sliding_window=8,
        max_position_embeddings=48,
        head_dim=32,
        attention_other_setting={"num_attention_heads": 6, "num_attention_groups": 2, "head_dim": 32},
    )


def test_table_and_json(short_ckpt, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        ["--model", str(short_ckpt), "--prompt-lengths", "16,4096", "--gen-tokens", "6", "--json", str(out)]
    )  # --concurrency: its default, 1 and 4 requests
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
        "kv_bits",
        "concurrent",
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
    assert r["kv_bits"] is None
    assert [(c["mode"], c["requests"]) for c in r["concurrent"]] == [
        (m, n) for m in bench.CONCURRENT_MODES for n in bench.CONCURRENCY
    ]
    for c in r["concurrent"]:
        assert c["tokens"] == c["requests"] * 5  # each request's first token comes from the prefill
        assert c["tokens_per_s"] > 0 and c["per_request_tokens_per_s"] > 0
        assert 1 <= c["rows_per_pass"] <= c["requests"]
    plain4 = next(c for c in r["concurrent"] if c == dict(c, mode="plain", requests=4))
    assert plain4["tokens_per_pass"] == 4.0  # four plain rows in every decoding pass
    text = capsys.readouterr().out
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| mode | decode tok/s")) + 2
    rows = lines[start : start + len(bench.MODES)]
    assert [row.split(" | ")[0][2:] for row in rows] == list(bench.MODES)
    assert "| 16 |" in text and "| 42 |" in text and "note: prompt lengths capped" in text
    assert "requests decoded together" in text and "| plain | 4 |" in text and "| auto | 1 |" in text


def test_kv_bits_reach_every_measurement(short_ckpt, tmp_path, monkeypatch):
    """--kv-bits and its companions go to every generation and to the batch engine."""
    seen = []
    step, engine = bench.generate_step, bench.BatchEngine.__init__

    def spy_step(*args, **kw):
        seen.append(("step", kw.get("kv_bits"), kw.get("kv_group_size"), kw.get("quantized_kv_start")))
        return step(*args, **kw)

    def spy_engine(self, *args, **kw):
        seen.append(("batch", kw.get("kv_bits"), kw.get("kv_group_size"), kw.get("quantized_kv_start")))
        engine(self, *args, **kw)

    monkeypatch.setattr(bench, "generate_step", spy_step)
    monkeypatch.setattr(bench.BatchEngine, "__init__", spy_engine)
    out = tmp_path / "kv.json"
    flags = "--prompt-lengths 16 --gen-tokens 3 --concurrency 2 --kv-bits 8 --kv-group-size 32 --quantized-kv-start 4"
    bench.main(["--model", str(short_ckpt), "--modes", "plain,depth 2", "--json", str(out)] + flags.split())
    assert {s[0] for s in seen} == {"step", "batch"}
    assert {s[1:] for s in seen} == {(8, 32, 4)}
    r = json.loads(out.read_text())
    assert r["kv_bits"] == 8 and [c["requests"] for c in r["concurrent"]] == [2, 2]


@pytest.mark.parametrize(
    "bad",
    [
        ["--prompt-lengths", "12,x"],
        ["--gen-tokens", "0"],
        ["--gate", "1.5"],
        ["--modes", "plain,depth 9"],
        ["--concurrency", "1,x"],
        ["--concurrency", "-1"],
        ["--kv-bits", "7"],
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
