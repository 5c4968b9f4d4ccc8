"""Packing and padding: every token predicted exactly once, shapes, real-token share (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from chatray.data.dataset import IGNORE_INDEX, read_split_rows
from chatray.train.batches import collate_padded, iter_local_batches, pack_rows, rows_to_batches


def _rows(lengths: list[int], seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 100, n).astype(np.int32) for n in lengths]
    labs = []
    for r in ids:
        lab = r.copy()
        lab[: len(r) // 3] = IGNORE_INDEX  # the user turn carries no loss
        labs.append(lab)
    return ids, labs


@pytest.mark.parametrize("T", [4, 8, 16])
def test_pack_rows_predicts_every_stream_position_once(T):
    ids, labs = _rows([5, 17, 3, 9, 30])
    out = pack_rows(ids, labs, T, pad_id=0)
    stream_ids, stream_labs = np.concatenate(ids), np.concatenate(labs)
    L = len(stream_ids)
    assert out["input_ids"].shape[1] == T + 1
    # Inputs (first T of each block) walk the stream in order: real positions are exactly the stream.
    inputs = out["input_ids"][:, :-1].reshape(-1)
    assert np.array_equal(inputs[:L], stream_ids)
    assert out["n_real"].sum() == L
    # Targets (last T labels of each block) are the stream's labels shifted by one, then padding.
    targets = out["labels"][:, 1:].reshape(-1)
    assert np.array_equal(targets[: L - 1], stream_labs[1:])
    assert (targets[L - 1:] == IGNORE_INDEX).all()
    # Blocks overlap by one token: the last token of a block is the first of the next.
    assert np.array_equal(out["input_ids"][:-1, -1], out["input_ids"][1:, 0])


def test_pack_rows_empty_and_single_token():
    assert pack_rows([], [], 8, 0)["input_ids"].shape == (0, 9)
    assert pack_rows([np.array([5], np.int32)], [np.array([5], np.int32)], 8, 0)["input_ids"].shape == (0, 9)


def test_collate_padded_pads_to_multiple_of_8_and_truncates():
    ids, labs = _rows([5, 20, 11])
    b = collate_padded(ids, labs, pad_id=0, block_size=64)
    assert tuple(b.input_ids.shape) == (3, 24)  # longest row 20 -> 19 inputs -> rounded up to 24
    assert b.n_real == 4 + 19 + 10
    assert (b.targets[0, 4:] == IGNORE_INDEX).all()
    assert b.n_loss == int((b.targets != IGNORE_INDEX).sum())
    short = collate_padded(ids, labs, pad_id=0, block_size=8)
    assert tuple(short.input_ids.shape) == (3, 8)


def test_packed_batches_are_full_and_mostly_real(small_dataset):
    ids, labs = read_split_rows(str(small_dataset), "train")
    packed = list(rows_to_batches(ids, labs, packing="pack", block_size=32, micro_batch_size=4, pad_id=0))
    padded = list(rows_to_batches(ids, labs, packing="pad", block_size=32, micro_batch_size=4, pad_id=0))
    real = lambda bs: sum(b.n_real for b in bs) / sum(b.n_tokens for b in bs)  # noqa: E731
    assert all(b.input_ids.shape[1] == 32 for b in packed)
    assert real(packed) >= 0.95
    assert real(packed) > real(padded)
    # No token lost: packing feeds every real token as an input exactly once and predicts every labelled one
    # (padding too, when rows fit the block; a padded row cannot predict its own first token).
    assert sum(b.n_real for b in packed) == sum(len(r) for r in ids)
    loss_tokens = sum(int((lab != IGNORE_INDEX).sum()) for lab in labs)
    assert sum(b.n_loss for b in packed) == loss_tokens - int(labs[0][0] != IGNORE_INDEX)
    padded64 = rows_to_batches(ids, labs, packing="pad", block_size=64, micro_batch_size=4, pad_id=0)
    assert sum(b.n_loss for b in padded64) == loss_tokens - sum(int(lab[0] != IGNORE_INDEX) for lab in labs)


def test_iter_local_batches_shards_rows_between_ranks(small_dataset):
    kw = dict(packing="pad", block_size=64, micro_batch_size=8, pad_id=0)
    total = sum(b.n_real for b in iter_local_batches(str(small_dataset), "train", **kw))
    split = sum(b.n_real for r in range(2) for b in iter_local_batches(str(small_dataset), "train", rank=r,
                                                                        world_size=2, **kw))
    assert split == total
