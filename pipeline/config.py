"""Run configuration: one frozen dataclass per stage, nested in RunConfig, loaded from YAML.

Unknown keys and values of the wrong type are errors that name the key, so a
typo never silently falls back to a default. A few settings can be overridden
on the command line with ``--set section.key=value`` (the value is parsed as
YAML: ``--set runtime.max_retries=3``).

A stage issue adds its config here as a dataclass and one field of RunConfig.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.crawl import CrawlConfig
from pipeline.dedup import DedupConfig
from pipeline.errors import ConfigError
from pipeline.filter import FilterConfig
from pipeline.ingest import IngestConfig
from pipeline.shard import ShardConfig
from pipeline.stats import StatsConfig


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how stages run."""

    executor: Literal["ray", "inline"] = "ray"  # inline: in this process, one shard at a time (debugging)
    address: str | None = None  # Ray cluster address; None starts a local instance
    num_cpus: int | None = None  # local instance size; None = all CPUs
    max_retries: int = 2  # per shard, for exceptions and for dead workers/nodes
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Everything `clipline run` needs: where outputs go, how to run, and each stage's config."""

    name: str = "clipline"
    out: str = "out"  # local directory or s3://bucket/prefix
    stages: tuple[str, ...] = ()  # data stages to run, in pipeline order; empty = all
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)


# --- generic dataclass <-> dict, with checking ----------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a valid {_type_name(tp)}")
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' → (['a', 'b'], parsed YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e.__class__.__name__})") from e
    return key.strip().split("."), value


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of `config` with `section.key=value` overrides applied and re-checked."""
    data = to_dict(config)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section '{part}' in override '{text}'")
            node = node[part]
        node[path[-1]] = value
    return from_dict(type(config), data)


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Load a YAML file (or the defaults when `path` is None), then apply overrides."""
    data: dict = {}
    if path is not None:
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
    try:
        config = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e
    return apply_overrides(config, list(overrides))


def dump_config(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
