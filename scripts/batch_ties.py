"""How often a row of the batch engine parts from the same request run alone, and at what gap.

The batch engine packs several rows into one trunk pass (`BatchEngine`). In float32 on the
CPU each row gets the bits of its own pass (tests/test_batch.py); in bf16, and on Metal in
any dtype, a packed pass over more tokens can round differently from a pass over one row's
tokens (the shapes of the matmuls and of the MoE's expert groups change with the batch),
so where a row's two best tokens are within rounding its greedy token can flip, as in the
verify pass (scripts/near_ties.py). For each prompt this decodes greedily alone
(`stream_generate`) and inside a batch of N rows (all prompts queued at once; rows join as
others finish), with the same request (plain, depth 2 or depth 3, ungated, by turns), and
reports the first token where the batched row differs, with the log-probability gap between
the two tokens in the alone run (a near-tie: a few bf16 rounding steps).

    python scripts/batch_ties.py --stdlib 40 --batch 4 --dtypes bfloat16,float32
    python scripts/batch_ties.py --model ~/models/Step-3.5-Flash-4bit --stdlib 40 --batch 8

Default: the bundled demo model, 40 stdlib prompts (as near_ties.py), 96 tokens, batch 4.
"""

import sys
import time
from pathlib import Path

import mlx.core as mx
from near_ties import stdlib_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_step35 import load  # noqa: E402
from mlx_step35.batch import BatchEngine, BatchRequest  # noqa: E402
from mlx_step35.cli import ArgumentParser, user_errors  # noqa: E402
from mlx_step35.generation import build_prompt, stream_generate  # noqa: E402

# requests by turns: prompt i gets REQUESTS[i % 3] (greedy; drafting ungated, so it drafts)
REQUESTS = [
    ("plain", dict()),
    ("depth 2", dict(draft_mtp=True, num_draft=2, draft_min_confidence=0.0)),
    ("depth 3", dict(draft_mtp=True, num_draft=3, draft_min_confidence=0.0)),
]


def alone(model, tokenizer, prompt, max_tokens, kw):
    """(tokens, log-probs [V] numpy per token) of the request run by itself."""
    out = []
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kw):
        out.append((r.token, r.logprobs))
    mx.eval([lp for _, lp in out])
    return [t for t, _ in out], [lp.astype(mx.float32).tolist() for _, lp in out]


def batched(model, tokenizer, prompts, max_tokens, kws, batch):
    """Each request's tokens when all are queued at once, `batch` rows decoded together;
    and the engine's passes by batch size."""
    engine = BatchEngine(model, tokenizer, decode_concurrency=batch)
    rows = [engine.insert(BatchRequest(list(p), max_tokens, **kw)) for p, kw in zip(prompts, kws)]
    tokens = {r.uid: [] for r in rows}
    while engine.running or engine.waiting:
        for row, responses in engine.step():
            if row.error:
                raise ValueError(row.error)
            tokens[row.uid] += [r.token for r in responses]
    return [tokens[r.uid] for r in rows], dict(sorted(engine.batch_sizes.items()))


def first_difference(a, b):
    """First index where two token lists differ (a shorter list that ended early counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(model, tokenizer, texts, max_tokens, batch, chat_template=False):
    """Per prompt: (request name, position or None, alone token, batched token, gap); the
    batch sizes seen; tokens compared."""
    prompts = [build_prompt(tokenizer, t, chat_template=chat_template) for t in texts]
    names = [REQUESTS[i % len(REQUESTS)][0] for i in range(len(prompts))]
    kws = [REQUESTS[i % len(REQUESTS)][1] for i in range(len(prompts))]
    solo = [alone(model, tokenizer, p, max_tokens, kw) for p, kw in zip(prompts, kws)]
    together, sizes = batched(model, tokenizer, prompts, max_tokens, kws, batch)
    rows, compared = [], 0
    for name, (a, lps), b in zip(names, solo, together):
        pos = first_difference(a, b)
        compared += len(a) if pos is None else pos + 1
        if pos is None or pos >= min(len(a), len(b)):
            rows.append((name, pos, None, None, None))
            continue
        lp = lps[pos]
        rows.append((name, pos, a[pos], b[pos], lp[a[pos]] - lp[b[pos]]))
    return rows, sizes, compared


def main(argv=None):
    p = ArgumentParser(prog="batch_ties.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument("--stdlib", type=int, default=40, metavar="N", help="prompts: as near_ties.py --stdlib N")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=4, help="rows decoded together (decode_concurrency)")
    p.add_argument(
        "--dtypes",
        default="bfloat16,float32",
        help="comma-separated activation dtypes (bfloat16, float16, float32), one run each",
    )
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    a = p.parse_args(argv)
    dtypes = a.dtypes.split(",")
    if set(dtypes) - {"bfloat16", "float16", "float32"}:
        p.error(f"--dtypes: unknown {sorted(set(dtypes) - {'bfloat16', 'float16', 'float32'})}")
    if a.stdlib < 1 or a.max_tokens < 1 or a.batch < 1:
        p.error("--stdlib, --max-tokens and --batch must be at least 1")
    with user_errors(p.prog):
        run(a, dtypes)


def run(a, dtypes):
    texts = stdlib_prompts(a.stdlib)
    for dtype in dtypes:
        model, tokenizer = load(a.model, mtp=True, dtype=dtype)
        tic = time.perf_counter()
        rows, sizes, compared = compare(model, tokenizer, texts, a.max_tokens, a.batch, a.chat_template)
        print(
            f"\n{dtype}: device {mx.default_device()}, {len(texts)} prompts, {a.max_tokens} tokens, batch "
            f"{a.batch}; passes by rows in the pass {sizes}; {time.perf_counter() - tic:.0f} s"
        )
        for (name, pos, x, y, gap), text in zip(rows, texts):
            if pos is None:
                print(f"identical                {name:8s} {text[:40]!r}")
            elif x is None:
                print(f"ends differently at {pos:3d} {name:8s} {text[:40]!r}")
            else:
                print(
                    f"differs at token {pos:3d}: alone {x} vs batched {y}, log-prob gap {gap:.2e} {name:8s} "
                    f"{text[:40]!r}"
                )
        parted = sum(r[1] is not None for r in rows)
        print(
            f"{dtype}: {parted} of {len(rows)} rows parted from their alone run within {a.max_tokens} tokens "
            f"({compared} tokens compared, up to the first difference or the end)"
        )


if __name__ == "__main__":
    main()
