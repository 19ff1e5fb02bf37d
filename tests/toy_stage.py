"""A small deterministic stage for testing the runner: tables in, parquet + bytes out.

Shard k writes toy/{k:05d}.parquet (rows derived from k and the seed) and
toy/{k:05d}.bin. Faults are driven by the config so that the test, not the
stage, decides what goes wrong. `attempts_dir` counts executions per shard
across processes (one file per attempt).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import RuntimeConfig
from pipeline.errors import SchemaError
from pipeline.stage import IDENTITY, PlanContext, ShardContext, Stage

RUNTIME_ONLY = {IDENTITY: False}


@dataclass(frozen=True)
class ToyConfig:
    shards: int = 6
    rows: int = 50
    seed: int = 0
    # Fault injection: does not change what a successful shard writes.
    sleep: float = field(default=0.0, metadata=RUNTIME_ONLY)
    fail_shards: tuple[int, ...] = field(default=(), metadata=RUNTIME_ONLY)  # raise every time
    flaky_shards: tuple[int, ...] = field(default=(), metadata=RUNTIME_ONLY)  # raise on the first attempt only
    crash_shards: tuple[int, ...] = field(default=(), metadata=RUNTIME_ONLY)  # kill the worker on the first attempt
    bad_input_shards: tuple[int, ...] = field(default=(), metadata=RUNTIME_ONLY)  # a ClipError: not retried
    fail_after_staging: tuple[int, ...] = field(default=(), metadata=RUNTIME_ONLY)  # raise after staging outputs
    attempts_dir: str = field(default="", metadata=RUNTIME_ONLY)


@dataclass(frozen=True)
class ToyRun:
    out: str = ""
    toy: ToyConfig = field(default_factory=ToyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def attempts(config: ToyConfig, shard: int) -> int:
    return len(list(Path(config.attempts_dir).glob(f"{shard:05d}-*"))) if config.attempts_dir else 0


def task_id() -> str:
    """The Ray task running this attempt ("inline" outside Ray)."""
    import ray

    return (ray.get_runtime_context().get_task_id() if ray.is_initialized() else None) or "inline"


def attempt_tasks(config: ToyConfig) -> dict[str, list[int]]:
    """The shards each task ran (an attempt file is named shard-task-nonce)."""
    tasks: dict[str, list[int]] = {}
    for path in sorted(Path(config.attempts_dir).iterdir()):
        shard, task, _ = path.name.split("-")
        tasks.setdefault(task, []).append(int(shard))
    return tasks


def plan(ctx: PlanContext) -> list[int]:
    return list(range(ctx.config.shards))


def run_shard(ctx: ShardContext) -> dict:
    cfg: ToyConfig = ctx.config
    before = attempts(cfg, ctx.shard)
    if cfg.attempts_dir:
        (Path(cfg.attempts_dir) / f"{ctx.shard:05d}-{task_id()}-{uuid.uuid4().hex}").touch()
    if cfg.sleep:
        time.sleep(cfg.sleep)
    if ctx.shard in cfg.bad_input_shards:
        raise SchemaError(f"toy/{ctx.name}.parquet: missing column 'url' (string)")
    if ctx.shard in cfg.fail_shards:
        raise ValueError(f"toy failure in shard {ctx.shard}")
    if ctx.shard in cfg.flaky_shards and before == 0:
        raise ConnectionError("transient toy failure")
    if ctx.shard in cfg.crash_shards and before == 0:
        os._exit(1)  # the worker process dies without a word
    rng = np.random.default_rng([cfg.seed, ctx.shard])
    values = rng.integers(0, 1000, size=cfg.rows)
    table = pa.table({"shard": pa.array([ctx.shard] * cfg.rows, pa.int32()), "value": values})
    ctx.write_table(f"toy/{ctx.name}.parquet", table)
    ctx.output_path(f"toy/{ctx.name}.bin").write_bytes(values.astype("<i8").tobytes())
    if ctx.shard in cfg.fail_after_staging:
        raise ValueError("failed after staging its outputs")
    return {"rows": cfg.rows, "sum": int(values.sum())}


STAGE = Stage(name="toy", plan=plan, run_shard=run_shard)
