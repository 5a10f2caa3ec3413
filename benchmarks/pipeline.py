"""Benchmark 7: host time on a speculative step's critical path.

Per speculative step, the time from the end of the step's sync (`speculative.accept`
returns) to the next step's first queued work (the next `mx.eval` or `mx.async_eval`
call): while it lasts the device has nothing queued and idles. Measured by wrapping
`accept`, `mx.eval` and `mx.async_eval` of the code under test (`--code DIR`: a checkout
of this repository, default this one), on the demo model, greedy, fixed depth, every
prompt of benchmark 2. Run before/after versions as separate processes, interleaved:

    python benchmarks/pipeline.py --code /tmp/base --rounds 3   # e.g. the previous commit
    python benchmarks/pipeline.py --rounds 3

Prints one JSON line: per depth, the median and mean gap in ms; the median time from the
sync to the last work queued before the next sync (the verify pass: until then the host is
building the step), the median step time in ms (sync to sync), and a hash of the tokens
generated (compare it across versions: identical).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--depths", default="1,3")
    a = p.parse_args()
    sys.path.insert(0, a.code)
    sys.path.insert(1, str(Path(__file__).parent))
    import mlx.core as mx
    from common import PROMPTS

    from mlx_step35 import load, speculative
    from mlx_step35.generation import build_prompt, generate_step

    events = []  # ("sync", t) when accept returns, ("queue", t) when eval/async_eval is called
    real_accept, real_eval, real_async = speculative.accept, mx.eval, mx.async_eval

    def accept(*args, **kw):
        out = real_accept(*args, **kw)
        events.append(("sync", time.perf_counter()))
        return out

    def wrap(fn):
        def queued(*args):
            events.append(("queue", time.perf_counter()))
            return fn(*args)

        return queued

    model, tok = load(None)
    prompts = [build_prompt(tok, q, chat_template=False) for q in PROMPTS]
    speculative.accept = accept
    import mlx_step35.generation as generation

    generation.accept = accept
    mx.eval, mx.async_eval = wrap(real_eval), wrap(real_async)
    out = {}
    for depth in map(int, a.depths.split(",")):
        gaps, whole, steps, tokens = [], [], [], []
        for r in range(a.rounds + 1):  # round 0: warm-up
            for q in prompts:
                events.clear()
                toks = [
                    t
                    for t, _, _ in generate_step(
                        model, q, max_tokens=a.gen_tokens, draft_mtp=True, num_draft=depth
                    )
                ]
                if r == 0:
                    continue
                tokens.append(toks)
                syncs = [i for i, (kind, _) in enumerate(events) if kind == "sync"]
                for i, j in zip(syncs, syncs[1:]):
                    queued = [t for kind, t in events[i + 1 : j + 1] if kind == "queue"]
                    gaps.append(queued[0] - events[i][1])
                    whole.append(queued[-1] - events[i][1])
                    steps.append(events[j][1] - events[i][1])
        out[depth] = dict(
            gap_ms_median=1e3 * statistics.median(gaps),
            gap_ms_mean=1e3 * statistics.mean(gaps),
            to_verify_queued_ms_median=1e3 * statistics.median(whole),
            step_ms_median=1e3 * statistics.median(steps),
            steps=len(gaps),
            tokens_hash=hash(json.dumps(tokens)),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
