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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chatray.errors import ChatrayError

__all__ = [
    "FORMATS",
    "ROLES",
    "Conversation",
    "DataError",
    "Format",
    "collect_files",
    "detect_format",
    "iter_conversations",
    "read_file",
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


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:line {line}", f"not valid UTF-8 (byte {e.start}: {e.reason}); "
                        "re-encode the file as UTF-8") from e


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
        for i, line in enumerate(text.splitlines(), 1):
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


def _records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs of a JSON array/object file or a JSONL file."""
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith("[") and not stripped.startswith("[\""):
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
                yield f"{path}: record {i}", rec
            return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:line {i}", DataError(f"{path}:line {i}", f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        yield f"{path}:line {i}", rec


def _check(where: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise DataError(where, "empty conversation (no messages)")
    for j, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(where, f"message {j}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(where, f"message {j}: content must be a string, got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise DataError(where, f"message {j} ({m['role']}): empty content")
        if m["role"] == "system" and j != 0:
            raise DataError(where, f"message {j}: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
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
        if not isinstance(m, dict):
            raise DataError(where, f"message {j}: expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(where, f"message {j}: missing '{key}'")
        out.append({"role": m["role"], "content": m["content"]})
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


def _chatterbot_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
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
        yield f"{path}: conversation {i}", c


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
    data = path.read_bytes()
    text = _decode(path, data)
    if not text.strip():
        raise DataError(str(path), "file is empty")
    if fmt == "auto":
        fmt = detect_format(path, text)
    src = SourceFile(path=str(path), sha256=hashlib.sha256(data).hexdigest(), format=fmt)
    records = _chatterbot_records(path, text) if fmt == "chatterbot" else _records(path, text)
    parse = {"openai": _from_openai, "sharegpt": _from_sharegpt, "turns": _from_turns,
             "chatterbot": lambda w, r: _from_turns(w, r, coerce_scalars=True)}.get(fmt)
    if parse is None:
        raise ChatrayError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out: list[Conversation] = []
    for where, rec in records:
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(Conversation(parse(where, rec), where))
        except DataError as e:
            if not skip_invalid:
                raise
            src.skipped += 1
            if errors is not None:
                errors.append(str(e.message))
    src.conversations = len(out)
    return out, src


def iter_conversations(inputs: list[str], fmt: str = "auto", *, skip_invalid: bool = False,
                       errors: list[str] | None = None) -> tuple[list[Conversation], list[SourceFile]]:
    """Read every input (files, folders, or ``chatterbot:english|chinese``) into one list.

    Raises:
        DataError / ChatrayError: see :func:`read_file`; also when no conversation at all was read.
    """
    from chatray.data.corpus import corpus_root, expand_corpus_inputs

    files = collect_files(expand_corpus_inputs(inputs))
    bundled = corpus_root()
    convs: list[Conversation] = []
    sources: list[SourceFile] = []
    for f in files:
        # The bundled corpus has a few malformed records of its own (e.g. a bare string where a list of
        # turns belongs): those are always skipped and counted, never fatal.
        in_corpus = bundled is not None and f.resolve().is_relative_to(bundled)
        c, s = read_file(f, fmt, skip_invalid=skip_invalid or in_corpus, errors=errors)
        convs.extend(c)
        sources.append(s)
    if not convs:
        raise ChatrayError(f"no valid conversations in {', '.join(map(str, inputs))}",
                           hint="check the files and --format")
    return convs, sources
