"""The prepared-dataset format, written and read here: layout, shard schema, manifest (local folder or ``s3://``).

Layout::

    manifest.json          written last: a dataset without it is incomplete and is refused
    tokenizer/             HF tokenizer files with the chat template
    train/part-*.parquet   input_ids list<int32>, labels list<int32> (-100 = no loss), length int32
    eval/part-*.parquet

:class:`DatasetWriter` fills a local folder in that layout (``chatray data prepare`` publishes it afterwards);
the readers below take a folder or an ``s3://`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chatray import __version__
from chatray.data.tokenizer import CHAT_TEMPLATE, tokenizer_fingerprint
from chatray.errors import ChatrayError
from chatray.storage.uri import download_dir, exists, filesystem_for, is_remote, join, read_text

if TYPE_CHECKING:
    import pyarrow as pa
    from transformers import PreTrainedTokenizerFast

    from chatray.data.encode import EncodeStats

__all__ = [
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "MANIFEST",
    "DatasetWriter",
    "as_int32_rows",
    "load_tokenizer",
    "read_manifest",
    "read_split_rows",
    "shard_schema",
    "shard_table",
    "split_files",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SPLITS: tuple[str, ...] = ("train", "eval")
IGNORE_INDEX = -100  # a label that carries no loss (torch cross_entropy's default ignore_index)
_TOKENIZER_DIR = "tokenizer"
_OVER_LENGTH_RULE = ("split at message boundaries into windows of whole messages; a single message longer than "
                     "max_length is truncated to max_length; windows with no loss tokens are dropped (all counted "
                     "here)")


def shard_schema() -> pa.Schema:
    """The Arrow schema of every shard."""
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("length", pa.int32())])


def shard_table(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> pa.Table:
    """Rows given as flat buffers as a table in :func:`shard_schema`.

    Args:
        ids: int32 token ids of all rows, concatenated.
        labels: int32 labels of all rows (``IGNORE_INDEX`` where no loss), concatenated.
        offsets: (rows + 1,) row ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.
    """
    import pyarrow as pa

    offsets32 = pa.array(offsets.astype(np.int32))
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets32, pa.array(ids)),
        "labels": pa.ListArray.from_arrays(offsets32, pa.array(labels)),
        "length": pa.array(np.diff(offsets).astype(np.int32)),
    }, schema=shard_schema())


def _shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


class DatasetWriter:
    """Writes one dataset into an empty local folder: shards as they come, the tokenizer, and the manifest last.

    Args:
        folder: the (staging) folder.
        conversations: per split, the conversations it holds.
    """

    def __init__(self, folder: Path, conversations: dict[str, int]) -> None:
        self.folder = folder
        self.splits: dict[str, dict[str, Any]] = {
            name: {"rows": 0, "tokens": 0, "loss_tokens": 0, "files": [], "conversations": conversations[name]}
            for name in _SPLITS}

    def add_shard(self, split: str, index: int, parquet: bytes, *, rows: int, tokens: int, loss_tokens: int) -> str:
        """Write shard ``index`` of ``split`` (a finished Parquet file) and count it; returns its relative path.

        Raises:
            ChatrayError: the shard was written already.
        """
        name = _shard_name(split, index)
        path = self.folder / name
        if path.exists():
            raise ChatrayError(f"internal error: shard {name} came back twice from Ray Data")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(parquet)
        info = self.splits[split]
        info["files"].append(name)
        info["rows"] += rows
        info["tokens"] += tokens
        info["loss_tokens"] += loss_tokens
        return name

    def save_tokenizer(self, tok: PreTrainedTokenizerFast) -> None:
        """Save the tokenizer (with its chat template) into the dataset."""
        tok.save_pretrained(str(self.folder / _TOKENIZER_DIR))

    def write_manifest(self, tok: PreTrainedTokenizerFast, *, tokenizer_source: str, max_length: int, seed: int,
                       train_on_all: bool, stats: EncodeStats, shards: int, sources: list[dict[str, Any]],
                       invalid_examples: list[str], timing_s: dict[str, float]) -> dict[str, Any]:
        """Give each split without a shard an empty one (readers always find a file), then write the manifest.

        Returns:
            The manifest.
        """
        import pyarrow.parquet as pq

        for split, info in self.splits.items():
            if not info["files"]:
                name = _shard_name(split, 0)
                (self.folder / split).mkdir(exist_ok=True)
                pq.write_table(shard_schema().empty_table(), self.folder / name, compression="zstd")
                info["files"].append(name)
            info["files"].sort()
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "created_by": f"chatray {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "max_length": max_length,
            "seed": seed,
            "train_on_all": train_on_all,
            "tokenizer": {"source": tokenizer_source, "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
            "chat_template": CHAT_TEMPLATE,
            "splits": self.splits,
            "counts": {
                "conversations": sum(info["conversations"] for info in self.splits.values()),
                "invalid_skipped": sum(s["skipped"] for s in sources),
                "rows": stats.rows,
                "tokens": stats.tokens,
                "split_conversations": stats.split_conversations,
                "truncated_messages": stats.truncated_messages,
                "dropped_windows_without_loss": stats.dropped_windows,
                "shards": shards,
            },
            "over_length_rule": _OVER_LENGTH_RULE,
            "sources": sources,
            "invalid_examples": invalid_examples,
            "timing_s": timing_s,
        }
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        (self.folder / MANIFEST).write_text(text, encoding="utf-8")
        return manifest


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
    tdir = join(uri, _TOKENIZER_DIR)
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
