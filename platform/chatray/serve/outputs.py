"""What the generation engine hands back: one :class:`StepOutput` per request per step, a finished request's
:class:`Completion`, and :class:`EngineError` when a step fails. Plain dataclasses, shared by the
engine, the asyncio wrapper, the ``n``-choices logic and the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from chatray.serve.logprobs import TokenLogprob

__all__ = ["Completion", "EngineError", "FinishReason", "StepOutput", "gather_outputs"]

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """The engine failed while a request was in flight (e.g. out of memory); the request did not finish."""


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request.

    Attributes:
        request_id: the request.
        delta: new text since the previous output (may be empty: held back for a possible stop string,
            or an incomplete UTF-8 character).
        finish_reason: None while running; ``"stop"`` (EOS or a stop string) or ``"length"`` (max_tokens or
            context full) on the last output.
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated so far (EOS and the token completing a stop string included).
        logprobs: the tokens generated since the previous output, with their logprobs, when the request asked
            for them (every generated token, EOS and a stop string's included, like ``completion_tokens``).
        prompt_logprobs: the prompt tokens' logprobs, on the first output, when the request asked for them.
    """

    request_id: str
    delta: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request: the full text, the exact token counts and any logprobs it asked for."""

    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


def gather_outputs(outputs: Sequence[StepOutput]) -> Completion:
    """One request's outputs, the last of them finished, as one :class:`Completion`."""
    last = outputs[-1]
    assert last.finish_reason is not None
    return Completion(last.request_id, "".join(o.delta for o in outputs), last.finish_reason, last.prompt_tokens,
                      last.completion_tokens, tuple(lp for o in outputs for lp in o.logprobs),
                      next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None))
