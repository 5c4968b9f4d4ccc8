"""Conversation -> training rows: template, tokenization, loss mask, and the over-length rule.

Pure Python + ``tokenizers`` (no Ray): the Ray Data pipeline in :mod:`chatray.data.prepare` maps
:func:`encode_batch` over batches of conversations.

Loss mask: a token carries loss when its first character lies inside an assistant span (the assistant's
content and its EOS); every other position gets ``labels = -100``. With ``train_on_all`` every token
carries loss.

Over-length rule (documented in the README): a conversation whose tokens exceed ``max_length`` is split at
message boundaries into consecutive windows of whole messages, each as long as fits. A single message
longer than ``max_length`` becomes its own window, truncated to ``max_length`` tokens. Windows without any
loss-bearing token (e.g. a lone user message) are dropped. Every split, truncation and drop is counted in
the manifest; nothing is lost silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatray.data.tokenizer import render_chat

__all__ = ["IGNORE_INDEX", "EncodeStats", "encode_batch", "encode_conversation"]

IGNORE_INDEX = -100


@dataclass
class EncodeStats:
    """Counts for the manifest."""

    conversations: int = 0
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    split_conversations: int = 0
    truncated_messages: int = 0
    dropped_windows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, other: EncodeStats) -> None:
        for k in ("conversations", "rows", "tokens", "loss_tokens", "split_conversations", "truncated_messages",
                  "dropped_windows"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _windows(msg_tok_starts: np.ndarray, n_tokens: int, max_length: int) -> tuple[list[tuple[int, int]], int]:
    """Greedy windows of whole messages, in token positions; returns (windows, truncated_count)."""
    bounds = [int(b) for b in msg_tok_starts] + [int(n_tokens)]
    windows: list[tuple[int, int]] = []
    truncated = 0
    start = bounds[0]
    for i in range(1, len(bounds)):
        end = bounds[i]
        if end - start <= max_length:
            continue
        prev = bounds[i - 1]
        if prev > start:  # close the window before message i-1
            windows.append((start, prev))
            start = prev
        if end - start > max_length:  # message i-1 alone is too long: truncate it
            windows.append((start, start + max_length))
            truncated += 1
            start = end
    if start < n_tokens:
        windows.append((start, n_tokens))
    return windows, truncated


def encode_conversation(ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]], starts: list[int],
                        max_length: int, stats: EncodeStats) -> list[tuple[np.ndarray, np.ndarray]]:
    """Labels and windows for one already-tokenized conversation.

    Args:
        ids: (T,) token ids of the rendered conversation.
        offsets: (T, 2) character offsets of each token.
        spans: loss-bearing character spans from :func:`render_chat`.
        starts: character offset of each message.
        max_length: the context length rows must fit.
        stats: updated in place.

    Returns:
        A list of (input_ids, labels) int32 arrays, each at most ``max_length`` long.
    """
    tok_start = offsets[:, 0]
    loss = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        loss |= (tok_start >= a) & (tok_start < b)
    labels = np.where(loss, ids, IGNORE_INDEX).astype(np.int32)
    ids = ids.astype(np.int32)
    stats.conversations += 1
    if len(ids) <= max_length:
        pieces = [(0, len(ids))]
    else:
        msg_tok = np.searchsorted(tok_start, np.asarray(starts), side="left")
        pieces, truncated = _windows(msg_tok, len(ids), max_length)
        stats.split_conversations += 1
        stats.truncated_messages += truncated
    out = []
    for a, b in pieces:
        lab = labels[a:b]
        n_loss = int((lab != IGNORE_INDEX).sum())
        if n_loss == 0:
            stats.dropped_windows += 1
            continue
        out.append((ids[a:b], lab))
        stats.rows += 1
        stats.tokens += int(b - a)
        stats.loss_tokens += n_loss
    return out


def encode_batch(backend: Any, conversations: list[list[dict[str, str]]], max_length: int,
                 train_on_all: bool = False) -> tuple[list[np.ndarray], list[np.ndarray], EncodeStats]:
    """Tokenize a batch of conversations with a ``tokenizers.Tokenizer`` (one Rust ``encode_batch`` call).

    Returns:
        (input_ids rows, labels rows, stats).
    """
    rendered = [render_chat(m, train_on_all=train_on_all) for m in conversations]
    encs = backend.encode_batch([r[0] for r in rendered], add_special_tokens=False)
    stats = EncodeStats()
    ids_out: list[np.ndarray] = []
    lab_out: list[np.ndarray] = []
    for (_, spans, starts), enc in zip(rendered, encs):
        ids = np.array(enc.ids, dtype=np.int32)
        offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
        for i, lab in encode_conversation(ids, offsets, spans, starts, max_length, stats):
            ids_out.append(i)
            lab_out.append(lab)
    return ids_out, lab_out, stats
