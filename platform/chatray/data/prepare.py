"""``chatray data prepare``: dialogue files -> tokenized, sharded Parquet dataset.

Pipeline: read + validate on the driver (exact error locations) -> seeded shuffle and train/eval split ->
render the chat template -> train or load the tokenizer -> one Ray Data ``map_batches`` task per shard
(scales out across a cluster): tokenize, build the loss masks, compress the shard's Parquet file -> the
driver writes each file to a staging folder as it arrives (one progress line per shard) -> published
atomically (local: one rename; S3: ``manifest.json`` uploaded last, so readers never see half a dataset).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatray import __version__
from chatray.data.corpus import DEMO_INPUTS
from chatray.data.dataset import FORMAT_VERSION, MANIFEST
from chatray.data.encode import EncodeStats, render_batch
from chatray.data.readers import FORMATS, InputFile, Part, PartResult, load_inputs, merge_parts, read_part, split_parts
from chatray.data.tokenizer import CHAT_TEMPLATE, load_tokenizer_spec, tokenizer_fingerprint
from chatray.errors import ChatrayError
from chatray.storage.uri import exists, filesystem_for, is_remote, join

__all__ = ["DEMO_INPUTS", "prepare_dataset"]

SHARD_CONVERSATIONS = 20_000  # --shards default: about this many train conversations per shard (progress steps)
LOCAL_READ_BYTES = 4 << 20  # inputs up to this size are read by the driver; larger ones by Ray tasks
READ_PARTS_PER_CPU = 4  # reader tasks per cluster CPU for large inputs (balance)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[chatray data] {msg}", file=sys.stderr, flush=True)


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


def _shard_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("length", pa.int32())])


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
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatray.data.encode import encode_rendered

    total = EncodeStats()
    sink = pa.BufferOutputStream()
    schema = _shard_schema()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for lo in range(0, block.num_rows, chunk):
            part = block.slice(lo, chunk)
            enc = encode_rendered(backend, part.column("text").to_pylist(), part.column("spans").to_pylist(),
                                  part.column("starts").to_pylist(), max_length)
            offsets = pa.array(enc.offsets.astype(np.int32))
            writer.write_table(pa.table({
                "input_ids": pa.ListArray.from_arrays(offsets, pa.array(enc.ids)),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(enc.labels)),
                "length": pa.array(enc.lengths),
            }, schema=schema))
            total.add(enc.stats)
    return sink.getvalue().to_pybytes(), total


def _check_out(out: str, overwrite: bool) -> None:
    if not exists(out):
        return
    if is_remote(out):
        occupied = exists(join(out, MANIFEST))
    else:
        p = Path(out)
        occupied = p.is_file() or (p.is_dir() and any(p.iterdir()))
    if occupied and not overwrite:
        raise ChatrayError(f"output {out} already exists",
                           hint="pass --overwrite to replace it, or choose another --out")
    if not is_remote(out) and Path(out).is_file():
        raise ChatrayError(f"output {out} is a file, not a folder")


def _connect() -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; returns True if this call did."""
    import logging

    import ray.data

    from chatray.rayenv import connect

    # chatray prints one progress line per finished shard; Ray Data's own bars and INFO lines would interleave.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return connect(include_dashboard=False, log_to_driver=False, quiet=True)


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
    tokenizer_s: float  # loading or training it


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


def _assemble(inputs: list[str], files: list[InputFile], parts: list[Part], read: list[tuple[Any, PartResult]],
              eval_fraction: float, seed: int, tokenizer: str, max_length: int, progress: bool) -> _Inputs:
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
    _say(progress, f"read {n:,} conversations from {len(sources)} files"
         + (f" ({skipped} invalid records skipped)" if skipped else ""))
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * n))
    if n_eval >= n:
        raise ChatrayError(f"only {n} conversations: too few for an eval split of {eval_fraction}",
                           hint="add data or pass --eval-fraction 0")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    t_tok = time.perf_counter()
    texts = None
    if tokenizer == "train" or tokenizer.startswith("train:"):
        texts = table.column("text").to_pylist()
    tok = load_tokenizer_spec(tokenizer, None if texts is None else (texts[i] for i in order), max_length=max_length)
    tok_s = time.perf_counter() - t_tok
    _say(progress, f"tokenizer {tokenizer}: vocab {len(tok)} ({tok_s:.1f}s)")
    return _Inputs([vars(s) for s in sources], errors, n_eval, table, order, tok, tok_s)


def _empty_shard(path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_shard_schema().empty_table(), path, compression="zstd")


def _publish(staging: Path, out: str, overwrite: bool) -> None:
    if is_remote(out):
        import pyarrow.fs as pafs

        fs, path = filesystem_for(out)
        if overwrite and exists(join(out, MANIFEST)):
            fs.delete_file(f"{path}/{MANIFEST}")  # dataset is "incomplete" from here until the new manifest lands
            fs.delete_dir_contents(path, missing_dir_ok=True)
        local = pafs.LocalFileSystem()
        for sel in local.get_file_info(pafs.FileSelector(str(staging), recursive=True)):
            if sel.type != pafs.FileType.File or sel.path.endswith("/" + MANIFEST):
                continue
            rel = os.path.relpath(sel.path, staging)
            fs.create_dir(f"{path}/{os.path.dirname(rel)}".rstrip("/"), recursive=True)
            pafs.copy_files(sel.path, f"{path}/{rel}", source_filesystem=local, destination_filesystem=fs)
        pafs.copy_files(str(staging / MANIFEST), f"{path}/{MANIFEST}", source_filesystem=local,
                        destination_filesystem=fs)
        return
    dest = Path(out).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    staging.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        inputs: files, folders, or ``chatterbot:english`` / ``chatterbot:chinese`` (empty: the demo corpus).
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
    if fmt not in FORMATS:
        raise ChatrayError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 0 <= eval_fraction < 1:
        raise ChatrayError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if max_length < 8:
        raise ChatrayError(f"--max-length must be at least 8, got {max_length}")
    if shards is not None and shards < 1:
        raise ChatrayError(f"--shards must be at least 1, got {shards}")
    if num_workers is not None and num_workers < 1:
        raise ChatrayError(f"--num-workers must be at least 1, got {num_workers}")
    inputs = list(inputs) or list(DEMO_INPUTS)
    _check_out(out, overwrite)
    t0 = time.perf_counter()
    import ray

    files = load_inputs(inputs, skip_invalid)
    total_bytes = sum(len(f.data) for f in files)
    loaded: _Inputs | None = None
    if total_bytes <= LOCAL_READ_BYTES:  # small: read here before Ray starts, so bad input is reported at once
        parts = split_parts(files, fmt)
        read = [_read_rendered(p, train_on_all) for p in parts]
        read_s = time.perf_counter() - t0
        loaded = _assemble(inputs, files, parts, read, eval_fraction, seed, tokenizer, max_length, progress)
    started_ray = False
    tmp_root: Path | None = None
    staging: Path | None = None
    try:
        t_ray = time.perf_counter()
        started_ray = _connect()
        ray_s = time.perf_counter() - t_ray
        if started_ray:
            where = os.environ.get("RAY_ADDRESS")
            _say(progress, f"connected to Ray at {where}" if where else f"started a local Ray ({ray_s:.1f}s)")
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if loaded is None:  # large: JSONL files are cut into runs of lines, read and rendered by Ray tasks
            parts = split_parts(files, fmt, part_bytes=max(1 << 20, -(-total_bytes // (READ_PARTS_PER_CPU * cpus))))
            t_read = time.perf_counter()
            reader = ray.remote(num_cpus=1)(_read_rendered)
            read = ray.get([reader.remote(p, train_on_all) for p in parts])
            read_s = time.perf_counter() - t_read
            _say(progress, f"read {total_bytes / 1e6:,.1f} MB in {len(parts)} Ray tasks ({read_s:.1f}s)")
            loaded = _assemble(inputs, files, parts, read, eval_fraction, seed, tokenizer, max_length, progress)
            del parts, read
        del files
        tok, n_eval, sources, errors = loaded.tokenizer, loaded.n_eval, loaded.sources, loaded.errors
        import pyarrow as pa

        workers = num_workers or cpus
        n_train = loaded.table.num_rows - n_eval
        shards = shards or cpus * math.ceil(n_train / (cpus * SHARD_CONVERSATIONS))
        shards = max(1, min(shards, n_train))
        eval_shards = max(1, min(shards, 2, n_eval))
        blocks = []
        for split, first, count, n_shards in (("train", n_eval, n_train, shards),
                                              ("eval", 0, n_eval, eval_shards if n_eval else 0)):
            for k in range(n_shards):  # balanced and never empty (n_shards <= count)
                lo, hi = first + k * count // n_shards, first + (k + 1) * count // n_shards
                block = loaded.table.take(pa.array(loaded.order[lo:hi], pa.int64()))  # a copy: a slice would ship
                # the whole table's buffers to every task
                blocks.append(block.append_column("split", pa.repeat(pa.scalar(split), hi - lo))
                              .append_column("shard", pa.repeat(pa.scalar(k, pa.int32()), hi - lo)))
        loaded.table = None

        tmp_root = Path(tempfile.mkdtemp(prefix="chatray-prepare-"))
        if not is_remote(out):
            dest = Path(out).expanduser()
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        else:
            staging = tmp_root / "dataset"
            staging.mkdir()

        tok_ref = ray.put(tok.backend_tokenizer.to_str())
        ds = ray.data.from_arrow(blocks).map_batches(
            _encode_shards, fn_kwargs={"tokenizer_json": tok_ref, "max_length": max_length, "chunk": batch_size},
            batch_size=None, batch_format="pyarrow", num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=min(workers, len(blocks))),
        )
        _say(progress, f"tokenizing {n_train:,} train + {n_eval:,} eval conversations into {len(blocks)} shards, "
             f"{min(workers, len(blocks))} Ray Data tasks at a time")
        t_enc = time.perf_counter()
        stats = EncodeStats()
        split_info: dict[str, Any] = {
            name: {"rows": 0, "tokens": 0, "loss_tokens": 0, "files": [],
                   "conversations": n_train if name == "train" else n_eval}
            for name in ("train", "eval")}
        done = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                name = f"{r['split']}/part-{r['shard']:05d}.parquet"
                if (staging / name).exists():
                    raise ChatrayError(f"internal error: shard {name} came back twice from Ray Data")
                (staging / r["split"]).mkdir(exist_ok=True)
                (staging / name).write_bytes(r["parquet"])
                info = split_info[r["split"]]
                info["files"].append(name)
                for k in ("rows", "tokens", "loss_tokens"):
                    info[k] += r[k]
                stats.add(EncodeStats(**{k: r[k] for k in EncodeStats.counters()}))
                done += 1
                el = max(time.perf_counter() - t_enc, 1e-9)
                _say(progress, f"shard {done}/{len(blocks)} written ({name}): {stats.conversations:,}/"
                     f"{n_train + n_eval:,} conversations, {stats.tokens:,} tokens "
                     f"({stats.conversations / el:,.0f} conv/s, {stats.tokens / el:,.0f} tokens/s)")
        enc_s = time.perf_counter() - t_enc
        if done != len(blocks) or stats.conversations != n_train + n_eval:
            raise ChatrayError(f"internal error: tokenization returned {done} of {len(blocks)} shards, "
                               f"{stats.conversations} of {n_train + n_eval} conversations; nothing was published")
        if not n_eval:
            _empty_shard(staging / "eval" / "part-00000.parquet")
            split_info["eval"]["files"] = ["eval/part-00000.parquet"]
        for info in split_info.values():
            info["files"].sort()
        tok.save_pretrained(str(staging / "tokenizer"))
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "created_by": f"chatray {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "max_length": max_length,
            "seed": seed,
            "train_on_all": train_on_all,
            "tokenizer": {"source": tokenizer, "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
            "chat_template": CHAT_TEMPLATE,
            "splits": split_info,
            "counts": {
                "conversations": n_train + n_eval,
                "invalid_skipped": sum(s["skipped"] for s in sources),
                "rows": stats.rows,
                "tokens": stats.tokens,
                "split_conversations": stats.split_conversations,
                "truncated_messages": stats.truncated_messages,
                "dropped_windows_without_loss": stats.dropped_windows,
                "shards": shards,
            },
            "over_length_rule": "split at message boundaries into windows of whole messages; a single message "
                                "longer than max_length is truncated to max_length; windows with no loss tokens "
                                "are dropped (all counted here)",
            "sources": sources,
            "invalid_examples": errors[:20],
            "timing_s": {"read": round(read_s, 3), "tokenizer": round(loaded.tokenizer_s, 3),
                         "ray_start": round(ray_s, 3), "encode": round(enc_s, 3), "total": None},
        }
        manifest["timing_s"]["total"] = round(time.perf_counter() - t0, 3)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _publish(staging, out, overwrite)
        staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    el = time.perf_counter() - t0
    _say(progress, f"wrote {out}: {stats.rows:,} rows, {stats.tokens:,} tokens "
         f"(train {split_info['train']['rows']:,} / eval {split_info['eval']['rows']:,}) in {el:.1f}s; "
         f"tokenization {stats.tokens / max(enc_s, 1e-9):,.0f} tokens/s")
    return manifest
