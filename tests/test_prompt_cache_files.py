"""Prompt-cache files cannot change output (issue 22): one flipped byte anywhere in a file is
refused (load_prompt_cache) or deleted and prefilled cold, exactly (the server's store); the
store writes off the request path, a killed write leaves no file that loads, and its index
finds earlier processes' files without reading every header on each miss."""

import json
import os
import signal
import threading
import time
import types
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_prompt_cache import SYSTEM, agent_turns, conversation, run, words

from mlx_step35 import cache_files, load
from mlx_step35.prompt_cache import (
    ChecksumError,
    PromptCacheError,
    PromptCacheStore,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_step35.safetensors_io import read_header


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")[0]


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A file of a drafting conversation past the window, and its data offset."""
    pc = make_prompt_cache(model)
    run(model, SYSTEM + words(20, 3), pc, draft_mtp=True, num_draft=2)
    f = tmp_path_factory.mktemp("saved") / "chat.safetensors"
    save_prompt_cache(f, pc)
    return f, read_header(f)[2]


def flipped(src: Path, dst: Path, at: int) -> Path:
    data = bytearray(src.read_bytes())
    data[at] ^= 0x01  # the smallest change: a digit stays a digit, a bit of a float
    dst.write_bytes(bytes(data))
    return dst


def test_file_is_plain_safetensors_with_a_checksum(model, saved):
    f, data_start = saved
    arrays, meta = mx.load(str(f), return_metadata=True)  # MLX's own reader reads it
    assert meta["checksum"].startswith("crc32:") and len(meta["checksum"]) == 23
    ours, _ = cache_files.read(f)
    assert set(ours) == set(arrays)
    for k in arrays:
        assert ours[k].dtype == arrays[k].dtype and mx.array_equal(ours[k], arrays[k])
    load_prompt_cache(f, model)  # and it loads intact


def test_one_flipped_byte_in_the_data_is_refused(model, saved, tmp_path):
    f, data_start = saved
    size = f.stat().st_size
    places = sorted({data_start, size - 1, *np.linspace(data_start, size - 1, 12).astype(int).tolist()})
    for i, at in enumerate(places):
        bad = flipped(f, tmp_path / f"data{i}.safetensors", at)
        with pytest.raises(ChecksumError, match=f"data{i}.safetensors: checksum mismatch"):
            load_prompt_cache(bad, model)


def test_one_flipped_byte_in_the_header_is_refused(model, saved, tmp_path):
    f, data_start = saved
    head = f.read_bytes()[:data_start]
    digit = head.index(b'"tokens":"[') + len(b'"tokens":"[') + 1  # inside the token list
    check = head.index(b'"checksum":"crc32:') + len(b'"checksum":"crc32:') + 3
    places = sorted({0, 3, 7, 8, digit, check, data_start - 1, *range(9, data_start - 1, 97)})
    for i, at in enumerate(places):
        bad = flipped(f, tmp_path / f"head{i}.safetensors", at)
        with pytest.raises(PromptCacheError, match=f"head{i}.safetensors"):
            load_prompt_cache(bad, model)


def test_format_1_file_without_checksum_is_refused(model, saved, tmp_path):
    arrays, meta = mx.load(str(saved[0]), return_metadata=True)
    del meta["checksum"]
    meta["version"] = "1"
    old = tmp_path / "old.safetensors"
    mx.save_safetensors(str(old), arrays, metadata=meta)  # as format 1 wrote them
    with pytest.raises(PromptCacheError, match="old.safetensors: prompt-cache format 1.*no checksum"):
        load_prompt_cache(old, model)
    meta["version"] = "2"  # a format-2 header without its checksum: no data is trusted
    mx.save_safetensors(str(old), arrays, metadata=meta)
    with pytest.raises(PromptCacheError, match="old.safetensors: has no checksum"):
        load_prompt_cache(old, model)


def store_files(d: Path):
    return sorted(f for f in d.glob("*.safetensors") if not f.name.startswith("."))


@pytest.fixture(scope="module")
def chat(model, tmp_path_factory):
    """Turn 1 through a store with a directory; the cold answer to turn 2."""
    d = tmp_path_factory.mktemp("store")
    turns = [words(9, 81), words(6, 82)]
    cold, _ = conversation(model, None, turns)
    store = PromptCacheStore(model, max_bytes=1 << 30, directory=d)
    agent_turns(model, store, turns[:1])
    assert store.close(timeout=60)
    prompt = SYSTEM + turns[0] + cold[0][0][-4:] + turns[1] + [1, 2]
    return d, prompt, cold[1][0], turns


def usable(f: Path, prompt) -> int:
    tokens = json.loads(cache_files.read_metadata(f)["tokens"])
    return len(tokens) if prompt[: len(tokens)] == tokens else 0


@pytest.mark.parametrize("where", ["data0", "data1", "data2", "header"])
def test_store_deletes_a_damaged_file_and_prefills_cold(model, chat, where, tmp_path):
    d, prompt, cold, _ = chat
    for f in store_files(d):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    longest = max(store_files(tmp_path), key=lambda f: usable(f, prompt))  # the file a hit reads
    assert usable(longest, prompt) > len(SYSTEM)
    data_start, size = read_header(longest)[2], longest.stat().st_size
    at = {"data0": data_start, "data1": (data_start + size) // 2, "data2": size - 1}.get(where)
    if at is None:  # a token of its header: still valid JSON, so only the header's CRC tells
        head = longest.read_bytes()[:data_start]
        at = head.index(b'"tokens":"[') + len(b'"tokens":"[') + 1
    flipped(longest, longest, at)
    with pytest.warns(UserWarning, match=f"deleting {longest}"):  # at start (header) or when read
        store = PromptCacheStore(model, max_bytes=1 << 30, directory=tmp_path)
        pc, cont = store.acquire(prompt)
    assert not longest.exists() and cont == prompt and pc.cached_tokens == 0
    out, _ = run(model, cont, pc)
    assert out == cold


def test_store_treats_format_1_files_as_misses_and_replaces_them(model, chat, tmp_path, recwarn):
    d, prompt, cold, turns = chat
    for f in store_files(d):  # the same files as format 1 wrote them: no checksum
        arrays, meta = mx.load(str(f), return_metadata=True)
        del meta["checksum"]
        meta["version"] = "1"
        mx.save_safetensors(str(tmp_path / f.name), arrays, metadata=meta)
    store = PromptCacheStore(model, max_bytes=1 << 30, directory=tmp_path)
    pc, cont = store.acquire(prompt)
    assert pc.tokens == [] and cont == prompt and run(model, cont, pc)[0] == cold
    assert [f.name for f in store_files(tmp_path)] == [f.name for f in store_files(d)]  # kept
    assert not [w for w in recwarn if "prompt cache" in str(w.message)]  # a miss, not damage
    agent_turns(model, store, turns[:1])  # the same conversation again writes the same names
    assert store.close(timeout=60)
    assert {cache_files.read_metadata(f)["version"] for f in store_files(tmp_path)} == {"2"}


class Gate:
    """Patches the writer to wait until the test opens the gate."""

    def __init__(self, monkeypatch):
        self.open, self.started = threading.Event(), threading.Event()
        real = cache_files.write

        def slow(path, snap, fsync=True):
            self.started.set()
            assert self.open.wait(120)
            real(path, snap, fsync)

        monkeypatch.setattr(cache_files, "write", slow)


def test_a_request_never_waits_for_a_write(model, tmp_path, monkeypatch):
    turns = [words(9, 91), words(5, 92)]
    cold, _ = conversation(model, None, turns)
    gate = Gate(monkeypatch)
    store = PromptCacheStore(model, max_bytes=1 << 30, directory=tmp_path)
    try:
        out1, _ = agent_turns(model, store, turns[:1])  # release() hands the files over
        assert gate.started.wait(60) and store_files(tmp_path) == []
        t = time.perf_counter()
        prompt = SYSTEM + turns[0] + out1[0][-4:] + turns[1] + [1, 2]
        pc, cont = store.acquire(prompt)
        out2, _ = run(model, cont, pc)  # the next turn, while the write still waits
        store.release(pc)
        took = time.perf_counter() - t
        assert not gate.open.is_set() and store_files(tmp_path) == []
        assert out2 == cold[1][0] and pc.cached_tokens >= len(SYSTEM) + len(turns[0])
    finally:
        gate.open.set()
    assert took < 60
    assert store.close(timeout=60)  # shutdown waits for the pending writes
    assert len(store_files(tmp_path)) >= 2 and not list(tmp_path.glob(".*"))


def test_index_finds_earlier_files_without_reading_headers_per_miss(model, chat, monkeypatch):
    d, prompt, cold, _ = chat
    reads = []
    real = cache_files.read_header
    monkeypatch.setattr(cache_files, "read_header", lambda f: reads.append(Path(f)) or real(f))
    store = PromptCacheStore(model, max_bytes=1 << 30, directory=d)
    assert sorted(reads) == store_files(d)  # the index: every header once, at start
    reads.clear()
    for seed in range(3):  # misses in memory and on disk
        pc, cont = store.acquire(words(30, 100 + seed))
        assert pc.tokens == [] and len(cont) == 30
    assert reads == []
    pc, cont = store.acquire(prompt)  # a hit: only the file it loads is opened
    n = len(pc.tokens)
    assert len(set(reads)) == 1 and n > len(SYSTEM)
    assert run(model, cont, pc)[0] == cold and pc.cached_tokens == n


def slow_write(target: Path):
    """In a forked child (no MLX call: numpy, zlib and files only): write 100 MiB in 400
    blocks, 10 ms per block, and never return."""
    try:
        crc = zlib.crc32
        cache_files.zlib = types.SimpleNamespace(crc32=lambda b, c=0: time.sleep(0.01) or crc(b, c))
        arrays = {f"t{i:03d}": np.full((1024, 64), i, np.float32) for i in range(400)}
        snap = cache_files.Snapshot({k: ("F32", a) for k, a in arrays.items()}, {"tokens": "[1, 2]"})
        cache_files.write(target, snap)
    finally:
        os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_killed_write_leaves_no_file_that_loads(model, tmp_path):
    target = tmp_path / f"{'a' * 24}.safetensors"
    pid = os.fork()
    if pid == 0:
        slow_write(target)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            tmp = list(tmp_path.glob(".*" + cache_files.TMP_SUFFIX))
            if tmp and tmp[0].stat().st_size > 8 << 20:
                break
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the writer ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not target.exists()
    (tmp,) = tmp_path.glob(".*" + cache_files.TMP_SUFFIX)
    with pytest.raises(PromptCacheError):
        cache_files.read(tmp)
    PromptCacheStore(model, max_bytes=1 << 30, directory=tmp_path).close()
    assert list(tmp_path.iterdir()) == []  # removed at the next start


def test_strided_views_of_every_cache_dtype_round_trip(tmp_path):
    """Cache slices are written from their own memory (no copy): bfloat16 as its bits, packed
    uint32 words, odd strides; MLX's own reader and ours read back the same values."""
    base = mx.random.normal((2, 3, 10, 8))
    arrays = {
        "bf16": base.astype(mx.bfloat16)[..., :7, :],
        "f16": base.astype(mx.float16)[:, 1:, ::2, :],
        "f32": mx.transpose(base, (0, 2, 1, 3)),
        "u32": mx.arange(2 * 3 * 10 * 8, dtype=mx.uint32).reshape(2, 3, 10, 8)[..., :5, :4],
        "i32": mx.array([[1, -2], [3, -4]], dtype=mx.int32).T,
        "empty": mx.zeros((1, 2, 0, 8), dtype=mx.bfloat16),
    }
    f = tmp_path / "views.safetensors"
    cache_files.write(f, cache_files.snapshot(arrays, {"note": "x"}))
    theirs, meta = mx.load(str(f), return_metadata=True)
    ours, _ = cache_files.read(f)
    assert meta["note"] == "x"
    for k, a in arrays.items():
        for got in (theirs[k], ours[k]):
            assert got.dtype == a.dtype and got.shape == a.shape and mx.array_equal(got, a), k


def test_writer_drops_the_oldest_queued_file_when_it_falls_behind(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    writer = cache_files.Writer(max_pending=4)
    snap = cache_files.Snapshot({"x": ("F32", np.ones((2, 3), np.float32))}, {})
    done = []
    paths = [tmp_path / f"p{i}.safetensors" for i in range(6)]
    writer.submit(paths[0], snap, done.append)
    assert gate.started.wait(60)  # p0 is being written; p1..p5 queue behind it
    for p in paths[1:]:
        writer.submit(p, snap, done.append)
    assert writer.pending() == set(paths) - {paths[1]}  # 4 queued at most: p1 dropped
    gate.open.set()
    assert writer.close(timeout=60)
    assert sorted(tmp_path.iterdir()) == sorted(set(paths) - {paths[1]}) and done == [None] * 5


def test_a_live_writers_temporary_file_is_kept(model, tmp_path):
    """A store starting on a directory leaves alone the temporary file of a write still in
    progress in a live process (another server on the same directory): here, this one."""
    live = tmp_path / f".{'b' * 24}.safetensors.{os.getpid()}.1{cache_files.TMP_SUFFIX}"
    live.write_bytes(b"partial")
    PromptCacheStore(model, max_bytes=1 << 30, directory=tmp_path).close()
    assert live.exists()
