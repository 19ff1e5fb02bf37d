"""The run configuration: one frozen dataclass per stage, nested in RunConfig.

Loading, checking and typed command-line overrides are generic and live on the
ground floor (pipeline.configio); this module only composes the stage configs,
so it sits with the stages. A new stage adds its config class and one field of
RunConfig. `docs/configuration.md` is generated from these classes
(`python -m pipeline.configdoc`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from pipeline import configio
from pipeline.crawl import CrawlConfig
from pipeline.dedup import DedupConfig
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
    progress: bool = True  # progress bars for each stage


@dataclass(frozen=True)
class RunConfig:
    """Everything `clipline run` needs: where outputs go, how to run, and each stage's config."""

    name: str = "clipline"  # the dataset name written into its manifest and report
    out: str = "out"  # local directory or s3://bucket/prefix
    stages: tuple[str, ...] = ()  # data stages to run, in pipeline order; empty = all
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    # named dataset variants over the shared ingest, crawl and dedup, each written to OUT/variants/NAME/:
    # {NAME: {filter: {...}, shard: {...}, stats: {...}}}, overrides of those sections (pipeline/variants.py)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_config(path: str | Path | None, overrides: Iterable[str | tuple[str, Any]] = (), cls: type = RunConfig) -> Any:
    """A run config (or another config class) from YAML, then overrides; see pipeline.configio."""
    return configio.load(cls, path, overrides)


def dump_config(config: Any) -> str:
    return configio.dump(config)


apply_overrides = configio.apply_overrides
