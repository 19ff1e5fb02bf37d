"""The data stages in pipeline order. Adding a stage is one line in STAGES.

Each entry names the module attribute holding its `pipeline.stage.Stage`, or
a tuple of Stages run in order (ingest is map → merge → cut); modules are
imported only when a stage is used, so `clipline --help` stays fast.
"""

from __future__ import annotations

import importlib

from pipeline.errors import ConfigError, NotImplementedStage
from pipeline.stage import Stage

# name -> "module:attribute", in pipeline order.
STAGES: dict[str, str] = {
    "ingest": "pipeline.ingest:STAGES",
    "crawl": "pipeline.crawl:STAGE",
    "dedup": "pipeline.dedup:STAGES",
    "filter": "pipeline.filter:STAGE",
    "shard": "pipeline.shard:STAGES",
    "stats": "pipeline.stats:STAGE",
}

# Every data stage of DESIGN.md, in order, and the issue that brings it.
PIPELINE_ORDER: dict[str, str] = {
    "ingest": "#3 ingest and crawl",
    "crawl": "#3 ingest and crawl",
    "dedup": "#4 dedup",
    "filter": "#5 filter",
    "shard": "#6 final shards and stats",
    "stats": "#6 final shards and stats",
}


def get_stages(name: str) -> list[Stage]:
    """The Stage(s) called `name`, in order; a one-line error if unknown or not built yet."""
    if name not in PIPELINE_ORDER and name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(PIPELINE_ORDER)})")
    if name not in STAGES:
        raise NotImplementedStage(f"stage '{name}' is not implemented yet (issue {PIPELINE_ORDER[name]})")
    module, _, attr = STAGES[name].partition(":")
    found = getattr(importlib.import_module(module), attr)
    return list(found) if isinstance(found, (tuple, list)) else [found]


def implemented() -> list[str]:
    return [name for name in PIPELINE_ORDER if name in STAGES]


def select(names: tuple[str, ...] | list[str]) -> list[Stage]:
    """Stages by name in pipeline order; an empty selection means every implemented stage."""
    wanted = list(names) or implemented()
    order = list(PIPELINE_ORDER) + [n for n in STAGES if n not in PIPELINE_ORDER]
    selected: list[Stage] = []
    for name in sorted(set(wanted), key=lambda n: order.index(n) if n in order else len(order)):
        selected.extend(get_stages(name))
    return selected
