"""Log-probabilities: computed from the model's logits, and shaped as OpenAI's two APIs report them.

What is reported is the model's own distribution: ``log_softmax`` of the raw logits over the whole vocabulary at
each position, before temperature, top-k/top-p and penalties reshape it for sampling (vLLM's default,
``logprobs_mode="raw_logprobs"``). So a token's logprob scores the text whatever sampling settings produced it.

Imports only torch: the engine computes :class:`TokenLogprob` entries; the generator, which holds the tokenizer,
turns them into JSON with :class:`LogprobFormatter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LogprobFormatter", "TokenLogprob", "position_logprobs", "prompt_logprobs"]

# JSON has no -inf: OpenAI and vLLM report -9999.0 for a token the model rules out.
_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability and the most likely tokens at that position.

    Attributes:
        token_id: the token (sampled, or the prompt's).
        logprob: its log-probability; None for the first prompt token (nothing precedes it).
        top: up to k ``(token_id, logprob)`` pairs, most likely first.
    """

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def position_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each row's token and its top ``k`` under ``log_softmax(logits)``.

    Args:
        logits: (N, V) raw logits, one row per position.
        tokens: (N,) the token at each position.
        k: alternatives per position (0: none).

    Returns:
        N entries.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = lp.gather(-1, tokens.view(-1, 1).to(lp.device)).squeeze(-1).tolist()  # (N,)
    if k > 0:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (N, k) each
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), float(c), top) for t, c, top in zip(tokens.tolist(), chosen, tops)]


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Score a prompt: ``logits[j]`` (the model's output at position j) predicts ``ids[j + 1]``.

    Args:
        logits: (len(ids), V) logits at every prompt position (the last one's are not used).
        ids: the prompt.
        k: alternatives per position.

    Returns:
        One entry per prompt token; the first has no logprob.
    """
    first = TokenLogprob(int(ids[0]), None)
    if len(ids) == 1:
        return [first]
    targets = torch.tensor(list(ids[1:]), dtype=torch.long, device=logits.device)
    return [first, *position_logprobs(logits[:-1], targets, k)]


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class LogprobFormatter:
    """Turns :class:`TokenLogprob` entries into OpenAI's JSON, for one tokenizer (token texts are cached).

    A token's ``token`` is its own decoded text (a piece of a UTF-8 character decodes to U+FFFD, as in vLLM);
    ``bytes`` are its exact bytes (for a byte-level BPE tokenizer such as GPT-2's, straight from the vocabulary).

    Args:
        tokenizer: the model's tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_of = _bytes_to_unicode()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, utf-8 bytes)`` of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            raw = self._tokenizer.convert_ids_to_tokens(token_id) if self._byte_level else None
            if isinstance(raw, str) and raw and all(c in self._byte_of for c in raw):
                data = [self._byte_of[c] for c in raw]
            else:  # special tokens written as text, other tokenizer kinds
                data = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, data)
        return hit

    def chat(self, entries: Sequence[TokenLogprob], top_logprobs: int) -> list[dict[str, Any]]:
        """``choices[i].logprobs.content``: ``[{token, logprob, bytes, top_logprobs: [...]}]``."""
        out = []
        for e in entries:
            text, data = self.token(e.token_id)
            tops = [{"token": t, "logprob": _num(lp), "bytes": b}
                    for (t, b), lp in ((self.token(i), lp) for i, lp in e.top[:top_logprobs])]
            out.append({"token": text, "logprob": _num(e.logprob), "bytes": data, "top_logprobs": tops})
        return out

    def completion(self, entries: Sequence[TokenLogprob], k: int, offset: int) -> dict[str, list[Any]]:
        """``choices[i].logprobs`` of ``/v1/completions``: ``{tokens, token_logprobs, top_logprobs, text_offset}``.

        Each ``top_logprobs`` dict holds the position's own token and its ``k`` most likely ones (so up to k + 1
        entries, as vLLM reports); it is null where the logprob is (the first prompt token).

        Args:
            entries: positions in order.
            k: the request's ``logprobs``.
            offset: the first token's character offset in the choice's text (the text already sent).
        """
        tokens, logprobs, tops, offsets = [], [], [], []
        for e in entries:
            text, _ = self.token(e.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if e.logprob is None:
                logprobs.append(None)
                tops.append(None)
                continue
            logprobs.append(_num(e.logprob))
            top = {text: _num(e.logprob)}
            for i, lp in e.top[:k]:
                top.setdefault(self.token(i)[0], _num(lp))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _num(lp: float | None) -> float | None:
    return None if lp is None else max(lp, _FLOOR)
