"""``chatray data prepare``: dialogue files -> tokenized, sharded Parquet dataset.

Pipeline: read + validate on the driver (cheap, exact error locations) -> train or load the tokenizer ->
deterministic shuffle and train/eval split -> tokenization as a Ray Data ``map_batches`` over an actor
pool (scales out across a cluster) -> Parquet shards written to a staging folder -> published atomically
(local: one rename; S3: ``manifest.json`` uploaded last, so readers never see half a dataset).
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
from pathlib import Path
from typing import Any

from chatray import __version__
from chatray.data.corpus import DEMO_INPUTS
from chatray.data.dataset import FORMAT_VERSION, MANIFEST
from chatray.data.encode import EncodeStats
from chatray.data.readers import FORMATS, iter_conversations
from chatray.data.tokenizer import CHAT_TEMPLATE, load_tokenizer_spec, render_chat, tokenizer_fingerprint
from chatray.errors import ChatrayError
from chatray.storage.uri import exists, filesystem_for, is_remote, join

__all__ = ["DEMO_INPUTS", "prepare_dataset"]

_STATS_SPLIT = -1  # sentinel rows that carry a batch's counts back to the driver


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


class _Tokenize:
    """Encodes one batch of conversations (a Ray Data task; the tokenizer is cached per worker)."""

    def __init__(self, tokenizer_json: str, max_length: int, train_on_all: bool) -> None:
        self.backend = _backend(tokenizer_json)
        self.max_length = max_length
        self.train_on_all = train_on_all

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        from chatray.data.encode import encode_batch

        convs = batch.column("conv").to_pylist()
        splits = batch.column("split").to_pylist()
        ids_rows: list = []
        lab_rows: list = []
        split_rows: list[int] = []
        total = EncodeStats()
        for split in (0, 1):
            sel = [json.loads(c) for c, s in zip(convs, splits) if s == split]
            if not sel:
                continue
            ids, labs, st = encode_batch(self.backend, sel, self.max_length, self.train_on_all)
            ids_rows += ids
            lab_rows += labs
            split_rows += [split] * len(ids)
            total.add(st)
        counts = [total.conversations, total.split_conversations, total.truncated_messages, total.dropped_windows]
        n = len(ids_rows)
        # Build list<int32> columns from one flat buffer (no per-token Python objects); a last sentinel row
        # (split = -1, empty lists) carries this batch's counts back to the driver.
        lengths = np.fromiter((len(r) for r in ids_rows), dtype=np.int32, count=n)
        offsets = np.zeros(n + 2, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1 : n + 1])
        offsets[n + 1] = offsets[n]
        flat_ids = np.concatenate(ids_rows).astype(np.int32) if n else np.zeros(0, np.int32)
        flat_lab = np.concatenate(lab_rows).astype(np.int32) if n else np.zeros(0, np.int32)
        zeros = np.zeros(n + 1, dtype=np.int64)

        def stat(v: int) -> Any:
            col = zeros.copy()
            col[-1] = v
            return pa.array(col)

        return pa.table({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids)),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_lab)),
            "length": pa.array(np.append(lengths, 0).astype(np.int32)),
            "split": pa.array(np.array(split_rows + [_STATS_SPLIT], dtype=np.int8)),
            "stat_conversations": stat(counts[0]),
            "stat_split": stat(counts[1]),
            "stat_truncated": stat(counts[2]),
            "stat_dropped": stat(counts[3]),
        })


def _tokenize_batch(batch: Any, tokenizer_json: Any, max_length: int, train_on_all: bool) -> Any:
    if not isinstance(tokenizer_json, str):  # an ObjectRef passed through fn_kwargs
        import ray

        tokenizer_json = ray.get(tokenizer_json)
    return _Tokenize(tokenizer_json, max_length, train_on_all)(batch)


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


def _ensure_ray(progress: bool) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
             include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None,
             configure_logging=True, logging_level="WARNING")
    return True


def _write_shards(tables: list[Any], folder: Path, shards: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.concat_tables(tables) if tables else None
    n = table.num_rows if table is not None else 0
    shards = max(1, min(shards, n)) if n else 1
    names = []
    per = math.ceil(n / shards) if n else 0
    for i in range(shards):
        part = table.slice(i * per, per) if table is not None else pa.table({
            "input_ids": pa.array([], pa.list_(pa.int32())), "labels": pa.array([], pa.list_(pa.int32())),
            "length": pa.array([], pa.int32())})
        name = f"part-{i:05d}.parquet"
        pq.write_table(part, folder / name, compression="zstd")
        names.append(f"{folder.name}/{name}")
    return names


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
    shards: int = 2,
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
        shards: Parquet files per split.
        seed: shuffle seed; the same inputs and seed give the same dataset.
        overwrite: replace an existing dataset at ``out``.
        skip_invalid: skip and count bad records instead of failing on the first.
        train_on_all: every token carries loss (default: assistant tokens only).
        num_workers: tokenizer actors (default: the cluster's CPUs).
        batch_size: conversations per tokenization batch.
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
    if shards < 1:
        raise ChatrayError(f"--shards must be at least 1, got {shards}")
    inputs = list(inputs) or list(DEMO_INPUTS)
    _check_out(out, overwrite)
    t0 = time.perf_counter()

    errors: list[str] = []
    convs, sources = iter_conversations(inputs, fmt, skip_invalid=skip_invalid, errors=errors)
    skipped = sum(s.skipped for s in sources)
    _say(progress, f"read {len(convs)} conversations from {len(sources)} files"
         + (f" ({skipped} invalid records skipped)" if skipped else ""))

    t_tok = time.perf_counter()
    tok = load_tokenizer_spec(tokenizer, (render_chat(c.messages)[0] for c in convs), max_length=max_length)
    _say(progress, f"tokenizer {tokenizer}: vocab {len(tok)} ({time.perf_counter() - t_tok:.1f}s)")

    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(convs)))
    if n_eval >= len(convs):
        raise ChatrayError(f"only {len(convs)} conversations: too few for an eval split of {eval_fraction}",
                           hint="add data or pass --eval-fraction 0")

    import pyarrow as pa

    conv_col = [json.dumps(convs[i].messages, ensure_ascii=False) for i in order]
    split_col = [1 if k < n_eval else 0 for k in range(len(order))]
    table = pa.table({"conv": pa.array(conv_col, pa.string()), "split": pa.array(split_col, pa.int8())})

    started_ray = _ensure_ray(progress)
    tmp_root = Path(tempfile.mkdtemp(prefix="chatray-prepare-"))
    if not is_remote(out):
        dest = Path(out).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    else:
        staging = tmp_root / "dataset"
        staging.mkdir()
    try:
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, num_workers or cpus)
        n_blocks = max(workers, math.ceil(table.num_rows / batch_size))
        per = math.ceil(table.num_rows / n_blocks)
        blocks = [table.slice(i * per, per) for i in range(n_blocks) if i * per < table.num_rows]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # deterministic output for a given seed
        ctx.enable_progress_bars = progress
        tok_ref = ray.put(tok.backend_tokenizer.to_str())
        ds = ray.data.from_arrow(blocks).map_batches(
            _tokenize_batch,
            fn_kwargs={"tokenizer_json": tok_ref, "max_length": max_length, "train_on_all": train_on_all},
            batch_size=batch_size, batch_format="pyarrow", num_cpus=1, compute=ray.data.TaskPoolStrategy(size=workers),
        )
        t_enc = time.perf_counter()
        parts: dict[int, list] = {0: [], 1: []}
        stats = EncodeStats()
        last = t_enc
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            split = batch.column("split").to_numpy()
            stat_rows = batch.filter(pa.compute.equal(batch.column("split"), _STATS_SPLIT))
            for k, attr in (("stat_conversations", "conversations"), ("stat_split", "split_conversations"),
                            ("stat_truncated", "truncated_messages"), ("stat_dropped", "dropped_windows")):
                setattr(stats, attr, getattr(stats, attr) + int(pa.compute.sum(stat_rows.column(k)).as_py() or 0))
            for s in (0, 1):
                rows = batch.filter(pa.array(split == s)).select(["input_ids", "labels", "length"])
                if rows.num_rows:
                    parts[s].append(rows)
                    stats.rows += rows.num_rows
                    stats.tokens += int(pa.compute.sum(rows.column("length")).as_py() or 0)
            now = time.perf_counter()
            if now - last > 2:
                last = now
                el = now - t_enc
                _say(progress, f"tokenized {stats.conversations}/{len(convs)} conversations, {stats.tokens:,} tokens "
                     f"({stats.conversations / el:,.0f} conv/s, {stats.tokens / el:,.0f} tokens/s)")
        enc_s = time.perf_counter() - t_enc

        split_info: dict[str, Any] = {}
        for s, name in ((0, "train"), (1, "eval")):
            files = _write_shards(parts[s], staging / name, shards if name == "train" else max(1, min(shards, 2)))
            rows = sum(t.num_rows for t in parts[s])
            tokens = sum(int(pa.compute.sum(t.column("length")).as_py() or 0) for t in parts[s])
            loss = 0
            for t in parts[s]:
                flat = pa.compute.list_flatten(t.column("labels"))
                loss += int(pa.compute.sum(pa.compute.not_equal(flat, -100).cast(pa.int64())).as_py() or 0)
            split_info[name] = {"rows": rows, "tokens": tokens, "loss_tokens": loss, "files": files,
                                "conversations": len(convs) - n_eval if s == 0 else n_eval}
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
                "conversations": len(convs),
                "invalid_skipped": skipped,
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
            "sources": [vars(s) for s in sources],
            "invalid_examples": errors[:20],
            "timing_s": {"encode": round(enc_s, 3), "total": None},
        }
        manifest["timing_s"]["total"] = round(time.perf_counter() - t0, 3)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        if started_ray:
            import ray

            ray.shutdown()
    el = time.perf_counter() - t0
    _say(progress, f"wrote {out}: {stats.rows:,} rows, {stats.tokens:,} tokens "
         f"(train {split_info['train']['rows']:,} / eval {split_info['eval']['rows']:,}) in {el:.1f}s; "
         f"tokenization {stats.tokens / max(enc_s, 1e-9):,.0f} tokens/s")
    return manifest
