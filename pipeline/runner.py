"""Maps stages over shards as Ray tasks. The only module that imports Ray.

- local Ray with this machine's CPUs by default, a cluster with an address;
- committed shards are skipped (resume), so a killed run started again redoes
  only the rest, with identical results;
- a task that raises is retried (bounded); a worker or node that dies is
  retried by Ray (bounded); a shard that still fails is reported with its
  one-line error after the others finish, never hangs the stage;
- a bad-input error (ClipError) is not retried: it cannot succeed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import ray
from tqdm import tqdm

from pipeline.errors import ClipError, StageFailed
from pipeline.stage import (
    PlanContext,
    ShardOutcome,
    Stage,
    committed_shards,
    config_sha256,
    execute_shard,
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


@ray.remote
def _execute_remote(stage: Stage, shard: int, storage: Storage, run: Any) -> ShardOutcome:
    logging.basicConfig(level=logging.INFO)
    return execute_shard(stage, shard, storage, run)


def _committed_markers(storage: Storage, stage: Stage, shards: Iterable[int]) -> dict[int, dict]:
    committed = set(committed_shards(storage, stage.name)) & set(shards)
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = list(pool.map(lambda s: (s, read_marker(storage, stage.name, s)), sorted(committed)))
    return {s: m for s, m in markers if m is not None}


def run_stage(
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
    """Run every planned shard of `stage` that is not committed yet; raise StageFailed listing failures."""
    started = time.time()
    config = stage.config_of(run)
    shards = sorted(set(stage.plan(PlanContext(storage, config, run))))
    report = StageReport(stage.name, planned=len(shards))

    expected_hash = config_sha256(config)
    for shard, marker in _committed_markers(storage, stage, shards).items():
        if marker.get("config_sha256") != expected_hash:
            raise ClipError(
                f"{storage.url(stage.name)} holds shards committed with another {stage.name} config; "
                "use a new output location or delete that stage's outputs"
            )
        if not stage.redo:
            report.skipped.append(shard)
            report.stats[shard] = marker.get("stats", {})
    pending = [s for s in shards if s not in report.stats]
    if report.skipped:
        log.info(
            "%s: %d of %d shards already committed, running %d",
            stage.name,
            len(report.skipped),
            len(shards),
            len(pending),
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
            rows_done += int(outcome.stats.get(stage.rate_key, 0) or 0)
        bar.update(1)
        elapsed = max(time.time() - started, 1e-6)
        bar.set_postfix(
            {stage.rate_key: rows_done, f"{stage.rate_key}/s": f"{rows_done / elapsed:.1f}", "failed": len(failures)},
            refresh=False,
        )

    try:
        if executor == "inline":
            for shard in pending:
                for attempt in range(max_retries + 1):
                    try:
                        finished(execute_shard(stage, shard, storage, run))
                        break
                    except Exception as e:  # noqa: BLE001 - same bounded retry as on Ray
                        if attempt == max_retries:
                            finished(ShardOutcome(shard, {}, error=f"{stage.name}/{shard_name(shard)}: {_one_line(e)}"))
        elif executor == "ray":
            ensure_ray(address, num_cpus)
            cpus, gpus = stage_resources(stage, run)
            task = _execute_remote.options(
                num_cpus=cpus,
                num_gpus=gpus,
                max_retries=max_retries,  # worker/node death
                retry_exceptions=True,  # application exceptions, same bound
                name=f"clipline-{stage.name}",
            )
            refs = {task.remote(stage, shard, storage, run): shard for shard in pending}
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in ready:
                    shard = refs.pop(ref)
                    try:
                        finished(ray.get(ref))
                    except Exception as e:  # noqa: BLE001 - every failure becomes a reported row
                        finished(ShardOutcome(shard, {}, error=f"{stage.name}/{shard_name(shard)}: {_one_line(e)}"))
        else:
            raise ClipError(f"unknown executor '{executor}' (expected ray or inline)")
    finally:
        bar.close()

    report.ran.sort()
    report.skipped.sort()
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
