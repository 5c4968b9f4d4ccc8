"""OpenAI-compatible request and response shapes, and the OpenAI error shape.

Imports only pydantic (no Ray, no torch): the ingress validates bodies with these models, the generator
builds responses with the helpers below, and unit tests use both without Ray.

Request policy (documented in docs/serving.md):
  * types are strict: ``"temperature": "0.5"`` is a 400, not a silent conversion;
  * fields chatray does not implement (``logprobs``, ``presence_penalty``, ``tools``, ...) and unknown fields
    are ignored, as OpenAI clients send many optional fields;
  * ``n`` must be 1 (anything else is a 400);
  * extensions beyond OpenAI (as in vLLM): ``top_k``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_request",
]

MAX_STOP = 16
MAX_SEED = 2**64 - 1


class APIError(Exception):
    """An error the HTTP layer returns as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status.
        message: one line naming the field and the problem.
        param: the offending field (dotted path), if any.
        type: OpenAI error type (defaults from the status).
        code: short machine-readable code.
        headers: extra response headers (e.g. Retry-After).
    """

    _TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
              429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,  # noqa: A002
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or self._TYPES.get(status, "invalid_request_error")
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_dict(self) -> dict[str, Any]:
        """A picklable form that crosses the Ray boundary (rebuilt with :meth:`from_dict`)."""
        return {"status": self.status, "message": self.message, "param": self.param, "type": self.type,
                "code": self.code, "headers": self.headers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        return cls(d["status"], d["message"], param=d.get("param"), type=d.get("type"), code=d.get("code"),
                   headers=d.get("headers"))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _check_unicode(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates ("\ud800") parse as JSON but are not text
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate at position {e.start})") from e
    return value


class TextPart(_Strict):
    """One part of a multi-part message content; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_text(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        _check_unicode(v if isinstance(v, str) else "".join(p.text for p in v), "content")
        return v

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=MAX_SEED)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: keep generating past EOS (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(items)}")
        for s in items:
            if s == "":
                raise ValueError("stop strings must not be empty")
            _check_unicode(s, "stop string")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` body: ``prompt`` is a string, a one-element list of strings, or token ids."""

    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError(f"batched prompts are not supported: send one prompt per request, got {len(v)}")
                _check_unicode(v[0], "prompt")
        else:
            _check_unicode(v, "prompt")
        return v


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param_path(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``; drops pydantic's union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_request(body: bytes, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body.

    Raises:
        APIError: 400 naming the field for invalid JSON, a non-object body, wrong types or bad values.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # For a union (str | list[str]) pydantic reports one error per member: the deepest is the useful one.
        err = max(errors, key=lambda x: len(x["loc"]))
        param = _param_path(tuple(err["loc"])) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = f"{param} is required"
        else:
            got = "" if err["type"] in ("value_error",) else f" (got {_describe(err.get('input'))})"
            message = f"invalid {param}: {msg}{got}" if param else f"invalid request: {msg}"
        raise APIError(400, message, param=param, code="invalid_value") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": _usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
    }


def _chunk(obj: str, rid: str, model: str, created: int, choice: dict[str, Any],
           usage: tuple[int, int] | None, no_choices: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                             "choices": [] if no_choices else [choice], "system_fingerprint": None}
    if usage is not None:
        chunk["usage"] = _usage(*usage)
    return chunk


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               usage: tuple[int, int] | None = None, no_choices: bool = False) -> dict[str, Any]:
    """A ``chat.completion.chunk`` (the last one, with ``no_choices``, carries only usage)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _chunk("chat.completion.chunk", rid, model, created, choice, usage, no_choices)


def completion_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    """A ``text_completion`` object."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": _usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     usage: tuple[int, int] | None = None, no_choices: bool = False) -> dict[str, Any]:
    """A streamed ``text_completion`` chunk."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _chunk("text_completion", rid, model, created, choice, usage, no_choices)
