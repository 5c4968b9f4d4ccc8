"""The KV cache a replica allocates once: one slot of ``max_model_len`` positions per running sequence.

A sequence owns its slot from admission to finish. Writes go in place to (slot, position), so a sequence joining
or leaving never moves another's cache; when every slot is taken, new requests wait (they never run the replica
out of memory). Slots are handed out lowest first, so the running sequences stay packed at the front and a
decode step reads the view ``[:rows]`` of the cache without gathering.

Each slot has one extra position past ``max_model_len``: the scratch position. Tokens that must not land in the
cache (padding in a prefill chunk, rows of a decode batch that are not decoding) are written there; attention
never reads it.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import torch

__all__ = ["CacheShape", "KVCache", "cache_slots_for_budget", "gpu_cache_budget"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    """What one slot holds: ``layers`` x (keys, values) x ``heads`` x ``positions`` x ``head_dim``."""

    layers: int
    heads: int
    head_dim: int
    positions: int  # max_model_len: the most tokens (prompt + output) a sequence may reach

    def slot_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one slot (keys and values, every layer, the scratch position included)."""
        elt = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.layers * self.heads * (self.positions + 1) * self.head_dim * elt


def cache_slots_for_budget(shape: CacheShape, dtype: torch.dtype, wanted: int, budget_bytes: int | None) -> int:
    """How many slots to allocate: ``wanted``, or fewer when ``budget_bytes`` cannot hold that many.

    Raises:
        ValueError: the budget does not hold even one slot (the message names both sizes).
    """
    if budget_bytes is None:
        return wanted
    per = shape.slot_bytes(dtype)
    fits = budget_bytes // per
    if fits < 1:
        raise ValueError(f"the KV cache budget ({budget_bytes / 2**20:.1f} MiB) does not hold one sequence of "
                         f"{shape.positions} tokens ({per / 2**20:.1f} MiB): lower max_model_len or raise the budget")
    if fits < wanted:
        logger.warning("[chatray serve] KV cache budget holds %d sequences of %d tokens, not max_batch_size=%d: "
                       "at most %d run at once", fits, shape.positions, wanted, fits)
    return int(min(wanted, fits))


def gpu_cache_budget(device: torch.device, utilization: float, batched_tokens: int, vocab: int, embd: int) -> int:
    """Bytes left for the KV cache on a GPU: ``utilization`` of the card, minus what is allocated now (the
    weights) and a reserve for one step's activations (a full token budget's hidden states and logits)."""
    total = torch.cuda.get_device_properties(device).total_memory
    reserve = batched_tokens * embd * 4 * 16 + batched_tokens * vocab * 4 * 2 + (256 << 20)
    return int(total * utilization) - torch.cuda.memory_allocated(device) - reserve


class KVCache:
    """Per-layer keys and values, each ``(slots, heads, positions + 1, head_dim)``, allocated once.

    Args:
        shape: the per-slot geometry.
        slots: how many sequences can run at once.
        dtype: the model's compute dtype.
        device: where the cache lives.
    """

    def __init__(self, shape: CacheShape, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        if slots < 1:
            raise ValueError(f"a KV cache needs at least one slot, got {slots}")
        self.shape = shape
        self.num_slots = slots
        self.scratch = shape.positions  # the extra position nobody reads
        size = (slots, shape.heads, shape.positions + 1, shape.head_dim)
        # Zeros, not empty: attention multiplies masked positions' values by 0, and 0 * NaN garbage is NaN.
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._used: set[int] = set()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return len(self._used)

    def high_water(self) -> int:
        """One past the highest slot in use (0 when none): decode steps cover slots ``[0, high_water)``."""
        return max(self._used) + 1 if self._used else 0

    def allocate(self) -> int:
        """Take the lowest free slot.

        Raises:
            RuntimeError: no slot is free (the scheduler checks :attr:`free_slots` first).
        """
        if not self._free:
            raise RuntimeError("KV cache full: no free slot")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a finished sequence's slot back; its stale contents are masked until overwritten."""
        if slot in self._used:
            self._used.remove(slot)
            heapq.heappush(self._free, slot)

    def release_all(self) -> None:
        self._free = list(range(self.num_slots))
        self._used.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
