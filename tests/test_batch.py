"""The batch engine against cold single-request runs (float32): every row's tokens equal
`stream_generate`'s for the same request alone, whatever runs beside it."""

import numpy as np
import pytest
from factory import make_checkpoint
from spec_models import successor_model
from test_kv_quant import WIDE, WINDOW

from mlx_step35 import load
from mlx_step35.batch import BatchEngine, BatchRequest, batch_generate
from mlx_step35.cache import FullKVCache
from mlx_step35.generation import generate, stream_generate
from mlx_step35.prompt_cache import make_prompt_cache
from mlx_step35.sampling import make_logits_processors, make_sampler

GEN = 40  # past the sliding window (8) many times
STEP = 16  # prefill chunks: long prompts take several steps, interleaved with decoding
rng = np.random.default_rng(11)
PROMPTS = [[int(t) for t in rng.integers(3, 500, n)] for n in (20, 7, 45, 12, 33, 9, 26, 60)]
greedy_ungated = dict(draft_mtp=True, draft_min_confidence=0.0)
CONFIGS = [
    dict(),  # plain
    dict(num_draft=1, **greedy_ungated),
    dict(num_draft=3, draft_mtp=True),  # gated at the default threshold: chains of any length
    dict(num_draft="auto", draft_mtp=True),
    dict(sampler=make_sampler(temp=0.9), seed=3),  # seeded sampling, plain
    dict(sampler=make_sampler(temp=0.7, top_p=0.9), seed=8, num_draft=2, **greedy_ungated),
    dict(num_draft=2, logits_processors=make_logits_processors(repetition_penalty=1.3), **greedy_ungated),
    dict(sampler=make_sampler(temp=1.0, top_k=20), seed=5, num_draft=3, draft_mtp=True),
]


@pytest.fixture(scope="module")
def mixed(tiny_ckpt):
    """Drafts partly rejected: rewinds of every length happen."""
    return successor_model(tiny_ckpt, eps=2.5)


@pytest.fixture(scope="module")
def random_pair(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")


def alone(model, tok, prompt, cfg, max_tokens=GEN):
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens, prefill_step_size=STEP, **cfg)]


def run(engine, requests, arrivals=None, cancel=None):
    """Step the engine; request i is inserted before step arrivals[i]; cancel = {i: step}.
    Returns each request's tokens and its row."""
    arrivals = arrivals or [0] * len(requests)
    rows, tokens, step = {}, {}, 0
    while len(rows) < len(requests) or engine.running or engine.waiting:
        for i, req in enumerate(requests):
            if arrivals[i] == step:
                rows[i] = engine.insert(req)
                tokens[i] = []
        for i, at in (cancel or {}).items():
            if at == step and i in rows:
                engine.cancel(rows[i])
        by_uid = {r.uid: i for i, r in rows.items()}
        for row, responses in engine.step():
            assert row.error is None, row.error
            tokens[by_uid[row.uid]] += [r.token for r in responses]
        step += 1
        assert step < 2000
    return [tokens[i] for i in range(len(requests))], [rows[i] for i in range(len(requests))]


@pytest.mark.parametrize("which", ["mixed", "random_pair"])
def test_every_row_equals_its_request_alone(which, request):
    """Eight requests of every kind, arriving at different steps, four decoded together: each
    row's tokens are those of the request run alone (seeded sampling included)."""
    model, tok = request.getfixturevalue(which)
    want = [alone(model, tok, p, c) for p, c in zip(PROMPTS, CONFIGS)]
    engine = BatchEngine(model, tok, decode_concurrency=4, prompt_concurrency=2, prefill_step_size=STEP)
    got, rows = run(
        engine, [BatchRequest(p, GEN, **c) for p, c in zip(PROMPTS, CONFIGS)], [0, 0, 0, 2, 3, 9, 9, 20]
    )
    assert got == want
    assert max(engine.batch_sizes) == 4  # rows really shared passes
    assert sum(r.g.stats.verify_steps for r in rows) > 0
    if which == "mixed":  # partial acceptances: rewinds per row
        drafted = sum(sum(r.g.stats.drafted) for r in rows)
        accepted = sum(sum(r.g.stats.accepted) for r in rows)
        assert 0 < accepted < drafted


def test_cancelled_rows_leave_others_unchanged(mixed):
    """Rows cancelled while prefilling and while decoding end there; the others' tokens are
    unchanged, and a cancelled row's tokens are a prefix of its own run."""
    model, tok = mixed
    long_prompt = PROMPTS[7] * 2  # 120 tokens: 8 prefill chunks
    reqs = [BatchRequest(p, GEN, **c) for p, c in zip([PROMPTS[0], long_prompt, PROMPTS[2]], CONFIGS[1:4])]
    engine = BatchEngine(model, tok, decode_concurrency=3, prefill_step_size=STEP)
    got, rows = run(engine, reqs, cancel={1: 3, 2: 12})
    assert [r.finish for r in rows] == ["length", "cancelled", "cancelled"]
    assert got[0] == alone(model, tok, PROMPTS[0], CONFIGS[1])
    assert got[1] == []  # cancelled before its prompt was through
    full = alone(model, tok, PROMPTS[2], CONFIGS[3])
    assert 0 < len(got[2]) < GEN and got[2] == full[: len(got[2])]


def test_memory_budget_queues_rows(mixed):
    """A budget that fits one row's KV: the others wait (no pass carries two rows) and still
    give their own tokens; a budget for all lets them share passes."""
    model, tok = mixed
    reqs = [BatchRequest(p, 20, **c) for p, c in zip(PROMPTS[:3], CONFIGS[:3])]
    one = BatchEngine(model, tok, prefill_step_size=STEP).kv_need(reqs[2])
    engine = BatchEngine(model, tok, prefill_step_size=STEP, memory_budget=one)
    got, _ = run(engine, reqs)
    assert set(engine.batch_sizes) == {1}
    assert got == [alone(model, tok, p, c, 20) for p, c in zip(PROMPTS[:3], CONFIGS[:3])]
    engine = BatchEngine(model, tok, prefill_step_size=STEP, memory_budget=10 * one)
    run(engine, reqs)
    assert max(engine.batch_sizes) == 3


def test_prompt_caches_per_row(mixed):
    """Two conversations' second turns in one batch, each restoring its own prompt cache:
    the tokens are those of the same turns run alone with their own prompt caches."""
    model, tok = mixed
    cfg = dict(num_draft=2, **greedy_ungated)
    firsts, seconds = [PROMPTS[2], PROMPTS[4]], [PROMPTS[1], PROMPTS[5]]

    def conversations():
        pcs = [make_prompt_cache(model, draft_mtp=True, prefill_step_size=STEP) for _ in firsts]
        for pc, p in zip(pcs, firsts):
            alone(model, tok, p, dict(cfg, prompt_cache=pc), 12)
        return pcs

    want = [alone(model, tok, p, dict(cfg, prompt_cache=pc), 25) for p, pc in zip(seconds, conversations())]
    pcs = conversations()
    engine = BatchEngine(model, tok, prefill_step_size=STEP)
    got, _ = run(engine, [BatchRequest(p, 25, prompt_cache=pc, **cfg) for p, pc in zip(seconds, pcs)])
    assert got == want
    assert all(pc.cached_tokens > 0 for pc in pcs)
    assert [pc.history[-25:] for pc in pcs] == want  # each conversation's cache took its own reply


def test_bad_request_fails_its_row_only(mixed):
    model, tok = mixed
    engine = BatchEngine(model, tok, prefill_step_size=STEP)
    good = engine.insert(BatchRequest(PROMPTS[0], 10))
    bad = engine.insert(BatchRequest(PROMPTS[1], 10, draft_mtp=True, num_draft=7))
    events = engine.step()
    assert bad.finish == "error" and "num_draft" in bad.error
    assert any(row is good for row, _ in events) and not good.done
    with pytest.raises(ValueError, match="positive"):
        BatchEngine(model, tok, decode_concurrency=0)


def test_batch_generate_texts(random_pair):
    model, tok = random_pair
    prompts = PROMPTS[:3]
    texts = batch_generate(model, tok, prompts, 16, draft_mtp=True, num_draft=2, prefill_step_size=STEP)
    assert texts == [
        generate(model, tok, p, 16, draft_mtp=True, num_draft=2, prefill_step_size=STEP) for p in prompts
    ]


def test_quantized_kv_rows(tmp_path_factory):
    """With kv_bits, each row's full-attention KV is quantized from quantized_kv_start on, by
    position, as alone: the tokens are those of each request run alone with the same KV format."""

    model, tok = successor_model(
        make_checkpoint(tmp_path_factory.mktemp("kvq_batch"), sliding_window=WINDOW, **WIDE), eps=2.5
    )
    kv = dict(kv_bits=8, kv_group_size=64, quantized_kv_start=10)
    cfgs = [CONFIGS[0], CONFIGS[1], CONFIGS[7]]
    want = [alone(model, tok, p, dict(c, **kv), 24) for p, c in zip(PROMPTS, cfgs)]
    engine = BatchEngine(model, tok, prefill_step_size=STEP, **kv)
    got, rows = run(engine, [BatchRequest(p, 24, **c) for p, c in zip(PROMPTS, cfgs)])
    assert got == want
    assert all(any(isinstance(c, FullKVCache) and c.q_len > 0 for c in r.g.cache) for r in rows)


def test_short_prompts_start_together_beside_a_long_one(mixed):
    """Prompts share one chunk of tokens per step, shortest first: three short prompts that
    arrive with a long one all give their first token in the first step, the long one takes
    the rest of the chunk, and every row's tokens are still those it gets alone."""
    model, tok = mixed
    cfg = dict(num_draft=1, **greedy_ungated)
    prompts = [PROMPTS[7] * 2, PROMPTS[1], PROMPTS[5], PROMPTS[3]]  # 120 tokens, then 7, 9, 12
    engine = BatchEngine(model, tok, prefill_step_size=64)
    rows = [engine.insert(BatchRequest(p, 12, **cfg)) for p in prompts]
    first = {row.uid: len(responses) for row, responses in engine.step()}
    assert [first[r.uid] for r in rows] == [0, 1, 1, 1]
    assert rows[0].cuts[0][0] == 64 - 7 - 9 - 12  # the long prompt ran what the short ones left
    while engine.running:
        engine.step()
    assert [r.g.tokens[len(p) :] for r, p in zip(rows, prompts)] == [
        alone(model, tok, p, cfg, 12) for p in prompts
    ]
