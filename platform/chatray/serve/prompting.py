"""Turn a validated OpenAI request into prompt token ids and :class:`SamplingParams`.

Runs inside the generator replica (it needs the tokenizer and the model's context length) but imports
no Ray, so unit tests call it directly. Every problem is an :class:`APIError` naming the field.
"""

from __future__ import annotations

from typing import Any

from chatray.serve.sampling import SamplingParams
from chatray.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest
from chatray.serve.settings import SamplingDefaults

__all__ = ["build_prompt"]


def _chat_ids(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this checkpoint's tokenizer has no chat template: use /v1/completions",
                       param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template error is about these messages, not the server
        raise APIError(400, f"cannot apply the chat template to messages: {e}", param="messages") from None
    # The template already wrote any special tokens as text; do not add BOS/EOS again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _completion_ids(tokenizer: Any, req: CompletionRequest, vocab_size: int) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size}), got {bad[0]}", param="prompt")
        return list(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer: Any, req: ChatCompletionRequest | CompletionRequest, *, context_length: int,
                 vocab_size: int, defaults: SamplingDefaults) -> tuple[list[int], SamplingParams]:
    """Tokenize the request (chat template for chat) and resolve its sampling settings.

    ``max_tokens`` left out means ``min(defaults.max_tokens, room left in the context)``; given explicitly, it
    must fit: prompt + max_tokens over the context is a 400 naming both numbers.

    Raises:
        APIError: empty prompt, prompt alone too long, prompt + max_tokens over the context, bad token ids.
    """
    if isinstance(req, ChatCompletionRequest):
        ids, field = _chat_ids(tokenizer, req), "messages"
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
        max_tokens = asked
    top_k = defaults.top_k if req.top_k is None else max(req.top_k, 0)  # -1 (vLLM's "off") == 0
    top_k = min(top_k, vocab_size)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=top_k,
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        stop=tuple(req.stop_list()),
        seed=req.seed,
        ignore_eos=req.ignore_eos,
    )
    return ids, params
