"""A long prefill can be stopped between chunks: `prompt_progress_callback` (mlx-lm's name)
sees each chunk, an exception it raises ends the generation, and a prompt cache then holds
exactly the chunks that ran; the server's engine stops a cancelled request's prefill that way,
and a retry of the same prompt continues from there with a cold run's exact output."""

import numpy as np
import pytest

from mlx_step35 import load
from mlx_step35.generation import generate_step
from mlx_step35.prompt_cache import PromptCacheStore, make_prompt_cache
from mlx_step35.sampling import make_sampler
from mlx_step35.server.engine import Engine, Finished, GenRequest, Job

PROMPT = [int(t) for t in np.random.default_rng(5).integers(3, 500, 53)]
STEP = 16


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt, quantize=False, dtype="float32")


def tokens(model, prompt, **kw):
    return [t for t, _, _ in generate_step(model, prompt, max_tokens=6, **kw)]


@pytest.mark.parametrize("draft", [{}, dict(draft_mtp=True, num_draft=2)])
def test_progress_per_chunk_and_a_stopped_prefill_resumes_exactly(model, draft):
    m = model[0]
    seen = []
    cold = tokens(
        m, PROMPT, prefill_step_size=STEP, prompt_progress_callback=lambda *a: seen.append(a), **draft
    )
    n = len(PROMPT) - (not draft)  # without a drafter the last prompt token runs with the first step
    assert seen == [(min(e, n), len(PROMPT)) for e in range(STEP, n + STEP, STEP)]

    def stop_after_two(done, total):
        if done >= 2 * STEP:
            raise Stop

    pc = make_prompt_cache(m, draft_mtp=bool(draft))
    with pytest.raises(Stop):
        tokens(
            m,
            PROMPT,
            prefill_step_size=STEP,
            prompt_cache=pc,
            prompt_progress_callback=stop_after_two,
            **draft,
        )
    assert pc.tokens == PROMPT[: 2 * STEP] and all(c.offset == 2 * STEP for c in pc.cache)
    assert tokens(m, PROMPT, prefill_step_size=STEP, prompt_cache=pc, **draft) == cold
    assert pc.cached_tokens == 2 * STEP


def test_engine_stops_a_cancelled_prefill_and_keeps_what_ran(model, monkeypatch):
    """A job whose client left before the first chunk ends was prefilling: it ends
    'cancelled' after that chunk, without a token; the same prompt then reuses the chunk."""
    import mlx_step35.generation as generation

    m, tok = model
    monkeypatch.setitem(generation.stream_generate.__kwdefaults__, "prefill_step_size", STEP)
    store = PromptCacheStore(m, 10**9, draft_mtp=True)
    engine = Engine(m, tok, prompt_cache=store)
    try:
        greedy = make_sampler(0.0)
        req = lambda: GenRequest(prompt=list(PROMPT), max_tokens=6, sampler=greedy, num_draft=2)  # noqa: E731
        job = Job(req(), loop=None)
        events = []
        job.emit = events.append
        job.cancel()  # gone before the prefill's first chunk is done
        engine._serve(job)
        (done,) = [e for e in events if isinstance(e, Finished)]
        assert done.finish_reason == "cancelled" and done.completion_tokens == 0
        assert [len(pc.tokens) for pc in store.entries] == [STEP]

        job2 = Job(req(), loop=None)
        events2 = []
        job2.emit = events2.append
        engine._serve(job2)
        out = [t for e in events2 if not isinstance(e, Finished) for t in e.tokens]
        assert events2[-1].finish_reason == "length" and events2[-1].cached_tokens == STEP
        cold = tokens(m, PROMPT, draft_mtp=True, num_draft=2)
        assert out == cold
    finally:
        engine.shutdown()
