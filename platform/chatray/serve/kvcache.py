"""The KV cache across transformers versions: how to pass it, make it, read it back and edit it.

transformers 5.x names the forward argument ``cache`` where 4.x says ``past_key_values``, and keeps per-layer
tensors in ``cache.layers`` where earlier versions keep ``key_cache``/``value_cache`` lists. The engine edits the
cache in place (rows join and leave a running batch), so it goes through these helpers only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["cache_kwarg", "cache_tensors", "new_cache", "returned_cache", "set_cache_tensors"]


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name of the model's forward argument that takes the KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache() -> Any:
    """An empty cache for a prefill."""
    from transformers import DynamicCache

    return DynamicCache()


def returned_cache(out: Any) -> Any:
    """The cache a forward pass returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, heads, T, head_dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


def set_cache_tensors(cache: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace every layer's (keys, values) in place.

    Raises:
        TypeError: a cache type without per-layer tensors to replace (legacy tuple caches).
    """
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
    elif hasattr(cache, "key_cache"):
        cache.key_cache[:] = [k for k, _ in kv]
        cache.value_cache[:] = [v for _, v in kv]
    else:  # pragma: no cover - the supported versions return DynamicCache objects
        raise TypeError(f"unsupported KV cache type {type(cache).__name__}")
