"""Request bodies (pydantic) of the OpenAI-compatible endpoints, and what we refuse.

Unknown fields are refused (400 naming them), except a few that change nothing about the
output (`user`, `store`, `metadata`, ...). Fields whose non-default values we cannot honour
(`n` > 1, `response_format` with a schema, `logit_bias`, ...) are refused with the reason."""

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..generation import MAX_DRAFT


class RequestError(ValueError):
    """A request we cannot serve; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


# a request's draft_min_confidence (every protocol): the gate's threshold, or "auto"
MinConfidence = Optional[Union[Annotated[float, Field(ge=0, lt=1)], Literal["auto"]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # -1: off, as vLLM
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**64)
    stop: Optional[Union[str, List[str]]] = None
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    n: int = 1
    num_draft: Optional[Union[int, Literal["auto"]]] = None  # ours: 0 decodes plainly
    return_token_ids: bool = False  # vLLM's extension: prompt and completion token ids
    logit_bias: Optional[Dict[str, float]] = None
    draft_min_confidence: MinConfidence = None  # ours: the MTP confidence gate
    # accepted, changing nothing about the output
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[Dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None


class ChatRequest(_Common):
    messages: List[Dict[str, Any]] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    reasoning_effort: Optional[str] = None  # Step-3.7's template variable
    response_format: Optional[Dict[str, Any]] = None
    modalities: Optional[List[str]] = None


class CompletionRequest(_Common):
    prompt: Union[str, List[int], List[str], List[List[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


def refuse_unsupported(req: _Common):
    """400 for every field set to something we cannot honour."""
    if req.n != 1:
        raise RequestError("only n=1 is supported (one choice per request)", "n")
    if req.logit_bias:
        raise RequestError("logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatRequest):
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise RequestError(
                f"response_format {fmt!r} is not supported (no constrained decoding): only 'text'",
                "response_format",
            )
        if req.modalities not in (None, ["text"]):
            raise RequestError("only text output is supported", "modalities")
        if req.parallel_tool_calls is False:
            raise RequestError("parallel_tool_calls=false cannot be enforced", "parallel_tool_calls")
        if req.top_logprobs and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    else:
        if req.echo:
            raise RequestError("echo is not supported", "echo")
        if req.suffix:
            raise RequestError("suffix (fill-in-the-middle) is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise RequestError("only best_of=1 is supported", "best_of")


def stop_list(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise RequestError("stop strings must be non-empty", "stop")
    if len(stops) > 16:
        raise RequestError("at most 16 stop strings", "stop")
    return stops


def num_draft_of(value, default):
    """(draft_mtp, num_draft) for a request's num_draft (None: the server's setting)."""
    if value is None:
        return default
    if value == "auto" or (isinstance(value, int) and 1 <= value <= MAX_DRAFT):
        return True, value
    if value == 0:
        return False, default[1]
    raise RequestError(
        f"num_draft must be 0 (no drafting), 1-{MAX_DRAFT} or 'auto', got {value!r}", "num_draft"
    )
