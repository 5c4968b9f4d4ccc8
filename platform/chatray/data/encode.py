"""Conversation -> training rows: template, tokenization, loss mask, and the over-length rule.

Pure Python + ``tokenizers`` (no Ray): the Ray Data pipeline in :mod:`chatray.data.prepare` maps
:func:`encode_rendered` over blocks of rendered conversations.

Loss mask: a token carries loss when its first character lies inside an assistant span (the assistant's
content and its EOS); every other position gets ``labels = -100``. With ``train_on_all`` every token
carries loss.

Over-length rule (each manifest states it in ``over_length_rule``): a conversation whose tokens exceed
``max_length`` is split at message boundaries into consecutive windows of whole messages, each as long as fits.
A single message longer than ``max_length`` becomes its own window, truncated to ``max_length`` tokens. Windows
without any loss-bearing token (e.g. a lone user message) are dropped. Every split, truncation and drop is counted
in the manifest; nothing is lost silently.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from chatray.data.dataset import IGNORE_INDEX
from chatray.data.tokenizer import render_chat

__all__ = ["EncodeStats", "EncodedRows", "encode_batch", "encode_rendered", "render_batch"]


@dataclass
class EncodeStats:
    """Counts for the manifest (every field is a counter)."""

    conversations: int = 0
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    split_conversations: int = 0
    truncated_messages: int = 0
    dropped_windows: int = 0

    def add(self, other: EncodeStats) -> None:
        """Add ``other``'s counts to these."""
        for k in self.counters():
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @classmethod
    def counters(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in fields(cls))


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


def _first_token_at(enc: Any, pos: int, n_chars: int, n_tokens: int) -> int:
    """Index of the first token of ``enc`` whose first character is at or after ``pos`` (``n_tokens`` if none).

    Asks the Rust ``Encoding`` about a few tokens around ``pos`` instead of copying every token's offsets into
    Python (the offsets copy cost more than the tokenization itself).
    """
    if pos >= n_chars:
        return n_tokens
    k = enc.char_to_token(pos)
    if k is None:  # a character no token claims: binary search on token starts
        lo, hi = 0, n_tokens
        while lo < hi:
            mid = (lo + hi) // 2
            if enc.token_to_chars(mid)[0] < pos:
                lo = mid + 1
            else:
                hi = mid
        return lo
    while k > 0 and enc.token_to_chars(k - 1)[0] >= pos:
        k -= 1
    while k < n_tokens and enc.token_to_chars(k)[0] < pos:
        k += 1
    return k


@dataclass
class EncodedRows:
    """Rows of a batch as flat buffers: row ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` (same for labels)."""

    ids: np.ndarray  # int32, all rows concatenated
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss
    offsets: np.ndarray  # int64, len(rows) + 1
    stats: EncodeStats

    def rows(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(input_ids rows, labels rows) as views into the flat buffers."""
        o = self.offsets
        return ([self.ids[o[i]:o[i + 1]] for i in range(len(o) - 1)],
                [self.labels[o[i]:o[i + 1]] for i in range(len(o) - 1)])


def encode_rendered(backend: Any, texts: list[str], spans: list[list[int]], starts: list[list[int]],
                    max_length: int) -> EncodedRows:
    """Tokenize rendered conversations (one Rust ``encode_batch`` call) into training rows.

    Args:
        backend: a ``tokenizers.Tokenizer``.
        texts: rendered conversations (:func:`chatray.data.tokenizer.render_chat`).
        spans: per conversation, the character spans whose tokens carry loss as flat ``[start, end)`` pairs
            (``[s0, e0, s1, e1, ...]``: the form they are stored in between the pipeline's stages).
        starts: per conversation, the character offset of each message (split points for over-long ones).
        max_length: the context length rows must fit.
    """
    from itertools import chain

    encs = backend.encode_batch(texts, add_special_tokens=False)
    id_lists = [e.ids for e in encs]
    n_tok = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(encs))
    conv_off = np.zeros(len(encs) + 1, dtype=np.int64)
    np.cumsum(n_tok, out=conv_off[1:])
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(conv_off[-1]))
    del id_lists
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    stats = EncodeStats(conversations=len(encs))
    cuts: list[int] = []  # row boundaries, in flat positions: [s0, e0, s1, e1, ...]
    for i, enc in enumerate(encs):
        o, n, n_chars = int(conv_off[i]), int(n_tok[i]), len(texts[i])
        sp = spans[i]
        for j in range(0, len(sp), 2):
            ta = o + _first_token_at(enc, sp[j], n_chars, n)
            tb = o + _first_token_at(enc, sp[j + 1], n_chars, n)
            labels[ta:tb] = ids[ta:tb]
        if n <= max_length:
            cuts += (o, o + n)
            continue
        msg_tok = np.array([_first_token_at(enc, s, n_chars, n) for s in starts[i]], dtype=np.int64)
        pieces, truncated = _windows(msg_tok, n, max_length)
        stats.split_conversations += 1
        stats.truncated_messages += truncated
        for a, b in pieces:
            cuts += (o + a, o + b)
    cut = np.array(cuts, dtype=np.int64).reshape(-1, 2)
    loss_cs = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(labels != IGNORE_INDEX, out=loss_cs[1:])
    n_loss = loss_cs[cut[:, 1]] - loss_cs[cut[:, 0]]
    keep_rows = n_loss > 0  # a window without any loss-bearing token teaches nothing: dropped, counted
    stats.dropped_windows = int((~keep_rows).sum())
    cut = cut[keep_rows]
    lengths = cut[:, 1] - cut[:, 0]
    if len(cut) != len(encs) or len(ids) != int(lengths.sum()):  # some rows are windows: gather them
        keep = np.zeros(len(ids) + 1, dtype=np.int64)
        np.add.at(keep, cut[:, 0], 1)
        np.add.at(keep, cut[:, 1], -1)
        mask = np.cumsum(keep[:-1]) > 0
        ids, labels = ids[mask], labels[mask]
    offsets = np.zeros(len(cut) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stats.rows = len(cut)
    stats.tokens = int(offsets[-1])
    stats.loss_tokens = int(n_loss[keep_rows].sum())
    return EncodedRows(ids, labels, offsets, stats)


def render_batch(conversations: list[list[dict[str, str]]],
                 train_on_all: bool = False) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Render message lists for :func:`encode_rendered`: (texts, flat loss spans, message starts)."""
    texts, spans, starts = [], [], []
    for messages in conversations:
        text, sp, st = render_chat(messages, train_on_all=train_on_all)
        texts.append(text)
        spans.append([x for ab in sp for x in ab])
        starts.append(st)
    return texts, spans, starts


def encode_batch(backend: Any, conversations: list[list[dict[str, str]]], max_length: int,
                 train_on_all: bool = False) -> tuple[list[np.ndarray], list[np.ndarray], EncodeStats]:
    """Render and tokenize a batch of conversations (message lists); see :func:`encode_rendered`.

    Returns:
        (input_ids rows, labels rows, stats).
    """
    out = encode_rendered(backend, *render_batch(conversations, train_on_all), max_length)
    ids, labels = out.rows()
    return ids, labels, out.stats
