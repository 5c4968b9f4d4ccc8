"""Helpers for tests of the generation engine: transformers' own greedy reference, and a spy on sampled ids."""

from __future__ import annotations

from typing import Any


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """The ``n`` tokens transformers' ``generate`` picks greedily after ``ids`` (EOS ignored), on the model's device."""
    import torch

    dev = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=dev),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def spy_token_ids(engine: Any) -> dict[str, list[int]]:
    """Record the token ids each request of ``engine`` gets, by request id, as they are sampled (the text alone
    would hide an id that decodes to nothing)."""
    seen: dict[str, list[int]] = {}
    real = engine._consume

    def spy(rows, tokens):
        for s, t in zip(rows, tokens):
            seen.setdefault(s.request_id, []).append(t)
        return real(rows, tokens)

    engine._consume = spy
    return seen
