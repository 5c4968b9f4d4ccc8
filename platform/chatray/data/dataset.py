"""Reading a prepared dataset: manifest, tokenizer, split locations (local folder or ``s3://``).

Layout::

    manifest.json          written last: a dataset without it is incomplete and is refused
    tokenizer/             HF tokenizer files with the chat template
    train/part-*.parquet   input_ids list<int32>, labels list<int32> (-100 = no loss), length int32
    eval/part-*.parquet
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chatray.errors import ChatrayError
from chatray.storage.uri import download_dir, exists, filesystem_for, is_remote, join, read_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "MANIFEST",
    "as_int32_rows",
    "load_tokenizer",
    "read_manifest",
    "read_split_rows",
    "split_files",
    "split_uri",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IGNORE_INDEX = -100  # a label that carries no loss (torch cross_entropy's default ignore_index)


def read_manifest(uri: str) -> dict[str, Any]:
    """Load and check ``manifest.json`` of the prepared dataset at ``uri``.

    Raises:
        ChatrayError: missing dataset, incomplete dataset (no manifest), unreadable or newer-format manifest.
    """
    muri = join(uri, MANIFEST)
    if not exists(muri):
        if exists(uri):
            raise ChatrayError(f"{uri} is not a prepared dataset (no {MANIFEST}); it may be incomplete",
                               hint="run `chatray data prepare ... --out " + str(uri) + "`")
        raise ChatrayError(f"dataset not found: {uri}", hint="prepare one with `chatray data prepare`")
    try:
        manifest = json.loads(read_text(muri))
    except json.JSONDecodeError as e:
        raise ChatrayError(f"{muri}: corrupt manifest ({e.msg} at line {e.lineno})") from e
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ChatrayError(f"{muri}: unsupported dataset format_version {version!r} (this chatray reads "
                           f"<= {FORMAT_VERSION})", hint="upgrade chatray or re-prepare the dataset")
    for key in ("tokenizer", "splits", "max_length"):
        if key not in manifest:
            raise ChatrayError(f"{muri}: manifest lacks {key!r}")
    return manifest


def split_uri(uri: str, split: str) -> str:
    """The folder of ``split``'s Parquet files (``train`` or ``eval``)."""
    return join(uri, split)


def split_files(uri: str, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of ``split``'s Parquet shards, in manifest order."""
    manifest = manifest or read_manifest(uri)
    info = manifest["splits"].get(split)
    if info is None:
        raise ChatrayError(f"{uri}: dataset has no {split!r} split (has {', '.join(manifest['splits'])})")
    return [join(uri, f) for f in info["files"]]


def load_tokenizer(uri: str) -> PreTrainedTokenizerFast:
    """The dataset's tokenizer (with chat template); remote ones are cached locally by content hash."""
    from transformers import PreTrainedTokenizerFast

    manifest = read_manifest(uri)
    tdir = join(uri, "tokenizer")
    if is_remote(uri):
        key = hashlib.sha256(f"{uri}|{manifest['tokenizer']['fingerprint']}".encode()).hexdigest()[:16]
        local = Path(tempfile.gettempdir()) / "chatray-tokenizers" / key
        if not (local / "tokenizer.json").exists():
            download_dir(tdir, local)
        tdir = str(local)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(tdir)
    except Exception as e:
        raise ChatrayError(f"{tdir}: cannot load the dataset tokenizer: {e}") from e
    tok.clean_up_tokenization_spaces = False
    return tok


def as_int32_rows(col: Any) -> list[np.ndarray]:
    """A list-column (numpy object array, 2-D array or list) as a list of 1-D int32 arrays."""
    if isinstance(col, np.ndarray) and col.ndim == 2:
        return list(col.astype(np.int32, copy=False))
    return [np.asarray(r, dtype=np.int32) for r in col]


def read_split_rows(dataset_uri: str, split: str, manifest: dict[str, Any] | None = None,
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All rows (``input_ids``, ``labels``) of one split, in manifest order, without Ray (local or S3).

    Raises:
        ChatrayError: missing dataset or split, unreadable shard.
    """
    import pyarrow.parquet as pq

    ids: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    for uri in split_files(dataset_uri, split, manifest):
        fs, path = filesystem_for(uri)
        try:
            table = pq.read_table(path, filesystem=fs, columns=["input_ids", "labels"])
        except (OSError, ValueError) as e:
            raise ChatrayError(f"cannot read {uri}: {e}") from e
        ids += as_int32_rows(table.column("input_ids").to_numpy(zero_copy_only=False))
        labs += as_int32_rows(table.column("labels").to_numpy(zero_copy_only=False))
    return ids, labs
