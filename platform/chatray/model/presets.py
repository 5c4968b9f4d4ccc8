"""Model presets: ``tiny`` is a GPT-2 built from a config (random init, offline); the rest are hub ids.

``tiny`` takes its vocabulary from the dataset's tokenizer and its context from the block size, so a tiny
model always matches the data it is trained on. Hub presets are plain aliases: any hub id or local folder
of a GPT-2-family causal LM works the same way (``model.name: ./my-gpt2``).

No torch/transformers import at module level: the CLI and config validation use this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GPT2Config

__all__ = ["GPT2_ARCH", "HUB_PRESETS", "TINY", "TinyPreset", "is_tiny", "tiny_config"]


@dataclass(frozen=True)
class TinyPreset:
    """Shape of the ``tiny`` GPT-2 (about 3.5M parameters with an 8k vocabulary)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256


TINY = TinyPreset()

# Hub ids of the named presets (the hub serves them under these short names, and so do local HF caches that
# `chatray data prepare --tokenizer gpt2` filled); any other hub id or folder also works.
HUB_PRESETS: dict[str, str] = {name: name for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}

# Architectures of the hub presets, for building them from a config (benchmarks, no download):
# (n_layer, n_head, n_embd, n_positions, vocab_size).
GPT2_ARCH: dict[str, tuple[int, int, int, int, int]] = {
    "gpt2": (12, 12, 768, 1024, 50257),
    "gpt2-medium": (24, 16, 1024, 1024, 50257),
    "gpt2-large": (36, 20, 1280, 1024, 50257),
    "gpt2-xl": (48, 25, 1600, 1024, 50257),
}


def is_tiny(name: str) -> bool:
    """Whether ``name`` is the random-init ``tiny`` preset."""
    return name == "tiny"


def tiny_config(vocab_size: int, block_size: int, *, eos_token_id: int, n_layer: int | None = None,
                n_head: int | None = None, n_embd: int | None = None, dropout: float | None = None,
                arch: str | None = None, **extra: Any) -> GPT2Config:
    """A ``GPT2Config`` for a model built from scratch.

    Args:
        vocab_size: the tokenizer's size (``len(tokenizer)``).
        block_size: context length (``n_positions``).
        eos_token_id: end-of-turn token (also BOS).
        n_layer, n_head, n_embd: override the tiny preset's shape.
        dropout: residual/embedding/attention dropout (default 0.0).
        arch: build the shape of a hub preset instead (``gpt2``...), e.g. for benchmarks.

    Returns:
        The config, with SDPA attention selected.
    """
    from transformers import GPT2Config

    if arch is not None:
        L, H, E, _, _ = GPT2_ARCH[arch]
    else:
        L, H, E = TINY.n_layer, TINY.n_head, TINY.n_embd
    L, H, E = n_layer or L, n_head or H, n_embd or E
    p = 0.0 if dropout is None else dropout
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=L, n_head=H, n_embd=E,
                     resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, bos_token_id=eos_token_id,
                     eos_token_id=eos_token_id, pad_token_id=eos_token_id, **extra)
    cfg._attn_implementation = "sdpa"
    return cfg
