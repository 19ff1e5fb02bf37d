"""Maps stages over shards as Ray tasks. The only module that imports Ray.

- local Ray with this machine's CPUs by default, a cluster with an address;
- committed shards are skipped (resume), so a killed run started again redoes
  only the rest, with identical results;
- a shard that raises is retried (bounded); a worker or node that dies: its
  task is retried by Ray (bounded), skipping the shards it had committed; a
  shard that still fails is reported with its one-line error after the others
  finish, never hangs the stage;
- a bad-input error (ClipError) is not retried: it cannot succeed;
- a task runs one shard, or several for stages whose shards are quick
  (Stage.shards_per_task), as long as that leaves enough tasks to balance.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from pipeline.errors import ClipError, StageFailed
from pipeline.lineage import expected_inputs, staleness
from pipeline.stage import (
    PlanContext,
    ShardOutcome,
    Stage,
    committed_shards,
    config_sha256,
    execute_shard,
    prune,
    read_marker,
    shard_name,
)
from pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    """What one stage run did: which shards ran, which were already committed, their stats."""

    stage: str
    planned: int
    ran: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    stats: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0
    stale: dict[int, str] = field(default_factory=dict)  # committed shards redone, with why (pipeline.lineage)
    unchanged: list[int] = field(default_factory=list)  # of those run: outputs came out byte-identical
    pruned: list[int] = field(default_factory=list)  # committed shards the plan no longer lists, removed

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0) or 0) for s in self.stats.values())


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: an existing connection, a cluster, or a local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job: join the job's cluster
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)


def stage_resources(stage, run) -> tuple[float, float]:
    """(CPUs, GPUs) per task: a stage that can use a GPU (the CLIP-score filter) gets one when the cluster has any."""
    wants_gpu = stage.num_gpus or (stage.gpu_when and stage.gpu_when(stage.config_of(run)))
    if wants_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return stage.num_cpus, float(stage.num_gpus or 1)
    return stage.num_cpus, 0.0


def _one_line(exc: BaseException) -> str:
    """A Ray task error as one line: the original exception, not Ray's traceback dump."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "the worker running it died (retries exhausted)"
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return "the node running it died (retries exhausted)"
    text = " ".join(str(exc).split()) or "no message"
    return text if isinstance(exc, ClipError) else f"{type(exc).__name__}: {text}"


def execute_shards(
    stage: Stage, shards: list[int], storage: Storage, run: Any, max_retries: int, inputs: dict[int, dict]
) -> list[ShardOutcome]:
    """execute_shard for each of `shards` in turn (with its expected inputs), a shard that raises
    tried again up to `max_retries` times, then reported with its one-line error (the others still run)."""
    outcomes = []
    for shard in shards:
        for attempt in range(max_retries + 1):
            try:
                outcomes.append(execute_shard(stage, shard, storage, run, inputs.get(shard)))
                break
            except Exception as e:  # noqa: BLE001 - every failure becomes a reported row
                if attempt == max_retries:
                    outcomes.append(ShardOutcome(shard, {}, error=f"{stage.name}/{shard_name(shard)}: {_one_line(e)}"))
    return outcomes


@ray.remote
def _execute_remote(
    stage: Stage, shards: list[int], storage: Storage, run: Any, max_retries: int, inputs: dict[int, dict]
) -> list:
    logging.basicConfig(level=logging.INFO)
    return execute_shards(stage, shards, storage, run, max_retries, inputs)


# Shards a Ray task runs when a stage allows several (Stage.shards_per_task): as many as leave
# at least this many tasks for each task slot, so that the last tasks still balance.
TASKS_PER_SLOT = 12


def shards_per_task(stage: Stage, pending: int, slots: int) -> int:
    """How many of `pending` shards one task runs: 1, or up to stage.shards_per_task when there
    are many more shards than `slots` (tasks that can run at once)."""
    return max(1, min(stage.shards_per_task, pending // (TASKS_PER_SLOT * max(1, slots))))


def _task_slots(cpus: float, gpus: float) -> int:
    """Tasks of this size the cluster can run at once."""
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / cpus if cpus else float("inf")
    if gpus:
        slots = min(slots, resources.get("GPU", 0) / gpus)
    return max(1, int(slots))


def _committed_markers(storage: Storage, stage: Stage) -> dict[int, dict]:
    committed = committed_shards(storage, stage.name)
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = list(pool.map(lambda s: (s, read_marker(storage, stage.name, s)), sorted(committed)))
    return {s: m for s, m in markers if m is not None}


def _lost_batch(
    stage: Stage, batch: list[int], storage: Storage, run: Any, error: str, inputs: dict[int, dict]
) -> list[ShardOutcome]:
    """Outcomes of a task that failed as a whole (its worker died, retries spent): the shards it
    committed before that, from their markers; the others failed with `error`. (Pending shards
    had no fresh marker when the stage began, except in a redo stage, whose markers prove nothing.)"""
    config_hash = config_sha256(stage.config_of(run))
    outcomes = []
    for shard in batch:
        marker = None if stage.redo else read_marker(storage, stage.name, shard)
        if marker is not None and staleness(marker, config_hash, inputs.get(shard) if inputs else None) is None:
            outcomes.append(ShardOutcome(shard, marker.get("stats", {})))
        else:
            outcomes.append(ShardOutcome(shard, {}, error=f"{stage.name}/{shard_name(shard)}: {error}"))
    return outcomes


def run_stage(stage: Stage, storage: Storage, run: Any, **settings) -> StageReport:
    """Run every planned shard of `stage` that is not committed yet; raise StageFailed listing failures.

    A `repeat` stage (rounds of an iterative step) is planned again after each pass, until a
    pass has nothing left to run: its plan adds the next round's shards while more are needed.
    Keyword settings: executor ("ray" or "inline"), max_retries, address, num_cpus, progress."""
    report = more = _run_stage_once(stage, storage, run, **settings)
    while stage.repeat and more.ran:
        more = _run_stage_once(stage, storage, run, **settings)
        report = StageReport(
            stage.name,
            planned=more.planned,
            ran=sorted(report.ran + more.ran),
            skipped=sorted(set(more.skipped) - set(report.ran)),
            stats=more.stats,
            seconds=report.seconds + more.seconds,
            stale={**report.stale, **more.stale},
            unchanged=sorted(report.unchanged + more.unchanged),
            pruned=sorted(report.pruned + more.pruned),
        )
    return report


def _run_stage_once(
    stage: Stage,
    storage: Storage,
    run: Any,
    *,
    executor: str = "ray",
    max_retries: int = 2,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
) -> StageReport:
    started = time.time()
    config = stage.config_of(run)
    shards = sorted(set(stage.plan(PlanContext(storage, config, run))))
    report = StageReport(stage.name, planned=len(shards))

    expected_hash = config_sha256(config)
    inputs = expected_inputs(stage.reads, config, storage, shards)
    planned = set(shards)
    # A redo stage runs every shard it plans, a subset on purpose (retry-failed, stats): its markers decide nothing.
    for shard, marker in ({} if stage.redo else _committed_markers(storage, stage)).items():
        if shard not in planned:
            prune(storage, stage.name, shard, marker)
            report.pruned.append(shard)
            continue
        reason = staleness(marker, expected_hash, inputs.get(shard) if inputs else None)
        if reason is None:
            report.skipped.append(shard)
            report.stats[shard] = marker.get("stats", {})
        else:
            report.stale[shard] = reason
    pending = [s for s in shards if s not in report.stats]
    if report.skipped or report.stale or report.pruned:
        log.info(
            "%s: %d of %d shards committed, %d stale (%s), running %d; %d no longer planned, removed",
            stage.name,
            len(report.skipped),
            len(shards),
            len(report.stale),
            "; ".join(sorted(set(report.stale.values())))[:300] or "none",
            len(pending),
            len(report.pruned),
        )

    failures: dict[int, str] = {}
    bar = tqdm(
        total=len(shards),
        initial=len(report.skipped),
        desc=stage.name,
        unit="shard",
        disable=not progress or not shards,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    rows_done = 0

    def finished(outcome: ShardOutcome) -> None:
        nonlocal rows_done
        if outcome.error:
            failures[outcome.shard] = outcome.error
        else:
            report.stats[outcome.shard] = outcome.stats
            (report.skipped if outcome.skipped else report.ran).append(outcome.shard)
            if outcome.unchanged:
                report.unchanged.append(outcome.shard)
            rows_done += int(outcome.stats.get(stage.rate_key, 0) or 0)
        bar.update(1)
        elapsed = max(time.time() - started, 1e-6)
        bar.set_postfix(
            {stage.rate_key: rows_done, f"{stage.rate_key}/s": f"{rows_done / elapsed:.1f}", "failed": len(failures)},
            refresh=False,
        )

    try:
        if executor == "inline":
            for outcome in execute_shards(stage, pending, storage, run, max_retries, inputs):
                finished(outcome)
        elif executor == "ray":
            ensure_ray(address, num_cpus)
            cpus, gpus = stage_resources(stage, run)
            task = _execute_remote.options(
                num_cpus=cpus,
                num_gpus=gpus,
                max_retries=max_retries,  # worker/node death; a shard that raises is retried in the task
                name=f"clipline-{stage.name}",
            )
            # Several shards a task where a stage's shards are quick (Ray's cost per task was
            # a quarter of a 25 ms dedup shard on 2 cores); one a task otherwise.
            size = shards_per_task(stage, len(pending), _task_slots(cpus, gpus))
            batches = [pending[i : i + size] for i in range(0, len(pending), size)]
            refs = {
                task.remote(
                    stage, batch, storage, run, max_retries, {s: inputs[s] for s in batch if s in inputs}
                ): batch
                for batch in batches
            }
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in ready:
                    batch = refs.pop(ref)
                    try:
                        outcomes = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - every failure becomes a reported row
                        outcomes = _lost_batch(stage, batch, storage, run, _one_line(e), inputs)
                    for outcome in outcomes:
                        finished(outcome)
        else:
            raise ClipError(f"unknown executor '{executor}' (expected ray or inline)")
    finally:
        bar.close()

    report.ran.sort()
    report.skipped.sort()
    report.unchanged.sort()
    report.seconds = time.time() - started
    if failures:
        listed = "; ".join(failures[s] for s in sorted(failures)[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        raise StageFailed(f"{stage.name}: {len(failures)} of {len(shards)} shards failed: {listed}{more}")
    return report


def run_pipeline(stages: list[Stage], storage: Storage, run: Any, **overrides) -> list[StageReport]:
    """Run `stages` in order, each after the one before has committed every shard.

    Executor, retries, address, CPUs and progress come from `run.runtime` when the
    run config has one; keyword arguments override them.
    """
    runtime = getattr(run, "runtime", None)
    settings = {}
    if runtime is not None:
        settings = dict(
            executor=runtime.executor,
            max_retries=runtime.max_retries,
            address=runtime.address,
            num_cpus=runtime.num_cpus,
            progress=runtime.progress,
        )
    settings.update(overrides)
    return [run_stage(stage, storage, run, **settings) for stage in stages]
