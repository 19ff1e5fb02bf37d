"""Dataset variants: several filter + shard + stats configurations over one ingest, crawl and dedup.

A variant NAME keeps its own ``filter/``, ``shard/``, ``dataset/`` (manifest,
shards, stats report) and ``config.yaml`` under ``OUT/variants/NAME/``, and reads
the shared ``ingest/``, ``crawl/`` and ``dedup/`` of ``OUT/``. The stages run
unchanged over a storage view (`VariantStorage`) that routes each path to one or
the other, so a variant has its own markers and lineage and nothing is crawled
again. The unnamed variant is the layout of OUT/ itself.

Variants come from a config's ``variants:`` section (each a set of overrides of
the filter, shard and stats sections) or from ``clipline run --variant NAME``
with the config and ``--set`` overrides given.
"""

from __future__ import annotations

from typing import Any

from pipeline import configio, layout
from pipeline.errors import ConfigError
from pipeline.storage import Storage

STAGES = ("filter", "shard", "stats")  # the stages a variant has of its own
ROUTED = ("filter", "shard", layout.DATASET, "stats", layout.CONFIG_FILE)  # first path parts kept per variant
ROOT = "variants"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def check_name(name: str) -> str:
    if not name or not set(name) <= NAME_CHARS:
        raise ConfigError(f"variant name {name!r}: use lowercase letters, digits, '-' and '_'")
    return name


class VariantStorage:
    """A storage view of one variant: its own stages' paths under variants/NAME/, every other path shared."""

    def __init__(self, base: Storage, name: str):
        self.base = base
        self.variant = check_name(name)
        self.prefix = f"{ROOT}/{name}/"
        self.uri = base.url(f"{ROOT}/{name}")

    def route(self, rel: str) -> str:
        return self.prefix + rel if rel.split("/", 1)[0] in ROUTED else rel

    def __getattr__(self, attr: str):
        if attr in ("base", "variant", "prefix", "uri"):  # not set yet (unpickling): no recursion into base
            raise AttributeError(attr)
        return getattr(self.base, attr)  # what takes no path: map_reads, read_concurrency, ...

    def __reduce__(self):
        return (VariantStorage, (self.base, self.variant))

    def url(self, rel: str = "") -> str:
        return self.base.url(self.route(rel)) if rel else self.uri

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        routed = self.route(prefix)
        names = self.base.list(routed, suffix)
        return [n[len(self.prefix) :] if routed.startswith(self.prefix) else n for n in names]

    def child(self, rel: str) -> Storage:
        return self.base.child(self.route(rel))

    def put_file(self, local_path, rel: str) -> None:
        self.base.put_file(local_path, self.route(rel))

    def move_file(self, local_path, rel: str) -> None:
        self.base.move_file(local_path, self.route(rel))

    def get_file(self, rel: str, local_path) -> None:
        self.base.get_file(self.route(rel), local_path)


def _routed_method(name: str):
    def method(self, rel: str, *args, **kwargs):
        return getattr(self.base, name)(self.route(rel), *args, **kwargs)

    method.__name__ = name
    return method


for _name in (
    "exists", "size", "open_read", "open_seekable", "delete", "read_bytes", "write_bytes", "writer",
    "read_range", "read_json", "write_json", "read_parquet", "read_frame", "write_parquet",
):  # fmt: skip
    setattr(VariantStorage, _name, _routed_method(_name))


def variant_config(run: Any, name: str) -> Any:
    """The run config of variant `name`: the config's own, with its `variants:` overrides when it lists the name."""
    check_name(name)
    overrides = (run.variants or {}).get(name)
    data = configio.to_dict(run)
    data["variants"] = {}
    if overrides:
        if not isinstance(overrides, dict) or set(overrides) - set(STAGES):
            found = sorted(set(overrides) - set(STAGES)) if isinstance(overrides, dict) else overrides
            raise ConfigError(f"variants.{name}: a variant overrides {', '.join(STAGES)} only, not {found}")
        for section, values in overrides.items():
            if not isinstance(values, dict):
                raise ConfigError(f"variants.{name}.{section}: expected a mapping of settings")
            data[section] = {**data[section], **values}
    try:
        return configio.from_dict(type(run), data)
    except ConfigError as e:
        raise ConfigError(f"variants.{name}: {e}") from e


def names(storage: Storage) -> list[str]:
    """The variants that have a dataset under OUT/variants/."""
    found = {rel.split("/")[1] for rel in storage.list(ROOT, suffix="manifest.json")}
    return sorted(found)
