"""Prompt caches across turns: exactly the cold computation (plain and drafting), past the
sliding window, with branches; files that are damaged or foreign are refused."""

import numpy as np
import pytest
from factory import make_checkpoint
from spec_models import successor_model

import generate as generate_cli  # the script at the repository root (conftest)
from mlx_step35 import cache_files, load
from mlx_step35.generation import generate_step
from mlx_step35.prompt_cache import (
    CHECKPOINT_BEFORE_END,
    PromptCacheError,
    PromptCacheStore,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_step35.speculative import SpecStats

RNG = np.random.default_rng(11)
SYSTEM = [int(t) for t in RNG.integers(3, 500, 21)]  # ~3 sliding windows of 8
MODES = [
    {},
    dict(draft_mtp=True, num_draft=1),
    dict(draft_mtp=True, num_draft=2),
    dict(draft_mtp=True, num_draft=3),
    dict(draft_mtp=True, num_draft="auto"),
]


def words(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 500, n)]


def run(model, prompt, pc=None, max_tokens=12, checkpoints=(), **kw):
    out, first = [], None
    for tok, lp, _ in generate_step(
        model, prompt, max_tokens=max_tokens, prompt_cache=pc, checkpoints=checkpoints, **kw
    ):
        out.append(tok)
        first = lp if first is None else first
    return out, np.array(first)


@pytest.fixture(scope="module")
def mixed(tiny_ckpt):
    """Drafts partly accepted: caches, windows and rewinds all shape the output."""
    return successor_model(tiny_ckpt, eps=2.5)[0]


@pytest.fixture(scope="module")
def random_model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")[0]


def conversation(model, pc, turns, **kw):
    """An agent-like chat: each prompt re-renders the history, where an earlier reply keeps
    only its last 4 tokens (its 'reasoning' is dropped), so a new prompt shares the last
    one only up to before the last reply. Checkpoints at the end of each user message."""
    history, outputs, cached = list(SYSTEM), [], []
    for i, user in enumerate(turns):
        prompt = history + user + [1, 2]  # [1, 2]: the generation prompt, as `<think>\n`
        marks = [len(SYSTEM), len(history) + len(user)]
        cont = pc.continuation(prompt) if pc is not None else prompt
        out, first = run(model, cont, pc, checkpoints=marks, **kw)
        outputs.append((out, first))
        cached.append(pc.cached_tokens if pc is not None else 0)
        history = prompt[:-2] + out[-4:]
    return outputs, cached


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_turns_with_cache_equal_cold_runs(mixed, mode):
    kw = MODES[mode]
    turns = [words(9, 1), words(3, 2), words(17, 3), words(1, 4)]
    pc = make_prompt_cache(mixed)
    stats = SpecStats()
    warm, cached = conversation(mixed, pc, turns, stats=stats, **kw)
    cold, _ = conversation(mixed, None, turns, **kw)
    for (w, wl), (c, cl) in zip(warm, cold):
        assert w == c
        assert np.abs(wl - cl).max() <= 1e-4 * (cl.max() - cl.min())
    # the prefix shared with the previous prompt ends before the last reply; the newest
    # checkpoint before it is the end of the previous user message
    assert cached[0] == 0
    assert all(c >= len(SYSTEM) + 9 for c in cached[1:])
    if kw.get("num_draft") in (1, 2, 3):
        assert 0 < sum(stats.accepted) < sum(stats.drafted)


def test_branch_restores_the_newest_checkpoint_before_it(random_model):
    base = SYSTEM + words(30, 5) + [1, 2]
    pc = make_prompt_cache(random_model)
    run(random_model, pc.continuation(base), pc, checkpoints=[len(SYSTEM), len(SYSTEM) + 16])
    edited = base[: len(SYSTEM) + 20] + [9, 9, 9] + base[len(SYSTEM) + 23 :]  # edit mid-message
    warm, wl = run(random_model, pc.continuation(edited), pc, draft_mtp=True, num_draft=2)
    assert pc.cached_tokens == len(SYSTEM) + 16  # not len(SYSTEM) + 20: the ring has moved on
    cold, cl = run(random_model, edited, draft_mtp=True, num_draft=2)
    assert warm == cold
    assert np.abs(wl - cl).max() <= 1e-4 * (cl.max() - cl.min())
    # regenerate: the same prompt again restores the checkpoint a few tokens before its end
    again, _ = run(random_model, pc.continuation(edited), pc, draft_mtp=True, num_draft=2)
    assert again == cold and pc.cached_tokens == len(edited) - CHECKPOINT_BEFORE_END


def test_prompt_continues_the_conversation_like_mlx_lm(random_model):
    """stream_generate's prompt continues the cache: prompt 1 + reply 1 + prompt 2."""
    p1, p2 = SYSTEM + words(5, 6), words(7, 7)
    pc = make_prompt_cache(random_model)
    out1, _ = run(random_model, p1, pc)
    out2, _ = run(random_model, p2, pc, draft_mtp=True, num_draft=3)
    assert pc.cached_tokens == len(p1) + len(out1) - 1  # the last reply token had not run
    assert out2 == run(random_model, p1 + out1 + p2, draft_mtp=True, num_draft=3)[0]


def test_closed_early_keeps_the_cache_consistent(random_model):
    pc = make_prompt_cache(random_model)
    gen = generate_step(random_model, SYSTEM, max_tokens=50, prompt_cache=pc)
    got = [next(gen)[0] for _ in range(5)]
    gen.close()  # a pipelined pass for the 5th token was already queued
    out, _ = run(random_model, [4], pc, draft_mtp=True, num_draft=2)
    assert out == run(random_model, SYSTEM + got + [4], draft_mtp=True, num_draft=2)[0]


def test_no_drafter_cache_refuses_drafting(random_model):
    pc = make_prompt_cache(random_model, draft_mtp=False)
    run(random_model, SYSTEM, pc)
    with pytest.raises(ValueError, match="holds no MTP state"):
        run(random_model, [5], pc, draft_mtp=True, num_draft=1)


def sliding_bytes(cp):
    return sum(c.nbytes for c in cp.sliding.values())


def test_checkpoints_hold_one_window_not_the_conversation(random_model):
    pc = make_prompt_cache(random_model)
    run(random_model, SYSTEM + words(60, 8), pc, checkpoints=[30, 60])
    cp30, cp60 = pc.checkpoints[30], pc.checkpoints[60]
    sliding = {i for i, layer in enumerate(random_model.layers) if layer.is_sliding}
    assert set(cp30.sliding) == sliding  # no full-attention layer is copied
    assert sliding_bytes(cp30) == sliding_bytes(cp60) > 0  # bounded by the window
    live = sum(c.nbytes for c in pc.cache) + sum(c.nbytes for c in pc.drafter.cache)
    live += sum(h.nbytes for h in pc.drafter.hidden if h is not None)
    assert pc.nbytes == live + sum(cp.nbytes for cp in pc.checkpoints.values())


def test_save_and_load_continue_exactly(random_model, tmp_path):
    pc = make_prompt_cache(random_model)
    out1, _ = run(random_model, SYSTEM, pc, draft_mtp=True, num_draft=2)
    f = tmp_path / "chat.safetensors"
    save_prompt_cache(f, pc, {"note": "turn 1"})
    loaded, meta = load_prompt_cache(f, random_model, return_metadata=True)
    assert meta["note"] == "turn 1" and loaded.tokens == pc.tokens and loaded.history == pc.history
    warm, _ = run(random_model, [8, 9], loaded, draft_mtp=True, num_draft=2)
    assert loaded.cached_tokens == len(SYSTEM) + len(out1) - 1
    assert warm == run(random_model, SYSTEM + out1 + [8, 9], draft_mtp=True, num_draft=2)[0]
    assert not list(tmp_path.glob(".*.tmp*"))


def test_damaged_or_foreign_files_are_refused(random_model, tmp_path, tmp_path_factory):
    pc = make_prompt_cache(random_model)
    run(random_model, SYSTEM, pc)
    f = tmp_path / "c.safetensors"
    save_prompt_cache(f, pc)
    data = f.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PromptCacheError, match="trunc.safetensors"):
        load_prompt_cache(tmp_path / "trunc.safetensors", random_model)
    other = load(
        make_checkpoint(tmp_path_factory.mktemp("other"), seed=5, sliding_window=8),
        quantize=False,
        dtype="float32",
    )[0]
    with pytest.raises(PromptCacheError, match="another model"):
        load_prompt_cache(f, other)
    arrays, meta = cache_files.read(f)
    del meta["checksum"]
    meta["tokens"] = meta["tokens"].replace("[", "[7, ", 1)  # tokens no longer match the caches
    cache_files.write(tmp_path / "edited.safetensors", cache_files.snapshot(arrays, meta))  # checksum ok
    with pytest.raises(PromptCacheError, match="edited.safetensors: cache offsets and tokens disagree"):
        load_prompt_cache(tmp_path / "edited.safetensors", random_model)


def agent_turns(model, store, turns, **kw):
    """As `conversation`, through a store (acquire / release), as the server does."""
    history, outs, cached = list(SYSTEM), [], []
    for user in turns:
        prompt = history + user + [1, 2]
        pc, cont = store.acquire(prompt)
        out, _ = run(model, cont, pc, checkpoints=[len(SYSTEM), len(history) + len(user)], **kw)
        store.release(pc)
        outs.append(out)
        cached.append(pc.cached_tokens)
        history = prompt[:-2] + out[-4:]
    return outs, cached


def test_store_serves_interleaved_conversations(random_model):
    store = PromptCacheStore(random_model, max_bytes=1 << 30)
    a_turns, b_turns = [words(9, 21), words(5, 22)], [words(12, 31), words(4, 32)]
    cold_a, _ = conversation(random_model, None, a_turns)
    cold_b, _ = conversation(random_model, None, [[0] + t for t in b_turns])  # differs after SYSTEM
    a1, _ = agent_turns(random_model, store, a_turns[:1])
    b1, cb1 = agent_turns(random_model, store, [[0] + b_turns[0]])
    assert cb1 == [len(SYSTEM)]  # B branches off A at the end of the system prompt: a fork
    assert len(store.entries) == 2
    # each conversation's second turn finds its own first turn
    ha = SYSTEM + a_turns[0] + a1[0][-4:]
    hb = SYSTEM + [0] + b_turns[0] + b1[0][-4:]
    for hist, user, cold in ((ha, a_turns[1], cold_a), (hb, b_turns[1], cold_b)):
        prompt = hist + user + [1, 2]
        pc, cont = store.acquire(prompt)
        out, _ = run(random_model, cont, pc)
        store.release(pc)
        assert out == cold[1][0]
        assert pc.cached_tokens >= len(hist) - 4  # the end of its previous user message
    assert a1[0] == cold_a[0][0] and b1[0] == cold_b[0][0]


def test_store_stays_under_its_byte_bound(random_model):
    one = PromptCacheStore(random_model, max_bytes=1 << 30)
    agent_turns(random_model, one, [words(9, 41)])
    bound = int(2.5 * one.nbytes)  # room for about two such conversations
    store = PromptCacheStore(random_model, max_bytes=bound)
    for seed in range(5):
        agent_turns(random_model, store, [[seed] + words(9, 50 + seed)])
        assert store.nbytes <= bound
    assert 1 <= len(store.entries) <= 2


def test_store_on_disk_survives_a_restart_and_skips_bad_files(random_model, tmp_path, recwarn):
    turns = [words(9, 61), words(6, 62)]
    cold, _ = conversation(random_model, None, turns)
    first = PromptCacheStore(random_model, max_bytes=1 << 30, directory=tmp_path)
    agent_turns(random_model, first, turns[:1])
    assert first.close(timeout=60)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files
    (tmp_path / ".x.123.tmp.safetensors").write_bytes(b"partial")  # a crash mid-write
    (tmp_path / f"{'0' * 24}.safetensors").write_bytes(b"\x00" * 3)  # damaged
    (tmp_path / "notes.safetensors").write_bytes(b"\x00" * 3)  # not the store's: left alone
    restarted = PromptCacheStore(random_model, max_bytes=1 << 30, directory=tmp_path)
    assert not (tmp_path / ".x.123.tmp.safetensors").exists()
    assert not (tmp_path / f"{'0' * 24}.safetensors").exists()
    assert (tmp_path / "notes.safetensors").exists()
    history = SYSTEM + turns[0] + cold[0][0][-4:]
    prompt = history + turns[1] + [1, 2]
    pc, cont = restarted.acquire(prompt)
    out, _ = run(random_model, cont, pc)
    assert out == cold[1][0]
    assert pc.cached_tokens >= len(SYSTEM) + len(turns[0])
    assert any(f"deleting {tmp_path / ('0' * 24)}.safetensors" in str(w.message) for w in recwarn)


def test_store_full_disk_loses_the_file_not_the_answer(random_model, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_files, "open", full, raising=False)  # the writer's open()
    store = PromptCacheStore(random_model, max_bytes=1 << 30, directory=tmp_path)
    with pytest.warns(UserWarning, match="could not write"):
        out, _ = agent_turns(random_model, store, [words(9, 71)])
        assert store.flush(timeout=60)
    assert out[0] == conversation(random_model, None, [words(9, 71)])[0][0][0]
    assert not list(tmp_path.iterdir())


def test_cli_continues_a_saved_conversation(tmp_path, capsys):
    """generate.py --save-prompt-cache, then --prompt-cache-file: the second answer is that of
    a cold run over the whole re-rendered chat (demo model, its chat template, drafting), and
    the second run reuses the first turn up to the end of its user message. The second run is
    the real script; the first and the refusal call the same main() in-process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import mlx.core as mx

    from mlx_step35 import generate
    from mlx_step35.generation import build_prompt

    root = Path(__file__).resolve().parents[1]
    f = tmp_path / "chat.safetensors"
    common = ["-m", "12", "--draft-mtp"]
    generate_cli.main(common + ["--prompt", "def f(x):", "--save-prompt-cache", str(f)])
    assert "Prompt cache: " in capsys.readouterr().out
    messages = json.loads(mx.load(str(f), return_metadata=True)[1]["messages"])
    assert [m["role"] for m in messages] == ["user", "assistant"]
    script = [sys.executable, str(root / "generate.py"), *common]
    r = subprocess.run(
        script + ["--prompt", "class A:", "--prompt-cache-file", str(f), "--num-draft", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    second, out = r.stdout.split("\n==========")[0], r.stdout
    model, tok = load()
    first_user = build_prompt(tok, "def f(x):", generation_prompt=False)
    assert f"(after {len(first_user)} reused from the prompt cache)" in out
    cold = generate(model, tok, build_prompt(tok, "class A:", history=messages), 12)
    assert second == cold and cold
    with pytest.raises(SystemExit) as e:
        generate_cli.main(common + ["--prompt-cache-file", str(tmp_path / "none.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "none.safetensors" in err and "Traceback" not in err
