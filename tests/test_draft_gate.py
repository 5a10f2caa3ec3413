"""The MTP confidence gate (draft_min_confidence): where it stops a chain, that output stays
plain decoding's (greedy identical, sampling the same distribution), auto's threshold
choice, and the flag / request field that carry it."""

import mlx.core as mx
import numpy as np
import pytest
from spec_models import successor_model
from test_speculative import (
    PROMPT,
    SAMPLED,
    assert_same_distribution,
    chi2_sf,
    plain_runs,
    sampled_runs,
    sampling_model,
    tokens_of,
)

from mlx_step35 import load, make_sampler, speculative
from mlx_step35.draft_policy import BUCKETS, AutoDraft, FixedDraft
from mlx_step35.follow import request_kwargs
from mlx_step35.generation import parse_min_confidence
from mlx_step35.server.anthropic import MessagesRequest
from mlx_step35.server.anthropic import chat_request as anthropic_chat_request
from mlx_step35.server.engine import GenRequest
from mlx_step35.server.responses_input import ResponsesRequest, as_items, to_chat
from mlx_step35.server.schemas import ChatRequest
from mlx_step35.speculative import MTPDrafter, SpecStats, accept

GEN = 50


@pytest.fixture(scope="module")
def random_model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")[0]


@pytest.fixture(scope="module")
def mixed_model(tiny_ckpt):
    return successor_model(tiny_ckpt, eps=2.5)[0]


def confidences_of(model, monkeypatch, sampler=None, prompt=PROMPT, max_tokens=GEN):
    """Every finite block gate value of an ungated depth-3 run (what the policy is told; blocks
    the rule never gates report inf)."""
    seen = []
    original = FixedDraft.update
    kw = dict(sampler=sampler) if sampler else {}
    with monkeypatch.context() as m:
        m.setattr(
            FixedDraft, "update", lambda self, n, a, s, c=(): (seen.extend(c), original(self, n, a, s, c))
        )
        tokens_of(
            model, prompt, max_tokens=max_tokens, draft_mtp=True, num_draft=3, draft_min_confidence=0.0, **kw
        )
    return [c for c in seen if np.isfinite(c)]


def gate_value(probs: np.ndarray, tops: list, k: int, sampler) -> float:
    """By hand: block k's (0-based) gate value under speculative.GATE_RULES for a number
    threshold, from its distribution `probs` and the top probabilities `tops` of the blocks
    before it (greedy: the drafted tokens' own probabilities)."""
    signal, factors = speculative.gate_rule(sampler)
    factor = factors[min(k, len(factors) - 1)]
    srt = np.sort(probs)[::-1]
    value = {
        "own": srt[0],
        "margin": srt[0] - srt[1],
        "entropy": np.exp(np.sum(probs * np.log(np.maximum(probs, 1e-30)))),
        "product": srt[0] * np.prod(tops),
    }[signal]
    return value / factor if factor > 0 else float("inf")


@pytest.mark.parametrize("which", ["random_model", "mixed_model"])
def test_gated_greedy_identical_and_chains_stop_at_the_first_unsure_block(which, request, monkeypatch):
    """At the median gate value (so the gate both stops and lets through): output is plain
    decoding's, each chain holds the drafts before the first block under the threshold, and
    each block's gate value is the greedy rule's signal (over its factor) of the softmax of the
    teacher-forced MTP logits, computed by hand."""
    model = request.getfixturevalue(which)
    threshold = float(np.median(confidences_of(model, monkeypatch)))
    calls = []
    original = MTPDrafter.draft

    def spy(self, seq, n, sampler, processors=None, min_confidence=0.0, rng=None):
        drafts, dists, confs = original(self, seq, n, sampler, processors, min_confidence, rng)
        calls.append((list(seq), n, drafts.tolist(), confs.tolist(), min_confidence))
        return drafts, dists, confs

    monkeypatch.setattr(MTPDrafter, "draft", spy)
    stats = SpecStats()
    out = tokens_of(
        model,
        PROMPT,
        max_tokens=GEN,
        draft_mtp=True,
        num_draft=3,
        stats=stats,
        draft_min_confidence=threshold,
    )
    monkeypatch.undo()
    assert out == tokens_of(model, PROMPT, max_tokens=GEN)
    assert 0 < stats.gated < stats.verify_steps
    for seq, n, drafts, confs, gate in calls:
        assert gate == pytest.approx(threshold, abs=1e-6)  # shared by rank 0 in millionths
        m = len(drafts)
        assert all(c >= gate for c in confs[:m])
        assert len(confs) == (m + 1 if m < n else m)
        if m < n:
            assert confs[m] < gate
        P = len(seq) - 1
        mtp = model.mtp_logits(mx.array([seq + drafts]))
        probs = [np.array(mx.softmax(mtp[k][0, P - 1].astype(mx.float32))) for k in range(len(confs))]
        for k, c in enumerate(confs):
            ref = gate_value(probs[k], [p.max() for p in probs[:k]], k, make_sampler())
            assert c == ref == float("inf") or abs(c - ref) < 1e-4, (k, c, ref)


def test_gate_stats_record_the_blocks_run(mixed_model):
    stats = SpecStats()
    tokens_of(
        mixed_model,
        PROMPT,
        max_tokens=GEN,
        draft_mtp=True,
        num_draft=3,
        stats=stats,
        draft_min_confidence=0.999,
    )
    cut = sum(k for (n, b, _), k in stats.steps.items() if b == n + 1)
    assert cut == stats.gated > 0
    assert sum(stats.steps.values()) == stats.verify_steps
    assert sum(k * (a + 1) for (_, _, a), k in stats.steps.items()) == GEN - 1


def test_gate_rule_keeps_one_position_distributed_as_the_target():
    """One position, drafted only when the gate (which reads q, not the token drawn) lets it
    through, else the trunk's own sample: the output is distributed as p. The same check
    catches a gate that drops a drawn draft for its own low q(d) (biased towards confident
    tokens), so it can fail. Chi-square at alpha = 1e-4, fixed seed."""
    from mlx_step35.speculative import confidence

    mx.random.seed(1)
    V, N = 6, 4000
    p = mx.array([[0.40, 0.25, 0.15, 0.10, 0.07, 0.03]])
    qs = [mx.array([[0.05, 0.10, 0.30, 0.30, 0.15, 0.10]]), mx.array([[0.70, 0.10, 0.05, 0.05, 0.05, 0.05]])]
    sampler = make_sampler(temp=1.0)
    logprobs = mx.log(mx.concatenate([p, p]))
    expected = np.array(p)[0] * N

    def run(keep):
        counts = np.zeros(V)
        for i in range(N):
            q = qs[i % 2]
            d = int(mx.random.categorical(mx.log(q)).item())
            if keep(q, d):
                n_acc, nxt = accept(mx.array([d]), [q], logprobs, sampler)
                counts[d if n_acc == 1 else nxt] += 1
            else:
                counts[accept(mx.array([], dtype=mx.int32), [], logprobs[1:], sampler)[1]] += 1
        return chi2_sf(float(((counts - expected) ** 2 / expected).sum()), V - 1)

    gate = lambda q, d: confidence(q, mx.log(q), sampler, None).item() >= 0.5  # noqa: E731
    assert run(gate) > 1e-4
    assert run(lambda q, d: q[0, d].item() >= 0.2) < 1e-4  # the biased rule is caught


@pytest.mark.parametrize(
    "rule", [None, ("margin", (0.0, 0.5, 1.0))], ids=["default-rule", "margin-never-block-1"]
)
def test_gated_sampling_distribution_matches_plain(rule, monkeypatch):
    """As test_speculative's chi-square test, with the gate at the median gate value of the
    sampled drafts: it stops some chains and lets others through (per position, false failure
    <= 1e-3). Under the default sampled rule, and under the top-1 minus top-2 margin with
    per-block factors, block 1 never gated (no chain may stop there)."""
    model, sampler = sampling_model(0), make_sampler(temp=1.0, top_k=6)
    if rule is not None:
        monkeypatch.setitem(speculative.GATE_RULES, "sampled", rule)
    mx.random.seed(5)
    threshold = float(np.median(confidences_of(model, monkeypatch, sampler, SAMPLED["prompt"], 40)))
    stats = SpecStats()
    kw = dict(draft_mtp=True, num_draft=3, draft_min_confidence=threshold, stats=stats)
    gated = sampled_runs(model, sampler, 123, **kw)
    assert 0 < stats.gated < stats.verify_steps and stats.drafted[0] > 0
    if rule is not None:
        assert not any(n == 0 and blocks == 1 for n, blocks, _ in stats.steps)
    assert_same_distribution(plain_runs(), gated)  # test_speculative's plain runs, drawn once


def feed(policy, rng, steps, accept_prob):
    """Depth-3 ungated steps with confidences uniform in [0, 1): a draft is accepted with
    probability accept_prob(confidence)."""
    for _ in range(steps):
        confs = list(rng.uniform(size=3))
        n_acc = 0
        while n_acc < 3 and rng.uniform() < accept_prob(confs[n_acc]):
            n_acc += 1
        policy.update(3, n_acc, 0.0, confs)


def test_auto_expected_tokens_by_hand():
    """Depth 1 only: tokens = 1 + sum over buckets >= t of P(bucket) * acceptance(bucket)."""
    policy = AutoDraft(1)
    policy.update(1, 1, 0.0, [0.95])  # bucket 0.95: 1 accepted of 1
    policy.update(1, 0, 0.0, [0.05])  # bucket 0.0: rejected
    policy.update(1, 0, 0.0, [0.05])
    w = policy.prior_weight
    acc_hi = (1 + 0.975 * w) / (1 + w)
    acc_lo = (0 + 0.05 * w) / (2 + w)
    b_hi = BUCKETS.index(0.95)
    for b0 in (1, b_hi):  # thresholds 0.1 and 0.95 keep the same single draft
        assert policy.gated(1, b0) == pytest.approx((1 / 3, acc_hi / 3))
        assert policy.expected_tokens(1, b0) == pytest.approx(1 + acc_hi / 3)
    assert policy.gated(1, 0) == (1.0, policy.acceptance(1)) == (1.0, (1 + 0.6 * w) / (3 + w))  # ungated
    assert acc_lo < acc_hi


def test_auto_learns_a_threshold_where_confidence_predicts_acceptance():
    """Bandwidth-like costs (a wider pass costs more): when drafts under 0.5 confidence are
    always rejected and the rest accepted, auto gates near 0.5; when acceptance does not
    depend on confidence (and is high), it does not gate."""
    rng = np.random.default_rng(0)
    costs = {0: 1.0, 1: 1.3, 2: 1.6, 3: 1.9}

    def trained(accept_prob):
        policy = AutoDraft(3, (0.01, 0.01))
        policy.c1, policy.plain_reports = 1.0, 2
        policy.cost = lambda n: costs[n]
        feed(policy, rng, 400, accept_prob)
        picks = [(policy.choose(), policy.min_confidence) for _ in range(40)]
        return [p for p in picks if p[1] > 0], picks

    gated, picks = trained(lambda c: c >= 0.5)
    assert len(gated) >= 0.9 * (len(picks) - len(picks) // AutoDraft.explore)
    assert all(0.4 <= t <= 0.6 for _, t in gated) and all(n >= 1 for n, _ in picks)
    gated, picks = trained(lambda c: 0.95)
    assert not gated and all(n == 3 for n, _ in picks)


def test_parse_and_request_field():
    assert parse_min_confidence("auto") == "auto" and parse_min_confidence("0.25") == 0.25
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(ValueError, match="--draft-min-confidence"):
            parse_min_confidence(bad)
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatRequest(messages=msgs, draft_min_confidence=0.3).draft_min_confidence == 0.3
    assert ChatRequest(messages=msgs, draft_min_confidence="auto").draft_min_confidence == "auto"
    for bad in (1.0, -0.5, "always"):
        with pytest.raises(ValueError):
            ChatRequest(messages=msgs, draft_min_confidence=bad)
    # the other protocols translate theirs into the chat request
    m = MessagesRequest(model="m", max_tokens=5, messages=msgs, draft_min_confidence=0.35)
    assert anthropic_chat_request(m).draft_min_confidence == 0.35
    r = ResponsesRequest(input="hi", draft_min_confidence="auto")
    assert to_chat(r, as_items(r.input))[0].draft_min_confidence == "auto"
    for schema, kw in (
        (MessagesRequest, dict(model="m", max_tokens=5, messages=msgs)),
        (ResponsesRequest, {}),
    ):
        with pytest.raises(ValueError):
            schema(draft_min_confidence=1.5, **kw)
    req = GenRequest(prompt=[1, 2], max_tokens=3, sampler=make_sampler(), draft_min_confidence=0.4)
    assert request_kwargs(req.shared())["draft_min_confidence"] == 0.4  # what every rank runs


def test_auto_counts_a_never_gated_block_as_always_passing():
    """Blocks a rule never gates report inf (speculative.GATE_RULES factor 0): at every threshold
    all of them pass, so their gated acceptance is the acceptance of all of their drafts."""
    policy = AutoDraft(3)
    for n_acc in (3, 1, 0, 2):
        policy.update(3, n_acc, 0.0, [float("inf"), float("inf"), 0.05])
    for b0 in range(1, len(BUCKETS)):
        assert policy.gated(1, b0)[0] == policy.gated(2, b0)[0] == 1.0
        assert policy.gated(3, b0)[0] == 0.0  # block 3's 0.05 is below every threshold
    assert policy.conf_tries[1][-1] == 4 and policy.conf_hits[1][-1] == 3  # accepted at depth 1: 3 of 4
