"""OpenAI-compatible request and response shapes, and the OpenAI error shape.

Imports only pydantic (no Ray, no torch): the ingress validates bodies with these models, the generator
builds responses with the helpers below, and unit tests use both without Ray.

Request policy (documented in docs/serving.md): nothing is silently ignored.
  * types are strict: ``"temperature": "0.5"`` is a 400, not a silent conversion;
  * a field chatray does not implement (``logit_bias``, ``tools``, ``best_of``, ``suffix``, ...) is a 400 naming
    it, unless it carries the value that means "off" (``null``, ``"tools": []``, ``"logit_bias": {}``, ...), as
    clients often send defaults; an unknown field is a 400 naming it too;
  * harmless fields are accepted: ``user``, ``stream_options``, ``model`` (one model is served);
  * extensions beyond OpenAI (as in vLLM): ``top_k``, ``repetition_penalty``, ``ignore_eos``, and ``/tokenize``,
    ``/detokenize`` bodies.
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
    "DetokenizeRequest",
    "TokenizeRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_request",
]

MAX_STOP = 16
MAX_SEED = 2**64 - 1
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI

# OpenAI fields chatray does not implement, with the values that mean "off": a client sending one of those (or
# null) asks for nothing chatray leaves undone, so it is accepted; any other value is a 400 naming the field.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "store": (False,),
    "suffix": ("",), "modalities": (["text"],), "service_tier": ("auto", "default"), "metadata": ({},),
    "tool_calls": ([],), "annotations": ([],),  # in an assistant message a client sends back
}


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
    # Extra fields are kept so that check_fields can name them (400) or accept the ones that mean "off".
    model_config = ConfigDict(strict=True, extra="allow")


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
    user: str | None = None  # an end-user id for abuse monitoring: nothing to do with it, nothing lost
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1)  # the upper bound is the app's max_n, checked where it is known
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

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_fields(self) -> None:
        """Checks across fields (each names its field).

        Raises:
            APIError: 400.
        """
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise APIError(400, f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                           f"({self.max_completion_tokens}) differ: they mean the same, send one",
                           param="max_completion_tokens", code="invalid_value")


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def check_fields(self) -> None:
        super().check_fields()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` body: ``prompt`` is a string or token ids, alone or in a one-element list.

    ``max_tokens: 0`` with ``echo: true`` scores the prompt without generating (how evaluation harnesses use it).
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str] | list[int] | list[list[int]]) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError(f"batched prompts are not supported: send one prompt per request, got {len(v)}")
                if isinstance(v[0], str):
                    _check_unicode(v[0], "prompt")
                elif not v[0]:
                    raise ValueError("must not be empty")
        else:
            _check_unicode(v, "prompt")
        return v

    def check_fields(self) -> None:
        super().check_fields()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 generates nothing: it is for scoring the prompt with echo: true",
                           param="max_tokens", code="invalid_value")

    def prompt_ids(self) -> list[int] | None:
        """The prompt's token ids when it was sent as ids, else None."""
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], list):
            return list(p[0])
        if isinstance(p, list) and isinstance(p[0], int):
            return list(p)
        return None


class TokenizeRequest(_Strict):
    """``POST /tokenize`` body (vLLM's): ``prompt`` as ``/v1/completions`` reads it, or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        return v if v is None else _check_unicode(v, "prompt")

    def check_fields(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt" if self.prompt is None
                           else "messages", code="invalid_value")


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` body (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[int]


def check_extra_fields(obj: BaseModel, path: str = "") -> None:
    """Refuse the fields of ``obj`` (and the models inside it) that no model declares.

    Accepted: null, and for a field OpenAI defines that chatray does not implement, the value that means "off"
    (``_OFF_VALUES``); ``best_of`` equal to ``n``.

    Raises:
        APIError: 400 naming the first refused field.
    """
    for name, value in (obj.model_extra or {}).items():
        where = f"{path}.{name}" if path else name
        if value is None or value in _OFF_VALUES.get(name, ()):
            continue
        if name == "best_of" and value == getattr(obj, "n", None):
            continue
        if name in _OFF_VALUES or name == "best_of":
            raise APIError(400, f"{where} is not supported by chatray (got {_describe(value)}); leave it out",
                           param=where, code="unsupported_field")
        raise APIError(400, f"unknown field {where}: chatray's fields are in docs/serving.md", param=where,
                       code="unknown_field")
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                where = f"{path}.{name}" if path else name
                check_extra_fields(item, f"{where}[{i}]" if isinstance(value, list) else where)


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
    """Parse and validate a JSON body: types, ranges, unknown or unsupported fields, checks across fields.

    Raises:
        APIError: 400 naming the field for invalid JSON, a non-object body, wrong types, bad values, or a field
            chatray does not implement.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = model.model_validate(data)
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
    check_extra_fields(req)
    if hasattr(req, "check_fields"):
        req.check_fields()
    return req


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` object.

    Args:
        choices: ``{"text", "finish_reason", "logprobs"}`` per choice, in index order (``logprobs``: the
            ``content`` list, or None).
    """
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": None if c.get("logprobs") is None else {"content": c["logprobs"]},
                     "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)],
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
               usage: tuple[int, int] | None = None, no_choices: bool = False, *, index: int = 0,
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` (the last one, with ``no_choices``, carries only usage)."""
    choice = {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
              "finish_reason": finish_reason}
    return _chunk("chat.completion.chunk", rid, model, created, choice, usage, no_choices)


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    """A ``text_completion`` object (``choices`` as for :func:`chat_response`, ``logprobs`` the legacy dict)."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": c["text"], "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                    for i, c in enumerate(choices)],
        "usage": _usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     usage: tuple[int, int] | None = None, no_choices: bool = False, *, index: int = 0,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed ``text_completion`` chunk."""
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk("text_completion", rid, model, created, choice, usage, no_choices)
