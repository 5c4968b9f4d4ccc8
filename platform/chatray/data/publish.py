"""Putting a prepared dataset in place all at once, so that readers never see half of one.

The dataset is written into a staging folder; a local destination then gets it with one rename (next to it, so
the rename stays on one filesystem), an ``s3://`` prefix gets its files with ``manifest.json`` uploaded last
(:func:`chatray.data.dataset.read_manifest` refuses a dataset without one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chatray.data.dataset import MANIFEST
from chatray.errors import ChatrayError
from chatray.storage.uri import exists, filesystem_for, is_remote, join

__all__ = ["check_out", "publish", "staging_folder"]


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``out`` that holds something, unless ``overwrite``.

    Raises:
        ChatrayError: ``out`` is occupied without ``overwrite``, or is a local file.
    """
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


@contextmanager
def staging_folder(out: str) -> Iterator[Path]:
    """An empty local folder to write the dataset for ``out`` into; removed on exit unless :func:`publish` moved
    it (a failed run leaves nothing behind)."""
    if is_remote(out):
        staging = Path(tempfile.mkdtemp(prefix="chatray-prepare-"))
    else:
        dest = Path(out).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: str, overwrite: bool) -> None:
    """Move the dataset in ``staging`` to ``out``, replacing what is there when ``overwrite``."""
    if is_remote(out):
        _upload(staging, out, overwrite)
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


def _upload(staging: Path, out: str, overwrite: bool) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(out)
    if overwrite and exists(join(out, MANIFEST)):
        fs.delete_file(f"{path}/{MANIFEST}")  # the old dataset reads as incomplete until the new manifest lands
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
