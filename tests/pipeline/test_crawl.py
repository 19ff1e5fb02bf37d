"""The crawl against the real loopback web on a real local Ray: every fault of docs/faults.md N*/S*/I*/M*
gets its exact status, the rest of each shard succeeds, and the output is img2dataset/webdataset-shaped."""

import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import schema
from pipeline.cli import main
from pipeline.config import RunConfig, dump_config
from pipeline.crawl import STAGE, CrawlConfig, HostScheduler, crawl_rows
from pipeline.formats import group_samples, iter_tar_members
from pipeline.images import WINDOW_BYTES, WINDOWS
from pipeline.ingest import STAGES as INGEST_STAGES
from pipeline.ingest import IngestConfig
from pipeline.runner import run_pipeline, run_stage
from pipeline.stage import committed_shards
from pipeline.storage import file_sha256, open_storage
from pipeline.web import SIZES, SyntheticWeb, WebSpec, generate
from tests.conftest import REPO

UA = "clipline-test/1 (+tests)"


def crawl_config(web_root: Path, **overrides) -> CrawlConfig:
    settings = dict(
        image_size=64,
        resize_mode="center_crop",
        min_image_size=16,
        max_aspect_ratio=10,
        timeout_s=2.0,
        deadline_s=3.0,
        backoff_s=0.2,
        max_retry_after_s=1.5,
        allow_networks=("127.0.1.0/24",),
        dns=False,
        user_agent=UA,
        blocklist_image_sha256=(str(web_root / "blocklist_image_sha256.txt"),),
    )
    return CrawlConfig(**{**settings, **overrides})


def run_config(out, web_root: Path, shard_size=120, **crawl) -> RunConfig:
    return RunConfig(
        out=str(out),
        ingest=IngestConfig(
            inputs=(str(web_root / "urls.parquet"),),
            shard_size=shard_size,
            blocklist_url_sha256=(str(web_root / "blocklist_url_sha256.txt"),),
        ),
        crawl=crawl_config(web_root, **crawl),
    )


def crawl_all(store, run, executor="ray"):
    return run_pipeline([*INGEST_STAGES, STAGE], store, run, executor=executor, progress=False)


def read_crawl(store) -> pa.Table:
    return pa.concat_tables([store.read_parquet(f"crawl/{s:05d}.parquet") for s in committed_shards(store, "crawl")])


def expected_statuses(web: SyntheticWeb) -> dict[str, str]:
    """Per URL, the status a correct crawl gives, with the web's blocklists applied."""
    blocked_bytes = set((web.root / "blocklist_image_sha256.txt").read_text().split())
    blocked_urls = set((web.root / "blocklist_url_sha256.txt").read_text().split())
    expected = {}
    for r in web.truth().to_pylist():
        status = r["expected_status"]
        if hashlib.sha256(r["url"].encode()).hexdigest() in blocked_urls:
            status = "blocked"
        elif r["file"] and status == "success" and file_sha256(web.root / "files" / r["file"]) in blocked_bytes:
            status = "blocked"
        expected[r["url"]] = status
    return expected


def assert_statuses(crawled: pa.Table, web: SyntheticWeb) -> tuple[dict, dict]:
    """Every URL of the web's truth has its expected status; returns (expected, crawled rows) by URL."""
    expected = expected_statuses(web)
    got = {r["url"]: r for r in crawled.to_pylist()}
    mismatches = {
        u: (expected[u], got[u]["status"], got[u]["error_message"])
        for u in expected
        if u in got and got[u]["status"] != expected[u]
    }
    assert mismatches == {}
    assert set(expected) <= set(got)
    return expected, got


@pytest.fixture
def fresh_web(tmp_path):
    """A web of its own (hit counters start at zero), tiny size."""
    with SyntheticWeb(generate(tmp_path / "web", SIZES["tiny"])) as web:
        yield web


def test_every_url_gets_exactly_its_expected_status(ray_local, fresh_web, tmp_path):
    web, store = fresh_web, open_storage(tmp_path / "out")
    reports = crawl_all(store, run_config(store.uri, web.root))
    assert reports[-1].planned == 4  # 411 rows after ingest dedup, 120 per shard

    crawled = read_crawl(store)
    ingested = pa.concat_tables(
        [store.read_parquet(f"ingest/{s:05d}.parquet") for s in committed_shards(store, "ingest")]
    )
    assert crawled.num_rows == ingested.num_rows == 411
    assert sorted(crawled["uid"].to_pylist()) == sorted(ingested["uid"].to_pylist())  # each input row exactly once
    schema.validate(crawled, schema.CRAWL, "crawl")

    expected, got = assert_statuses(crawled, web)
    assert Counter(expected[u] for u in expected if u in got)["blocked"] == 2 + sum(
        1
        for r in web.truth().to_pylist()
        if r["dup_kind"] == "exact"
        and file_sha256(web.root / "files" / r["file"]) in (web.root / "blocklist_image_sha256.txt").read_text()
    )
    # M1/M2 rows of the URL list: the query-string variants are fetched; the huge caption was cut.
    extra = [r for r in crawled.to_pylist() if r["url"] not in expected]
    assert Counter(r["status"] for r in extra) == {"success": 3, "invalid_url": 1}
    assert max(len(r["caption"]) for r in extra) == 4000

    # What the server saw: permanent failures once, transient ones up to max_attempts, no robots breach.
    hits = web.log.hits

    def path_hits(behaviour):
        row = [r for r in web.truth().to_pylist() if r["behaviour"] == behaviour][0]
        return hits[(row["site"], row["path"])]

    assert [path_hits(b) for b in ("status_404", "status_451", "xrobots_noai", "html_as_jpeg")] == [1, 1, 1, 1]
    assert [path_hits(b) for b in ("status_500", "status_503", "status_429", "flaky_429", "flaky_503")] == [
        3,
        3,
        3,
        2,
        2,
    ]
    assert path_hits("robots_disallowed") == 0 and not any("/private/" in p for p in web.log.paths())
    assert all(agent == UA for _, _, agent, _ in web.log.requests)
    # robots.txt once per worker process that crawled (Ray may place shards on an idle third worker)
    workers = {json.loads(store.read_bytes(f"crawl/_committed/{s:05d}.json"))["pid"] for s in range(4)}
    assert 1 <= hits[(0, "/robots.txt")] <= len(workers) <= 4
    flaky = [t for s, p, _, t in web.log.requests if p.endswith("/fault/flaky_429.jpg")]
    assert flaky[1] - flaky[0] >= 0.95  # Retry-After: 1 was honoured
    assert got[[u for u in expected if u.endswith("/fault/flaky_429.jpg")][0]]["attempts"] == 2


def test_a_malformed_uid_is_a_failed_row_never_a_tar_key_or_a_failed_shard(ray_local, fresh_web, tmp_path):
    store = open_storage(tmp_path / "out")
    run = run_config(store.uri, fresh_web.root, shard_size=200)
    run_pipeline(list(INGEST_STAGES), store, run, executor="inline", progress=False)
    table = store.read_parquet("ingest/00000.parquet")
    bad = {0: "0000000a.evil", 3: "0000000b\\..\\..\\x", 5: "../../etc/passwd", 8: "A" * 32, 9: "0" * 31}
    uids = table["uid"].to_pylist()
    fetchable = [i for i, s in enumerate(table["status"].to_pylist()) if s is None and i not in bad]
    for i, uid in bad.items():
        uids[i] = uid
    store.write_parquet("ingest/00000.parquet", table.set_column(0, "uid", pa.array(uids, pa.string())))
    (report,) = run_pipeline([STAGE], store, run, executor="inline", progress=False)
    assert report.ran == list(range(report.planned))  # every shard commits (a failed one raises StageFailed)
    rows = store.read_parquet("crawl/00000.parquet").to_pylist()
    assert [r["status"] for i, r in enumerate(rows) if i in bad] == ["invalid_uid"] * len(bad)
    assert all(rows[i]["status"] != "invalid_uid" for i in fetchable)
    with store.open_read("crawl/00000.tar") as f:
        keys = [k for k, _ in group_samples(iter_tar_members(f))]
    assert keys == [r["uid"] for r in rows if r["status"] == "success"] and all(schema.is_uid(k) for k in keys)
    assert sum(r["status"] == "success" for r in rows) > 100


def test_tars_hold_exactly_the_successes_and_read_with_webdataset(ray_local, fresh_web, tmp_path):
    import webdataset as wds

    store = open_storage(tmp_path / "out")
    crawl_all(store, run_config(store.uri, fresh_web.root, shard_size=200))
    for shard in committed_shards(store, "crawl"):
        rows = store.read_parquet(f"crawl/{shard:05d}.parquet").to_pylist()
        with store.open_read(f"crawl/{shard:05d}.tar") as f:
            samples = list(group_samples(iter_tar_members(f)))
        successes = [r for r in rows if r["status"] == "success"]
        assert [k for k, _ in samples] == [r["uid"] for r in successes]
        for (_, sample), row in zip(samples, successes, strict=True):
            assert set(sample) == {"jpg", "txt", "json"}
            assert sample["txt"].decode() == row["caption"]
            img = Image.open(io.BytesIO(sample["jpg"]))
            assert (
                (img.format, img.mode, img.size)
                == ("JPEG", "RGB", (64, 64))
                == ("JPEG", "RGB", (row["width"], row["height"]))
            )
        failures = [r for r in rows if r["status"] != "success"]
        assert all(r["error_message"] and r["width"] is None and r["phash"] is None for r in failures)
        assert all(r["window_sig"] is None for r in failures)
        assert all(
            r["phash"] is not None and r["colour_sig"] is not None and isinstance(r["pixel_hash"], int)
            for r in successes
        )
        assert all(len(r["window_sig"]) == len(WINDOWS) * WINDOW_BYTES for r in successes)
        # sha256_key is the digest's first 60 bits wherever there is a digest (failures after a fetch too).
        hashed = [r for r in rows if r["sha256"] is not None]
        assert len(hashed) >= len(successes) > 0
        assert all(r["sha256_key"] == int(r["sha256"][:15], 16) for r in hashed)
        assert all(r["sha256_key"] is None for r in rows if r["sha256"] is None)
    # Planted exact duplicates (same bytes, other URL) carry the same signatures.
    table = read_crawl(store)
    by_sha: dict[str, set] = {}
    for r in table.to_pylist():
        if r["status"] == "success":
            by_sha.setdefault(r["sha256"], set()).add((r["phash"], r["colour_sig"], r["window_sig"], r["pixel_hash"]))
    assert sum(1 for v in by_sha.values()) < Counter(table["status"].to_pylist())["success"]  # dups exist
    assert all(len(v) == 1 for v in by_sha.values())
    tars = sorted(glob.glob(str(tmp_path / "out" / "crawl" / "*.tar")))
    dataset = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    decoded = list(dataset)
    assert len(decoded) == Counter(read_crawl(store)["status"].to_pylist())["success"]
    assert all(
        img.size == (64, 64) and meta["status"] == "success" and meta["caption"] == txt for img, txt, meta in decoded
    )


def test_scheduler_holds_the_per_host_concurrency_limit():
    items = [(i, "http://a") for i in range(40)] + [(100 + i, "http://b") for i in range(10)]
    scheduler = HostScheduler(items, limit=3, rps=0)
    active, peak, lock, done = Counter(), Counter(), threading.Lock(), []

    def worker():
        while (job := scheduler.get()) is not None:
            item, host = job
            with lock:
                active[host] += 1
                peak[host] = max(peak[host], active[host])
            time.sleep(0.01)
            with lock:
                active[host] -= 1
            done.append(item)
            scheduler.done(host)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == list(range(40)) + list(range(100, 110))
    assert peak == {"http://a": 3, "http://b": 3}


def test_backoff_and_rate_limit_hold_one_host_only():
    scheduler = HostScheduler([(0, "slow"), (1, "slow"), (2, "fast"), (3, "fast"), (4, "fast")], limit=1, rps=20)
    order = []
    item, host = scheduler.get()
    assert host in ("slow", "fast")
    first_slow = item if host == "slow" else None
    if first_slow is None:  # take the first "slow" one
        scheduler.done(host)
        order.append(item)
        item, host = scheduler.get()
    assert host == "slow"
    started = time.monotonic()
    scheduler.done("slow", retry_item=item, backoff_s=0.6)  # e.g. a 429 with Retry-After
    while (job := scheduler.get()) is not None:
        order.append((job[1], round(time.monotonic() - started, 2)))
        scheduler.done(job[1])
    slow_times = [t for h, t in order[-5:] if h == "slow"] if isinstance(order[-1], tuple) else []
    fast_times = [t for o in order if isinstance(o, tuple) and o[0] == "fast" for t in [o[1]]]
    assert min(slow_times) >= 0.59  # the backed-off host waited
    assert fast_times and max(fast_times) < 0.5  # the other host did not
    gaps = [b - a for a, b in zip(fast_times, fast_times[1:], strict=False)]
    assert all(g >= 0.045 for g in gaps)  # 20 requests/s at most


def test_per_host_limit_seen_by_the_server(tmp_path):
    root = generate(tmp_path / "one-site", WebSpec(images=60, heldout=0, content_sites=1, faults=False))
    with SyntheticWeb(root) as web:
        urls = [r["url"] for r in web.truth().to_pylist() if r["behaviour"] == "image"]
        results = crawl_rows(urls, crawl_config(root, threads=16, per_host_concurrency=2, blocklist_image_sha256=()))
        assert Counter(o.status for o, _ in results) == {"success": len(urls)}
        assert web.log.max_inflight[0] <= 2


@pytest.mark.parametrize("slots", [2, 16])
def test_images_are_processed_by_at_most_decode_threads_at_once(tmp_path, monkeypatch, slots):
    """16 download threads: with 2 decode slots no more than 2 images are processed at once (the
    others wait for a slot, not for the GIL); with 16 slots more than 2 are. Every URL succeeds."""
    import pipeline.crawl as crawl

    inside, most, lock, real = 0, 0, threading.Lock(), crawl.process

    def counted(data, policy):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.01)  # hold the slot while the other threads' downloads arrive
            return real(data, policy)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(crawl, "process", counted)
    root = generate(tmp_path / "web", WebSpec(images=60, heldout=0, content_sites=2, faults=False))
    with SyntheticWeb(root) as web:
        urls = [r["url"] for r in web.truth().to_pylist() if r["behaviour"] == "image"]
        config = crawl_config(
            root, threads=16, per_host_concurrency=8, per_host_rps=0, decode_threads=slots, blocklist_image_sha256=()
        )
        results = crawl_rows(urls, config)
    assert Counter(o.status for o, _ in results) == {"success": len(urls)}
    assert most == 2 if slots == 2 else most > 2


def test_host_leases_are_exclusive_carry_the_rate_and_expire_when_not_renewed():
    from pipeline.hostlease import HostLeases

    leases = HostLeases(ttl_s=0.3)
    assert leases.acquire("a", ["x", "y"]) == {"x": 0.0, "y": 0.0}
    assert leases.acquire("b", ["x", "z"]) == {"z": 0.0}  # x is a's
    leases.release("a", "x", not_before=1234.5)
    assert leases.acquire("b", ["x"]) == {"x": 1234.5}  # handed over with the time its next request may start
    time.sleep(0.35)
    assert leases.renew("b", ["x", "z"]) == ([], [])  # b renewed in time (its expiry had passed, no one took them)
    time.sleep(0.35)
    assert leases.acquire("c", ["y"]) == {"y": 0.0}  # a stopped renewing: its lease expired
    assert leases.renew("a", ["y"])[0] == ["y"]  # and a learns it lost y
    leases.finish("b")
    assert leases.acquire("c", ["x", "z"]) == {"x": 1234.5, "z": 0.0}


def test_a_lease_actor_that_fails_leaves_the_task_its_own_limits_never_a_hung_crawl():
    class Unreachable:
        def acquire(self, holder, hosts):
            raise ConnectionError("the actor's node is gone")

        def finish(self, holder):
            raise ConnectionError("the actor's node is gone")

    scheduler = HostScheduler([(i, f"h{i % 3}") for i in range(9)], 2, 0.0, Unreachable())
    done = []
    while (job := scheduler.get()) is not None:
        done.append(job[0])
        scheduler.done(job[1])
    scheduler.close()
    assert sorted(done) == list(range(9))


def test_a_task_leases_enough_one_url_hosts_to_keep_its_threads_busy():
    """On the web most hosts have a URL or two in a shard: the scheduler asks for hosts until the work
    they hold fills `want_slots` requests, not for a fixed number of hosts (16 such hosts kept 32
    threads half idle)."""

    class Recording:
        ttl_s = 20.0

        def __init__(self):
            self.asked: list[list[str]] = []

        def acquire(self, holder, hosts):
            self.asked.append(list(hosts))
            return dict.fromkeys(hosts, 0.0)

        def renew(self, holder, hosts):
            return [], []

        def release(self, holder, host, not_before):
            pass

        def finish(self, holder):
            pass

    leases = Recording()
    items = [(i, f"h{i // 3}") for i in range(30)] + [(30 + i, f"one{i}") for i in range(200)]
    scheduler = HostScheduler(items, 4, 0.0, leases, want_slots=64)
    deadline = time.time() + 5
    while not leases.asked and time.time() < deadline:
        time.sleep(0.01)
    scheduler.close()
    urls = Counter(host for _, host in items)
    first = leases.asked[0]
    work = [min(4, urls[host]) for host in first]  # requests each host asked for can start at once
    assert sum(work) >= 64 and sum(work[:-1]) < 64  # just enough: no host more than it takes
    assert len(first) > 16


def test_host_leases_share_a_few_hosts_fairly_between_tasks():
    from pipeline.hostlease import HostLeases

    leases = HostLeases()
    hosts = [f"h{i}" for i in range(8)]
    assert len(leases.acquire("a", hosts)) == 8  # alone: every host
    assert leases.acquire("b", hosts) == {}  # all taken; b now waits for them
    lost, give_back = leases.renew("a", hosts)
    assert lost == [] and len(give_back) == 4  # a holds 8 of 8 in demand with 2 tasks: hand back 4
    for host in give_back:
        leases.release("a", host, not_before=0.0)
    assert sorted(leases.acquire("b", hosts)) == sorted(give_back)
    assert leases.acquire("a", give_back) == {} and leases.renew("a", hosts)[1] == []  # 4 each: settled


def crawl_task_at(start: float, urls: list[str], config: CrawlConfig) -> list[str]:
    """A crawl task's work (as in run_crawl), begun at wall time `start` so that all begin together."""
    time.sleep(max(0.0, start - time.time()))
    return [o.status for o, _ in crawl_rows(urls, config)]


def busiest_second(times: list[float]) -> int:
    """The most of `times` within any one second."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("cluster", [True, False])
def test_per_host_limits_hold_across_four_concurrent_crawl_tasks(ray_local, tmp_path, cluster):
    root = generate(tmp_path / "one-site", WebSpec(images=160, heldout=0, content_sites=1, faults=False))
    task = ray_local.remote(num_cpus=0.25)(crawl_task_at)
    with SyntheticWeb(root, delay_s=0.05) as web:  # a slow host: requests overlap when limits allow
        urls = [r["url"] for r in web.truth().to_pylist() if r["behaviour"] == "image"]
        limits = dict(per_host_concurrency=2, per_host_rps=25, cluster_politeness=cluster)
        config = crawl_config(root, threads=8, blocklist_image_sha256=(), **limits)
        start = time.time() + 4  # the four tasks' workers are up by then
        statuses = ray_local.get([task.remote(start, urls[i::4], config) for i in range(4)])
        images = [t for site, path, _, t in web.log.requests if path != "/robots.txt"]
        inflight, rate = web.log.max_inflight[0], busiest_second(images)
    assert [Counter(s) for s in statuses] == [{"success": len(urls[i::4])} for i in range(4)]
    print(f"cluster_politeness={cluster}: at most {inflight} in flight, {rate} requests in one second")
    if cluster:  # the host saw the configured limits, whatever the number of tasks
        assert inflight <= 2 and rate <= 25 + 1
    else:  # per task, the limits add up: the control that shows this test can fail
        assert inflight > 2 or rate > 25 + 1


def test_names_are_pinned_without_dns(tmp_path):
    root = generate(tmp_path / "w", WebSpec(images=6, heldout=0, faults=False))
    with SyntheticWeb(root) as web:
        path = [r["path"] for r in web.truth().to_pylist() if r["site"] == 0][0]
        urls = [f"http://images.example.test:{web.port}{path}", f"http://unknown.example:{web.port}{path}"]
        results = crawl_rows(urls, crawl_config(root, hosts={"images.example.test": "127.0.1.1"}, robots_txt=False))
        assert [o.status for o, _ in results] == ["success", "dns_error"]


def test_outputs_to_the_s3_endpoint(ray_local, s3_store, tmp_path):
    root = generate(tmp_path / "w", WebSpec(images=30, heldout=0, faults=False))
    with SyntheticWeb(root) as web:
        crawl_all(s3_store, run_config(s3_store.uri, root, shard_size=15))
        rows = web.truth().num_rows + 6 - 2  # + the URL list's M rows, - the 2 that are duplicates
        assert committed_shards(s3_store, "crawl") == list(range((rows + 14) // 15))
        table = read_crawl(s3_store)
        assert table.num_rows == rows
        assert_statuses(table, web)
    statuses = Counter(table["status"].to_pylist())
    assert statuses["success"] >= 28
    samples = []
    for shard in committed_shards(s3_store, "crawl"):
        with s3_store.open_read(f"crawl/{shard:05d}.tar") as f:
            samples += list(group_samples(iter_tar_members(f)))
    assert len(samples) == statuses["success"]
    marker = s3_store.read_json("crawl/_committed/00001.json")
    tar_sha = hashlib.sha256(s3_store.read_bytes("crawl/00001.tar")).hexdigest()
    assert marker["outputs"]["crawl/00001.tar"]["sha256"] == tar_sha


def test_retry_failed_fetches_only_transient_failures_again(ray_local, tmp_path):
    root = generate(tmp_path / "w", WebSpec(images=12, heldout=0))
    store = open_storage(tmp_path / "out")
    with SyntheticWeb(root) as web:
        run = run_config(store.uri, root, shard_size=40, max_attempts=1)
        crawl_all(store, run)
        before = {r["url"]: r for r in read_crawl(store).to_pylist()}
        by = {
            b: [u for u in before if u.endswith(f"/fault/{b}.jpg")][0]
            for b in ("flaky_503", "flaky_429", "status_500", "status_404")
        }
        assert [before[by[b]]["status"] for b in by] == ["server_error", "rate_limited", "server_error", "not_found"]
        hits_404 = web.log.hits[(0, "/fault/status_404.jpg")]

        cfg = tmp_path / "run.yaml"
        cfg.write_text(dump_config(run))
        assert main(["-q", "crawl", "--retry-failed", "--config", str(cfg)]) == 0

        after = {r["url"]: r for r in read_crawl(store).to_pylist()}
        assert [after[by[b]]["status"] for b in by] == ["success", "success", "server_error", "not_found"]
        assert [after[by[b]]["attempts"] for b in by] == [2, 2, 2, 1]
        assert web.log.hits[(0, "/fault/status_404.jpg")] == hits_404  # permanent: not fetched again
        changed = {u for u in before if before[u]["status"] != after[u]["status"]}
        assert changed == {by["flaky_503"], by["flaky_429"]} | {
            u
            for u in before
            if before[u]["status"] in ("timeout", "connection_error", "truncated")
            and after[u]["status"] != before[u]["status"]
        }
        # New versions of the shards: the tar gained the recovered samples and the markers verify.
        for shard in committed_shards(store, "crawl"):
            marker = store.read_json(f"crawl/_committed/{shard:05d}.json")
            for rel, meta in marker["outputs"].items():
                assert meta["sha256"] == hashlib.sha256(store.read_bytes(rel)).hexdigest()
            rows = store.read_parquet(f"crawl/{shard:05d}.parquet").to_pylist()
            with store.open_read(f"crawl/{shard:05d}.tar") as f:
                keys = [k for k, _ in group_samples(iter_tar_members(f))]
            assert keys == [r["uid"] for r in rows if r["status"] == "success"]
            assert marker["stats"]["success"] == len(keys)


@pytest.mark.slow
def test_crawl_killed_mid_shard_resumes_with_each_url_once(ray_local, tmp_path):
    root = generate(tmp_path / "w", SIZES["tiny"])
    out = tmp_path / "out"
    with SyntheticWeb(root):
        # Slow politeness in the killed run so it is caught mid-crawl; not part of the outputs' identity.
        run = run_config(str(out), root, shard_size=60)
        slow = replace(run, crawl=replace(run.crawl, per_host_rps=4.0), runtime=replace(run.runtime, num_cpus=1))
        cfg = tmp_path / "slow.yaml"
        cfg.write_text(dump_config(slow))
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-q", "run", "--config", str(cfg)],
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        store = open_storage(out)
        deadline = time.time() + 180
        while len(committed_shards(store, "crawl")) < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1.0)
        planned = len(committed_shards(store, "ingest"))
        assert 1 <= len(committed_shards(store, "crawl")) < planned

        report = run_stage(STAGE, store, run, progress=False)
        assert len(report.skipped) >= 1 and len(report.ran) + len(report.skipped) == planned
    crawled = read_crawl(store)
    ingested = pa.concat_tables([store.read_parquet(f"ingest/{s:05d}.parquet") for s in range(planned)])
    assert sorted(crawled["uid"].to_pylist()) == sorted(ingested["uid"].to_pylist())
    assert len(set(crawled["uid"].to_pylist())) == crawled.num_rows
    assert not [n for n in os.listdir(out / "crawl") if n.startswith(".tmp-")]
    tar_keys = []
    for s in range(planned):
        with store.open_read(f"crawl/{s:05d}.tar") as f:
            tar_keys += [k for k, _ in group_samples(iter_tar_members(f))]
    assert len(tar_keys) == len(set(tar_keys)) == Counter(crawled["status"].to_pylist())["success"]
