"""Generate text with Step-3.5/3.7-Flash, optionally drafting with its 3 MTP blocks."""

from dataclasses import asdict

from mlx_step35.cli import ArgumentParser, user_errors
from mlx_step35.generation import MAX_TOKENS, NUM_DRAFT
from mlx_step35.sampling import Sampler

DEFAULTS = dict(asdict(Sampler()), max_tokens=MAX_TOKENS)  # the package's defaults, defined there


def main(argv=None):
    p = ArgumentParser(
        prog="generate.py",
        description=__doc__ + " With --draft-mtp, each step drafts up to --num-draft tokens with "
        "the chained MTP blocks and verifies them in one trunk pass: greedy output is identical "
        "to plain decoding and sampled output has exactly the same distribution.",
        epilog="Example: python generate.py --model ~/models/Step-3.5-Flash-4bit --draft-mtp "
        '--prompt "def fibonacci(n):"',
    )
    p.add_argument(
        "--model",
        default=None,
        help="model directory: our conversion, an mlx-lm "
        "conversion or the original HF checkpoint (quantized while loading); "
        "default: the bundled demo model",
    )
    p.add_argument("--prompt", "-p", default="def fibonacci(n):", help="prompt text ('-' reads stdin)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULTS["max_tokens"],
        help="tokens to generate (default %(default)s)",
    )
    p.add_argument(
        "--temp", type=float, default=DEFAULTS["temp"], help="sampling temperature; 0 = greedy (default)"
    )
    p.add_argument(
        "--top-p", type=float, default=DEFAULTS["top_p"], help="nucleus sampling threshold (0 = off)"
    )
    p.add_argument(
        "--top-k", type=int, default=DEFAULTS["top_k"], help="sample among the k most likely (0 = off)"
    )
    p.add_argument(
        "--min-p", type=float, default=DEFAULTS["min_p"], help="min-p sampling threshold (0 = off)"
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=None, help="penalty for recent tokens (e.g. 1.1)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument(
        "--draft-mtp", action="store_true", help="speculative decoding with the model's MTP blocks"
    )
    p.add_argument(
        "--num-draft",
        default=NUM_DRAFT,
        choices=["1", "2", "3", "auto"],
        help="tokens drafted per step; auto (default) picks 0-3 each step from the "
        "measured acceptance and step times",
    )
    p.add_argument(
        "--no-quantize", action="store_true", help="HF checkpoints only: load in bfloat16 instead of 4-bit"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="dtype of unquantized weights (default: bfloat16 for HF checkpoints, "
        "the stored dtype for conversions)",
    )
    p.add_argument("--verbose", action="store_true", help="also print the prompt and per-step details")
    a = p.parse_args(argv)
    if a.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    with user_errors(p.prog):
        run(a)


def run(a):
    from mlx_step35.distributed import exit_when_terminated, peer_errors, world

    group = world()  # started by mlx.launch with several ranks: tensor parallel over them
    if group is not None:
        exit_when_terminated(f"generate.py: error: rank {group.rank()}: stopped, another rank exited")
    with peer_errors(group.rank() if group else None):
        generate(a, group)


def generate(a, group):
    import sys

    import mlx.core as mx

    from mlx_step35 import load, make_logits_processors, make_sampler, stream_generate
    from mlx_step35.generation import build_prompt, format_stats

    if a.seed is not None:
        mx.random.seed(a.seed)
    show = print if group is None or group.rank() == 0 else (lambda *args, **kwargs: None)
    model, tokenizer = load(a.model, quantize=not a.no_quantize, dtype=a.dtype, group=group)
    text = sys.stdin.read() if a.prompt == "-" else a.prompt.replace("\\n", "\n")
    prompt = build_prompt(tokenizer, text, system=a.system, chat_template=not a.ignore_chat_template)
    if a.verbose:
        show(tokenizer.decode(prompt), end="")
        show("\n" + "=" * 10)
    sampler = make_sampler(a.temp, a.top_p, a.min_p, a.top_k)
    procs = make_logits_processors(repetition_penalty=a.repetition_penalty) if a.repetition_penalty else None
    last = None
    for last in stream_generate(
        model,
        tokenizer,
        prompt,
        a.max_tokens,
        sampler=sampler,
        logits_processors=procs,
        draft_mtp=a.draft_mtp,
        num_draft=a.num_draft if a.num_draft == "auto" else int(a.num_draft),
    ):
        show(last.text, end="", flush=True)  # rank 0 prints, the others follow in lockstep
    show("\n" + "=" * 10)
    if last is not None:
        show(format_stats(last))


if __name__ == "__main__":
    main()
