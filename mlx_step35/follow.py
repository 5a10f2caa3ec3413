"""Serving under tensor parallelism: rank 0 takes requests and shares each one
(`lockstep.share_request`); every other rank follows, running the same generation."""

from dataclasses import fields

from .batch import BatchEngine, BatchRequest
from .generation import stream_generate
from .lockstep import share_request
from .sampling import make_logits_processors, make_sampler


def request_kwargs(request: dict) -> dict:
    """stream_generate keyword arguments (prompt as token ids included) for a shared request:
    {"prompt": [ids], "max_tokens", "sampler": make_sampler kwargs, "repetition_penalty",
    "presence_penalty", "frequency_penalty", "draft_mtp", "num_draft", "stop_strings", "seed",
    "draft_min_confidence", "kv_bits", "kv_group_size", "quantized_kv_start"}; every rank builds
    the same call (each rank's caches hold its own KV heads, quantized alike)."""
    penalties = {k: request.get(k) for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")}
    keys = ("prompt", "max_tokens", "draft_mtp", "num_draft", "draft_min_confidence", "seed")
    keys += ("kv_bits", "kv_group_size", "quantized_kv_start")
    kwargs = {k: request[k] for k in keys if k in request}
    kwargs["stop_strings"] = tuple(request.get("stop_strings") or ())
    kwargs["sampler"] = make_sampler(**(request.get("sampler") or {}))
    kwargs["logits_processors"] = make_logits_processors(**penalties) if any(penalties.values()) else None
    return kwargs


def batch_request(request: dict) -> BatchRequest:
    """A shared request as the batch engine's row. Without its stop strings: rank 0's server
    applies them and ends the row through the shared plan."""
    names = {f.name for f in fields(BatchRequest)} - {"stop_strings"}
    return BatchRequest(**{k: v for k, v in request_kwargs(request).items() if k in names})


def follow_batch(model, tokenizer, **engine_kwargs):
    """The loop of every rank but 0 while rank 0 serves with the batch engine: each step runs
    rank 0's plan (joins, admissions, cancellations), until rank 0 stops. `engine_kwargs`:
    the KV format and prefill step (as on rank 0)."""
    engine = BatchEngine(model, tokenizer, rebuild=batch_request, **engine_kwargs)
    try:
        while engine.following:
            engine.step()
    finally:
        engine.close()


def follow(model, tokenizer) -> int:
    """The loop of every rank but 0 while rank 0 serves: take each shared request and run the
    same generation to its end (rank 0 must also run each to its end, even if its client left,
    or the ranks fall out of step). Returns the number of requests served, when rank 0 shares None."""
    served = 0
    while (request := share_request(model)) is not None:
        for _ in stream_generate(model, tokenizer, **request_kwargs(request)):
            pass
        served += 1
    return served
