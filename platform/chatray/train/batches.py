"""Rows of a prepared dataset -> fixed-shape training batches (packed or padded).

Packing concatenates rows (each one conversation, assistant turns ending in EOS) into a token stream cut
into blocks of ``block_size + 1`` tokens that overlap by one, so every token is predicted exactly once and
only the last block of each packing batch is padded. Padding keeps one row per sequence, padded to the
longest row of the micro-batch (rounded up to a multiple of 8).

The same functions serve the Ray Train workers (via Ray Data ``map_batches`` and :class:`ShardStream`)
and the Ray-free paths (``benchmarks/gpu_train.py``, unit tests, the plain-PyTorch baseline). Only numpy
and pyarrow at module level; torch is imported where batches become tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from chatray.data.dataset import IGNORE_INDEX, as_int32_rows, read_split_rows
from chatray.errors import ChatrayError

if TYPE_CHECKING:
    import ray.data
    import torch

__all__ = [
    "Batch",
    "ShardStream",
    "collate_padded",
    "dummy_batch",
    "iter_local_batches",
    "make_train_dataset",
    "pack_rows",
    "packed_batch",
    "rows_to_batches",
]


@dataclass
class Batch:
    """One micro-batch, already shifted for next-token prediction."""

    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where no loss
    n_real: int  # input positions holding data (not padding)
    n_loss: int  # positions with a target

    @property
    def n_tokens(self) -> int:
        """Input positions processed, padding included."""
        return int(self.input_ids.numel())

    def to(self, device: Any) -> Batch:
        """The batch on ``device`` (non-blocking copy from pinned memory where possible)."""
        nb = getattr(device, "type", str(device)) == "cuda"
        return Batch(self.input_ids.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                     self.n_real, self.n_loss)


def pack_rows(input_ids: Sequence[Any], labels: Sequence[Any], block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate rows and cut them into overlapping blocks of ``block_size + 1`` tokens.

    Block ``i`` holds stream positions ``[i*T, i*T + T + 1)``; its inputs are the first ``T`` tokens and its
    targets the last ``T`` labels, so consecutive blocks predict disjoint positions and no token is lost.
    The final block is padded (pad inputs, ``-100`` labels).

    Returns:
        ``input_ids`` and ``labels`` of shape (N, T + 1) int32, and ``n_real`` (N,) int32: input positions
        that hold data.
    """
    T = block_size
    rows = as_int32_rows(input_ids)
    labs = as_int32_rows(labels)
    empty = {"input_ids": np.zeros((0, T + 1), np.int32), "labels": np.zeros((0, T + 1), np.int32),
             "n_real": np.zeros((0,), np.int32)}
    if not rows:
        return empty
    ids = np.concatenate(rows)
    lab = np.concatenate(labs)
    L = len(ids)
    if L < 2:
        return empty
    n = (L - 1 + T - 1) // T  # blocks needed so that positions 1..L-1 are all targets
    need = n * T + 1
    ids = np.concatenate([ids, np.full(need - L, pad_id, np.int32)])
    lab = np.concatenate([lab, np.full(need - L, IGNORE_INDEX, np.int32)])
    idx = np.arange(n)[:, None] * T + np.arange(T + 1)[None, :]  # (N, T+1)
    n_real = np.minimum(T, L - np.arange(n) * T).astype(np.int32)
    return {"input_ids": ids[idx], "labels": lab[idx], "n_real": n_real}


def _pack_batch(batch: dict[str, np.ndarray], block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: a batch of rows -> a batch of packed blocks."""
    return pack_rows(batch["input_ids"], batch["labels"], block_size, pad_id)


def packed_batch(input_ids: np.ndarray, labels: np.ndarray, n_real: np.ndarray | None = None) -> Batch:
    """Blocks of ``T + 1`` tokens (from :func:`pack_rows`) -> a shifted :class:`Batch`."""
    import torch

    if input_ids.dtype == object:  # list columns arrive as arrays of rows
        input_ids, labels = np.stack(list(input_ids)), np.stack(list(labels))
    ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    x, y = ids[:, :-1], lab[:, 1:]
    real = int(n_real.sum()) if n_real is not None else int(x.numel())
    return Batch(x.contiguous(), y.contiguous(), real, int((y != IGNORE_INDEX).sum()))


def collate_padded(input_ids: Sequence[Any], labels: Sequence[Any], pad_id: int, block_size: int,
                   multiple_of: int = 8) -> Batch:
    """One row per sequence, right-padded to the longest row (inputs a multiple of ``multiple_of``).

    Rows longer than ``block_size + 1`` tokens are truncated. Causal attention means real tokens never
    attend to the padding after them, so no attention mask is needed.
    """
    rows = [r[: block_size + 1] for r in as_int32_rows(input_ids)]
    labs = [r[: block_size + 1] for r in as_int32_rows(labels)]
    longest = max((len(r) for r in rows), default=2)
    width = min(block_size, -(-max(longest - 1, 1) // multiple_of) * multiple_of) + 1
    ids = np.full((len(rows), width), pad_id, np.int32)
    lab = np.full((len(rows), width), IGNORE_INDEX, np.int32)
    for i, (r, lb) in enumerate(zip(rows, labs)):
        ids[i, : len(r)] = r
        lab[i, : len(lb)] = lb
    n_real = np.array([max(len(r) - 1, 0) for r in rows], np.int32)
    return packed_batch(ids, lab, n_real)


def dummy_batch(like: Batch | None, micro_batch_size: int, block_size: int, pad_id: int) -> Batch:
    """A batch with no targets: lets a worker whose data ran out join the gradient all-reduce with zeros."""
    import torch

    shape = tuple(like.input_ids.shape) if like is not None else (micro_batch_size, block_size)
    return Batch(torch.full(shape, pad_id, dtype=torch.int64), torch.full(shape, IGNORE_INDEX, dtype=torch.int64),
                 0, 0)


def rows_to_batches(input_ids: Sequence[Any], labels: Sequence[Any], *, packing: Literal["pack", "pad"],
                    block_size: int, micro_batch_size: int, pad_id: int, pack_rows_per_batch: int = 1024,
                    ) -> Iterator[Batch]:
    """Rows -> micro-batches exactly as the Ray path builds them (packing ``pack_rows_per_batch`` rows at a time)."""
    rows = as_int32_rows(input_ids)
    labs = as_int32_rows(labels)
    if packing == "pad":
        for i in range(0, len(rows), micro_batch_size):
            yield collate_padded(rows[i: i + micro_batch_size], labs[i: i + micro_batch_size], pad_id, block_size)
        return
    pending: dict[str, list[np.ndarray]] = {"input_ids": [], "labels": [], "n_real": []}
    have = 0
    for i in range(0, len(rows), pack_rows_per_batch):
        p = pack_rows(rows[i: i + pack_rows_per_batch], labs[i: i + pack_rows_per_batch], block_size, pad_id)
        for k in pending:
            pending[k].append(p[k])
        have += len(p["n_real"])
        while have >= micro_batch_size:
            cat = {k: np.concatenate(v) for k, v in pending.items()}
            yield packed_batch(cat["input_ids"][:micro_batch_size], cat["labels"][:micro_batch_size],
                               cat["n_real"][:micro_batch_size])
            pending = {k: [cat[k][micro_batch_size:]] for k in cat}
            have -= micro_batch_size
    if have:
        cat = {k: np.concatenate(v) for k, v in pending.items()}
        yield packed_batch(cat["input_ids"], cat["labels"], cat["n_real"])


def iter_local_batches(dataset_uri: str, split: str = "train", *, packing: Literal["pack", "pad"] = "pack",
                       block_size: int, micro_batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1,
                       pack_rows_per_batch: int = 1024) -> Iterator[Batch]:
    """One epoch of micro-batches read straight from Parquet (no Ray); rows ``rank::world_size``."""
    ids, labs = read_split_rows(dataset_uri, split)
    yield from rows_to_batches(ids[rank::world_size], labs[rank::world_size], packing=packing,
                               block_size=block_size, micro_batch_size=micro_batch_size, pad_id=pad_id,
                               pack_rows_per_batch=pack_rows_per_batch)


def _local_blocks(dataset_uri: str, *, packing: str, block_size: int, pad_id: int, rows_per_block: int,
                  pack_rows_per_batch: int, manifest: dict[str, Any] | None) -> list[Any]:
    """The train split read and packed here, cut into Arrow tables of ``rows_per_block`` rows."""
    import pyarrow as pa

    ids, labs = read_split_rows(dataset_uri, "train", manifest)
    if packing == "pack":
        parts = [pack_rows(ids[i: i + pack_rows_per_batch], labs[i: i + pack_rows_per_batch], block_size, pad_id)
                 for i in range(0, len(ids), pack_rows_per_batch)]
        ids = [r for p in parts for r in p["input_ids"]]
        labs = [r for p in parts for r in p["labels"]]
        n_real = np.concatenate([p["n_real"] for p in parts]) if parts else np.zeros(0, np.int32)
    tables = []
    for i in range(0, len(ids), rows_per_block):
        cols = {"input_ids": pa.array([r.tolist() for r in ids[i: i + rows_per_block]], pa.list_(pa.int32())),
                "labels": pa.array([r.tolist() for r in labs[i: i + rows_per_block]], pa.list_(pa.int32()))}
        if packing == "pack":
            cols["n_real"] = pa.array(n_real[i: i + rows_per_block], pa.int32())
        tables.append(pa.table(cols))
    return tables


def make_train_dataset(dataset_uri: str, *, packing: Literal["pack", "pad"], block_size: int, pad_id: int,
                       rows_per_block: int, pack_rows_per_batch: int = 1024, manifest: dict[str, Any] | None = None,
                       in_memory: bool = False) -> ray.data.Dataset:
    """The train split as a Ray Dataset, packed when asked, in blocks of ``rows_per_block`` rows.

    Blocks hold one optimizer step's share of a worker: the split hands them to workers in turn, so workers
    get equal shares (within one block) and N workers together see, step by step, the same sequences as one
    worker with the same global batch.

    Args:
        in_memory: for small splits: read and pack here and put the blocks straight into the object store
            (no Ray Data tasks, so no start-up cost; every epoch and restart reuses them). Otherwise the split
            streams through ``ray.data.read_parquet`` -> ``map_batches`` (packing, as Ray Data tasks that
            scale out with the cluster) -> ``repartition``, re-read each epoch.
    """
    import ray.data

    from chatray.data.dataset import split_files
    from chatray.storage.uri import filesystem_for

    if in_memory:
        ds = ray.data.from_arrow(_local_blocks(dataset_uri, packing=packing, block_size=block_size, pad_id=pad_id,
                                               rows_per_block=rows_per_block,
                                               pack_rows_per_batch=pack_rows_per_batch, manifest=manifest))
        ds.context.enable_progress_bars = False  # training logs its own progress
        return ds
    files = split_files(dataset_uri, "train", manifest)
    if not files:
        raise ChatrayError(f"{dataset_uri}: the train split has no files")
    fs, _ = filesystem_for(files[0])
    paths = [filesystem_for(f)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["input_ids", "labels"])
    ds.context.execution_options.preserve_order = True  # same blocks in the same order on every run
    ds.context.enable_progress_bars = False  # training logs its own progress
    if packing == "pack":
        ds = ds.map_batches(_pack_batch, fn_kwargs={"block_size": block_size, "pad_id": pad_id},
                            batch_size=pack_rows_per_batch, batch_format="numpy")
    return ds.repartition(target_num_rows_per_block=rows_per_block)


class ShardStream:
    """Micro-batches from one worker's dataset shard, one epoch at a time, resumable by position.

    :meth:`next` returns None once this worker's share of the epoch is used up; the caller starts the next
    epoch only when every worker is out (Ray Data's split starts epochs in lock-step).

    Args:
        shard: the worker's ``ray.train.get_dataset_shard("train")`` (rows as :func:`make_train_dataset` made them).
        epoch, skip: where to continue: the epoch, and the micro-batches of it already consumed.
    """

    def __init__(self, shard: Any, *, micro_batch_size: int, packing: Literal["pack", "pad"], block_size: int,
                 pad_id: int, epoch: int = 0, skip: int = 0) -> None:
        self.shard = shard
        self.micro_batch_size = micro_batch_size
        self.packing = packing
        self.block_size = block_size
        self.pad_id = pad_id
        self.epoch = epoch
        self.pulled = 0  # micro-batch requests in this epoch (same on every rank)
        self._skip = skip
        self._it: Any = None
        self._done = False

    def _open(self) -> None:
        self._it = iter(self.shard.iter_batches(batch_size=self.micro_batch_size, batch_format="numpy",
                                                prefetch_batches=2, drop_last=False))
        skipped = 0
        while skipped < self._skip and not self._done:
            try:
                next(self._it)
            except StopIteration:
                self._done = True
            skipped += 1
        self.pulled = self._skip
        self._skip = 0

    def next(self) -> Batch | None:
        """The next micro-batch of this epoch, or None when this worker's share is used up."""
        if self._it is None:
            self._open()
        self.pulled += 1
        if self._done:
            return None
        try:
            raw = next(self._it)
        except StopIteration:
            self._done = True
            return None
        if self.packing == "pack":
            return packed_batch(raw["input_ids"], raw["labels"], raw["n_real"])
        return collate_padded(raw["input_ids"], raw["labels"], self.pad_id, self.block_size)

    def next_epoch(self) -> None:
        """Start the next epoch (the shard is iterated afresh)."""
        self.epoch += 1
        self.pulled = 0
        self._it = None
        self._done = False
