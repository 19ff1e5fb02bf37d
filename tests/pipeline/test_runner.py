"""The runner on a real local Ray instance, with a toy stage whose faults the tests choose."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from pipeline.errors import StageFailed
from pipeline.runner import run_stage
from pipeline.stage import committed_shards, marker_path
from pipeline.storage import open_storage
from tests.conftest import REPO
from tests.toy_stage import STAGE, ToyConfig, ToyRun, attempt_tasks, attempts


def toy_run(out, **toy) -> ToyRun:
    return ToyRun(out=str(out), toy=ToyConfig(**toy))


def outputs(store) -> dict[str, bytes]:
    """Every committed data file (not markers) and its bytes."""
    return {name: store.read_bytes(name) for name in store.list("toy") if "/_committed/" not in name}


def test_runs_every_shard_on_ray_and_commits_outputs_then_markers(ray_local, local_store):
    run = toy_run(local_store.uri, shards=5)
    report = run_stage(STAGE, local_store, run, progress=False)
    assert report.planned == 5 and report.ran == [0, 1, 2, 3, 4] and report.skipped == []
    assert report.total("rows") == 250
    for shard in range(5):
        marker = local_store.read_json(marker_path("toy", shard))
        assert marker["stats"]["rows"] == 50
        for rel, meta in marker["outputs"].items():
            data = local_store.read_bytes(rel)
            assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        table = local_store.read_parquet(f"toy/{shard:05d}.parquet")
        assert table["shard"].to_pylist() == [shard] * 50
        assert sum(table["value"].to_pylist()) == marker["stats"]["sum"]


def test_rerun_skips_committed_shards_and_touches_nothing(ray_local, local_store, tmp_path):
    run = toy_run(local_store.uri, shards=4, attempts_dir=str(tmp_path))
    run_stage(STAGE, local_store, run, progress=False)
    before = {n: os.stat(local_store.url(n)).st_mtime_ns for n in local_store.list()}
    report = run_stage(STAGE, local_store, run, progress=False)
    assert report.ran == [] and report.skipped == [0, 1, 2, 3]
    assert report.total("rows") == 200  # stats come back from the markers
    assert {n: os.stat(local_store.url(n)).st_mtime_ns for n in local_store.list()} == before
    assert [attempts(run.toy, s) for s in range(4)] == [1, 1, 1, 1]


def test_a_failing_shard_is_reported_after_the_others_commit(ray_local, local_store, tmp_path):
    run = toy_run(local_store.uri, shards=4, fail_shards=(2,), attempts_dir=str(tmp_path))
    with pytest.raises(StageFailed) as e:
        run_stage(STAGE, local_store, run, max_retries=1, progress=False)
    assert str(e.value) == "toy: 1 of 4 shards failed: toy/00002: ValueError: toy failure in shard 2"
    assert attempts(run.toy, 2) == 2  # first try + one retry
    assert not local_store.exists("toy/00002.parquet")
    assert all(local_store.exists(marker_path("toy", s)) for s in (0, 1, 3))
    # Fixed and run again: only the failed shard runs.
    fixed = replace(run, toy=replace(run.toy, fail_shards=()))
    report = run_stage(STAGE, local_store, fixed, progress=False)
    assert report.ran == [2] and report.skipped == [0, 1, 3]


def test_transient_errors_are_retried_bad_input_is_not(ray_local, local_store, tmp_path):
    run = toy_run(local_store.uri, shards=3, flaky_shards=(0,), bad_input_shards=(1,), attempts_dir=str(tmp_path))
    with pytest.raises(StageFailed) as e:
        run_stage(STAGE, local_store, run, max_retries=2, progress=False)
    assert str(e.value) == "toy: 1 of 3 shards failed: toy/00001: toy/00001.parquet: missing column 'url' (string)"
    assert attempts(run.toy, 0) == 2 and local_store.exists(marker_path("toy", 0))
    assert attempts(run.toy, 1) == 1  # a ClipError cannot succeed on retry


def test_a_worker_that_dies_mid_shard_is_retried_by_ray(ray_local, local_store, tmp_path):
    run = toy_run(local_store.uri, shards=3, crash_shards=(1,), attempts_dir=str(tmp_path))
    report = run_stage(STAGE, local_store, run, max_retries=2, progress=False)
    assert report.ran == [0, 1, 2]
    assert attempts(run.toy, 1) == 2
    assert pq.read_table(local_store.url("toy/00001.parquet")).num_rows == 50


def test_a_worker_that_always_dies_surfaces_as_a_failed_shard(ray_local, local_store, tmp_path):
    # crash on "first attempt" = attempts == 0; with max_retries=0 there is no second.
    run = toy_run(local_store.uri, shards=2, crash_shards=(0,), attempts_dir=str(tmp_path))
    with pytest.raises(StageFailed, match=r"^toy: 1 of 2 shards failed: toy/00000: the worker running it died"):
        run_stage(STAGE, local_store, run, max_retries=0, progress=False)


def test_quick_stages_run_several_shards_a_task_and_report_each_shard(ray_local, tmp_path, monkeypatch):
    import pipeline.runner

    monkeypatch.setattr(pipeline.runner, "TASKS_PER_SLOT", 1)  # 10 shards, 2 slots: up to 5 a task
    batched = replace(STAGE, shards_per_task=3)
    one_each, several = (open_storage(tmp_path / name) for name in ("one", "several"))
    (tmp_path / "a").mkdir()
    run_stage(STAGE, one_each, toy_run(one_each.uri, shards=10), progress=False)
    run = toy_run(several.uri, shards=10, flaky_shards=(1,), attempts_dir=str(tmp_path / "a"))
    report = run_stage(batched, several, run, max_retries=1, progress=False)
    assert report.ran == list(range(10)) and report.total("rows") == 500
    assert sorted(sorted(set(s)) for s in attempt_tasks(run.toy).values()) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert attempts(run.toy, 1) == 2  # retried within its task
    assert outputs(several) == outputs(one_each)

    # Faults inside a task: a shard that raises fails alone; a worker that dies loses the shards
    # its task had not committed yet, and keeps those it had.
    faulty = open_storage(tmp_path / "faulty")
    (tmp_path / "b").mkdir()
    run = toy_run(faulty.uri, shards=10, crash_shards=(4,), fail_shards=(7,), attempts_dir=str(tmp_path / "b"))
    with pytest.raises(StageFailed) as e:
        run_stage(batched, faulty, run, max_retries=0, progress=False)
    assert str(e.value) == (
        "toy: 3 of 10 shards failed: toy/00004: the worker running it died (retries exhausted); "
        "toy/00005: the worker running it died (retries exhausted); toy/00007: ValueError: toy failure in shard 7"
    )
    assert committed_shards(faulty, "toy") == [0, 1, 2, 3, 6, 8, 9]
    report = run_stage(batched, faulty, replace(run, toy=replace(run.toy, fail_shards=())), progress=False)
    assert report.ran == [4, 5, 7] and outputs(faulty) == outputs(one_each)


def test_a_redo_stage_whose_worker_dies_is_not_reported_from_its_old_marker(ray_local, local_store, tmp_path):
    redo = replace(STAGE, redo=True)
    run_stage(redo, local_store, toy_run(local_store.uri, shards=2), progress=False)
    (tmp_path / "a").mkdir()
    crashing = toy_run(local_store.uri, shards=2, crash_shards=(1,), attempts_dir=str(tmp_path / "a"))
    with pytest.raises(StageFailed, match=r"^toy: 1 of 2 shards failed: toy/00001: the worker running it died"):
        run_stage(redo, local_store, crashing, max_retries=0, progress=False)


def test_shards_a_task_leave_enough_tasks_to_balance():
    from pipeline.runner import TASKS_PER_SLOT, shards_per_task

    quick = replace(STAGE, shards_per_task=8)
    assert shards_per_task(STAGE, 10_000, 2) == 1  # a stage that did not ask for it
    assert shards_per_task(quick, 100, 2) == 100 // (2 * TASKS_PER_SLOT)
    assert shards_per_task(quick, 10_000, 2) == 8
    assert shards_per_task(quick, 10, 2) == 1
    assert shards_per_task(quick, 0, 0) == 1


def test_error_after_staging_leaves_no_final_output(ray_local, local_store):
    run = toy_run(local_store.uri, shards=2, fail_after_staging=(1,))
    with pytest.raises(StageFailed):
        run_stage(STAGE, local_store, run, max_retries=0, progress=False)
    assert local_store.list("toy") == sorted(["toy/00000.bin", "toy/00000.parquet", "toy/_committed/00000.json"])


def test_more_workers_than_shards_and_no_shards_do_not_hang(ray_local, local_store):
    assert run_stage(STAGE, local_store, toy_run(local_store.uri, shards=1), progress=False).ran == [0]
    empty = open_storage(local_store.url("empty"))
    assert run_stage(STAGE, empty, toy_run(empty.uri, shards=0), progress=False).planned == 0


def test_a_changed_config_redoes_its_shards_and_prunes_what_it_no_longer_plans(ray_local, local_store, tmp_path):
    run_stage(STAGE, local_store, toy_run(local_store.uri, shards=4, seed=1), progress=False)
    report = run_stage(STAGE, local_store, toy_run(local_store.uri, shards=3, seed=2), progress=False)
    assert report.ran == [0, 1, 2] and report.skipped == [] and report.pruned == [3]
    assert set(report.stale.values()) == {"its stage config changed"}
    fresh = open_storage(tmp_path / "fresh")
    run_stage(STAGE, fresh, toy_run(fresh.uri, shards=3, seed=2), progress=False)
    assert outputs(local_store) == outputs(fresh)  # nothing of the old config left, nothing mixed in
    assert committed_shards(local_store, "toy") == [0, 1, 2]


def test_shard_without_marker_is_redone_identically(ray_local, local_store):
    """FAULTS T2/T4: killed between upload and marker → redone; a second write is byte-identical."""
    run = toy_run(local_store.uri, shards=3)
    run_stage(STAGE, local_store, run, progress=False)
    first = outputs(local_store)
    local_store.delete(marker_path("toy", 1))
    report = run_stage(STAGE, local_store, run, progress=False)
    assert report.ran == [1]
    assert outputs(local_store) == first


def test_runs_against_s3_from_ray_workers(ray_local, s3_store):
    run = toy_run(s3_store.uri, shards=3)
    report = run_stage(STAGE, s3_store, run, progress=False)
    assert report.ran == [0, 1, 2]
    assert s3_store.list("toy/_committed") == [f"toy/_committed/{s:05d}.json" for s in range(3)]
    assert s3_store.read_parquet("toy/00002.parquet").num_rows == 50
    assert run_stage(STAGE, s3_store, run, progress=False).skipped == [0, 1, 2]


def test_inline_executor_gives_the_same_outputs_as_ray(ray_local, tmp_path):
    a, b = open_storage(tmp_path / "ray"), open_storage(tmp_path / "inline")
    run_stage(STAGE, a, toy_run(a.uri, shards=3), progress=False)
    run_stage(STAGE, b, toy_run(b.uri, shards=3), executor="inline", progress=False)
    assert outputs(a) == outputs(b)


DRIVER = textwrap.dedent(
    """
    import sys
    from pipeline.runner import run_stage
    from pipeline.storage import open_storage
    from tests.toy_stage import STAGE, ToyConfig, ToyRun
    store = open_storage(sys.argv[1])
    run = ToyRun(out=store.uri, toy=ToyConfig(shards=8, sleep=1.0))
    run_stage(STAGE, store, run, num_cpus=1, progress=False)
    """
)


@pytest.mark.slow
def test_killed_driver_then_rerun_gives_the_same_outputs(ray_local, tmp_path):
    """A whole run (driver and its local Ray) SIGKILLed mid-stage, then run again."""
    killed = open_storage(tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, killed.uri],
        cwd=REPO,
        start_new_session=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while len(killed.list("toy/_committed")) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the driver committed nothing in 120 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # let orphaned workers, if any, finish their writes
    done_before = len(killed.list("toy/_committed"))
    assert 2 <= done_before < 8

    run = ToyRun(out=killed.uri, toy=ToyConfig(shards=8, sleep=1.0))
    report = run_stage(STAGE, killed, run, progress=False)
    assert len(report.skipped) >= done_before and len(report.ran) + len(report.skipped) == 8

    clean = open_storage(tmp_path / "clean")
    run_stage(STAGE, clean, replace(run, out=clean.uri), executor="inline", progress=False)
    assert outputs(killed) == outputs(clean)
    for s in range(8):
        a, b = (json.loads(Path(st.url(marker_path("toy", s))).read_text()) for st in (killed, clean))
        assert (a["outputs"], a["stats"]) == (b["outputs"], b["stats"])


def test_runtime_only_fields_do_not_change_the_config_identity():
    from pipeline.stage import config_sha256

    base = ToyConfig(shards=3, seed=1)
    assert config_sha256(base) == config_sha256(replace(base, sleep=2.0, fail_shards=(1,)))
    assert config_sha256(base) != config_sha256(replace(base, seed=2))
    assert config_sha256(ToyRun(toy=base)) != config_sha256(ToyRun(toy=replace(base, rows=7)))


def test_gpu_stages_ask_for_a_gpu_only_when_the_cluster_has_one(ray_local):
    from pipeline.config import RunConfig
    from pipeline.filter import STAGE as FILTER
    from pipeline.filter import FilterConfig
    from pipeline.runner import stage_resources

    assert stage_resources(FILTER, RunConfig(filter=FilterConfig(clip_checkpoint="run/"))) == (1.0, 0.0)  # no GPU here
    assert stage_resources(FILTER, RunConfig()) == (1.0, 0.0)
    assert FILTER.gpu_when(FilterConfig(clip_checkpoint="run/")) and not FILTER.gpu_when(FilterConfig())


def test_a_task_gives_its_freed_memory_back_only_when_the_process_holds_much(monkeypatch, tmp_path):
    import numpy as np

    from pipeline import stage

    before = stage.resident_bytes()
    touched = np.ones(64 << 17)  # 64 MiB of float64, every page written
    assert stage.resident_bytes() - before >= 0.9 * touched.nbytes
    del touched
    released = []
    monkeypatch.setattr(stage, "_LIBC", SimpleNamespace(malloc_trim=released.append))  # the last step of a release
    store = open_storage(tmp_path / "out")
    run = toy_run(store.uri, shards=2)
    monkeypatch.setattr(stage, "RELEASE_ABOVE", stage.resident_bytes() + (1 << 30))
    stage.execute_shard(STAGE, 0, store, run)
    assert released == []
    monkeypatch.setattr(stage, "RELEASE_ABOVE", 1)
    stage.execute_shard(STAGE, 1, store, run)
    assert released == [0]


def test_polars_in_a_ray_worker_gets_as_many_threads_as_the_task_has_cpus(ray_local):
    def pool_size() -> tuple[str, int]:
        __import__("pipeline")  # before polars, as when a worker loads a stage
        import polars as pl

        return os.environ["OMP_NUM_THREADS"], pl.thread_pool_size()

    fresh = {"env_vars": {"CLIPLINE_TEST_WORKER": str(time.time())}}  # a new worker, nothing imported yet
    task = ray_local.remote(num_cpus=1, runtime_env=fresh)(pool_size)
    assert ray_local.get(task.remote()) == ("1", 1)


def test_markers_hash_what_users_read_and_not_work_files(local_store):
    import numpy as np
    import pyarrow as pa

    from pipeline.shuffle import write_partitioned
    from pipeline.stage import Stage, execute_shard

    def run_shard(ctx):
        table = pa.table({"x": np.arange(10)})
        ctx.write_table("t/out.parquet", table)
        ctx.write_table("t/_work.parquet", table, work=True)
        write_partitioned(ctx, "t/_map.arrow", table, np.arange(10) % 3, 3)
        return {}

    stage = Stage(name="t", plan=lambda ctx: [0], run_shard=run_shard)
    execute_shard(stage, 0, local_store, toy_run(local_store.uri))
    outputs = local_store.read_json(marker_path("t", 0))["outputs"]
    data = {rel: local_store.read_bytes(rel) for rel in outputs}
    assert outputs["t/out.parquet"]["sha256"] == hashlib.sha256(data["t/out.parquet"]).hexdigest()
    assert {rel for rel, meta in outputs.items() if "sha256" not in meta} == {
        "t/_work.parquet",
        "t/_map.arrow",
    }
    assert all(meta["bytes"] == len(data[rel]) for rel, meta in outputs.items())
