"""Readers for the dialogue formats ``data prepare`` accepts, with exact error locations.

Every reader yields :class:`Conversation` objects whose messages are ``{"role", "content"}`` dicts with
roles ``system | user | assistant``. A bad record raises :class:`DataError` naming file, line (JSONL)
or record (JSON/YAML) and the reason; with ``skip_invalid`` the caller counts and skips it instead.

Formats:
    openai      JSONL (or JSON list) of ``{"messages": [{"role": ..., "content": ...}, ...]}``
    sharegpt    JSON/JSONL of ``{"conversations": [{"from": "human|gpt|system", "value": ...}, ...]}``
    turns       JSON/JSONL of lists of strings alternating user/assistant (``[[u, a, u, a], ...]``)
    chatterbot  YAML with ``conversations:`` lists of turns (the chatterbot-corpus layout)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chatray.errors import ChatrayError

try:
    import orjson as _orjson
except ImportError:  # optional: the standard library parses the same records, slower
    _orjson = None

__all__ = [
    "FORMATS",
    "ROLES",
    "Conversation",
    "DataError",
    "Format",
    "InputFile",
    "Part",
    "PartResult",
    "collect_files",
    "detect_format",
    "iter_conversations",
    "load_inputs",
    "merge_parts",
    "read_file",
    "read_part",
    "split_parts",
]

Format = Literal["auto", "openai", "sharegpt", "turns", "chatterbot"]
FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "turns", "chatterbot")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}
_SUFFIXES = {".jsonl", ".json", ".yml", ".yaml"}


class DataError(ChatrayError):
    """A bad input record: ``where`` is ``file:line N`` or ``file: record N``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}", hint="fix the record, or pass --skip-invalid to skip and count it")
        self.where = where
        self.reason = reason


@dataclass
class Conversation:
    """One dialogue: ``messages`` plus where it came from (for error messages and the manifest)."""

    messages: list[dict[str, str]]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceFile:
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


def detect_format(path: Path, text: str) -> str:
    """Guess the format of one file from its suffix and first record.

    Raises:
        DataError: when nothing recognisable is found.
    """
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml"):
        return "chatterbot"
    first: Any = None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(str(path), "file is empty")
    if suffix == ".json" or stripped.startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, list) and doc:
            first = doc[0]
        elif isinstance(doc, dict):
            first = doc
    if first is None:
        for i, line in enumerate(_lines(text), 1):
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:line {i}", f"malformed JSON ({e.msg} at column {e.colno})") from e
                break
    if isinstance(first, dict) and "messages" in first:
        return "openai"
    if isinstance(first, dict) and "conversations" in first:
        return "sharegpt"
    if isinstance(first, list):
        return "turns"
    raise DataError(f"{path}", "cannot tell the format from the first record (expected an object with 'messages' "
                    "or 'conversations', or a list of turns); pass --format")


_LINE_END = re.compile(r"\r\n|\r|\n")  # not str.splitlines(): U+2028, U+0085... are legal inside JSON strings


def _lines(text: str) -> list[str]:
    """``text`` cut at :data:`_LINE_END` (plain ``str.split`` when there is no \\r: six times faster)."""
    return _LINE_END.split(text) if "\r" in text else text.split("\n")


def _count_line_ends(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Line ends in ``data[start:end]`` as :data:`_LINE_END` counts them (\\r\\n, \\r or \\n)."""
    return data.count(b"\n", start, end) + data.count(b"\r", start, end) - data.count(b"\r\n", start, end)


def _records(path: Path, text: str, first_line: int = 1,
             lines_only: bool = False) -> Iterator[tuple[str, Any, str | None]]:
    """(location, record, JSONL line or None) of a JSON array/object file or a JSONL file (or a run of JSONL lines
    starting at line ``first_line`` when ``lines_only``)."""
    stripped = text.lstrip()
    if not lines_only and (path.suffix.lower() == ".json" or _json_document(stripped)):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json":
                raise DataError(f"{path}:line {e.lineno}", f"malformed JSON ({e.msg} at column {e.colno})") from e
            doc = None
        if doc is not None:
            if isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                raise DataError(str(path), f"top level must be a list of records, got {type(doc).__name__}")
            for i, rec in enumerate(doc):
                yield f"{path}: record {i}", rec, None
            return
    for i, line in enumerate(_lines(text), first_line):
        if not line or line.isspace():
            continue
        try:
            rec = _loads(line)
        except json.JSONDecodeError as e:
            yield (f"{path}:line {i}",
                   DataError(f"{path}:line {i}", f"malformed JSON ({e.msg} at column {e.colno})"), line)
            continue
        yield f"{path}:line {i}", rec, line


def _loads(line: str) -> Any:
    """``json.loads`` of one JSONL line, through orjson when it is installed (several times faster); whatever orjson
    refuses goes to ``json.loads``, so what parses and every error message stay exactly the standard library's."""
    if _orjson is not None:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(line)


def _json_document(stripped: str) -> bool:
    """Whether text (leading whitespace removed) is tried as one JSON document rather than as JSONL lines: it
    opens a list, and not as a JSONL line of turns (``["hi", ...]``) does."""
    return stripped.startswith("[") and not stripped.startswith("[\"")


_ROLE_SET = frozenset(ROLES)


def _check(where: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise DataError(where, "empty conversation (no messages)")
    has_assistant = False
    for j, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in _ROLE_SET:
            raise DataError(where, f"message {j}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(where, f"message {j}: content must be a string, got {type(content).__name__}")
        if not content or content.isspace():
            raise DataError(where, f"message {j} ({role}): empty content")
        if role == "assistant":
            has_assistant = True
        elif role == "system" and j != 0:
            raise DataError(where, f"message {j}: a system message may only come first")
    if not has_assistant:
        raise DataError(where, "conversation has no assistant turn (nothing to learn from)")
    return messages


def _from_openai(where: str, rec: Any) -> list[dict[str, str]]:
    if not isinstance(rec, dict) or "messages" not in rec:
        raise DataError(where, "expected an object with a 'messages' list")
    msgs = rec["messages"]
    if not isinstance(msgs, list):
        raise DataError(where, f"'messages' must be a list, got {type(msgs).__name__}")
    out = []
    for j, m in enumerate(msgs):
        try:
            out.append({"role": m["role"], "content": m["content"]})
        except (KeyError, TypeError, IndexError):
            if not isinstance(m, dict):
                raise DataError(where, f"message {j}: expected an object with 'role' and 'content'") from None
            key = "role" if "role" not in m else "content"
            raise DataError(where, f"message {j}: missing '{key}'") from None
    return _check(where, out)


def _from_sharegpt(where: str, rec: Any) -> list[dict[str, str]]:
    if not isinstance(rec, dict) or "conversations" not in rec:
        raise DataError(where, "expected an object with a 'conversations' list")
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise DataError(where, f"'conversations' must be a list, got {type(turns).__name__}")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(where, f"turn {j}: expected an object with 'from' and 'value'")
        for key in ("from", "value"):
            if key not in t:
                raise DataError(where, f"turn {j}: missing '{key}'")
        role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(where, f"turn {j}: unknown speaker {t['from']!r} (expected human, gpt or system)")
        out.append({"role": role, "content": t["value"]})
    return _check(where, out)


def _from_turns(where: str, rec: Any, *, coerce_scalars: bool = False) -> list[dict[str, str]]:
    if not isinstance(rec, list):
        raise DataError(where, f"expected a list of turns (strings), got {type(rec).__name__}")
    out = []
    for j, t in enumerate(rec):
        if coerce_scalars and isinstance(t, (int, float, bool)):
            t = str(t)  # YAML reads bare `yes` / `42` as non-strings
        if not isinstance(t, str):
            raise DataError(where, f"turn {j}: expected a string, got {type(t).__name__}")
        out.append({"role": "user" if j % 2 == 0 else "assistant", "content": t})
    if len(out) == 1:
        raise DataError(where, "conversation has no assistant turn (a single turn)")
    return _check(where, out)


def _chatterbot_records(path: Path, text: str) -> Iterator[tuple[str, Any, None]]:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:line {mark.line + 1}" if mark else str(path)
        raise DataError(where, f"malformed YAML ({getattr(e, 'problem', e)})") from e
    if not isinstance(doc, dict) or "conversations" not in doc:
        raise DataError(str(path), "expected a YAML mapping with a 'conversations:' list (chatterbot-corpus layout)")
    convs = doc["conversations"]
    if not isinstance(convs, list):
        raise DataError(str(path), "'conversations' must be a list of lists of turns")
    for i, c in enumerate(convs):
        yield f"{path}: conversation {i}", c, None


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
    path, fmt = part.path, part.fmt
    out: list[Conversation] = []
    res = PartResult(out, fmt)
    try:
        try:
            text = part.data.decode("utf-8-sig" if part.first_line == 1 else "utf-8")
        except UnicodeDecodeError as e:
            res.undecodable = True
            line = part.first_line + _count_line_ends(part.data, 0, e.start)
            raise DataError(f"{path}:line {line}", f"not valid UTF-8 (byte {part.offset + e.start}: {e.reason}); "
                            "re-encode the file as UTF-8") from e
        if not part.lines_only and not text.strip():
            raise DataError(str(path), "file is empty")
        if fmt == "auto":
            fmt = res.fmt = detect_format(path, text)
        parse = {"openai": _from_openai, "sharegpt": _from_sharegpt, "turns": _from_turns,
                 "chatterbot": lambda w, r: _from_turns(w, r, coerce_scalars=True)}.get(fmt)
        if parse is None:
            raise ChatrayError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        records = (_chatterbot_records(path, text) if fmt == "chatterbot"
                   else _records(path, text, part.first_line, part.lines_only))
        for where, rec, line in records:
            try:
                if isinstance(rec, DataError):
                    raise rec
                try:
                    messages = parse(where, rec)
                except DataError:
                    if line is None or _orjson is None:
                        raise
                    # orjson reads a few things differently (integers past 64 bits become floats): the standard
                    # library's reading of the line names what is wrong, exactly as without orjson.
                    messages = parse(where, json.loads(line))
                out.append(Conversation(messages, where))
            except DataError as e:
                if not part.skip_invalid:
                    raise
                res.skipped += 1
                res.errors.append(str(e.message))
    except DataError as e:
        res.error = e
    res.count = len(out)
    return res


_LEADING_SPACE = re.compile(rb"[ \t\r\n]*")


def split_parts(files: list[InputFile], fmt: str, part_bytes: int | None = None) -> list[Part]:
    """Cut the inputs into parts for parallel readers: a JSONL file larger than ``part_bytes`` becomes runs of
    whole lines of about that size (format detected once from its first run); any other file is one part."""
    parts: list[Part] = []
    for k, f in enumerate(files):
        data = f.data
        first = _LEADING_SPACE.match(data, 3 if data.startswith(b"\xef\xbb\xbf") else 0).end()
        splittable = (part_bytes is not None and len(data) > part_bytes and f.path.suffix.lower() == ".jsonl"
                      and fmt != "chatterbot" and first < len(data)  # not blank: that is "file is empty"
                      and not _json_document(data[first:first + 2].decode("utf-8", "replace")))
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
            line += _count_line_ends(data, a, b)
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
    """Read every input (files, folders, or ``chatterbot:english|chinese``) into one list, in this process.

    Raises:
        DataError / ChatrayError: see :func:`read_file`; also when no conversation at all was read.
    """
    convs, sources = _read_here(load_inputs(inputs, skip_invalid), fmt, errors)
    if not convs:
        raise ChatrayError(f"no valid conversations in {', '.join(map(str, inputs))}",
                           hint="check the files and --format")
    return convs, sources
