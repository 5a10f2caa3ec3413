"""Generate text with Step-3.5/3.7-Flash, optionally drafting with its 3 MTP blocks."""

import sys
import warnings
from dataclasses import asdict

from mlx_step35.cli import ArgumentParser, add_kv_arguments, kv_arguments, user_errors
from mlx_step35.expert_cache import add_expert_cache_arguments
from mlx_step35.generation import (
    DRAFT_MIN_CONFIDENCE,
    GATE_DEFAULT,
    MAX_TOKENS,
    NUM_DRAFT,
    PREFILL_STEP,
    parse_min_confidence,
)
from mlx_step35.sampling import Sampler
from mlx_step35.weights import QuantRecipe

R = QuantRecipe()
TEMPLATE_TOKENS = 64  # allowance for the chat template's tokens in the pre-flight's context

DEFAULTS = dict(asdict(Sampler()), max_tokens=MAX_TOKENS)  # the package's defaults, defined there


def main(argv=None):
    p = ArgumentParser(
        prog="generate.py",
        description=__doc__ + " With --draft-mtp, each step drafts up to --num-draft tokens with "
        "the chained MTP blocks and verifies them in one trunk pass: sampled output has exactly "
        "plain decoding's distribution; greedy output is identical to it in float32 on the CPU, "
        "while in bf16 (and on Metal) a near-tie that the wider pass rounds differently can flip "
        "a token (README: What lossless means).",
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
        default=None,
        choices=["1", "2", "3", "auto"],
        help=f"tokens drafted per step (giving it implies --draft-mtp); {NUM_DRAFT} (default) picks 0-3 "
        "each step from the measured acceptance and step times",
    )
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=PREFILL_STEP,
        help="prompt tokens per prefill chunk (default %(default)s)",
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
    p.add_argument(
        "--q-bits",
        type=int,
        default=R.bits,
        choices=[2, 3, 4, 5, 6, 8],
        help=f"HF checkpoints only: bits of the bulk of the weights when quantizing (default {R.bits})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="load even when the memory pre-flight says the model cannot fit in this machine's memory",
    )
    add_expert_cache_arguments(p)
    p.add_argument(
        "--trace-experts",
        default=None,
        metavar="FILE",
        help="record each pass's routed experts per MoE layer to FILE (npz) for benchmarks/expert_cache.py",
    )
    p.add_argument(
        "--prompt-cache-file",
        default=None,
        help="continue the conversation saved in this prompt cache (by --save-prompt-cache): "
        "the prompt is the next user message, and the tokens the cache holds are not recomputed",
    )
    p.add_argument(
        "--save-prompt-cache",
        default=None,
        metavar="FILE",
        help="after generating, save the conversation's caches to FILE (may be the --prompt-cache-file)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print the prompt, per-step details and the memory pre-flight "
        "(printed anyway when the model does not fit as configured)",
    )
    p.add_argument(
        "--draft-min-confidence",
        default=DRAFT_MIN_CONFIDENCE,
        metavar="P",
        help="stop a step's draft chain before the first MTP block whose confidence (its draft "
        "distribution's top probability) is below P, in [0, 1); 0 = never; auto (default): learnt "
        f"with the depth under --num-draft auto, {GATE_DEFAULT} at a fixed depth. Output is unchanged",
    )
    add_kv_arguments(p)
    a = p.parse_args(argv)
    if a.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    if a.prefill_step_size < 1:
        p.error("--prefill-step-size must be at least 1")
    if a.expert_cache_gb is not None and a.expert_cache_gb <= 0:
        p.error("--expert-cache-gb must be positive")
    try:
        a.draft_min_confidence = parse_min_confidence(a.draft_min_confidence)
    except ValueError as e:
        p.error(str(e))
    a.draft_mtp = a.draft_mtp or a.num_draft is not None
    a.num_draft = a.num_draft or NUM_DRAFT
    with user_errors(p.prog), warnings.catch_warnings():
        run(a)


def check_memory(a, text: str, group=None) -> int:
    """Print the memory pre-flight when the model does not fit (or with --verbose); exit 2
    when it cannot fit at all, unless --force. Returns the context it budgeted for."""
    from mlx_step35.loading import preflight
    from mlx_step35.memory import MemoryWarning

    # An upper bound on the prompt's tokens (a token covers at least one byte), before any tokenizer.
    context = len(text.encode()) + len((a.system or "").encode()) + TEMPLATE_TOKENS + a.max_tokens
    report = preflight(
        a.model,
        quantize=not a.no_quantize,
        q_bits=a.q_bits,
        dtype=a.dtype,
        mtp=a.draft_mtp,
        context=context,
        draft=a.draft_mtp,
        expert_cache_gb=a.expert_cache_gb,
        group=group,
        kv_bits=a.kv_bits,
        kv_group_size=a.kv_group_size,
        quantized_kv_start=a.quantized_kv_start,
    )
    if a.verbose or not report.ok:
        print(report.text(), file=sys.stderr)
        warnings.simplefilter("ignore", MemoryWarning)  # said once: load() and generation stay quiet
    if report.refuse and not a.force:
        print(
            "generate.py: error: the model cannot fit in this machine's memory (see above); "
            "--force loads anyway",
            file=sys.stderr,
        )
        sys.exit(2)
    return context


def run(a):
    from mlx_step35.distributed import exit_when_terminated, peer_errors, world

    group = world()  # started by mlx.launch with several ranks: tensor parallel over them
    if group is not None and (a.prompt_cache_file or a.save_prompt_cache):
        raise ValueError(
            "prompt cache files are not supported under tensor parallelism yet (each rank holds a shard)"
        )
    if group is not None:
        exit_when_terminated(f"generate.py: error: rank {group.rank()}: stopped, another rank exited")
    with peer_errors(group.rank() if group else None):
        generate(a, group)


def generate(a, group):
    import json

    import mlx.core as mx

    from mlx_step35 import make_logits_processors, make_sampler, stream_generate
    from mlx_step35.generation import build_prompt, format_stats
    from mlx_step35.prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    if a.seed is not None:
        mx.random.seed(a.seed)
    show = print if group is None or group.rank() == 0 else (lambda *args, **kwargs: None)
    text = sys.stdin.read() if a.prompt == "-" else a.prompt.replace("\\n", "\n")
    model, tokenizer, trace = load_model(a, check_memory(a, text, group), group)
    pc, messages = None, []
    if a.prompt_cache_file:
        pc, meta = load_prompt_cache(a.prompt_cache_file, model, return_metadata=True)
        messages = json.loads(meta.get("messages", "[]"))
    elif a.save_prompt_cache:
        pc = make_prompt_cache(model, draft_mtp=a.draft_mtp, **kv_arguments(a))
    templated = not a.ignore_chat_template and tokenizer.has_chat_template
    prompt = build_prompt(tokenizer, text, system=a.system, chat_template=templated, history=messages)
    branch = None  # where the next turn's re-rendered prompt leaves this one: after the user message
    if pc is not None:  # the whole conversation: the cache reuses the prefix it shares
        if templated:
            kw = dict(system=a.system, history=messages, generation_prompt=False)
            branch = min(len(build_prompt(tokenizer, text, **kw)), len(prompt) - 1)
        prompt = pc.continuation(prompt if templated else pc.history + prompt)
    if a.verbose:
        show(tokenizer.decode(prompt), end="")
        show("\n" + "=" * 10)
    sampler = make_sampler(a.temp, a.top_p, a.min_p, a.top_k)
    procs = make_logits_processors(repetition_penalty=a.repetition_penalty) if a.repetition_penalty else None
    last, reply = None, ""
    for last in stream_generate(
        model,
        tokenizer,
        prompt,
        a.max_tokens,
        sampler=sampler,
        logits_processors=procs,
        draft_mtp=a.draft_mtp,
        num_draft=a.num_draft if a.num_draft == "auto" else int(a.num_draft),
        prefill_step_size=a.prefill_step_size,
        prompt_cache=pc,
        checkpoints=[branch] if branch else (),
        draft_min_confidence=a.draft_min_confidence,
        **kv_arguments(a),
    ):
        show(last.text, end="", flush=True)  # rank 0 prints, the others follow in lockstep
        reply += last.text
    show("\n" + "=" * 10)
    if last is not None:
        show(format_stats(last))
    if group is not None and group.rank() != 0:
        return  # rank 0 reports and saves
    report_experts(a, model, trace, last, prompt)
    if a.save_prompt_cache:
        if not messages and a.system:
            messages.append({"role": "system", "content": a.system})
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        state = pc.at(branch) if branch in pc.checkpoints else pc  # raw text: it continues at the end
        save_prompt_cache(a.save_prompt_cache, state, {"messages": json.dumps(messages)})
        print(f"Prompt cache: {len(state.tokens)} tokens saved to {a.save_prompt_cache}")


def load_model(a, context: int, group=None):
    """load() with the CLI's flags (the memory pre-flight for `context` tokens was printed
    by check_memory); with --expert-cache-gb the expert cache's pre-flight is printed first
    (a budget too small is refused there, before anything loads)."""
    from mlx_step35 import load
    from mlx_step35.expert_cache import plan_expert_cache
    from mlx_step35.expert_trace import trace_experts
    from mlx_step35.loading import resolve_path

    if a.expert_cache_gb is not None:
        print(plan_expert_cache(resolve_path(a.model), a.expert_cache_gb).describe())
    model, tokenizer = load(
        a.model,
        quantize=not a.no_quantize,
        q_bits=a.q_bits,
        dtype=a.dtype,
        mtp=a.draft_mtp,  # the MTP blocks are loaded only to draft with
        context=context,
        force=True,  # check_memory decided
        expert_cache_gb=a.expert_cache_gb,
        expert_cache_policy=a.expert_cache_policy,
        group=group,
    )
    return model, tokenizer, trace_experts(model) if a.trace_experts else None


def report_experts(a, model, trace, last, prompt):
    """The expert cache's counters, and the expert trace written to --trace-experts."""
    if getattr(model, "expert_cache", None) is not None and last is not None:
        print(model.expert_cache.summary(last.generation_tokens))
    if trace is not None:
        n = last.generation_tokens if last is not None else 0
        trace.save(a.trace_experts, prompt_tokens=len(prompt), generated_tokens=n)
        print(f"Expert trace: {a.trace_experts}")


if __name__ == "__main__":
    main()
