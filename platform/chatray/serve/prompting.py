"""Turn a validated OpenAI request into prompt token ids and :class:`SamplingParams`, and serve ``/tokenize``.

Runs inside the generator replica (it needs the tokenizer and the model's context length) but imports
no Ray, so unit tests call it directly. Every problem is an :class:`APIError` naming the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Literal

from chatray.serve.sampling import SamplingParams
from chatray.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from chatray.serve.settings import SamplingDefaults

__all__ = ["RequestPlan", "build_prompt", "detokenize", "plan_request", "tokenize"]


@dataclass(frozen=True)
class RequestPlan:
    """What the generator runs for one request.

    Attributes:
        kind: which API the reply takes the shape of.
        prompt_ids: the prompt.
        params: one per choice (``n``); their seeds differ so that the choices do.
        echo: completions' ``echo``: the prompt text that starts every choice's text (None: no echo).
        generate: False for ``max_tokens: 0`` with echo: the one token the engine generates is dropped.
        logprobs: chat: ``top_logprobs`` (0 with plain ``logprobs: true``); completions: ``logprobs``; None: off.
    """

    kind: Literal["chat", "completion"]
    prompt_ids: list[int]
    params: tuple[SamplingParams, ...]
    echo: str | None = None
    generate: bool = True
    logprobs: int | None = None


def _chat_ids(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True,
              add_special_tokens: bool = False) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this checkpoint's tokenizer has no chat template: use /v1/completions",
                       param="messages", code="no_chat_template")
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template error is about these messages, not the server
        raise APIError(400, f"cannot apply the chat template to messages: {e}", param="messages") from None
    # The template already wrote any special tokens as text; do not add BOS/EOS again.
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _completion_ids(tokenizer: Any, req: CompletionRequest, vocab_size: int) -> list[int]:
    ids = req.prompt_ids()
    if ids is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size}), got {bad[0]}", param="prompt")
        return ids
    text = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _logprobs(req: ChatCompletionRequest | CompletionRequest) -> tuple[int | None, int | None]:
    """(alternatives per generated token, alternatives per prompt token), None where not asked for."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None, None
    return req.logprobs, req.logprobs if req.echo else None


def build_prompt(tokenizer: Any, req: ChatCompletionRequest | CompletionRequest, *, context_length: int,
                 vocab_size: int, defaults: SamplingDefaults) -> tuple[list[int], SamplingParams]:
    """Tokenize the request (chat template for chat) and resolve its sampling settings (of its first choice).

    ``max_tokens`` left out means ``min(defaults.max_tokens, room left in the context)``; given explicitly, it
    must fit: prompt + max_tokens over the context is a 400 naming both numbers. ``max_tokens: 0`` (completions
    with echo) runs one token, which the caller drops, as vLLM does.

    Raises:
        APIError: empty prompt, prompt alone too long, prompt + max_tokens over the context, bad token ids.
    """
    if isinstance(req, ChatCompletionRequest):
        ids, field = _chat_ids(tokenizer, req.messages), "messages"
    else:
        ids, field = _completion_ids(tokenizer, req, vocab_size), "prompt"
    if not ids:
        raise APIError(400, f"{field} is empty: it must contain at least one token", param=field)
    room = context_length - len(ids)
    if room < 1:
        raise APIError(400, f"{field} is {len(ids)} tokens, which leaves no room for a reply in the model's "
                       f"context of {context_length} tokens", param=field, code="context_length_exceeded")
    asked = req.requested_max_tokens()
    if asked is None:
        max_tokens = min(defaults.max_tokens, room)
    elif len(ids) + asked > context_length:
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise APIError(400, f"prompt ({len(ids)} tokens) + {name} ({asked}) = {len(ids) + asked} exceeds the "
                       f"model's context of {context_length} tokens", param=name, code="context_length_exceeded")
    else:
        max_tokens = max(asked, 1)
    top_k = defaults.top_k if req.top_k is None else max(req.top_k, 0)  # -1 (vLLM's "off") == 0
    top_k = min(top_k, vocab_size)
    logprobs, prompt_logprobs = _logprobs(req)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=top_k,
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        stop=tuple(req.stop_list()),
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    return ids, params


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index``'s seed: the request's for choice 0 (n=1 replies stay as they were), a hash of both for the
    others, so a seeded request with n > 1 gives the same n different choices every time."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def plan_request(tokenizer: Any, req: ChatCompletionRequest | CompletionRequest, *, context_length: int,
                 vocab_size: int, defaults: SamplingDefaults, max_n: int) -> RequestPlan:
    """Everything the generator needs for one request: :func:`build_prompt` plus ``n``, ``echo`` and logprobs.

    Raises:
        APIError: as :func:`build_prompt`, and ``n`` over ``max_n``.
    """
    if req.n > max_n:
        raise APIError(400, f"n must be at most {max_n} (the server's max_n), got {req.n}", param="n",
                       code="invalid_value")
    ids, params = build_prompt(tokenizer, req, context_length=context_length, vocab_size=vocab_size,
                               defaults=defaults)
    per_choice = tuple(replace(params, seed=choice_seed(params.seed, i)) for i in range(req.n))
    if isinstance(req, ChatCompletionRequest):
        return RequestPlan("chat", ids, per_choice, logprobs=params.logprobs)
    echo = None
    if req.echo:  # the prompt as sent, or its ids decoded as they are (special tokens included)
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[0] if isinstance(req.prompt[0], str) else None
        echo = text if text is not None else tokenizer.decode(ids, skip_special_tokens=False,
                                                              clean_up_tokenization_spaces=False)
    return RequestPlan("completion", ids, per_choice, echo=echo, generate=req.max_tokens != 0,
                       logprobs=params.logprobs)


def tokenize(tokenizer: Any, req: TokenizeRequest, *, context_length: int) -> dict[str, Any]:
    """``POST /tokenize``: ``{count, max_model_len, tokens, token_strs}`` (vLLM's shape).

    A prompt is tokenized as ``/v1/completions`` reads it, messages as ``/v1/chat/completions`` renders them
    (``add_generation_prompt`` true by default), so ``count`` equals the ``usage.prompt_tokens`` they report.

    Raises:
        APIError: messages without a chat template, or a template error.
    """
    special = bool(req.add_special_tokens)
    if req.messages is not None:
        ids = _chat_ids(tokenizer, req.messages, req.add_generation_prompt, special)
    else:
        ids = list(tokenizer(req.prompt or "", add_special_tokens=special)["input_ids"])
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": context_length, "tokens": ids, "token_strs": strs}


def detokenize(tokenizer: Any, req: DetokenizeRequest) -> dict[str, Any]:
    """``POST /detokenize``: ``{prompt}``, the ids decoded as they are (special tokens included).

    Raises:
        APIError: an id outside the tokenizer's vocabulary.
    """
    limit = len(tokenizer)
    bad = [(i, t) for i, t in enumerate(req.tokens) if not 0 <= t < limit]
    if bad:
        raise APIError(400, f"tokens[{bad[0][0]}] = {bad[0][1]} is not a token id: ids are in [0, {limit})",
                       param=f"tokens[{bad[0][0]}]", code="invalid_value")
    return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)}
