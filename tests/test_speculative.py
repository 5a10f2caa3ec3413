"""MTP speculative decoding: lossless (greedy identical, sampling same distribution),
drafts equal to the teacher-forced MTP definition, stops, fallback and the CLI."""

import functools
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from factory import make_config
from spec_models import successor_model

import generate as generate_cli  # the script at the repository root (conftest)
from mlx_step35 import generate, load, make_sampler, stream_generate
from mlx_step35.config import parse_config
from mlx_step35.generation import generate_step
from mlx_step35.model import Model
from mlx_step35.speculative import MTPDrafter, SpecStats, accept

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 500, 20)]
GEN = 60  # prompt + generation = 80 tokens = 10 sliding windows of 8


def tokens_of(model, prompt, **kw):
    return [t for t, _, _ in generate_step(model, prompt, **kw)]


@pytest.fixture(scope="module")
def random_model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")[0]


@pytest.fixture(scope="module")
def perfect_model(tiny_ckpt):
    return successor_model(tiny_ckpt, eps=0.0)


@pytest.fixture(scope="module")
def mixed_model(tiny_ckpt):
    return successor_model(tiny_ckpt, eps=2.5)[0]


@pytest.mark.parametrize("num_draft", [1, 2, 3, "auto"])
@pytest.mark.parametrize("which", ["random_model", "mixed_model"])
def test_greedy_identical_to_plain(which, num_draft, request):
    model = request.getfixturevalue(which)
    plain = tokens_of(model, PROMPT, max_tokens=GEN)
    stats = SpecStats()
    ungated = dict(draft_min_confidence=0.0)  # every step drafts num_draft (test_draft_gate: gated)
    spec = tokens_of(
        model, PROMPT, max_tokens=GEN, draft_mtp=True, num_draft=num_draft, stats=stats, **ungated
    )
    assert spec == plain
    if num_draft != "auto":  # (auto drafts only where it pays: see the tests below)
        assert len(stats.drafted) == num_draft
    if which == "mixed_model" and num_draft != "auto":  # partial acceptance and rewinds
        # (auto's depths follow measured step times: whether it drafts here depends on the
        # machine's load, so its rewinds are exercised by the patched-policy tests below)
        assert 0 < stats.accepted[0] < stats.drafted[0]
        assert stats.verify_steps < GEN - 1


def test_greedy_quantized_identical_to_plain(tiny_ckpt):
    model, _ = load(tiny_ckpt, q_bits=4)
    plain = tokens_of(model, PROMPT, max_tokens=40)
    assert tokens_of(model, PROMPT, max_tokens=40, draft_mtp=True, num_draft=3) == plain


@pytest.mark.parametrize("num_draft", [1, 2, 3])
def test_perfect_drafts_all_accepted(perfect_model, num_draft):
    model, _ = perfect_model
    stats = SpecStats()
    out = tokens_of(
        model,
        PROMPT,
        max_tokens=GEN,
        draft_mtp=True,
        num_draft=num_draft,
        stats=stats,
        draft_min_confidence=0.0,
    )
    V = model.args.vocab_size
    assert out == [(PROMPT[-1] + 1 + i) % V for i in range(GEN)]  # the successor chain
    assert stats.accepted == stats.drafted and stats.drafted[0] > 0
    assert stats.verify_steps == math.ceil((GEN - 1) / (num_draft + 1))


@pytest.mark.parametrize("which", ["random_model", "mixed_model"])
def test_auto_switching_depths_and_plain_runs_is_lossless(which, request, monkeypatch):
    """Depth changes every step, with stretches of plain decoding in between (after which
    the MTP caches catch up over many rows): still identical to plain decoding."""
    from mlx_step35.draft_policy import AutoDraft

    model = request.getfixturevalue(which)
    script = iter([0, 3, 1, 0, 2, 3, 1, 1, 0, 3, 2] * 20)
    monkeypatch.setattr(AutoDraft, "choose", lambda self: next(script))
    monkeypatch.setattr(AutoDraft, "plain_check", 5)
    stats = SpecStats()
    plain = tokens_of(model, PROMPT, max_tokens=GEN)
    assert tokens_of(model, PROMPT, max_tokens=GEN, draft_mtp=True, stats=stats) == plain
    assert stats.plain_tokens >= 10 and len(stats.drafted) == 3


def test_auto_drafts_when_wider_passes_are_cheap(mixed_model, monkeypatch):
    """With a bandwidth-bound cost model (a verify pass costs about one plain step, as on
    a Mac) auto drafts deep; with per-token costs (as on this CPU) it decodes plainly."""
    from mlx_step35.draft_policy import AutoDraft

    base = AutoDraft(3, (0.05, 0.05))
    base.c1, base.plain_reports, base.prefill = 0.01, 2, (100, 0.02)  # prefill: 0.1 ms per extra token
    assert base.choose() >= 2
    base.prefill = (100, 1.0)  # a wider pass costs a full plain step per token
    assert base.choose() == 0
    monkeypatch.setattr(AutoDraft, "cost", lambda self, n: 0.01 * (1 + 0.05 * n))
    stats = SpecStats()
    plain = tokens_of(mixed_model, PROMPT, max_tokens=GEN)
    assert tokens_of(mixed_model, PROMPT, max_tokens=GEN, draft_mtp=True, stats=stats) == plain
    assert stats.verify_steps > 5 and stats.drafted[0] > 5


def test_auto_without_drafts_does_the_work_of_plain_decoding(mixed_model, monkeypatch):
    """Where drafting cannot pay (passes cost per token, as on this CPU), auto is one
    uninterrupted pipelined plain loop over trunk caches with plain decoding's slack of 1
    (so one query needs no mask), consulting the policy every 16 tokens."""
    from mlx_step35 import generation
    from mlx_step35.cache import SlidingKVCache
    from mlx_step35.draft_policy import AutoDraft

    monkeypatch.setattr(AutoDraft, "cost", lambda self, n: 0.01 * (1 + n))
    runs, caches, choices = [], [], []
    original_run, original_cache, original_choose = generation._plain_run, Model.make_cache, AutoDraft.choose

    def run_spy(*args, **kw):
        runs.append(args[3])  # count
        return (yield from original_run(*args, **kw))

    monkeypatch.setattr(generation, "_plain_run", run_spy)
    monkeypatch.setattr(
        Model,
        "make_cache",
        lambda self, slack, **kw: caches.append(original_cache(self, slack, **kw)) or caches[-1],
    )
    monkeypatch.setattr(
        AutoDraft, "choose", lambda self: choices.append(original_choose(self)) or choices[-1]
    )
    stats = SpecStats()
    out = tokens_of(mixed_model, PROMPT, max_tokens=GEN, draft_mtp=True, stats=stats)
    assert runs == [GEN - 1] and stats.plain_tokens == GEN - 1 and stats.verify_steps == 0
    assert choices == [0] * (1 + (GEN - 2) // AutoDraft.plain_check)
    sliding = [c for c in caches[0] if isinstance(c, SlidingKVCache)]
    assert sliding and all(c.slack == 1 and c.make_mask(1) is None for c in sliding)
    assert out == tokens_of(mixed_model, PROMPT, max_tokens=GEN)


def test_long_plain_stretch_keeps_bounded_trunk_rows(random_model):
    """Plain decoding under auto hands every trunk row to the drafter; with sliding MTP
    blocks only the last 2 * horizon rows may stay alive, however long the stretch."""
    drafter = MTPDrafter(random_model, slack=4)
    H = random_model.args.hidden_size
    rows = 4 * drafter.horizon

    def feed(n):
        for _ in range(n):
            h = mx.random.normal((1, 1, H))
            mx.eval(h)
            drafter.add_trunk(h)

    feed(rows)  # past the first skip-ahead
    before = mx.get_active_memory()
    feed(25 * rows)
    grown = mx.get_active_memory() - before
    assert grown < 2 * drafter.horizon * H * 4, grown  # well below the 25 * rows fed


def drafts_vs_teacher_forced(model, monkeypatch, **kw):
    """Run a generation; check every draft equals the argmax of mtp_logits computed on
    (verified tokens + the earlier drafts of that step). Returns the number of steps."""
    calls = []
    original = MTPDrafter.draft

    def spy(self, seq, n, sampler, processors=None, min_confidence=0.0, rng=None):
        drafts, dists, confs = original(self, seq, n, sampler, processors, min_confidence, rng)
        calls.append((list(seq), drafts.tolist()))
        return drafts, dists, confs

    monkeypatch.setattr(MTPDrafter, "draft", spy)
    out = tokens_of(model, PROMPT, draft_mtp=True, **kw)
    for seq, drafts in calls:
        P = len(seq) - 1
        mtp = model.mtp_logits(mx.array([seq + drafts[:-1]]))
        for k, d in enumerate(drafts, start=1):
            assert int(mtp[k - 1][0, P - 1].argmax().item()) == d, (P, k)
    return out, len(calls)


@pytest.mark.parametrize("which", ["random_model", "mixed_model"])
def test_drafts_match_teacher_forced_mtp(which, request, monkeypatch):
    _, steps = drafts_vs_teacher_forced(
        request.getfixturevalue(which), monkeypatch, max_tokens=30, num_draft=3
    )
    assert steps > 5


@pytest.mark.parametrize("which", ["random_model", "mixed_model"])
def test_drafts_exact_after_long_plain_stretches(which, request, monkeypatch):
    """Auto decoding plainly for long stretches lets the MTP blocks skip ahead (only the
    last K * (window - 1) positions can reach a draft): drafts stay teacher-forced exact."""
    from mlx_step35.draft_policy import AutoDraft

    # one plain token per choice, so that drafts come right after a skip (the tight case)
    script = iter(([3] + [0] * 25 + [2] + [0] * 44 + [3] + [0] * 47 + [3, 1] + [0] * 60) * 3)
    monkeypatch.setattr(AutoDraft, "choose", lambda self: next(script))
    monkeypatch.setattr(AutoDraft, "plain_check", 1)
    skips = []
    original = MTPDrafter._skip_ahead
    monkeypatch.setattr(
        MTPDrafter, "_skip_ahead", lambda self, start: (skips.append(start), original(self, start))
    )
    model = request.getfixturevalue(which)
    out, steps = drafts_vs_teacher_forced(model, monkeypatch, max_tokens=280)
    assert len(skips) >= 2 and steps > 5
    assert out == tokens_of(model, PROMPT, max_tokens=280)


def test_eos_inside_accepted_draft_stops_there(perfect_model):
    model, tokenizer = perfect_model
    eos = 511  # an EOS id of the tiny checkpoints (eos_token_id [1, 2, 511])
    assert eos in tokenizer.eos_token_ids
    prompt = PROMPT[:-1] + [eos - 3]  # successors: eos-2, eos-1, eos, ...: EOS is draft 2 of step 1
    out = list(stream_generate(model, tokenizer, prompt, 50, draft_mtp=True, num_draft=3))
    assert [r.token for r in out] == [eos - 2, eos - 1, eos]
    assert out[-1].finish_reason == "stop" and out[-1].from_draft
    assert [r.finish_reason for r in out[:-1]] == [None, None]


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_stops_exactly_at_max_tokens(perfect_model, max_tokens):
    model, tokenizer = perfect_model
    out = list(stream_generate(model, tokenizer, PROMPT[:5], max_tokens, draft_mtp=True))
    assert len(out) == max_tokens and out[-1].finish_reason == "length"


def test_stop_string(perfect_model):
    model, tokenizer = perfect_model
    full = generate(model, tokenizer, PROMPT[:5], 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop and stop in full
    cut = generate(model, tokenizer, PROMPT[:5], 12, draft_mtp=True, stop_strings=[stop])
    assert cut == full[: full.index(stop)]


def test_no_mtp_falls_back_to_plain(tiny_ckpt_nomtp):
    model, _ = load(tiny_ckpt_nomtp, quantize=False, dtype="float32")
    plain = tokens_of(model, PROMPT, max_tokens=20)
    with pytest.warns(UserWarning, match="no MTP weights"):
        assert tokens_of(model, PROMPT, max_tokens=20, draft_mtp=True) == plain


def test_bad_num_draft(random_model):
    for bad in (0, 4):
        with pytest.raises(ValueError, match="num_draft"):
            tokens_of(random_model, PROMPT, max_tokens=3, draft_mtp=True, num_draft=bad)


# ---- sampling: the output distribution is the trunk's ----


def chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularized upper gamma)."""
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )


def assert_same_distribution(a_runs: np.ndarray, b_runs: np.ndarray, alpha: float = 1e-3):
    """Two-sample chi-square test per token position after the first ([runs, tokens] of
    token ids below 8, the sampling models' vocabulary in use), each at level `alpha`."""
    for pos in range(1, a_runs.shape[1]):
        a = np.bincount(a_runs[:, pos], minlength=8)
        b = np.bincount(b_runs[:, pos], minlength=8)
        keep = (a + b) > 0
        stat = float((((a - b) ** 2)[keep] / (a + b)[keep]).sum())
        assert chi2_sf(stat, int(keep.sum()) - 1) > alpha, (pos, a, b)


def test_accept_rule_reproduces_target_distribution():
    """One draft from q, then `accept`: the emitted token is distributed as p. Chi-square
    goodness of fit at alpha = 1e-4 (false failure probability 1e-4; the seed is fixed)."""
    mx.random.seed(0)
    V, N = 6, 20000
    p = mx.array([[0.40, 0.25, 0.15, 0.10, 0.07, 0.03]])
    q = mx.array([[0.05, 0.10, 0.30, 0.30, 0.15, 0.10]])
    sampler = make_sampler(temp=1.0)
    drafts = np.array(mx.random.categorical(mx.log(q), num_samples=N))[0]
    logprobs = mx.log(mx.concatenate([p, p]))  # trunk at the draft position and after it
    counts = np.zeros(V)
    for d in drafts:
        n_acc, nxt = accept(mx.array([int(d)]), [q], logprobs, sampler)
        counts[int(d) if n_acc == 1 else nxt] += 1
    expected = np.array(p)[0] * N
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, V - 1) > 1e-4, (counts, expected)


def sampling_model(seed: int):
    """A random tiny model (vocab 8) with peaked, different trunk and MTP distributions."""
    cfg = make_config(vocab_size=8, sliding_window=4)
    cfg["eos_token_id"] = []
    mx.random.seed(seed)
    model = Model(parse_config(cfg))
    model.update({"lm_head": {"weight": model.lm_head.weight * 6}})
    for block in model.mtp:
        block.shared_head.output.weight = block.shared_head.output.weight * 6
    mx.eval(model.parameters())
    return model


SAMPLED = dict(prompt=[1, 5, 3, 6, 2], N=400, T=4)  # the chi-square tests' runs


def sampled_runs(model, sampler, seed, **kw) -> np.ndarray:
    """[N, T] tokens of SAMPLED's generations from `seed` on."""
    mx.random.seed(seed)
    prompt, N, T = SAMPLED["prompt"], SAMPLED["N"], SAMPLED["T"]
    return np.array([tokens_of(model, prompt, max_tokens=T, sampler=sampler, **kw) for _ in range(N)])


@functools.lru_cache(maxsize=None)
def plain_runs() -> np.ndarray:
    """Plain decoding's side of the chi-square tests here and in test_draft_gate: computed once
    (the same samples either test drew on its own before)."""
    return sampled_runs(sampling_model(0), make_sampler(temp=1.0, top_k=6), 321)


def test_sampling_distribution_matches_plain():
    """Tokens 2..4 of many sampled generations, with and without MTP drafting: a chi-square
    two-sample test per position at alpha = 1e-3 (3 tests: false failure <= 3e-3)."""
    model = sampling_model(0)
    sampler = make_sampler(temp=1.0, top_k=6)
    drafted = sampled_runs(model, sampler, 123, draft_mtp=True, num_draft=3)
    assert_same_distribution(plain_runs(), drafted)


def test_cli_end_to_end(tiny_ckpt, capsys):
    """The real script once; its refusals in-process (the same main(), exit 2, one line)."""
    args = [
        "--model",
        str(tiny_ckpt),
        "--draft-mtp",
        "--max-tokens",
        "12",
        "--prompt",
        "hello",
        "--draft-min-confidence",
        "0",
    ]
    cmd = [sys.executable, str(ROOT / "generate.py"), *args, "--num-draft", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Generation: 12 tokens" in r.stdout and "MTP acceptance by depth: 1:" in r.stdout
    for bad in (
        ["--num-draft", "0"],
        ["--num-draft", "4"],
        ["--model", str(tiny_ckpt) + "-missing"],
        ["--draft-min-confidence", "1"],
    ):
        with pytest.raises(SystemExit) as e:
            generate_cli.main(args + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("which", ["random_model", "mixed_model"])
def test_greedy_identical_with_repetition_penalty(which, request):
    from mlx_step35 import make_logits_processors

    model = request.getfixturevalue(which)
    procs = make_logits_processors(repetition_penalty=3.0, repetition_context_size=30)
    plain = tokens_of(model, PROMPT, max_tokens=GEN, logits_processors=procs)
    assert plain != tokens_of(model, PROMPT, max_tokens=GEN)  # the penalty matters here
    spec = tokens_of(model, PROMPT, max_tokens=GEN, logits_processors=procs, draft_mtp=True)
    assert spec == plain


def test_skip_ahead_is_exact_at_its_horizon(random_model, monkeypatch):
    """A drafter handed a long backlog restarts its blocks K * (window - 1) + 1 positions
    back (the trigger is a backlog of twice that); a draft right at that horizon has block
    logits equal to the teacher-forced ones, which a shorter restart would not give."""
    from mlx_step35.model import SharedHead

    model = random_model
    seq = PROMPT + [int(t) for t in np.random.default_rng(3).integers(3, 500, 60)]
    P = len(seq) - 1
    drafter = MTPDrafter(model, slack=4)
    assert drafter.horizon == 3 * (8 - 1) + 1 and P > 2 * drafter.horizon
    drafter.add_trunk(model.hidden(mx.array([seq[:-1]])))  # backlog P: skips to P - horizon
    assert drafter.done[1:] == [P - drafter.horizon] * 3
    seen = []
    original = SharedHead.__call__
    monkeypatch.setattr(SharedHead, "__call__", lambda self, h: seen.append(original(self, h)) or seen[-1])
    drafts, _, _ = drafter.draft(seq, 3, make_sampler())
    mtp = model.mtp_logits(mx.array([seq + drafts.tolist()[:-1]]))
    for k in range(3):
        ref = mtp[k][0, P - 1]
        got = seen[k].reshape(-1)
        assert mx.abs(got - ref).max().item() < 1e-4 * (ref.max() - ref.min()).item(), k
