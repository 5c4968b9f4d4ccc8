"""Reading dialogue inputs: files and folders to bytes, bytes to conversations, in parallel where they are large.

The driver reads each input file's bytes (:func:`load_inputs`); :func:`split_parts` cuts them into parts (a large
JSONL file into runs of whole lines), :func:`read_part` parses one part (in a Ray task or here) without raising, and
:func:`merge_parts` puts the results back in input order and raises the error reading the files one by one would
have raised. Record formats and their errors are in :mod:`chatray.data.formats`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatray.data.formats import (
    Conversation,
    DataError,
    count_line_ends,
    detect_format,
    is_json_document,
    parse_records,
)
from chatray.errors import ChatrayError

__all__ = [
    "InputFile",
    "Part",
    "PartResult",
    "SourceFile",
    "collect_files",
    "iter_conversations",
    "load_inputs",
    "merge_parts",
    "read_file",
    "read_part",
    "split_parts",
]

_SUFFIXES = {".jsonl", ".json", ".yml", ".yaml"}
_LEADING_SPACE = re.compile(rb"[ \t\r\n]*")


@dataclass
class SourceFile:
    """One input file's entry in the manifest's ``sources``."""

    path: str
    sha256: str
    format: str
    conversations: int = 0
    skipped: int = 0


def collect_files(inputs: list[str]) -> list[Path]:
    """Expand files and folders (recursively, by suffix) into a sorted, de-duplicated file list.

    Raises:
        ChatrayError: an input that does not exist, or a folder with no dialogue files.
    """
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ChatrayError(f"{p}: folder has no dialogue files (*.jsonl, *.json, *.yml, *.yaml)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ChatrayError(f"input not found: {raw}")
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


@dataclass
class InputFile:
    """One input file as the driver read it: its bytes (shipped to reader tasks, so the cluster's nodes need
    no access to the driver's disk) and whether bad records are always skipped (the bundled corpus)."""

    path: Path
    data: bytes
    skip_invalid: bool


@dataclass
class Part:
    """Whole records of one input file for one reader: the whole file, or a run of lines of a large JSONL file
    (``first_line`` numbers its first line, so errors name the file's own line numbers)."""

    file: int  # index into the input files
    path: Path
    data: bytes
    fmt: str  # "auto" only for a whole file
    first_line: int = 1
    offset: int = 0  # of data's first byte in the file
    lines_only: bool = False
    skip_invalid: bool = False


@dataclass
class PartResult:
    """What reading a :class:`Part` gave: errors travel as values (reader tasks never raise)."""

    conversations: list[Conversation]
    fmt: str
    count: int = 0  # conversations read (kept when a task drops ``conversations`` after rendering them)
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # skipped records' messages
    error: DataError | None = None  # the first bad record (reading stopped there), or a file-level problem
    undecodable: bool = False  # ``error`` is invalid UTF-8: reported before any record error of the file


def read_part(part: Part) -> PartResult:
    """Decode, detect the format (whole files) and parse the records of ``part``; never raises DataError."""
    res = PartResult([], part.fmt)
    try:
        try:
            text = part.data.decode("utf-8-sig" if part.first_line == 1 else "utf-8")
        except UnicodeDecodeError as e:
            res.undecodable = True
            line = part.first_line + count_line_ends(part.data, 0, e.start)
            raise DataError(f"{part.path}:line {line}", f"not valid UTF-8 (byte {part.offset + e.start}: {e.reason}); "
                            "re-encode the file as UTF-8") from e
        if not part.lines_only and not text.strip():
            raise DataError(str(part.path), "file is empty")
        if res.fmt == "auto":
            res.fmt = detect_format(part.path, text)
        for item in parse_records(part.path, text, res.fmt, first_line=part.first_line, lines_only=part.lines_only):
            if isinstance(item, Conversation):
                res.conversations.append(item)
            elif part.skip_invalid:
                res.skipped += 1
                res.errors.append(item.message)
            else:
                raise item
    except DataError as e:
        res.error = e
    res.count = len(res.conversations)
    return res


def split_parts(files: list[InputFile], fmt: str, part_bytes: int | None = None) -> list[Part]:
    """Cut the inputs into parts for parallel readers: a JSONL file larger than ``part_bytes`` becomes runs of
    whole lines of about that size (format detected once from its first run); any other file is one part."""
    parts: list[Part] = []
    for k, f in enumerate(files):
        data = f.data
        first = _LEADING_SPACE.match(data, 3 if data.startswith(b"\xef\xbb\xbf") else 0).end()
        splittable = (part_bytes is not None and len(data) > part_bytes and f.path.suffix.lower() == ".jsonl"
                      and fmt != "chatterbot" and first < len(data)  # not blank: that is "file is empty"
                      and not is_json_document(data[first:first + 2].decode("utf-8", "replace")))
        cuts = [0]
        if splittable:
            n = -(-len(data) // part_bytes)
            for j in range(1, n):
                c = data.find(b"\n", max(cuts[-1], j * len(data) // n)) + 1
                if 0 < c < len(data) and c > cuts[-1]:
                    cuts.append(c)
        cuts.append(len(data))
        file_fmt = fmt
        if len(cuts) > 2 and fmt == "auto":
            try:
                file_fmt = detect_format(f.path, data[:cuts[1]].decode("utf-8-sig"))
            except (DataError, UnicodeDecodeError):  # read whole, so that it is reported as usual
                cuts = [0, len(data)]
        line = 1
        for a, b in zip(cuts, cuts[1:]):
            parts.append(Part(k, f.path, data[a:b], file_fmt, first_line=line, offset=a, lines_only=len(cuts) > 2,
                              skip_invalid=f.skip_invalid))
            line += count_line_ends(data, a, b)
    return parts


def merge_parts(files: list[InputFile], parts: list[Part], results: list[PartResult],
                errors: list[str] | None = None) -> list[SourceFile]:
    """Per-file counts for the manifest from the parts' results (in input order); raises the first error.

    Raises:
        DataError: the earliest bad record in input order (what reading the files one by one would raise).
    """
    first: dict[int, PartResult] = {}  # per file: the part with its first error, invalid UTF-8 ahead of the rest
    for p, r in zip(parts, results):
        if r.error is not None and (p.file not in first or r.undecodable and not first[p.file].undecodable):
            first[p.file] = r
    if first:
        raise first[min(first)].error  # type: ignore[misc]
    sources = [SourceFile(path=str(f.path), sha256=hashlib.sha256(f.data).hexdigest(), format="") for f in files]
    for p, r in zip(parts, results):
        s = sources[p.file]
        s.format = r.fmt
        s.conversations += r.count
        s.skipped += r.skipped
        if errors is not None:
            errors.extend(r.errors)
    return sources


def load_inputs(inputs: list[str], skip_invalid: bool = False) -> list[InputFile]:
    """Expand ``inputs`` (files, folders, ``chatterbot:LANG``) and read each file's bytes.

    Raises:
        ChatrayError: see :func:`collect_files`.
    """
    from chatray.data.corpus import corpus_root, expand_corpus_inputs

    bundled = corpus_root()
    out = []
    for f in collect_files(expand_corpus_inputs(inputs)):
        # The bundled corpus has a few malformed records of its own (e.g. a bare string where a list of
        # turns belongs): those are always skipped and counted, never fatal.
        in_corpus = bundled is not None and f.resolve().is_relative_to(bundled)
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ChatrayError(f"{f}: cannot read ({e.strerror or e})") from e
        out.append(InputFile(f, data, skip_invalid or in_corpus))
    return out


def _read_here(files: list[InputFile], fmt: str,
               errors: list[str] | None) -> tuple[list[Conversation], list[SourceFile]]:
    """Read ``files`` whole, in this process: their conversations in order and the per-file records."""
    parts = split_parts(files, fmt)
    results = [read_part(p) for p in parts]
    sources = merge_parts(files, parts, results, errors)
    return [c for r in results for c in r.conversations], sources


def read_file(path: Path, fmt: str = "auto", *, skip_invalid: bool = False,
              errors: list[str] | None = None) -> tuple[list[Conversation], SourceFile]:
    """Read one file into conversations.

    Args:
        path: the file.
        fmt: a format name or ``auto``.
        skip_invalid: skip bad records (their messages are appended to ``errors``) instead of raising.
        errors: where skipped records' messages go.

    Returns:
        The conversations and the file's :class:`SourceFile` record (sha256, counts) for the manifest.

    Raises:
        DataError: the first bad record (unless ``skip_invalid``), or a file-level problem.
    """
    convs, (src,) = _read_here([InputFile(path, path.read_bytes(), skip_invalid)], fmt, errors)
    return convs, src


def iter_conversations(inputs: list[str], fmt: str = "auto", *, skip_invalid: bool = False,
                       errors: list[str] | None = None) -> tuple[list[Conversation], list[SourceFile]]:
    """Read every input (files, folders, ``chatterbot:LANG``, ``chatray:founding``) into one list, in this process.

    Raises:
        DataError / ChatrayError: see :func:`read_file`; also when no conversation at all was read.
    """
    convs, sources = _read_here(load_inputs(inputs, skip_invalid), fmt, errors)
    if not convs:
        raise ChatrayError(f"no valid conversations in {', '.join(map(str, inputs))}",
                           hint="check the files and --format")
    return convs, sources
