"""``chatray data prepare``: dialogue files -> tokenized, sharded Parquet dataset.

Pipeline: read + validate + render the chat template (on the driver, or in Ray tasks for large inputs; exact
error locations) -> seeded shuffle and train/eval split -> train or load the tokenizer -> one Ray Data
``map_batches`` task per shard (scales out across a cluster): tokenize, build the loss masks, compress the shard's
Parquet file -> the driver writes each file to a staging folder as it arrives (one progress line per shard) ->
published atomically (:mod:`chatray.data.publish`). The dataset format itself is :mod:`chatray.data.dataset`.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatray.data.corpus import DEMO_INPUTS
from chatray.data.dataset import DatasetWriter, shard_schema, shard_table
from chatray.data.encode import EncodeStats, encode_rendered, render_batch
from chatray.data.formats import FORMATS
from chatray.data.publish import check_out, publish, staging_folder
from chatray.data.readers import InputFile, Part, PartResult, load_inputs, merge_parts, read_part, split_parts
from chatray.data.tokenizer import load_tokenizer_spec
from chatray.errors import ChatrayError

__all__ = ["DEMO_INPUTS", "prepare_dataset"]

SHARD_CONVERSATIONS = 20_000  # --shards default: about this many train conversations per shard (progress steps)
LOCAL_READ_BYTES = 4 << 20  # inputs up to this size are read by the driver; larger ones by Ray tasks
READ_PARTS_PER_CPU = 4  # reader tasks per cluster CPU for large inputs (balance)


@dataclass(frozen=True)
class _Options:
    """:func:`prepare_dataset`'s options, checked when made."""

    fmt: str
    tokenizer: str
    max_length: int
    eval_fraction: float
    shards: int | None
    seed: int
    train_on_all: bool
    num_workers: int | None
    batch_size: int
    progress: bool

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ChatrayError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ChatrayError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 8:
            raise ChatrayError(f"--max-length must be at least 8, got {self.max_length}")
        if self.shards is not None and self.shards < 1:
            raise ChatrayError(f"--shards must be at least 1, got {self.shards}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ChatrayError(f"--num-workers must be at least 1, got {self.num_workers}")

    def say(self, msg: str) -> None:
        """One progress line on stderr (when ``progress``)."""
        if self.progress:
            print(f"[chatray data] {msg}", file=sys.stderr, flush=True)


@dataclass
class _Timing:
    """Seconds per stage, for the manifest's ``timing_s``."""

    start: float
    read: float = 0.0
    tokenizer: float = 0.0
    ray_start: float = 0.0
    encode: float = 0.0

    def seconds(self) -> dict[str, float]:
        """Each stage and the total so far, to the millisecond."""
        spent = {"read": self.read, "tokenizer": self.tokenizer, "ray_start": self.ray_start, "encode": self.encode,
                 "total": time.perf_counter() - self.start}
        return {k: round(v, 3) for k, v in spent.items()}


_BACKENDS: dict[str, Any] = {}


def _backend(tokenizer_json: str) -> Any:
    """The Rust tokenizer for ``tokenizer_json``, cached per worker process (Ray reuses workers across tasks)."""
    import hashlib

    from tokenizers import Tokenizer

    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _BACKENDS:
        _BACKENDS.clear()
        _BACKENDS[key] = Tokenizer.from_str(tokenizer_json)
    return _BACKENDS[key]


def _encode_shards(batch: Any, tokenizer_json: Any, max_length: int, chunk: int) -> Any:
    """Ray Data ``map_batches`` function: tokenize each shard in ``batch`` into a finished Parquet file.

    Rows hold rendered conversations (``text``, flat ``spans`` pairs, ``starts``) with their ``split`` and
    ``shard``; the driver makes one block per shard, so a batch is normally one shard. Work happens ``chunk``
    conversations at a time (one Parquet row group each) so that memory stays bounded; each zstd-compressed file
    comes back as bytes with its shard's counts, and the driver only writes it.
    """
    import pyarrow as pa

    if not isinstance(tokenizer_json, str):  # an ObjectRef passed through fn_kwargs
        import ray

        tokenizer_json = ray.get(tokenizer_json)
    backend = _backend(tokenizer_json)
    keys = list(zip(batch.column("split").to_pylist(), batch.column("shard").to_pylist()))
    rows = []
    lo = 0
    while lo < len(keys):
        hi = lo
        while hi < len(keys) and keys[hi] == keys[lo]:
            hi += 1
        data, st = _encode_shard(backend, batch.slice(lo, hi - lo), max_length, chunk)
        rows.append({"split": keys[lo][0], "shard": keys[lo][1], "parquet": data, **vars(st)})
        lo = hi
    # large_binary: a shard's file may pass 2 GB when --shards is set low for a big corpus.
    schema = pa.schema([("split", pa.string()), ("shard", pa.int64()), ("parquet", pa.large_binary())]
                       + [(k, pa.int64()) for k in EncodeStats.counters()])
    return pa.Table.from_pylist(rows, schema=schema)


def _encode_shard(backend: Any, block: Any, max_length: int, chunk: int) -> tuple[bytes, EncodeStats]:
    """One shard's rendered conversations as a zstd Parquet file, ``chunk`` conversations per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = EncodeStats()
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, shard_schema(), compression="zstd") as writer:
        for lo in range(0, block.num_rows, chunk):
            part = block.slice(lo, chunk)
            enc = encode_rendered(backend, part.column("text").to_pylist(), part.column("spans").to_pylist(),
                                  part.column("starts").to_pylist(), max_length)
            writer.write_table(shard_table(enc.ids, enc.labels, enc.offsets))
            total.add(enc.stats)
    return sink.getvalue().to_pybytes(), total


@dataclass
class _Inputs:
    """The driver-side result of reading: conversations rendered, shuffled and split (eval rows first)."""

    sources: list[dict[str, Any]]  # per input file (SourceFile fields), for the manifest
    errors: list[str]
    n_eval: int
    table: Any  # pyarrow Table in input order: text large_string, spans list<int32> (flat [start, end) pairs),
    # starts list<int32>
    order: list[int]  # the seeded shuffle: row order[k] of ``table`` is the dataset's k-th (eval rows first)
    tokenizer: Any


def _read_rendered(part: Part, train_on_all: bool) -> tuple[Any, PartResult]:
    """Reader (a Ray task for large inputs): parse one part and render its conversations with the chat template.

    Returns:
        (Arrow table text/spans/starts, the part's result without its conversations); errors come back as values.
    """
    import pyarrow as pa

    res = read_part(part)
    texts, spans, starts = render_batch([c.messages for c in res.conversations], train_on_all)
    res.conversations = []
    return pa.table({"text": pa.array(texts, pa.large_string()), "spans": pa.array(spans, pa.list_(pa.int32())),
                     "starts": pa.array(starts, pa.list_(pa.int32()))}), res


def _read(inputs: list[str], files: list[InputFile], opts: _Options, timing: _Timing,
          cpus: int | None = None) -> _Inputs:
    """Read and render ``files`` here (``cpus`` None) or, cut into runs of lines, in about ``READ_PARTS_PER_CPU``
    Ray tasks per CPU; then merge, shuffle, split and get the tokenizer."""
    if cpus is None:
        parts = split_parts(files, opts.fmt)
        read = [_read_rendered(p, opts.train_on_all) for p in parts]
        timing.read = time.perf_counter() - timing.start
    else:
        import ray

        total_bytes = sum(len(f.data) for f in files)
        parts = split_parts(files, opts.fmt, part_bytes=max(1 << 20, -(-total_bytes // (READ_PARTS_PER_CPU * cpus))))
        t_read = time.perf_counter()
        reader = ray.remote(num_cpus=1)(_read_rendered)
        read = ray.get([reader.remote(p, opts.train_on_all) for p in parts])
        timing.read = time.perf_counter() - t_read
        opts.say(f"read {total_bytes / 1e6:,.1f} MB in {len(parts)} Ray tasks ({timing.read:.1f}s)")
    return _assemble(inputs, files, parts, read, opts, timing)


def _assemble(inputs: list[str], files: list[InputFile], parts: list[Part], read: list[tuple[Any, PartResult]],
              opts: _Options, timing: _Timing) -> _Inputs:
    """Merge the parts in input order, shuffle (seeded), split, and train or load the tokenizer."""
    import pyarrow as pa

    errors: list[str] = []
    sources = merge_parts(files, parts, [r for _, r in read], errors)  # raises the first bad record
    table = pa.concat_tables([t for t, _ in read])
    n = table.num_rows
    if not n:
        raise ChatrayError(f"no valid conversations in {', '.join(map(str, inputs))}",
                           hint="check the files and --format")
    skipped = sum(s.skipped for s in sources)
    opts.say(f"read {n:,} conversations from {len(sources)} files"
             + (f" ({skipped} invalid records skipped)" if skipped else ""))
    n_eval = 0 if opts.eval_fraction == 0 else max(1, round(opts.eval_fraction * n))
    if n_eval >= n:
        raise ChatrayError(f"only {n} conversations: too few for an eval split of {opts.eval_fraction}",
                           hint="add data or pass --eval-fraction 0")
    order = list(range(n))
    random.Random(opts.seed).shuffle(order)
    t_tok = time.perf_counter()
    texts = None
    if opts.tokenizer == "train" or opts.tokenizer.startswith("train:"):
        texts = table.column("text").to_pylist()
    tok = load_tokenizer_spec(opts.tokenizer, None if texts is None else (texts[i] for i in order),
                              max_length=opts.max_length)
    timing.tokenizer = time.perf_counter() - t_tok
    opts.say(f"tokenizer {opts.tokenizer}: vocab {len(tok)} ({timing.tokenizer:.1f}s)")
    return _Inputs([vars(s) for s in sources], errors, n_eval, table, order, tok)


def _start_ray(opts: _Options, timing: _Timing) -> tuple[bool, int]:
    """Connect to RAY_ADDRESS or start a local Ray; returns whether this call started it, and the cluster's CPUs."""
    import logging
    import os

    import ray.data

    from chatray.rayenv import connect

    if not ray.is_initialized():
        # chatray prints one progress line per finished shard; Ray Data's own bars and INFO lines would interleave.
        # A Ray that is already running (a notebook's, a test's) keeps its own settings.
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    t_ray = time.perf_counter()
    started = connect(include_dashboard=False, log_to_driver=False, quiet=True)
    timing.ray_start = time.perf_counter() - t_ray
    if started:
        where = os.environ.get("RAY_ADDRESS")
        opts.say(f"connected to Ray at {where}" if where else f"started a local Ray ({timing.ray_start:.1f}s)")
    return started, max(1, int(ray.cluster_resources().get("CPU", 1)))


def _shard_blocks(loaded: _Inputs, shards: int | None, cpus: int) -> tuple[list[Any], int]:
    """One Arrow block per shard (train then eval, in shuffled order, balanced, none empty), each tagged with its
    ``split`` and ``shard``; returns the blocks and the train shard count."""
    import pyarrow as pa

    n_eval = loaded.n_eval
    n_train = loaded.table.num_rows - n_eval
    shards = shards or cpus * math.ceil(n_train / (cpus * SHARD_CONVERSATIONS))
    shards = max(1, min(shards, n_train))
    eval_shards = max(1, min(shards, 2, n_eval)) if n_eval else 0
    blocks = []
    for split, first, count, n_shards in (("train", n_eval, n_train, shards), ("eval", 0, n_eval, eval_shards)):
        for k in range(n_shards):  # balanced and never empty (n_shards <= count)
            lo, hi = first + k * count // n_shards, first + (k + 1) * count // n_shards
            # take() copies: a slice would ship the whole table's buffers to every task.
            block = loaded.table.take(pa.array(loaded.order[lo:hi], pa.int64()))
            blocks.append(block.append_column("split", pa.repeat(pa.scalar(split), hi - lo))
                          .append_column("shard", pa.repeat(pa.scalar(k, pa.int32()), hi - lo)))
    return blocks, shards


def _tokenize(writer: DatasetWriter, blocks: list[Any], tok: Any, opts: _Options, cpus: int,
              timing: _Timing) -> EncodeStats:
    """Tokenize ``blocks`` with Ray Data (one task per shard) and write each shard's file as it comes back."""
    import ray

    n_conv = {name: info["conversations"] for name, info in writer.splits.items()}
    workers = min(opts.num_workers or cpus, len(blocks))
    tok_ref = ray.put(tok.backend_tokenizer.to_str())
    ds = ray.data.from_arrow(blocks).map_batches(
        _encode_shards, fn_kwargs={"tokenizer_json": tok_ref, "max_length": opts.max_length,
                                   "chunk": opts.batch_size},
        batch_size=None, batch_format="pyarrow", num_cpus=1, compute=ray.data.TaskPoolStrategy(size=workers),
    )
    opts.say(f"tokenizing {n_conv['train']:,} train + {n_conv['eval']:,} eval conversations into {len(blocks)} "
             f"shards, {workers} Ray Data tasks at a time")
    t_enc = time.perf_counter()
    stats = EncodeStats()
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in batch.to_pylist():
            name = writer.add_shard(r["split"], r["shard"], r["parquet"], rows=r["rows"], tokens=r["tokens"],
                                    loss_tokens=r["loss_tokens"])
            stats.add(EncodeStats(**{k: r[k] for k in EncodeStats.counters()}))
            done += 1
            el = max(time.perf_counter() - t_enc, 1e-9)
            opts.say(f"shard {done}/{len(blocks)} written ({name}): {stats.conversations:,}/"
                     f"{sum(n_conv.values()):,} conversations, {stats.tokens:,} tokens "
                     f"({stats.conversations / el:,.0f} conv/s, {stats.tokens / el:,.0f} tokens/s)")
    timing.encode = time.perf_counter() - t_enc
    if done != len(blocks) or stats.conversations != sum(n_conv.values()):
        raise ChatrayError(f"internal error: tokenization returned {done} of {len(blocks)} shards, "
                           f"{stats.conversations} of {sum(n_conv.values())} conversations; nothing was published")
    return stats


def _write(staging: Path, loaded: _Inputs, opts: _Options, cpus: int, timing: _Timing) -> dict[str, Any]:
    """Write the whole dataset into ``staging``; returns its manifest."""
    blocks, shards = _shard_blocks(loaded, opts.shards, cpus)
    n_eval = loaded.n_eval
    writer = DatasetWriter(staging, {"train": loaded.table.num_rows - n_eval, "eval": n_eval})
    loaded.table = None  # the blocks hold copies of what is still needed
    stats = _tokenize(writer, blocks, loaded.tokenizer, opts, cpus, timing)
    writer.save_tokenizer(loaded.tokenizer)
    return writer.write_manifest(loaded.tokenizer, tokenizer_source=opts.tokenizer, max_length=opts.max_length,
                                 seed=opts.seed, train_on_all=opts.train_on_all, stats=stats, shards=shards,
                                 sources=loaded.sources, invalid_examples=loaded.errors[:20],
                                 timing_s=timing.seconds())


def prepare_dataset(
    inputs: list[str],
    out: str,
    *,
    fmt: str = "auto",
    tokenizer: str = "train:8000",
    max_length: int = 512,
    eval_fraction: float = 0.05,
    shards: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    skip_invalid: bool = False,
    train_on_all: bool = False,
    num_workers: int | None = None,
    batch_size: int = 4096,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare a dialogue dataset for training.

    Args:
        inputs: files, folders, or ``chatterbot:LANG`` / ``chatray:founding`` (empty: the demo corpus).
        out: destination folder or ``s3://bucket/prefix``.
        fmt: input format or ``auto``.
        tokenizer: ``train[:VOCAB]``, ``gpt2``, a hub id or a local tokenizer/model folder.
        max_length: the context length (tokens) of each row; see :mod:`chatray.data.encode` for the split rule.
        eval_fraction: share of conversations held out for evaluation (at least one when > 0).
        shards: Parquet files in the train split, each tokenized by one Ray Data task (default: a multiple of the
            cluster's CPUs with about 20,000 conversations or fewer per shard; progress is reported per shard).
        seed: shuffle seed; the same inputs and seed give the same dataset.
        overwrite: replace an existing dataset at ``out``.
        skip_invalid: skip and count bad records instead of failing on the first.
        train_on_all: every token carries loss (default: assistant tokens only).
        num_workers: concurrent tokenizer tasks (default: the cluster's CPUs).
        batch_size: conversations per tokenizer call and Parquet row group.
        progress: print progress to stderr.

    Returns:
        The manifest that was written.

    Raises:
        ChatrayError / DataError: bad inputs, options, or an existing output without ``overwrite``.
    """
    opts = _Options(fmt, tokenizer, max_length, eval_fraction, shards, seed, train_on_all, num_workers, batch_size,
                    progress)
    inputs = list(inputs) or list(DEMO_INPUTS)
    check_out(out, overwrite)
    timing = _Timing(time.perf_counter())
    import ray

    files = load_inputs(inputs, skip_invalid)
    loaded = None
    if sum(len(f.data) for f in files) <= LOCAL_READ_BYTES:  # small: read before Ray starts, so bad input fails fast
        loaded = _read(inputs, files, opts, timing)
    started_ray = False
    try:
        started_ray, cpus = _start_ray(opts, timing)
        if loaded is None:
            loaded = _read(inputs, files, opts, timing, cpus)
        del files  # their bytes are read; the blocks hold what is left to do
        with staging_folder(out) as staging:
            manifest = _write(staging, loaded, opts, cpus, timing)
            publish(staging, out, overwrite)
    finally:
        if started_ray:
            ray.shutdown()
    c = manifest["counts"]
    opts.say(f"wrote {out}: {c['rows']:,} rows, {c['tokens']:,} tokens (train {manifest['splits']['train']['rows']:,}"
             f" / eval {manifest['splits']['eval']['rows']:,}) in {time.perf_counter() - timing.start:.1f}s; "
             f"tokenization {c['tokens'] / max(timing.encode, 1e-9):,.0f} tokens/s")
    return manifest
