"""The dialogue record formats ``data prepare`` accepts, parsed with exact error locations.

Every record becomes a :class:`Conversation` whose messages are ``{"role", "content"}`` dicts with roles
``system | user | assistant``. A bad record becomes a :class:`DataError` naming file, line (JSONL) or record
(JSON/YAML) and the reason.

Formats:
    openai      JSONL (or JSON list) of ``{"messages": [{"role": ..., "content": ...}, ...]}``
    sharegpt    JSON/JSONL of ``{"conversations": [{"from": "human|gpt|system", "value": ...}, ...]}``
    turns       JSON/JSONL of lists of strings alternating user/assistant (``[[u, a, u, a], ...]``)
    chatterbot  YAML with ``conversations:`` lists of turns (the chatterbot-corpus layout)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "count_line_ends",
    "detect_format",
    "is_json_document",
    "parse_records",
]

FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "turns", "chatterbot")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_ROLE_SET = frozenset(ROLES)
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}
_LINE_END = re.compile(r"\r\n|\r|\n")  # not str.splitlines(): U+2028, U+0085... are legal inside JSON strings


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


def _malformed(where: str, e: json.JSONDecodeError) -> DataError:
    return DataError(where, f"malformed JSON ({e.msg} at column {e.colno})")


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
    if suffix == ".json" or is_json_document(stripped):  # the rule parse_records reads the file by
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
                    raise _malformed(f"{path}:line {i}", e) from e
                break
    if isinstance(first, dict) and "messages" in first:
        return "openai"
    if isinstance(first, dict) and "conversations" in first:
        return "sharegpt"
    if isinstance(first, list):
        return "turns"
    raise DataError(f"{path}", "cannot tell the format from the first record (expected an object with 'messages' "
                    "or 'conversations', or a list of turns); pass --format")


def is_json_document(stripped: str) -> bool:
    """Whether text (leading whitespace removed) is tried as one JSON document rather than as JSONL lines: it
    opens a list, and not as a JSONL line of turns (``["hi", ...]``) does."""
    return stripped.startswith("[") and not stripped.startswith("[\"")


def count_line_ends(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Line ends in ``data[start:end]`` as JSONL lines are cut (\\r\\n, \\r or \\n)."""
    return data.count(b"\n", start, end) + data.count(b"\r", start, end) - data.count(b"\r\n", start, end)


def _lines(text: str) -> list[str]:
    """``text`` cut at :data:`_LINE_END` (plain ``str.split``, much faster, when there is no \\r)."""
    return _LINE_END.split(text) if "\r" in text else text.split("\n")


def _loads(line: str) -> Any:
    """``json.loads`` of one JSONL line, through orjson when it is installed (faster); whatever orjson
    refuses goes to ``json.loads``, so what parses and every error message stay exactly the standard library's."""
    if _orjson is not None:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(line)


def _json_records(path: Path, text: str, first_line: int = 1,
                  lines_only: bool = False) -> Iterator[tuple[str, Any, str | None]]:
    """(location, record, JSONL line or None) of a JSON array/object file or a JSONL file (or a run of JSONL lines
    starting at line ``first_line`` when ``lines_only``)."""
    if not lines_only and (path.suffix.lower() == ".json" or is_json_document(text.lstrip())):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json":
                raise _malformed(f"{path}:line {e.lineno}", e) from e
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
            yield f"{path}:line {i}", _malformed(f"{path}:line {i}", e), line
            continue
        yield f"{path}:line {i}", rec, line


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


def _list_field(where: str, rec: Any, key: str) -> list[Any]:
    """``rec[key]``, which must be a list inside an object."""
    if not isinstance(rec, dict) or key not in rec:
        raise DataError(where, f"expected an object with a '{key}' list")
    items = rec[key]
    if not isinstance(items, list):
        raise DataError(where, f"'{key}' must be a list, got {type(items).__name__}")
    return items


def _from_openai(where: str, rec: Any) -> list[dict[str, str]]:
    out = []
    for j, m in enumerate(_list_field(where, rec, "messages")):
        try:
            out.append({"role": m["role"], "content": m["content"]})
        except (KeyError, TypeError, IndexError):
            if not isinstance(m, dict):
                raise DataError(where, f"message {j}: expected an object with 'role' and 'content'") from None
            key = "role" if "role" not in m else "content"
            raise DataError(where, f"message {j}: missing '{key}'") from None
    return _check(where, out)


def _from_sharegpt(where: str, rec: Any) -> list[dict[str, str]]:
    out = []
    for j, t in enumerate(_list_field(where, rec, "conversations")):
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


def _from_chatterbot(where: str, rec: Any) -> list[dict[str, str]]:
    return _from_turns(where, rec, coerce_scalars=True)


_PARSERS: dict[str, Callable[[str, Any], list[dict[str, str]]]] = {
    "openai": _from_openai, "sharegpt": _from_sharegpt, "turns": _from_turns, "chatterbot": _from_chatterbot}


def parse_records(path: Path, text: str, fmt: str, *, first_line: int = 1,
                  lines_only: bool = False) -> Iterator[Conversation | DataError]:
    """The records of ``text`` (read from ``path``) in format ``fmt``, in order: a conversation for each good one,
    the error for each bad one.

    Args:
        path: the file, for error locations and the suffix (``.json`` is one document).
        text: the file's text, or a run of its JSONL lines when ``lines_only``.
        fmt: a format name (not ``auto``: see :func:`detect_format`).
        first_line: the file's line number of ``text``'s first line.
        lines_only: ``text`` is JSONL lines, never one JSON document.

    Raises:
        DataError: a file-level problem (malformed JSON document or YAML, a top level that is not a list).
        ChatrayError: an unknown format name.
    """
    parse = _PARSERS.get(fmt)
    if parse is None:
        raise ChatrayError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    records: Iterator[tuple[str, Any, str | None]]
    if fmt == "chatterbot":
        records = _chatterbot_records(path, text)
    else:
        records = _json_records(path, text, first_line, lines_only)
    for where, rec, line in records:
        try:
            item: Conversation | DataError = Conversation(_parse_one(parse, where, rec, line), where)
        except DataError as e:
            item = e
        yield item


def _parse_one(parse: Callable[[str, Any], list[dict[str, str]]], where: str, rec: Any,
               line: str | None) -> list[dict[str, str]]:
    """The messages of one record (``rec`` is the line's malformed-JSON error when it did not parse)."""
    if isinstance(rec, DataError):
        raise rec
    try:
        return parse(where, rec)
    except DataError:
        if line is None or _orjson is None:
            raise
        # orjson reads a few things differently (integers past 64 bits become floats): the standard library's
        # reading of the line names what is wrong, exactly as without orjson.
        return parse(where, json.loads(line))
