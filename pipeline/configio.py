"""Frozen config dataclasses to and from YAML and the command line, with checking (ground floor).

Unknown keys and values of the wrong type are errors that name the key, so a
typo never silently falls back to a default.

Overrides (``--set section.key=value`` and a command's own flags) are applied
as *typed* values: the text after ``=`` is read as the type of the field it
sets, never as YAML first. So ``--set out=2024`` and ``--out on`` keep their
text for a string field, ``--set lr=1e-3`` is a float and
``--set runtime.progress=off`` a bool. ``null`` (or ``~``) sets an optional
field to None. Lists, mappings and nested sections take YAML flow syntax
(``--set stages=[crawl,dedup]``); a list field also takes one bare item
(``--set ingest.inputs=urls.parquet``).

No module of clipline sits below this one but errors: any package may import it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import yaml

from pipeline.errors import ConfigError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NULL = ("null", "~")


def type_name(tp: Any) -> str:
    """A config type as the reference docs and error messages spell it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (tuple, list):
        inner = [type_name(a) for a in args if a is not Ellipsis]
        return f"list[{', '.join(inner)}]" if inner else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _first_member(tp: Any, value: Any, where: str, read: Callable[[Any, Any, str], Any]) -> Any:
    """`value` read as the first member type of the Union `tp` that takes it; else the one error there was,
    or one line naming the whole Union."""
    errors = []
    for arg in typing.get_args(tp):
        if arg is type(None):
            continue
        try:
            return read(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a valid {type_name(tp)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return None if value is None and type(None) in args else _first_member(tp, value, where, _coerce)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"config type {tp} at {where} is not supported by the loader")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{where + '.' if where else ''}{key}' (known here: {known})")
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """A plain dict (tuples as lists) that from_dict turns back into an equal config."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


# --- typed overrides ---------------------------------------------------------------------


def parse_text(raw: str, tp: Any, where: str) -> Any:
    """Command-line text read as a value of config type `tp` (see the module docstring)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.strip().lower() in NULL and type(None) in args:
            return None
        return _first_member(tp, raw, where, parse_text)
    if tp is str or tp is Any:
        return raw
    if origin is Literal:
        for arg in args:
            if str(arg) == raw:
                return arg
        raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(map(repr, args))}")
    if tp is bool:
        word = raw.strip().lower()
        if word in TRUE or word in FALSE:
            return word in TRUE
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if tp is int:
        try:
            return int(raw.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
    if origin in (tuple, list) and not raw.lstrip().startswith("["):
        return _coerce([parse_text(raw, args[0] if args else Any, f"{where}[0]")], tp, where)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {raw!r} is not valid YAML flow syntax ({e.__class__.__name__})") from e
    return _coerce(value, tp, where)


def _field_type(cls: type, key: str, where: str, section: bool) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if key not in names:
        what = f"section '{key}' in '{where}'" if section else f"key '{where}'"
        raise ConfigError(f"unknown config {what} (known here: {', '.join(sorted(names))})")
    return typing.get_type_hints(cls)[key]


def set_value(config: Any, path: list[str], value: Any, text: bool = False, prefix: str = "") -> Any:
    """A copy of `config` with the field at `path` set to `value`, checked against its type.

    With ``text=True`` the value is command-line text, read by the field's type (parse_text).
    """
    key, where = path[0], prefix + ".".join(path)
    tp = _field_type(type(config), key, where, section=len(path) > 1)
    if len(path) > 1:
        inner = getattr(config, key)
        if not dataclasses.is_dataclass(inner):
            raise ConfigError(f"unknown config section '{key}' in '{where}' ({key} is a {type_name(tp)})")
        return dataclasses.replace(config, **{key: set_value(inner, path[1:], value, text, f"{prefix}{key}.")})
    value = parse_text(value, tp, where) if text else _coerce(value, tp, where)
    return dataclasses.replace(config, **{key: value})


def parse_override(text: str) -> tuple[list[str], str]:
    """'a.b=value' → (['a', 'b'], 'value'); the value stays text until its field's type reads it."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    return key.strip().split("."), raw


def apply_overrides(config: Any, overrides: Iterable[str | tuple[str, Any]] = ()) -> Any:
    """A copy of `config` with overrides applied and checked.

    Each override is ``"section.key=text"`` (``--set``: the text is read by the field's type) or a pair
    ``("section.key", value)`` holding an already typed value (a command's own flag).
    """
    for override in overrides:
        if isinstance(override, str):
            path, raw = parse_override(override)
            config = set_value(config, path, raw, text=True)
        else:
            key, value = override
            config = set_value(config, key.split("."), value)
    return config


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; one-line errors for a missing file, bad YAML or another top level."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load(cls: type, path: str | Path | None, overrides: Iterable[str | tuple[str, Any]] = ()) -> Any:
    """Config `cls` from a YAML file (the defaults when `path` is None), then overrides applied."""
    data = read_yaml_mapping(path) if path is not None else {}
    try:
        config = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e
    return apply_overrides(config, overrides)


def dump(config: Any) -> str:
    """YAML that `load` turns back into an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
