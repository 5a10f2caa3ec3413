"""How often greedy drafting and plain greedy decoding part ways, and whether at near-ties.

In float32 they agree (tested on the CPU backend). In bf16, and on Metal in any dtype, a
verify pass over n+1 tokens rounds differently from a one-row pass (bf16 activations are
rounded after each op of a different-shaped graph; Metal's split-k quantized matmuls and
attention blocks change their reduction order with the number of rows), so where two
tokens' logits are within rounding of each other the argmax can differ: both continuations
are greedy outputs of the model within that rounding, but the texts differ from there on. For each prompt this decodes plainly and with
drafting, both greedy, and reports the first position where they differ, with the gap
between the two tokens' log-probabilities in the plain pass (a near-tie: ~1e-3 or less).

    python scripts/near_ties.py --model ~/models/Step-3.5-Flash-4bit --num-draft 3 --max-tokens 256
    python scripts/near_ties.py --prompts prompts.txt   # one prompt per line ('\\n' for newlines)
    python scripts/near_ties.py --stdlib 36 --dtype float32   # the first 400 characters of 36 stdlib files

Default: the bundled demo model and the code prompts of benchmarks/common.py.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def first_divergence(model, prompt, max_tokens, num_draft):
    """(position or None, plain token, drafted token, log-prob gap in the plain pass)."""
    from mlx_step35.generation import generate_step

    plain = list(generate_step(model, prompt, max_tokens=max_tokens))
    spec = generate_step(
        model, prompt, max_tokens=max_tokens, draft_mtp=True, num_draft=num_draft, draft_min_confidence=0.0
    )
    for i, ((a, lp, _), (b, _, _)) in enumerate(zip(plain, spec)):
        if a != b:
            return i, a, b, float(lp[a] - lp[b])
    return None, None, None, None


def stdlib_prompts(n: int, chars: int = 400):
    """The first `chars` characters of n top-level stdlib modules, evenly spaced in sorted order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.glob("*.py") if f.stat().st_size > chars)
    step = max(1, len(files) // n)
    return [f.read_text(encoding="utf-8", errors="replace")[:chars] for f in files[::step][:n]]


def main(argv=None):
    from mlx_step35.cli import ArgumentParser, user_errors

    p = ArgumentParser(prog="near_ties.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--num-draft", default="3", choices=["1", "2", "3", "auto"])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument(
        "--stdlib",
        type=int,
        default=0,
        metavar="N",
        help="prompts: the first 400 characters of N of this Python's stdlib modules (what the demo was "
        "trained on), evenly spaced in sorted order",
    )
    p.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="activation dtype"
    )
    a = p.parse_args(argv)
    if a.stdlib < 0 or a.max_tokens < 1:
        p.error("--stdlib must be >= 0 and --max-tokens >= 1")
    with user_errors(p.prog):
        run(a)


def run(a):
    import mlx.core as mx

    from mlx_step35 import load
    from mlx_step35.generation import build_prompt

    if a.prompts:
        texts = [t.replace("\\n", "\n") for t in Path(a.prompts).read_text().splitlines() if t.strip()]
    elif a.stdlib:
        texts = stdlib_prompts(a.stdlib)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from common import PROMPTS as texts
    model, tokenizer = load(a.model, mtp=True, dtype=a.dtype)
    num_draft = a.num_draft if a.num_draft == "auto" else int(a.num_draft)
    print(
        f"device: {mx.default_device()}, dtype {a.dtype or 'as stored'}, {len(texts)} prompts, "
        f"{a.max_tokens} tokens, num_draft {num_draft}"
    )
    diverged = 0
    for text in texts:
        prompt = build_prompt(tokenizer, text, chat_template=a.chat_template)
        pos, x, y, gap = first_divergence(model, prompt, a.max_tokens, num_draft)
        if pos is None:
            print(f"identical  {text[:40]!r}")
            continue
        diverged += 1
        print(f"differs at token {pos}: plain {x} vs drafted {y}, log-prob gap {gap:.2e}  {text[:40]!r}")
    print(f"{diverged} of {len(texts)} prompts diverged within {a.max_tokens} tokens")


if __name__ == "__main__":
    main()
