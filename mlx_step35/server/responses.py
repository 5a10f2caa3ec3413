"""OpenAI response objects and streamed chunks, `usage`, and llama-server-like `timings`."""

import json
import time
import uuid
from typing import List, Optional

from .engine import Finished, TokenLogprob, trunk_passes


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: Finished) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def timings(done: Finished) -> dict:
    """llama-server's field names; prompt_ms runs from the job's start to its first token,
    predicted_ms from the first token to the last (so predicted_per_second counts the tokens
    after the first). `mtp`: drafted/accepted per depth and tokens per trunk pass."""
    s = done.stats
    n = done.completion_tokens
    pp, dec = done.prompt_s * 1e3, done.decode_s * 1e3
    passes = trunk_passes(s, n)
    return {
        "queue_ms": done.queued_s * 1e3,
        "cache_n": done.cached_tokens,
        "prompt_n": done.prompt_tokens,
        "prompt_ms": pp,
        "prompt_per_token_ms": pp / max(done.prompt_tokens, 1),
        "prompt_per_second": done.prompt_tokens / done.prompt_s if done.prompt_s else 0.0,
        "predicted_n": n,
        "predicted_ms": dec,
        "predicted_per_token_ms": dec / (n - 1) if n > 1 else 0.0,
        "predicted_per_second": (n - 1) / done.decode_s if n > 1 and done.decode_s else 0.0,
        "draft_n": sum(s.drafted),
        "draft_n_accepted": sum(s.accepted),
        "mtp": {
            "drafted": list(s.drafted),
            "accepted": list(s.accepted),
            "acceptance": s.acceptance,
            "verify_steps": s.verify_steps,
            "plain_steps": s.plain_tokens,
            "trunk_passes": passes,
            "tokens_per_trunk_pass": n / passes if passes else 0.0,
        },
    }


def finish_reason(done: Finished, tool_calls: bool) -> str:
    if done.finish_reason == "stop" and tool_calls:
        return "tool_calls"
    return done.finish_reason


def chat_logprobs(lps: List[TokenLogprob]) -> dict:
    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            dict(entry(x.text, x.logprob), top_logprobs=[entry(t, v) for _, t, v in x.top]) for x in lps
        ]
    }


def completion_logprobs(lps: List[TokenLogprob], offset: int) -> dict:
    offsets = []
    for x in lps:
        offsets.append(offset)
        offset += len(x.text)
    return {
        "tokens": [x.text for x in lps],
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": [{t: v for _, t, v in x.top} for x in lps],
        "text_offset": offsets,
    }


class Envelope:
    """The fields every response and chunk of one request shares."""

    def __init__(self, kind: str, model: str):
        self.chat = kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model

    def wrap(self, choices: list, chunk: bool, **extra) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            obj += ".chunk"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        out.update({k: v for k, v in extra.items() if v is not None})
        return out

    def sse(self, choices: list, **extra) -> str:
        return "data: " + json.dumps(self.wrap(choices, True, **extra)) + "\n\n"


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
