"""YAML -> dataclasses, with precedence defaults < YAML < ``--set key=value``.

Every config dataclass field carries ``metadata={"help": "..."}``: a one-line description that is also
shown by the CLI. Unknown keys and wrong types are errors that name the key and the file; all problems
of one file are reported together in a single :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = [
    "ConfigError",
    "field_help",
    "from_dict",
    "load_config",
    "opt",
    "parse_overrides",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration problems, each naming the key and where it came from."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" ({source})" if source else ""
        if len(problems) == 1:
            msg = f"invalid config{where}: {problems[0]}"
        else:
            msg = f"{len(problems)} config problems{where}:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(msg)


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line help text (shown by ``--help`` and in errors).

    Mutable defaults (list/dict) are wrapped in a default_factory automatically.
    """
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def field_help(cls: type, name: str) -> str:
    """The one-line help of field ``name`` of dataclass ``cls`` (dotted names walk nested dataclasses)."""
    head, _, rest = name.partition(".")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == head:
            if rest:
                return field_help(hints[head], rest)
            return f.metadata.get("help", "")
    raise KeyError(name)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return the (lightly converted) value or record a problem."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{key}: must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping (section), got {value!r}")
            return value
        return _build(tp, value, key + ".", problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads ``3e-4`` (no dot) as a string (YAML 1.1); accept numeric strings for float fields.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    start = len(problems)  # only problems of this section stop it from being built (siblings still validate)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key).replace("-", "_"), sorted(names), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(names))})"
            problems.append(f"unknown key {prefix}{key}{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, problems)
    if len(problems) > start:
        return None  # type: ignore[return-value]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return None  # type: ignore[return-value]


def from_dict(cls: type[T], data: dict[str, Any] | None, source: str | None = None) -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: naming every bad key (with its dotted path) and ``source``.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of keys, got {type(data).__name__}"], source)
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass (nested) as a plain dict, e.g. for logging or writing next to a checkpoint."""
    return dataclasses.asdict(obj)


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ``["train.max_steps=200", "model.name=gpt2"]`` into a nested dict.

    Values are parsed as YAML scalars (``200`` -> int, ``true`` -> bool, ``[a, b]`` -> list).
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=200"], "--set")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {item!r}: {part} is both a value and a section"], "--set")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | typing.Iterable[str] | None = None
) -> T:
    """Load ``cls`` with precedence defaults < YAML file at ``path`` < ``overrides``.

    Args:
        cls: the config dataclass.
        path: a YAML file, or None for defaults only.
        overrides: a nested dict, or ``KEY=VALUE`` strings as given to ``--set``.

    Raises:
        ConfigError: unreadable/invalid YAML, unknown keys, wrong types, failed validation.
    """
    import yaml

    data: dict[str, Any] = {}
    source = str(path) if path else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p}"], str(p))
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], str(p)) from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of keys, got {type(loaded).__name__}"], str(p))
        data = loaded
    if overrides:
        over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        # Validate overrides on their own first so that a bad --set is blamed on --set, not the file.
        _check_keys_only(cls, over, "--set")
        data = _merge(data, over)
        source = f"{source} + --set" if path else "--set"
    return from_dict(cls, data, source)


def _check_keys_only(cls: type, data: dict[str, Any], source: str) -> None:
    problems: list[str] = []

    def walk(c: type, d: dict[str, Any], prefix: str) -> None:
        hints = typing.get_type_hints(c)
        names = {f.name for f in dataclasses.fields(c)}
        for k, v in d.items():
            if k not in names:
                problems.append(f"unknown key {prefix}{k} (known keys: {', '.join(sorted(names))})")
            elif isinstance(v, dict) and dataclasses.is_dataclass(hints[k]):
                walk(hints[k], v, f"{prefix}{k}.")

    walk(cls, data, "")
    if problems:
        raise ConfigError(problems, source)
