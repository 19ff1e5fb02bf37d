"""What a stage is, and how one shard of it is committed. No Ray here: see runner.py.

A stage is two plain functions:

- ``plan(ctx) -> list[int]``, run once on the driver: which shard indices
  exist (usually the committed shards of the stage before);
- ``run_shard(ctx) -> dict``, run once per shard, anywhere: reads its inputs
  through ``ctx``, writes its outputs into local staging files through ``ctx``
  and returns its statistics (counts, bytes).

The stage never touches final names. ``execute_shard`` commits its staged
outputs whole (rename / whole-object upload), then writes the shard's marker
``{stage}/_committed/{shard:05d}.json`` last. The marker holds the statistics,
each output's byte count and sha256, and the hash of the stage config. A rerun
skips marked shards; a shard killed before its marker is redone from scratch,
and since stages are deterministic the redone outputs are byte-identical.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ClipError, StorageError
from pipeline.layout import MARKER_DIR, shard_name
from pipeline.layout import marker as marker_path
from pipeline.lineage import ReadsOf, shard_identity, staleness
from pipeline.storage import Storage, file_sha256, parquet_options

log = logging.getLogger(__name__)


IDENTITY = "identity"  # field metadata key: {"identity": False} = does not change outputs


def output_identity(config: Any) -> Any:
    """The part of a config that decides a stage's outputs, as plain data.

    Fields declared with ``field(metadata={"identity": False})`` (thread counts,
    progress bars, test fault injection) are left out, so changing them does
    not invalidate committed shards.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: output_identity(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.metadata.get(IDENTITY, True)
        }
    if isinstance(config, (list, tuple)):
        return [output_identity(v) for v in config]
    if isinstance(config, dict):
        return {str(k): output_identity(v) for k, v in config.items()}
    if isinstance(config, float) and config.is_integer():
        return int(config)  # 10 in code and 10.0 from YAML are the same setting
    return config


def config_sha256(config: Any) -> str:
    """A stable hash of a config's output identity, used to refuse mixing outputs of two configs."""
    return hashlib.sha256(json.dumps(output_identity(config), sort_keys=True, default=str).encode()).hexdigest()


def committed_shards(storage: Storage, stage: str) -> list[int]:
    """Shard indices of `stage` whose marker exists (one listing, no reads)."""
    names = storage.list(f"{stage}/{MARKER_DIR}", suffix=".json")
    return sorted(int(Path(n).stem) for n in names)


@dataclass
class PlanContext:
    """What a stage's plan() sees on the driver."""

    storage: Storage
    config: Any  # the stage's own frozen config
    run: Any  # the whole RunConfig

    def committed_shards(self, stage: str) -> list[int]:
        """Shard indices of `stage` whose marker exists."""
        return committed_shards(self.storage, stage)


@dataclass
class ShardContext:
    """What a stage's run_shard() sees for one shard."""

    stage: str
    shard: int
    storage: Storage
    config: Any
    run: Any
    staging_dir: Path
    staged: dict[str, Path] = field(default_factory=dict)
    work: set[str] = field(default_factory=set)  # staged outputs only a later step reads (not hashed)
    _staging: threading.Lock = field(default_factory=threading.Lock, repr=False)  # outputs staged from threads

    @property
    def name(self) -> str:
        return shard_name(self.shard)

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return self.storage.read_parquet(rel, columns=columns)

    def read_frame(self, rel: str, columns: list[str] | None = None) -> pl.DataFrame:
        return self.storage.read_frame(rel, columns=columns)

    def output_path(self, rel: str, work: bool = False) -> Path:
        """A local file to write output `rel` into; committed after run_shard returns.

        The marker records each output's bytes and sha256, except a `work` file's hash: work
        files (shuffle pieces, edges) are read back by a later step only, and hashing them was
        a tenth of a dedup map task."""
        with self._staging:
            if rel in self.staged:
                raise AssertionError(f"output {rel} staged twice")
            local = self.staging_dir / f"out{len(self.staged)}-{Path(rel).name}"
            self.staged[rel] = local
            if work:
                self.work.add(rel)
        return local

    def write_table(self, rel: str, table: pa.Table, work: bool = False, distinct: tuple[str, ...] = ()) -> None:
        """Stage a parquet output, written with storage.parquet_options (which see for `work`
        and `distinct`)."""
        options = parquet_options(table.column_names, work=work, distinct=distinct)
        pq.write_table(table, self.output_path(rel, work=work), **options)


@dataclass(frozen=True)
class Stage:
    """A named data stage: `plan` on the driver, `run_shard` per shard."""

    name: str
    plan: Callable[[PlanContext], list[int]]
    run_shard: Callable[[ShardContext], dict]
    config_key: str | None = None  # attribute of RunConfig holding this stage's config
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    rate_key: str = "rows"  # the stats count shown per second in the progress bar
    redo: bool = False  # run planned shards even when committed, replacing outputs and marker (retry passes)
    gpu_when: Callable[[Any], bool] | None = None  # config -> True when a GPU helps (used if the cluster has one)
    # Up to this many shards in one Ray task when there are many more shards than task slots:
    # for stages whose shards take tens of milliseconds, where Ray's cost per task is a large share.
    shards_per_task: int = 1
    # What one shard reads (pipeline.lineage): its marker records those inputs, and a shard whose
    # inputs changed since is redone. None: the stage's shards depend on its config alone.
    reads: ReadsOf | None = None
    # Plan again after every pass until a pass runs nothing (iterative rounds: dedup components).
    repeat: bool = False

    def config_of(self, run: Any) -> Any:
        return getattr(run, self.config_key or self.name, None)


@dataclass(frozen=True)
class ShardOutcome:
    """What executing one shard came to; `error` is set for a non-retryable input error."""

    shard: int
    stats: dict
    skipped: bool = False
    error: str | None = None
    unchanged: bool = False  # redone (its inputs changed) and its outputs came out byte-identical


def read_marker(storage: Storage, stage: str, shard: int) -> dict | None:
    rel = marker_path(stage, shard)
    return storage.read_json(rel) if storage.exists(rel) else None


def execute_shard(stage: Stage, shard: int, storage: Storage, run: Any, inputs: dict | None = None) -> ShardOutcome:
    """Run one shard of `stage` and commit it: outputs whole, then the marker.

    Skips a shard that is already committed with the same config and the same `inputs` (see
    pipeline.lineage); a stale one is redone. When every output of a redone shard comes out
    byte-identical to the committed one, the outputs are left as they are and only the marker is
    rewritten (its identity, which readers record, does not change). A ClipError (bad input, told in
    one line) is returned as an outcome, not raised, so the runner does not retry what cannot
    succeed; other exceptions propagate and are retried by the runner.
    """
    config = stage.config_of(run)
    config_hash = config_sha256(config)
    previous = read_marker(storage, stage.name, shard)
    if previous is not None and not stage.redo and staleness(previous, config_hash, inputs) is None:
        return ShardOutcome(shard, previous.get("stats", {}), skipped=True)

    staging = Path(tempfile.mkdtemp(prefix=f"clipline-{stage.name.replace('/', '-')}-{shard_name(shard)}-"))
    try:
        ctx = ShardContext(stage.name, shard, storage, config, run, staging)
        reset_peak_rss()
        started, cpu = time.time(), time.process_time()
        try:
            stats = dict(stage.run_shard(ctx) or {})
        except ClipError as e:
            return ShardOutcome(shard, {}, error=f"{stage.name}/{shard_name(shard)}: {e}")
        outputs = {}
        for rel, local in ctx.staged.items():
            if not local.exists():
                raise AssertionError(f"stage {stage.name} staged {rel} but wrote nothing")
            outputs[rel] = {"bytes": local.stat().st_size}
            if rel not in ctx.work:
                outputs[rel]["sha256"] = file_sha256(local)
        old_outputs = (previous or {}).get("outputs") or {}
        unchanged = bool(outputs) and outputs == old_outputs and all("sha256" in o for o in outputs.values())
        if not unchanged:
            for rel, local in ctx.staged.items():
                storage.move_file(local, rel)
            for rel in set(old_outputs) - set(outputs):  # what the old version wrote and this one does not
                storage.delete(rel)
        recorded = inputs or {}
        storage.write_json(
            marker_path(stage.name, shard),
            {
                "stage": stage.name,
                "shard": shard,
                "config_sha256": config_hash,
                "inputs": recorded,
                "identity": shard_identity(outputs, config_hash, recorded),
                "outputs": outputs,
                "stats": stats,
                "duration_s": round(time.time() - started, 3),
                # the process's CPU time (every thread) over this shard: the cores a shard costs (cost model)
                "cpu_s": round(time.process_time() - cpu, 3),
                "peak_rss_mb": peak_rss_mb(),  # the process's, over this shard (bench/dedup.py's per-task memory)
                "finished_at": round(time.time(), 3),  # for throughput over time in the stats report
                "host": os.uname().nodename,
                "pid": os.getpid(),
            },
        )
        return ShardOutcome(shard, stats, unchanged=unchanged)
    except OSError as e:
        raise StorageError(f"{stage.name}/{shard_name(shard)}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        release_memory(above=RELEASE_ABOVE)


def prune(storage: Storage, stage: str, shard: int, marker: dict) -> None:
    """Remove a committed shard (its `marker` read already) that its stage no longer plans (a smaller
    cut, fewer partitions): the marker first, so that nothing counts it as committed while its outputs go."""
    storage.delete(marker_path(stage, shard))
    for rel in marker.get("outputs") or {}:
        storage.delete(rel)


# A process holding more than this after a task gives its freed memory back (release_memory).
# Always releasing cost more than it saved: the next task faults the same pages back in (a third
# of the CPU time of an exact-only dedup at 100k-row shards), while a worker's resident memory
# after an ordinary task is 300-470 MB; the big single tasks (dedup components) still release.
RELEASE_ABOVE = 512 << 20


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) afresh at its current size (Linux >= 4.0;
    elsewhere nothing), so that peak_rss_mb measures one shard."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """This process's peak resident memory since reset_peak_rss, in MB (None where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def release_memory(above: int = 0) -> None:
    """Give the allocators' freed pages back to the OS when the process holds more than `above`
    bytes: a Ray worker idles holding its last task's peak otherwise (Arrow's pool and glibc
    both keep freed memory for reuse), and with tasks of different sizes on one machine those
    idle peaks add up."""
    if above and resident_bytes() <= above:
        return
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_freed_blocks() -> None:
    """Let glibc reuse freed blocks of up to 8 MB instead of unmapping (and later page-faulting) them.

    glibc serves a block over its mmap threshold (128 KB at first) with fresh pages and unmaps it at
    free, and gives a heap's freed top back above 128 KB: a crawl thread's decoded image, its numpy
    copies and its encode buffer each came back as new pages, a third of the CPU time of processing a
    web-sized photo on a VM where page faults are dear (bench/crawl.py --photos). With these limits
    the blocks stay in the heap; larger ones (big PNG decodes) are still unmapped at free, and
    release_memory still trims after a task. Once per process; nothing where libc is not glibc."""
    global _KEPT
    if _LIBC is None or _KEPT:
        return
    _LIBC.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
    _LIBC.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    _KEPT = True


_KEPT = False

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None
