"""Checkpoint discovery and resolution, shared by training (resume) and serving.

Layout (Ray Train's, under ``storage_path``)::

    <storage>/<run>/checkpoint_<step>/   config.json, generation_config.json, model.safetensors,
                                         tokenizer files, train_state.pt, metrics.json
    <storage>/<run>/metrics.jsonl        one JSON object per logged step

A checkpoint URI is a checkpoint folder (local, NFS or ``s3://``), a run folder (= its latest checkpoint),
or ``<storage>/<run>:latest`` / ``<storage>/<run>:best`` (lowest ``eval_loss`` in ``metrics.json``). A plain
Hugging Face model folder (``config.json`` and weights, no ``metrics.json``: a ``save_pretrained`` output) names
itself; it has no integrity record, so only loading it checks it. Incomplete or corrupted checkpoints (a
crash during upload, a truncated file) are skipped with a warning;
the previous good one is used. Nothing here ever writes to or deletes a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chatray.errors import ChatrayError
from chatray.storage.uri import filesystem_for, is_remote, join

__all__ = [
    "CHECKPOINT_PREFIX",
    "MODEL_FILE",
    "METRICS_FILE",
    "TRAIN_STATE_FILE",
    "CheckpointInfo",
    "best_checkpoint",
    "check_checkpoint",
    "checkpoint_dir_name",
    "describe_checkpoint",
    "is_plain_model_folder",
    "latest_checkpoint",
    "list_checkpoints",
    "materialize_checkpoint",
    "resolve_checkpoint",
    "split_selector",
]

logger = logging.getLogger("chatray.checkpoints")

CHECKPOINT_PREFIX = "checkpoint_"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
TRAIN_STATE_FILE = "train_state.pt"
_REQUIRED = ("config.json", MODEL_FILE, METRICS_FILE)
_COMPLETE_MARK = ".chatray-complete"


@dataclass
class CheckpointInfo:
    """One checkpoint folder of a run and what its ``metrics.json`` says."""

    uri: str
    name: str
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def valid(self) -> bool:
        """True when every required file is present and intact."""
        return self.problem is None

    @property
    def eval_loss(self) -> float | None:
        """The checkpoint's eval loss, when it was evaluated."""
        v = self.metrics.get("eval_loss")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_00000042``: zero-padded so that name order is step order."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def split_selector(uri: str) -> tuple[str, Literal["latest", "best"] | None]:
    """``/x/run:best`` -> (``/x/run``, ``best``); anything else -> (uri, None)."""
    uri = str(uri)
    for sel in ("latest", "best"):
        if uri.endswith(":" + sel):
            return uri[: -len(sel) - 1].rstrip("/"), sel  # type: ignore[return-value]
    return uri.rstrip("/") if uri not in ("/",) else uri, None


def _read_small(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _safetensors_problem(fs: Any, path: str, size: int) -> str | None:
    """Whether a safetensors file is complete: header parses and the data ends exactly at the file's end."""
    if size < 8:
        return f"{MODEL_FILE} is truncated ({size} bytes)"
    try:
        with fs.open_input_file(path) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                return f"{MODEL_FILE} has a corrupt header"
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        return f"{MODEL_FILE} is unreadable ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{MODEL_FILE} is truncated ({size} bytes, expected {8 + n + end})"
    return None


def _inspect(uri: str, *, require_train_state: bool = False) -> CheckpointInfo:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digits = "".join(ch for ch in name.removeprefix(CHECKPOINT_PREFIX) if ch.isdigit())
    info = CheckpointInfo(uri=uri, name=name, step=int(digits) if digits else -1)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        info.problem = f"cannot list ({e})"
        return info
    sizes = {e.base_name: e.size for e in entries if e.type == pafs.FileType.File}
    missing = [f for f in _REQUIRED if f not in sizes]
    if require_train_state and TRAIN_STATE_FILE not in sizes:
        missing.append(TRAIN_STATE_FILE)
    if missing:
        info.problem = f"missing {', '.join(missing)}"
        return info
    try:
        info.metrics = json.loads(_read_small(fs, f"{path}/{METRICS_FILE}"))
        json.loads(_read_small(fs, f"{path}/config.json"))
    except (OSError, ValueError) as e:
        info.problem = f"unreadable metrics.json/config.json ({e})"
        return info
    if isinstance(info.metrics.get("step"), int):
        info.step = info.metrics["step"]
    # metrics.json lists each file's size: catches files cut short by a crash during upload.
    for fname, size in (info.metrics.get("files") or {}).items():
        if fname in sizes and sizes[fname] != size:
            info.problem = f"{fname} has {sizes[fname]} bytes, expected {size}"
            return info
        if fname not in sizes and (fname != TRAIN_STATE_FILE or require_train_state):
            info.problem = f"missing {fname}"
            return info
    info.problem = _safetensors_problem(fs, f"{path}/{MODEL_FILE}", sizes[MODEL_FILE])
    return info


def describe_checkpoint(uri: str) -> CheckpointInfo:
    """A checkpoint folder's step and metrics (from ``metrics.json``) and what is wrong with it, if anything."""
    return _inspect(uri)


def is_plain_model_folder(uri: str) -> bool:
    """Whether ``uri`` is a Hugging Face model folder that chatray did not write (``config.json``, no
    ``metrics.json``, not named ``checkpoint_*``): served as it is, without chatray's integrity record."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return (not name.startswith(CHECKPOINT_PREFIX) and _has_file(uri, "config.json")
            and not _has_file(uri, METRICS_FILE))


def check_checkpoint(uri: str, *, require_train_state: bool = False) -> str | None:
    """What is wrong with the checkpoint folder at ``uri`` (None when it is complete and intact)."""
    return _inspect(uri, require_train_state=require_train_state).problem


def list_checkpoints(run_uri: str, *, require_train_state: bool = False) -> list[CheckpointInfo]:
    """All ``checkpoint_*`` folders of a run, oldest step first, each with its problem (if any).

    Returns an empty list when the run folder does not exist.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem_for(run_uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise ChatrayError(f"cannot list {run_uri}: {e}") from e
    out = [_inspect(join(run_uri, e.base_name), require_train_state=require_train_state) for e in entries
           if e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX)]
    return sorted(out, key=lambda c: (c.step, c.name))


def _warn_skipped(infos: list[CheckpointInfo], chosen: CheckpointInfo | None) -> None:
    for c in infos:
        if not c.valid and (chosen is None or c.step >= chosen.step):
            logger.warning("skipping checkpoint %s: %s", c.uri, c.problem)


def latest_checkpoint(run_uri: str, *, require_train_state: bool = False) -> CheckpointInfo | None:
    """The newest valid checkpoint of a run (warning about newer broken ones), or None."""
    infos = list_checkpoints(run_uri, require_train_state=require_train_state)
    good = [c for c in infos if c.valid]
    chosen = good[-1] if good else None
    _warn_skipped(infos, chosen)
    return chosen


def best_checkpoint(run_uri: str) -> CheckpointInfo | None:
    """The valid checkpoint with the lowest ``eval_loss`` (latest on ties or when none has one), or None."""
    infos = list_checkpoints(run_uri)
    good = [c for c in infos if c.valid]
    scored = [c for c in good if c.eval_loss is not None]
    if scored:
        chosen = min(scored, key=lambda c: (c.eval_loss, -c.step))
    else:
        chosen = good[-1] if good else None
    for c in infos:
        if not c.valid:
            logger.warning("skipping checkpoint %s: %s", c.uri, c.problem)
    return chosen


def _is_dir(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory or (
            is_remote(uri) and bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))))
    except OSError:
        return False


def resolve_checkpoint(uri: str) -> str:
    """The concrete checkpoint folder URI that ``uri`` names.

    Args:
        uri: a checkpoint folder, a plain Hugging Face model folder, a run folder (its latest checkpoint), or
            ``<run>:latest`` / ``<run>:best``; local, NFS or ``s3://``.

    Returns:
        The checkpoint folder's URI (local paths made absolute).

    Raises:
        ChatrayError: nothing there, or no complete checkpoint (the message names ``uri`` and the problem).
    """
    base, selector = split_selector(uri)
    if not is_remote(base):
        base = str(Path(base.removeprefix("file://")).expanduser().resolve())
    if selector is None:
        name = base.rstrip("/").rsplit("/", 1)[-1]
        if is_plain_model_folder(base):
            return base
        if name.startswith(CHECKPOINT_PREFIX) or _has_file(base, MODEL_FILE):
            info = _inspect(base)
            if info.problem:
                raise ChatrayError(f"checkpoint {uri} is incomplete or corrupted: {info.problem}",
                                   hint="use the run's :latest or :best, which skip broken checkpoints")
            return base
        selector = "latest"
    if not _is_dir(base):
        raise ChatrayError(f"checkpoint not found: {uri} (no such run folder {base})",
                           hint="give <storage>/<run>:latest, <storage>/<run>:best or a checkpoint folder")
    chosen = best_checkpoint(base) if selector == "best" else latest_checkpoint(base)
    if chosen is None:
        raise ChatrayError(f"no valid checkpoint in {uri}",
                           hint="has the run written a checkpoint yet? (checkpoint.every steps, and at the end)")
    return chosen.uri


def _has_file(uri: str, fname: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    try:
        return fs.get_file_info(f"{path}/{fname}").type == pafs.FileType.File
    except OSError:
        return False


def _default_cache() -> Path:
    return Path(os.environ.get("CHATRAY_CACHE", "~/.cache/chatray")).expanduser() / "checkpoints"


def materialize_checkpoint(uri: str, cache_dir: str | None = None) -> Path:
    """Resolve ``uri`` and return a local folder holding that checkpoint (ready for ``from_pretrained``).

    Local and NFS checkpoints are used in place. Remote ones are copied (without ``train_state.pt``, which
    serving does not need) into ``cache_dir/<hash>`` through a temporary folder renamed into place, so a
    concurrent or interrupted copy never leaves a half-written cache entry; a complete copy is reused.

    Raises:
        ChatrayError: unresolvable URI, or a checkpoint without ``model.safetensors`` (pickled weights are refused).
    """
    import pyarrow.fs as pafs

    resolved = resolve_checkpoint(uri)
    if not is_remote(resolved):
        path = Path(resolved)
        if not (path / MODEL_FILE).is_file():
            raise ChatrayError(f"checkpoint {resolved} has no {MODEL_FILE}; chatray loads safetensors weights only")
        return path
    fs, path = filesystem_for(resolved)
    entries = [e for e in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if e.type == pafs.FileType.File and e.base_name != TRAIN_STATE_FILE]
    if not any(e.path.endswith("/" + MODEL_FILE) for e in entries):
        raise ChatrayError(f"checkpoint {resolved} has no {MODEL_FILE}; chatray loads safetensors weights only")
    # The key covers the URI and the file sizes/mtimes, so a rewritten checkpoint is fetched again.
    sig = "|".join(sorted(f"{e.path}:{e.size}:{e.mtime_ns}" for e in entries))
    key = hashlib.sha256(f"{resolved}|{sig}".encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() if cache_dir else _default_cache()
    dest = root / key
    if (dest / _COMPLETE_MARK).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for e in entries:
            rel = e.path[len(path):].lstrip("/")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(e.path) as src, open(target, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        (tmp / _COMPLETE_MARK).write_text(resolved, encoding="utf-8")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: use its copy
            if not (dest / _COMPLETE_MARK).is_file():
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
