"""`python -m mlx_step35.bench`: one command that measures this runtime on the machine at
hand and prints a table to paste into an issue (as llama-bench or `mlx_lm.benchmark`).

Device and memory facts, load time, prefill tokens/s per prompt length, then decode tokens/s
after the shortest prompt: plain decoding, drafting at each depth (ungated), `auto` (depth and
gate learnt) and depth 3 gated at --gate; with acceptance by depth and tokens per trunk pass.
Then several requests decoded together by the batch engine (`--concurrency`, plain and auto):
aggregate decode tokens/s over all of them. `--kv-bits` (and its two companions) apply to
every measurement. Prompts are this package's own source text, tokenized and cut to length;
lengths beyond the model's context are capped to it (the table says so). Peak memory is
MLX's, over the whole run.
"""

import json
import platform
import statistics
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from .batch import BatchEngine, BatchRequest
from .cli import ArgumentParser, add_kv_arguments, kv_arguments, user_errors
from .generation import GATE_DEFAULT, generate_step
from .loading import load
from .memory import Device
from .speculative import SpecStats

LENGTHS = (512, 4096, 32768)
QUICK_LENGTHS = (128, 512)
GEN_TOKENS, QUICK_GEN_TOKENS = 128, 24
CONCURRENCY, QUICK_CONCURRENCY = (1, 4), (1, 2)
CONCURRENT_MODES = ("plain", "auto")  # with --concurrency
# name -> generate_step keyword arguments
MODES = {
    "plain": dict(draft_mtp=False),
    "depth 1": dict(draft_mtp=True, num_draft=1, draft_min_confidence=0.0),
    "depth 2": dict(draft_mtp=True, num_draft=2, draft_min_confidence=0.0),
    "depth 3": dict(draft_mtp=True, num_draft=3, draft_min_confidence=0.0),
    "auto": dict(draft_mtp=True, num_draft="auto", draft_min_confidence="auto"),
    "gated": dict(draft_mtp=True, num_draft=3),  # draft_min_confidence: --gate
}


def prompt_tokens(tokenizer, n: int) -> List[int]:
    """n token ids of this package's source text (repeated if it is shorter)."""
    ids = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        text = path.read_text()
        for s in range(0, len(text), 2000):  # pieces well under the tokenizer's length warning
            ids += tokenizer.encode(text[s : s + 2000])
        if len(ids) >= n:
            break
    return (ids * (n // len(ids) + 1))[:n]


def prefill(model, ids: List[int], **kv) -> float:
    """Tokens/s of the prompt's prefill and its first token (plain, no drafting)."""
    gen = generate_step(model, ids, max_tokens=1, **kv)
    tic = time.perf_counter()
    next(gen)
    seconds = time.perf_counter() - tic
    gen.close()
    return len(ids) / seconds


def decode(model, ids: List[int], n_gen: int, **kw) -> dict:
    """Decode n_gen tokens after the prompt (the first, from the prefill, is not timed)."""
    stats = SpecStats()
    gen = generate_step(model, ids, max_tokens=n_gen, stats=stats, **kw)
    next(gen)
    tic = time.perf_counter()
    n = sum(1 for _ in gen)
    seconds = time.perf_counter() - tic
    passes = stats.verify_steps + stats.plain_tokens if kw.get("draft_mtp") else n
    return dict(
        tokens=n,
        tokens_per_s=n / seconds,
        tokens_per_pass=n / max(passes, 1),
        acceptance=[round(a, 4) for a in stats.acceptance],
        rejected_per_token=stats.rejected / max(n, 1),
        gated_steps=stats.gated,
        verify_steps=stats.verify_steps,
        plain_steps=stats.plain_tokens if kw.get("draft_mtp") else n,
    )


class NoEos:
    """A tokenizer without EOS ids, for the batch engine: every request decodes its n_gen
    tokens, as `generate_step` does in `decode`."""

    eos_token_ids = ()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def detokenizer(self):
        return self.tokenizer.detokenizer


def concurrent(model, tokenizer, prompts: List[List[int]], n_gen: int, kv: dict, **kw) -> dict:
    """len(prompts) requests decoded together by the batch engine, n_gen tokens each, all
    prefilled in the same passes (EOS does not stop them); timed from the pass that gave the last row its first token
    (the prefills' tokens are not counted) to the end."""
    n = len(prompts)
    engine = BatchEngine(model, NoEos(tokenizer), decode_concurrency=n, prompt_concurrency=n, **kv)
    rows = [engine.insert(BatchRequest(list(p), n_gen, **kw)) for p in prompts]
    counts, ended = {r.uid: 0 for r in rows}, {}
    tic, passes, before = None, 0, 0
    while engine.running or engine.waiting:
        events = engine.step()
        now = time.perf_counter()
        for row, responses in events:
            if row.error:
                raise ValueError(row.error)
            counts[row.uid] += len(responses)
            if row.done:
                ended[row.uid] = now
        if tic is None:
            if all(counts.values()):
                tic, before = now, sum(counts.values())
        else:
            passes += 1
    seconds = max(ended.values()) - tic if tic is not None else 0.0
    tokens = sum(counts.values()) - before
    per_row = (
        [(counts[r.uid] - 1) / max(ended[r.uid] - tic, 1e-9) for r in rows] if tic is not None else [0.0]
    )
    return dict(
        requests=n,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / max(seconds, 1e-9),
        per_request_tokens_per_s=statistics.median(per_row),
        tokens_per_pass=tokens / max(passes, 1),
        rows_per_pass=statistics.fmean([size for size, k in engine.batch_sizes.items() for _ in range(k)]),
    )


def run(
    model_path: Optional[str],
    lengths,
    gen_tokens: int,
    gate: float,
    modes,
    concurrency=CONCURRENCY,
    kv: Optional[dict] = None,
) -> dict:
    notes, kv = [], kv or {}
    mx.reset_peak_memory()
    tic = time.perf_counter()
    model, tokenizer = load(model_path)
    load_s = time.perf_counter() - tic
    context = model.args.max_position_embeddings
    room = context - gen_tokens
    if room < 1:
        raise ValueError(
            f"--gen-tokens {gen_tokens} leaves no room for a prompt in the model's context of {context}"
        )
    capped = sorted({min(n, room) for n in lengths})
    if capped != sorted(set(lengths)):
        notes.append(f"prompt lengths capped at {room} (the model's context {context} minus --gen-tokens)")
    facts = Device.current()
    out = dict(
        model=model_path or "bundled demo",
        mlx_version=mx.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=dict(mx.device_info(), default=str(mx.default_device())),
        memory_bytes=facts.memory,
        wired_limit_bytes=facts.recommended,  # what generation raises the wired limit to (Metal)
        load_s=load_s,
        context_length=context,
        prefill=[],
        decode_prompt_tokens=capped[0],
        gen_tokens=gen_tokens,
        gate=gate,
        kv_bits=kv.get("kv_bits"),
        kv=kv,
        decode={},
        concurrent=[],
        notes=notes,
    )
    if not model.num_mtp:
        notes.append("the model has no MTP weights: drafting modes skipped")
        modes = [m for m in modes if m == "plain"]
    prefill(model, prompt_tokens(tokenizer, min(64, capped[0])), **kv)  # warm-up: compile, first allocations
    for n in capped:
        out["prefill"].append(
            dict(prompt_tokens=n, tokens_per_s=prefill(model, prompt_tokens(tokenizer, n), **kv))
        )
    ids = prompt_tokens(tokenizer, capped[0])
    for name in modes:
        kw = dict(MODES[name])
        if name == "gated":
            kw["draft_min_confidence"] = gate
        out["decode"][name] = decode(model, ids, gen_tokens, **kw, **kv)
    n = capped[0]
    many = prompt_tokens(tokenizer, n * max(concurrency, default=1))  # a different prompt per request
    for name in [m for m in CONCURRENT_MODES if model.num_mtp or m == "plain"]:
        for c in concurrency:
            prompts = [many[i * n : (i + 1) * n] for i in range(c)]
            r = concurrent(model, tokenizer, prompts, gen_tokens, kv, **MODES[name])
            out["concurrent"].append(dict(mode=name, **r))
    out["peak_memory_bytes"] = mx.get_peak_memory()
    return out


def table(r: dict) -> str:
    G = 1e9
    wired = f"{r['wired_limit_bytes'] / G:.1f} GB" if r["wired_limit_bytes"] else "none (no Metal)"
    dev = r["device"]
    lines = [
        f"model: {r['model']} (context {r['context_length']}); MLX {r['mlx_version']}, Python {r['python']}",
        f"device: {dev.get('device_name', '?')} ({dev.get('architecture', '?')}), default {dev['default']}; "
        f"memory {r['memory_bytes'] / G:.1f} GB, wired limit {wired}",
        f"load {r['load_s']:.2f} s; peak memory {r['peak_memory_bytes'] / G:.3f} GB",
        "",
        "| prompt tokens | prefill tok/s |",
        "|---|---|",
    ]
    lines += [f"| {p['prompt_tokens']} | {p['tokens_per_s']:.1f} |" for p in r["prefill"]]
    lines += [
        "",
        f"decode after {r['decode_prompt_tokens']} prompt tokens, {r['gen_tokens']} tokens (gated: depth 3, "
        f"gate {r['gate']})",
        "",
        "| mode | decode tok/s | tokens per trunk pass | acceptance by depth | rejected drafts per token |",
        "|---|---|---|---|---|",
    ]
    for name, d in r["decode"].items():
        acc = ", ".join(f"{a:.0%}" for a in d["acceptance"]) or "-"
        lines.append(
            f"| {name} | {d['tokens_per_s']:.1f} | {d['tokens_per_pass']:.2f} | {acc} | {d['rejected_per_token']:.2f} |"
        )
    if r["concurrent"]:
        lines += [
            "",
            f"requests decoded together (batch engine), {r['gen_tokens']} tokens each after "
            f"{r['decode_prompt_tokens']}-token prompts; KV {r['kv_bits'] or 16}-bit",
            "",
            "| mode | requests | aggregate decode tok/s | x one request | per request tok/s (median) | "
            "tokens per pass | rows per pass |",
            "|---|---|---|---|---|---|---|",
        ]
        one = {c["mode"]: c["tokens_per_s"] for c in r["concurrent"] if c["requests"] == 1}
        for c in r["concurrent"]:
            x = f"{c['tokens_per_s'] / one[c['mode']]:.2f}" if c["mode"] in one else "-"
            lines.append(
                f"| {c['mode']} | {c['requests']} | {c['tokens_per_s']:.1f} | {x} | "
                f"{c['per_request_tokens_per_s']:.1f} | {c['tokens_per_pass']:.2f} | {c['rows_per_pass']:.2f} |"
            )
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m mlx_step35.bench",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1].replace("\n", " "),
    )
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument(
        "--prompt-lengths",
        default=None,
        help=f"comma-separated prompt lengths in tokens for prefill (default {','.join(map(str, LENGTHS))}; capped at the "
        "model's context); decoding follows the shortest",
    )
    p.add_argument(
        "--gen-tokens", type=int, default=None, help=f"tokens decoded per mode (default {GEN_TOKENS})"
    )
    p.add_argument(
        "--gate", type=float, default=GATE_DEFAULT, help="the gated mode's threshold (default %(default)s)"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated decode modes (default: all)")
    p.add_argument(
        "--concurrency",
        default=None,
        help=f"comma-separated numbers of requests decoded together by the batch engine, plain and auto "
        f"(default {','.join(map(str, CONCURRENCY))}; --quick: {','.join(map(str, QUICK_CONCURRENCY))})",
    )
    add_kv_arguments(p)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"prompt lengths {','.join(map(str, QUICK_LENGTHS))}, {QUICK_GEN_TOKENS} tokens and concurrency "
        f"{','.join(map(str, QUICK_CONCURRENCY))} (about a minute on the demo), unless given",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE as JSON")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if a.prompt_lengths is None:
        a.prompt_lengths = ",".join(map(str, QUICK_LENGTHS if a.quick else LENGTHS))
    if a.gen_tokens is None:
        a.gen_tokens = QUICK_GEN_TOKENS if a.quick else GEN_TOKENS
    if a.concurrency is None:
        a.concurrency = ",".join(map(str, QUICK_CONCURRENCY if a.quick else CONCURRENCY))
    try:
        lengths = [int(x) for x in a.prompt_lengths.split(",")]
    except ValueError:
        p.error(f"--prompt-lengths must be comma-separated integers, got {a.prompt_lengths!r}")
    try:
        concurrency = [int(x) for x in a.concurrency.split(",") if x] if a.concurrency != "0" else []
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers (or 0: none), got {a.concurrency!r}")
    if any(c < 1 for c in concurrency):
        p.error(f"--concurrency: each number of requests must be at least 1, got {a.concurrency!r}")
    modes = a.modes.split(",")
    if any(n < 1 for n in lengths) or a.gen_tokens < 1:
        p.error("--prompt-lengths and --gen-tokens must be at least 1")
    if not 0 <= a.gate < 1:
        p.error(f"--gate must be in [0, 1), got {a.gate}")
    if set(modes) - set(MODES):
        p.error(f"unknown --modes {sorted(set(modes) - set(MODES))}: choose from {', '.join(MODES)}")
    if a.json and not Path(a.json).resolve().parent.is_dir():
        p.error(f"--json: no directory {str(Path(a.json).resolve().parent)!r}")
    with user_errors(p.prog):
        r = run(a.model, lengths, a.gen_tokens, a.gate, modes, concurrency, kv_arguments(a))
    print(table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
        print(f"results: {a.json}")


if __name__ == "__main__":
    main()
