"""Vocabulary padding: the embedding and output layer rounded up to a multiple of N rows while training.

GPT-2's 50,257 tokens make the output matmul (about a third of the model's FLOPs at 124M) a shape GPU tensor
cores handle badly; 50,304 (a multiple of 128) runs it at full speed. The extra rows are zeros that no input
ever selects and whose logits the loss slices away (:class:`chatray.train.step.TrainStep`), so they get no
gradient and the loss is the same math. Everything that leaves the training process -- saved weights,
``config.json``, sampled tokens -- sees the tokenizer-sized vocabulary through :func:`unpadded_vocab`.

No torch import at module level (the model package stays cheap to import).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from chatray.errors import ChatrayError

if TYPE_CHECKING:
    import torch

__all__ = ["pad_vocab", "padded_rows", "padded_vocab_size", "real_vocab_size", "unpadded_vocab"]

# Set on a padded model: its tokenizer-sized vocabulary (the config then holds the padded size).
_REAL_VOCAB_ATTR = "_chatray_real_vocab_size"


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (1 leaves it as is)."""
    return -(-vocab_size // multiple) * multiple


def real_vocab_size(model: Any) -> int:
    """The tokenizer-sized vocabulary of ``model``: its config's unless :func:`pad_vocab` padded it."""
    return int(getattr(model, _REAL_VOCAB_ATTR, model.config.vocab_size))


def _tied_layers(model: Any) -> tuple[Any, Any]:
    """The input embedding and output layer, which must share one weight matrix."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not emb.weight or getattr(out, "bias", None) is not None:
        raise ChatrayError(f"cannot pad the vocabulary of {type(model).__name__}: it needs one weight matrix "
                           "shared by the input embedding and a bias-free output layer",
                           hint="set model.pad_vocab_multiple: 1")
    return emb, out


def _set_weight(model: Any, emb: Any, out: Any, weight: torch.nn.Parameter, vocab_size: int) -> None:
    emb.weight = weight
    out.weight = weight
    emb.num_embeddings = vocab_size
    if hasattr(out, "out_features"):
        out.out_features = vocab_size
    model.config.vocab_size = vocab_size


def pad_vocab(model: Any, multiple: int) -> int:
    """Pad ``model``'s tied embedding/output matrix in place with zero rows up to a multiple of ``multiple``.

    Call it before the model is wrapped for data parallelism or handed to an optimizer (it replaces the
    weight Parameter). Padding a padded model again re-pads from its tokenizer-sized rows.

    Args:
        model: a Hugging Face causal LM with tied input/output embeddings (GPT-2 family).
        multiple: the row multiple (128 on GPUs); 1 means no padding.

    Returns:
        The vocabulary size the model now computes logits for.

    Raises:
        ChatrayError: the embeddings are not tied, or the output layer has a bias.
        ValueError: ``multiple`` < 1.
    """
    import torch

    if multiple < 1:
        raise ValueError(f"the padding multiple must be >= 1, got {multiple}")
    real = real_vocab_size(model)
    size = padded_vocab_size(real, multiple)
    if size == model.config.vocab_size:
        return size
    emb, out = _tied_layers(model)
    old = emb.weight
    with torch.no_grad():
        new = torch.zeros(size, old.shape[1], dtype=old.dtype, device=old.device)
        new[:real] = old[:real]
    _set_weight(model, emb, out, torch.nn.Parameter(new, requires_grad=old.requires_grad), size)
    setattr(model, _REAL_VOCAB_ATTR, real)
    return size


def padded_rows(model: Any) -> torch.nn.Parameter | None:
    """The padded weight matrix of ``model`` (rows beyond :func:`real_vocab_size` are padding), or None."""
    if real_vocab_size(model) == model.config.vocab_size:
        return None
    return model.get_input_embeddings().weight


@contextlib.contextmanager
def unpadded_vocab(model: Any) -> Iterator[Any]:
    """Within the block ``model`` has its tokenizer-sized vocabulary (saving, sampling); then padded again.

    The trimmed weight is a copy without gradient: use the block for saving or inference, not for training.
    An unpadded model passes through unchanged.
    """
    if not hasattr(model, _REAL_VOCAB_ATTR) or real_vocab_size(model) == model.config.vocab_size:
        yield model
        return
    real, size = real_vocab_size(model), model.config.vocab_size
    import torch

    emb, out = _tied_layers(model)
    full = emb.weight
    _set_weight(model, emb, out, torch.nn.Parameter(full.detach()[:real].clone(), requires_grad=False), real)
    try:
        yield model
    finally:
        _set_weight(model, emb, out, full, size)
