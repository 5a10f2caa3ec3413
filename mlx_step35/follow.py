"""Serving under tensor parallelism: rank 0 takes requests and shares each one
(`lockstep.share_request`); every other rank follows, running the same generation."""

import mlx.core as mx

from .generation import stream_generate
from .lockstep import share_request
from .sampling import make_logits_processors, make_sampler


def request_kwargs(request: dict) -> dict:
    """stream_generate keyword arguments (prompt as token ids included) for a shared request:
    {"prompt": [ids], "max_tokens", "sampler": make_sampler kwargs, "repetition_penalty",
    "presence_penalty", "frequency_penalty", "draft_mtp", "num_draft", "stop_strings", "seed",
    "draft_min_confidence", "kv_bits", "kv_group_size", "quantized_kv_start"}; every rank builds
    the same call (each rank's caches hold its own KV heads, quantized alike)."""
    if request.get("seed") is not None:
        mx.random.seed(request["seed"])
    penalties = {k: request.get(k) for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")}
    keys = ("prompt", "max_tokens", "draft_mtp", "num_draft", "draft_min_confidence")
    keys += ("kv_bits", "kv_group_size", "quantized_kv_start")
    kwargs = {k: request[k] for k in keys if k in request}
    kwargs["stop_strings"] = tuple(request.get("stop_strings") or ())
    kwargs["sampler"] = make_sampler(**(request.get("sampler") or {}))
    kwargs["logits_processors"] = make_logits_processors(**penalties) if any(penalties.values()) else None
    return kwargs


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
