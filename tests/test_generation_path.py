"""The generation path as a Mac runs it: chunked prefill with the drafter's prompt work done
chunk by chunk, and the MTP blocks loaded only to draft with."""

import inspect
import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_step35
from mlx_step35 import load
from mlx_step35.generation import PREFILL_STEP, generate_step
from mlx_step35.model import Model
from mlx_step35.speculative import MTPDrafter

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [int(t) for t in np.random.default_rng(11).integers(3, 500, 45)]


def tokens_of(model, prompt, **kw):
    return [t for t, _, _ in generate_step(model, prompt, **kw)]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")[0]


def test_default_prefill_chunk_is_mlx_lms():
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    assert inspect.signature(mlx_lm_generate_step).parameters["prefill_step_size"].default == PREFILL_STEP


@pytest.mark.parametrize("draft", [None, 1, 3])
def test_chunked_prefill_is_exact(model, draft):
    """Chunks smaller than a sliding window, not dividing the prompt, and one chunk: same tokens."""
    kw = dict(max_tokens=20, draft_mtp=draft is not None, num_draft=draft or 1)
    whole = tokens_of(model, PROMPT, prefill_step_size=4096, **kw)
    assert tokens_of(model, PROMPT, prefill_step_size=7, **kw) == whole
    assert tokens_of(model, PROMPT, prefill_step_size=1, **kw) == whole
    if draft:
        assert whole == tokens_of(model, PROMPT, max_tokens=20)


def test_drafter_prompt_work_is_evaluated_chunk_by_chunk(model, monkeypatch):
    """Each prefill chunk runs the MTP blocks over its positions and evaluates their caches
    and kept rows with the trunk's caches; the first draft then only drafts."""
    evals, mtp_rows, states = [], [], []
    real_eval, real_hidden, real_state = mx.eval, Model.mtp_hidden, MTPDrafter.state
    monkeypatch.setattr(mx, "eval", lambda *a: evals.append({id(x) for x in _leaves(a)}) or real_eval(*a))

    def hidden_spy(self, k, toks, h_prev, cache=None):
        mtp_rows.append((len(evals), toks.shape[1]))
        return real_hidden(self, k, toks, h_prev, cache)

    def state_spy(self):
        states.append(real_state(self))
        return states[-1]

    monkeypatch.setattr(Model, "mtp_hidden", hidden_spy)
    monkeypatch.setattr(MTPDrafter, "state", state_spy)
    gen = generate_step(model, PROMPT, max_tokens=4, draft_mtp=True, num_draft=3, prefill_step_size=10)
    next(gen)  # prefill and the first token
    chunks = -(-len(PROMPT) // 10)
    assert len(states) == chunks and len(evals) == chunks
    for i, st in enumerate(states):  # every drafter array was evaluated with its chunk
        assert st and {id(x) for x in st} <= evals[i]
        assert sum(n for j, n in mtp_rows if j == i) <= 3 * 10  # 3 blocks over that chunk
    committed = sum(n for _, n in mtp_rows)
    assert committed == sum(len(PROMPT) - k for k in (1, 2, 3))  # all of the prompt's MTP work
    list(gen)


def _leaves(tree):
    if isinstance(tree, mx.array):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _leaves(t)


def test_bad_prefill_step_size(model):
    with pytest.raises(ValueError, match="prefill_step_size"):
        tokens_of(model, PROMPT, max_tokens=2, prefill_step_size=0)


@pytest.mark.parametrize("draft", [False, True])
def test_cli_loads_mtp_blocks_only_to_draft(tiny_ckpt, monkeypatch, capsys, draft):
    import generate as cli

    seen = []
    real_load = mlx_step35.load

    def load_spy(*a, **kw):
        seen.append(kw.get("mtp", True))
        return real_load(*a, **kw)

    monkeypatch.setattr(mlx_step35, "load", load_spy)
    cli.main(
        ["--model", str(tiny_ckpt), "--max-tokens", "3", "--prefill-step-size", "4", "--prompt", "hi"]
        + (["--draft-mtp", "--num-draft", "2"] if draft else [])
    )
    assert seen == [draft]
    assert "Generation: 3 tokens" in capsys.readouterr().out


def test_cli_bad_prefill_step_size(capsys):
    import generate as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--prefill-step-size", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prefill-step-size" in err[0]


@pytest.fixture(scope="module")
def perfect_model(tiny_ckpt):
    from spec_models import successor_model

    return successor_model(tiny_ckpt, eps=0.0)[0]


def test_speculative_steps_are_queued_ahead(perfect_model, monkeypatch):
    """Each step's drafts are queued before its trunk pass is built, and the next step is
    built and queued before the tokens of the step just accepted reach the caller."""
    from mlx_step35 import generation

    events = []
    real_hidden, real_async, real_accept = Model.hidden, mx.async_eval, generation.accept
    monkeypatch.setattr(
        Model, "hidden", lambda self, x, c=None: events.append("trunk") or real_hidden(self, x, c)
    )
    monkeypatch.setattr(mx, "async_eval", lambda *a: events.append("queue") or real_async(*a))
    monkeypatch.setattr(generation, "accept", lambda *a: events.append("sync") or real_accept(*a))
    gen = generate_step(perfect_model, PROMPT[:10], max_tokens=13, draft_mtp=True, num_draft=3)
    next(gen)  # the prompt's token
    events.clear()
    for _ in gen:
        events.append("yield")
    steps = "".join({"trunk": "T", "queue": "Q", "sync": "S", "yield": "y"}[e] for e in events).split("S")
    # 12 tokens in 3 steps of 3 drafts + 1, the first built when the second token is asked for;
    # each queues the next (its drafts before its trunk pass is built, then its log-probabilities)
    # before yielding its tokens; the last one has nothing left to queue
    assert [re.fullmatch(r"Q+TQ(y*)", x) is not None for x in steps[:3]] == [True] * 3
    assert [x.count("y") for x in steps] == [0, 4, 4, 4] and steps[3] == "yyyy"


def test_closing_mid_step_leaves_trunk_caches_at_the_verified_tokens(perfect_model, monkeypatch):
    caches = []
    real_make = Model.make_cache
    monkeypatch.setattr(
        Model,
        "make_cache",
        lambda self, slack, **kw: caches.append(real_make(self, slack, **kw)) or caches[-1],
    )
    prompt = PROMPT[:10]
    gen = generate_step(perfect_model, prompt, max_tokens=40, draft_mtp=True, num_draft=3)
    next(gen), next(gen)  # the prompt's token, then the first of a step's 4 (the next step is queued)
    gen.close()
    # through the trunk: the prompt, the prompt's token and the step's 3 accepted drafts
    assert {c.offset for c in caches[0]} == {len(prompt) + 4}


def test_near_ties_script_reports_where_drafting_parts_ways(tiny_ckpt, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import near_ties

    from mlx_step35 import generation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\\nworld\nabc\n")
    args = ["--model", str(tiny_ckpt), "--prompts", str(prompts), "--max-tokens", "12", "--num-draft", "2"]
    near_ties.main(args)
    assert "0 of 2 prompts diverged within 12 tokens" in capsys.readouterr().out
    real_accept = generation.accept

    def second_choice(drafts, dists, lp, sampler, rng=None):  # a verify pass whose argmax is the runner-up
        n_acc, _ = real_accept(drafts, dists, lp, sampler, rng)
        return n_acc, int(mx.argsort(lp[n_acc])[-2].item())

    monkeypatch.setattr(generation, "accept", second_choice)
    near_ties.main(args)
    out = capsys.readouterr().out
    gaps = [
        float(line.split("log-prob gap ")[1].split()[0]) for line in out.splitlines() if "differs" in line
    ]
    assert "2 of 2 prompts diverged" in out and len(gaps) == 2 and min(gaps) > 0  # plain's is the argmax
