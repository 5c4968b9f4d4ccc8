"""Per-slot sampling state on the device: each running sequence's settings, seed and token history.

Row ``s`` of every tensor belongs to whichever sequence holds KV-cache slot ``s``. A decode step samples rows
``0..R-1`` through views (no gather, no host round trip); a sequence's row is written once, when its prompt has
been prefilled, and its history then grows on the device as tokens are sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatray.serve.sampling import SamplerPlan, SamplingParams

__all__ = ["SlotState"]


class SlotState:
    """Sampling settings and history for ``slots`` sequences over a ``vocab``-sized vocabulary."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        f32 = {"dtype": torch.float32, "device": device}
        self.temperature = torch.zeros(slots, **f32)
        self.top_p = torch.ones(slots, **f32)
        self.penalty = torch.ones(slots, **f32)
        self.presence = torch.zeros(slots, **f32)
        self.frequency = torch.zeros(slots, **f32)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool, device=device)  # in prompt or output
        self.counts = torch.zeros((slots, vocab), **f32)  # occurrences in the output

    def assign(self, slots: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
               prompts: Sequence[Sequence[int]]) -> None:
        """Start the rows of ``slots`` afresh for sequences whose prompts were just prefilled."""
        dev = slots.device
        floats = torch.tensor([[p.temperature, p.top_p, p.repetition_penalty, p.presence_penalty,
                                p.frequency_penalty] for p in params], dtype=torch.float32).to(dev)
        for i, t in enumerate((self.temperature, self.top_p, self.penalty, self.presence, self.frequency)):
            t.index_copy_(0, slots, floats[:, i])
        longs = torch.tensor([[min(p.top_k, self.vocab), s] for p, s in zip(params, seeds)], dtype=torch.long)
        longs = longs.to(dev)
        self.top_k.index_copy_(0, slots, longs[:, 0])
        self.seed.index_copy_(0, slots, longs[:, 1])
        self.seen.index_fill_(0, slots, False)
        self.counts.index_fill_(0, slots, 0.0)
        rows = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(prompts)]).to(dev)
        cols = torch.tensor([t for p in prompts for t in p], dtype=torch.long).to(dev)
        self.seen[slots.index_select(0, rows), cols] = True

    def rows(self, slots: torch.Tensor | int, plan: SamplerPlan) -> dict[str, torch.Tensor | None]:
        """:func:`~chatray.serve.sampling.sample`'s per-row arguments for ``slots`` (an index tensor: a gather) or
        rows ``0..slots-1`` (views); the history only when ``plan`` has a penalty that reads it."""
        return {"temperature": _pick(self.temperature, slots), "top_k": _pick(self.top_k, slots),
                "top_p": _pick(self.top_p, slots), "repetition_penalty": _pick(self.penalty, slots),
                "presence_penalty": _pick(self.presence, slots), "frequency_penalty": _pick(self.frequency, slots),
                "seen": _pick(self.seen, slots) if plan.repetition else None,
                "counts": _pick(self.counts, slots) if plan.presence_frequency else None}

    def seeds(self, slots: torch.Tensor | int) -> torch.Tensor:
        """The rows' seeds (see :func:`~chatray.serve.sampling.seeded_uniforms`)."""
        return _pick(self.seed, slots)

    def record(self, slots: torch.Tensor | int, tokens: torch.Tensor, seen: bool, count: bool) -> None:
        """Add the sampled ``tokens`` to the rows' history: ``seen`` (for the repetition penalty) and ``count``
        (output counts, for presence and frequency penalties), each only when some row in the batch uses it."""
        if not (seen or count):
            return
        idx = torch.arange(slots, device=tokens.device) if isinstance(slots, int) else slots
        if seen:
            self.seen[idx, tokens] = True
        if count:
            self.counts[idx, tokens] += 1


def _pick(t: torch.Tensor, slots: torch.Tensor | int) -> torch.Tensor:
    return t[:slots] if isinstance(slots, int) else t.index_select(0, slots)
