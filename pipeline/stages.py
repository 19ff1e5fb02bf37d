"""The data stages' registry: each stage's Stage objects, imported by name when used.

The order and the entry points are declared once, in pipeline.layout.STAGES
(an entry may be a tuple of Stages run in order: ingest is map → merge → cut);
modules are imported only when a stage is used, so `clipline --help` stays fast.
"""

from __future__ import annotations

import importlib

from pipeline.errors import ConfigError
from pipeline.layout import STAGE_ORDER, STAGES
from pipeline.stage import Stage


def get_stages(name: str) -> list[Stage]:
    """The Stage(s) called `name`, in order; a one-line error if unknown."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(STAGE_ORDER)})")
    module, _, attr = STAGES[name].partition(":")
    found = getattr(importlib.import_module(module), attr)
    return list(found) if isinstance(found, (tuple, list)) else [found]


def select(names: tuple[str, ...] | list[str]) -> list[Stage]:
    """Stages by name in pipeline order; an empty selection means every stage."""
    wanted = set(names) or set(STAGE_ORDER)
    for name in wanted:
        if name not in STAGES:
            raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(STAGE_ORDER)})")
    return [stage for name in STAGE_ORDER if name in wanted for stage in get_stages(name)]
