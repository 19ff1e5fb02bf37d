"""Crawl: work shards → crawl/{shard}.tar (webdataset) + crawl/{shard}.parquet (one row per URL).

The output is img2dataset's: the same parquet columns (uid, url, caption, key,
status, error_message, width, height, original_width, original_height,
sha256) plus http_status, bytes, format, attempts and fetch_ms, and a tar of
{uid}.jpg/.txt/.json per success. The network layer (pipeline/fetch.py) adds
what img2dataset does not have: the address guard, a total deadline and byte
cap, robots.txt and X-Robots-Tag, a format allow-list and a bomb check.

Politeness: URLs are handed to the download threads by a per-host scheduler,
with at most `per_host_concurrency` requests in flight to one host and at
least 1/`per_host_rps` seconds between request starts. A 429/503 (with or
without Retry-After) or a 5xx backs off that host only and puts the URL back
in the queue, up to `max_attempts`. On a Ray cluster the limits hold across
every crawl task (`cluster_politeness`): a task fetches from a host only while
it holds the host's lease (pipeline/hostlease.py), so hash-partitioned ingest
shards, which spread each host's URLs over many tasks, never add up its load.

`clipline crawl --retry-failed` fetches again only the transient failures
(timeouts, 5xx, 429, connection errors) of committed shards and commits new
versions of those shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit

import pyarrow as pa

from pipeline import layout, schema
from pipeline.fetch import AddressGuard, Fetcher, FetchError, FetchPolicy, Network, RobotsCache
from pipeline.formats import TarWriter, group_samples, iter_tar_members
from pipeline.hostlease import cluster_leases
from pipeline.images import ImagePolicy, ImageRefused, process
from pipeline.lineage import Reads
from pipeline.pdq import HashList
from pipeline.stage import IDENTITY, PlanContext, ShardContext, Stage, committed_shards, keep_freed_blocks
from pipeline.storage import read_hash_lists

log = logging.getLogger(__name__)

RUNTIME_ONLY = {IDENTITY: False}
RETRIED_IN_CRAWL = frozenset({"rate_limited", "server_error", "connection_error"})


@dataclass(frozen=True)
class CrawlConfig:
    """How to download, check and resize. Sizes and resize modes follow img2dataset's options."""

    image_size: int = 256  # target side in pixels (img2dataset image_size)
    # img2dataset's modes; no = keep the decoded size
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    resize_only_if_bigger: bool = False  # never upscale smaller images
    # img2dataset's interpolations and defaults: area when shrinking (Pillow's antialiased bilinear, the
    # closest of its filters to OpenCV's INTER_AREA), lanczos when growing
    downscale_interpolation: Literal["area", "nearest", "linear", "cubic", "lanczos"] = "area"
    upscale_interpolation: Literal["lanczos", "nearest", "linear", "cubic", "area"] = "lanczos"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"  # format of the stored images
    encode_quality: int = 95  # JPEG/WebP quality
    min_image_size: int = 0  # refuse images whose smaller side is below this (image_too_small)
    max_image_area: float = float("inf")  # refuse images with more pixels than this (image_too_large)
    max_aspect_ratio: float = float("inf")  # refuse more elongated images (bad_aspect_ratio)
    max_image_pixels: int = 50_000_000  # decompression-bomb limit, checked from the header before decoding
    allowed_formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif")  # by magic bytes, never the Content-Type
    timeout_s: float = 10.0  # per connect / read
    deadline_s: float = 30.0  # per download, redirects included
    max_bytes: int = 20 << 20  # byte cap per download, also on decompressed bodies
    max_redirects: int = 5  # hops per URL; each one passes the address guard
    max_attempts: int = 3  # per URL, for 429 / 5xx / connection errors
    backoff_s: float = 1.0  # first backoff of a host without Retry-After; doubles per attempt
    max_retry_after_s: float = 60.0  # a longer Retry-After is cut to this
    # sent with every request
    user_agent: str = "clipline/0.1 (image-text dataset crawler; honours robots.txt and X-Robots-Tag noai)"
    agent_token: str = "clipline"  # the product token robots.txt groups and agent-scoped X-Robots-Tag name
    robots_txt: bool = True  # honour robots.txt (RFC 9309)
    x_robots_tag: bool = True  # honour X-Robots-Tag noai / noimageai / noindex / none
    allow_networks: tuple[str, ...] = ()  # CIDRs admitted despite being private/loopback (the demo's web)
    hosts: dict[str, str] = field(default_factory=dict)  # static name → IP, like curl --resolve
    dns: bool = True  # False: no name lookups at all (names must be in `hosts`)
    blocklist_image_sha256: tuple[str, ...] = ()  # files of sha256(image bytes) hex lines
    blocklist_image_pdq: tuple[str, ...] = ()  # files of PDQ hashes (64 hex digits), each optionally with a distance
    pdq: bool = True  # store each image's PDQ hash (~0.5 ms an image); without it no PDQ list can match later
    threads: int = field(default=32, metadata=RUNTIME_ONLY)  # downloads in flight per crawl task
    # images decoded at once per crawl task: the other threads wait for a slot instead of contending for
    # the GIL (2: one thread's Python work overlaps the other's decode; 20% faster than 32 at once)
    decode_threads: int = field(default=2, metadata=RUNTIME_ONLY)
    per_host_concurrency: int = field(default=4, metadata=RUNTIME_ONLY)  # requests in flight per host
    per_host_rps: float = field(default=20.0, metadata=RUNTIME_ONLY)  # request starts per second per host; 0: no cap
    # the two limits above hold across every crawl task of the Ray cluster (host leases); False: per task
    cluster_politeness: bool = field(default=True, metadata=RUNTIME_ONLY)

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            downscale_interpolation=self.downscale_interpolation,
            upscale_interpolation=self.upscale_interpolation,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            min_image_size=self.min_image_size,
            max_image_area=self.max_image_area,
            max_aspect_ratio=self.max_aspect_ratio,
            max_image_pixels=self.max_image_pixels,
            allowed_formats=self.allowed_formats,
            pdq=self.pdq or bool(self.blocklist_image_pdq),  # a list to match needs the hash anyway
        )

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            user_agent=self.user_agent,
            agent_token=self.agent_token,
            timeout_s=self.timeout_s,
            deadline_s=self.deadline_s,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            robots_txt=self.robots_txt,
            x_robots_tag=self.x_robots_tag,
        )

    def network(self) -> Network:
        return Network(guard=AddressGuard(self.allow_networks), hosts=dict(self.hosts), dns=self.dns)


# robots.txt rules are shared by every crawl task a worker process runs.
_ROBOTS = RobotsCache()


# --- per-host scheduling ------------------------------------------------------------------------


class HostScheduler:
    """Hands out work items so that each host gets at most `limit` in flight and `rps` starts a second.

    Hosts with work and a free slot wait in a heap keyed by the earliest time
    they may start another request; a backoff pushes that time out for one host.
    With `leases` (pipeline/hostlease.py) the limits hold across every task of
    the cluster: a host enters the heap only while this task holds its lease,
    which a thread of its own asks for, renews, and gives back when the host has
    nothing left here in flight or queued.
    """

    LEASE_POLL_S = 0.05  # how often hosts still waiting for a lease are asked for again
    LEASE_BATCH = 256  # hosts asked for in one call

    def __init__(
        self,
        items: list[tuple[int, str]],
        limit: int,
        rps: float,
        leases=None,
        want_slots: int = 64,
        holder: str | None = None,
    ):
        self.limit, self.interval = max(1, limit), 1.0 / rps if rps > 0 else 0.0
        self.queues: dict[str, deque[int]] = {}
        for item, host in items:
            self.queues.setdefault(host, deque()).append(item)
        self.active: Counter = Counter()
        self.not_before: dict[str, float] = {}
        self.heap: list = []
        self.in_heap: set[str] = set()
        self.pending = len(items)
        self.seq = 0
        self.cond = threading.Condition()
        # Leased work to keep at hand: requests startable at once over the hosts held (each host's queue
        # and in flight, up to its limit). Counted in requests, not hosts: with a URL or two a host, as
        # on the web, a cap of 2 x threads / limit hosts left the threads idle between handovers.
        self.leases, self.want_slots = leases, want_slots
        self.leased: set[str] = set()  # hosts whose lease this task holds (with leases)
        self.waiting: dict[str, None] = {}  # hosts with work and no lease yet, in order
        self.draining: set[str] = set()  # leased hosts being handed back: no new starts
        if leases is None:
            self.leased = set(self.queues)
            for host in self.queues:
                self._push(host)
        else:
            # A shard's retry (its worker died) comes back as the same holder: its leases are still its own.
            self.holder = holder or uuid.uuid4().hex
            self.waiting = dict.fromkeys(random.Random(self.holder).sample(list(self.queues), len(self.queues)))
            self.finished = threading.Event()
            self.wake = threading.Event()  # a host was handed back: ask for more at once, not at the next poll
            self.lease_thread = threading.Thread(target=self._lease_loop, name="crawl-leases", daemon=True)
            self.lease_thread.start()

    def _push(self, host: str) -> None:
        if (
            host in self.leased
            and host not in self.draining
            and host not in self.in_heap
            and self.queues[host]
            and self.active[host] < self.limit
        ):
            self.seq += 1
            heapq.heappush(self.heap, (self.not_before.get(host, 0.0), self.seq, host))
            self.in_heap.add(host)

    def get(self) -> tuple[int, str] | None:
        """The next (item, host) to fetch, waiting as politeness requires; None when all is done."""
        with self.cond:
            while True:
                now = time.monotonic()
                if self.heap and self.heap[0][0] <= now:
                    _, _, host = heapq.heappop(self.heap)
                    self.in_heap.discard(host)
                    item = self.queues[host].popleft()
                    self.active[host] += 1
                    self.pending -= 1
                    self.not_before[host] = max(now, self.not_before.get(host, 0.0)) + self.interval
                    self._push(host)
                    return item, host
                if self.pending == 0 and sum(self.active.values()) == 0:
                    return None
                self.cond.wait(timeout=(self.heap[0][0] - now) if self.heap else None)

    def done(self, host: str, retry_item: int | None = None, backoff_s: float = 0.0) -> None:
        """A request to `host` finished; optionally queue `retry_item` again after backing the host off."""
        with self.cond:
            self.active[host] -= 1
            if backoff_s > 0:
                self.not_before[host] = max(self.not_before.get(host, 0.0), time.monotonic() + backoff_s)
                self._unheap(host)  # re-keyed below
            if retry_item is not None:
                self.queues[host].append(retry_item)
                self.pending += 1
                if host not in self.leased and self.leases is not None:
                    self.waiting[host] = None
            if self.leases is not None and host in self.leased and not self.queues[host]:
                self.draining.add(host)  # nothing of it left here: another task may have it
            self._hand_back(host)
            self._push(host)
            self.cond.notify_all()

    def _hand_back(self, host: str) -> None:
        """Release a draining host once nothing of it is in flight here; what is still queued waits
        for a lease again."""
        if host in self.draining and not self.active[host] and self.leases is not None:
            self.draining.discard(host)
            self.leased.discard(host)
            self.leases.release(self.holder, host, self._wall(self.not_before.get(host, 0.0)))
            if self.queues[host]:
                self.waiting[host] = None
            self.wake.set()

    def _to_ask(self) -> list[str]:
        """Waiting hosts to ask for now: enough to bring the leased work up to `want_slots` requests."""
        gap = self.want_slots - sum(
            min(self.limit, len(self.queues[h]) + self.active[h]) for h in self.leased if h not in self.draining
        )
        ask = []
        for host in self.waiting:
            if gap <= 0 or len(ask) == self.LEASE_BATCH:
                break
            ask.append(host)
            gap -= min(self.limit, len(self.queues[host]))
        return ask

    def _unheap(self, host: str) -> None:
        if host in self.in_heap:  # drop its entry (a backoff re-keys it; a lost lease parks it)
            self.heap = [e for e in self.heap if e[2] != host]
            heapq.heapify(self.heap)
            self.in_heap.discard(host)

    @staticmethod
    def _wall(monotonic: float) -> float:
        return time.time() + (monotonic - time.monotonic())

    def _lease_loop(self) -> None:
        try:
            self._lease_rounds()
        except Exception as e:  # noqa: BLE001 - the lease actor unreachable: never a hung crawl
            log.warning("host leases unavailable (%s): this crawl task keeps the per-host limits to itself", e)
            with self.cond:
                self.leases = None
                self.draining.clear()
                for host in self.waiting:
                    self.leased.add(host)
                    self._push(host)
                self.waiting.clear()
                self.cond.notify_all()

    def _lease_rounds(self) -> None:
        renewed = time.monotonic()
        while not self.finished.is_set():
            self.wake.clear()  # a hand-back from here on wakes the next wait
            with self.cond:
                ask = self._to_ask()
            granted = self.leases.acquire(self.holder, ask) if ask else {}
            lost, give_back = [], []
            if time.monotonic() - renewed > min(1.0, self.leases.ttl_s / 6):
                with self.cond:
                    held = list(self.leased)
                lost, give_back = self.leases.renew(self.holder, held)
                renewed = time.monotonic()
            with self.cond:
                for host in ask:  # asked for and held elsewhere: the next call asks for other hosts first
                    if host not in granted and self.waiting.pop(host, False) is None:
                        self.waiting[host] = None
                for host, wall in granted.items():
                    self.waiting.pop(host, None)
                    self.leased.add(host)
                    start = time.monotonic() + max(0.0, wall - time.time())  # the last holder's spacing
                    self.not_before[host] = max(self.not_before.get(host, 0.0), start)
                    self._push(host)
                for host in lost:  # expired (this task stalled) and taken by another: stop starting there
                    self.leased.discard(host)
                    self.draining.discard(host)
                    self._unheap(host)
                    if self.queues[host]:
                        self.waiting[host] = None
                for host in give_back:  # more than our share while others wait: no new starts, then hand back
                    if host in self.leased:
                        self.draining.add(host)
                        self._unheap(host)
                        self._hand_back(host)
                self.cond.notify_all()
            if not (len(granted) == len(ask) > 0):  # all asked for was granted: ask again at once
                self.wake.wait(self.LEASE_POLL_S)

    def close(self) -> None:
        """Stop asking for leases and give back any still held (all of them at the end of a crawl)."""
        if hasattr(self, "lease_thread"):
            self.finished.set()
            self.wake.set()
            self.lease_thread.join()
        if self.leases is not None:
            try:
                self.leases.finish(self.holder)
            except Exception as e:  # noqa: BLE001 - unrenewed, they expire on their own
                log.warning("host leases: could not give back this task's leases (%s)", e)


# --- one URL ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str
    error_message: str | None = None
    http_status: int | None = None
    retry_after: float | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    sha256_key: int | None = None
    md5: str | None = None
    bytes: int | None = None
    format: str | None = None
    fetch_ms: float | None = None
    phash: int | None = None
    colour_sig: str | None = None
    window_sig: bytes | None = None
    pixel_hash: int | None = None
    pdq: str | None = None
    pdq_quality: int | None = None

    def image_columns(self) -> dict:
        """The crawl parquet columns this outcome fills (all but uid/url/caption/key/attempts)."""
        return {
            "status": self.status,
            "error_message": self.error_message,
            "width": self.width,
            "height": self.height,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "sha256": self.sha256,
            "sha256_key": self.sha256_key,
            "md5": self.md5,
            "http_status": self.http_status,
            "bytes": self.bytes,
            "format": self.format,
            "fetch_ms": self.fetch_ms,
            "phash": self.phash,
            "colour_sig": self.colour_sig,
            "window_sig": self.window_sig,
            "pixel_hash": self.pixel_hash,
            "pdq": self.pdq,
            "pdq_quality": self.pdq_quality,
        }


def download(
    url: str,
    fetcher: Fetcher,
    policy: ImagePolicy,
    blocked: frozenset[str],
    pdq_lists: HashList | None = None,
    decode_slots: threading.Semaphore | None = None,
) -> Outcome:
    """Fetch, check and process one URL into an Outcome; never raises for the URL's faults.
    `decode_slots` bounds how many threads process images at once (CrawlConfig.decode_threads)."""
    started = time.monotonic()
    try:
        result = fetcher.get(url)
    except FetchError as e:
        return Outcome(e.status, str(e), e.http_status, e.retry_after, fetch_ms=(time.monotonic() - started) * 1000)
    elapsed = (time.monotonic() - started) * 1000
    digest = hashlib.sha256(result.body).hexdigest()
    md5 = hashlib.md5(result.body, usedforsecurity=False).hexdigest()  # blocklists are published in md5 too
    base = dict(
        http_status=result.http_status,
        sha256=digest,
        sha256_key=schema.sha256_key(digest),
        md5=md5,
        bytes=len(result.body),
        fetch_ms=elapsed,
    )
    if digest in blocked:
        return Outcome("blocked", "image hash is on a blocklist", **base)
    try:
        with decode_slots or contextlib.nullcontext():
            image = process(result.body, policy)
    except ImageRefused as e:
        return Outcome(e.status, str(e), **base)
    if pdq_lists is not None and (name := pdq_lists.match([image.pdq], [image.pdq_quality])[0]):
        # Decoded to be hashed, but never written: no byte of it reaches crawl/*.tar.
        message = f"image PDQ matches an entry of blocklist {name}"
        return Outcome("blocked", message, pdq=image.pdq, pdq_quality=image.pdq_quality, **base)
    return Outcome(
        schema.SUCCESS,
        None,
        image=image.data,
        width=image.width,
        height=image.height,
        original_width=image.original_width,
        original_height=image.original_height,
        format=image.format,
        phash=image.phash,
        colour_sig=image.colour_sig,
        window_sig=image.window_sig,
        pixel_hash=image.pixel_hash,
        pdq=image.pdq,
        pdq_quality=image.pdq_quality,
        **base,
    )


def host_key(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def crawl_rows(
    urls: list[str], config: CrawlConfig, fetcher: Fetcher | None = None, holder: str | None = None
) -> list[tuple[Outcome, int]]:
    """Download `urls` politely with `config.threads` threads; (outcome, attempts) per URL, in order.
    `holder` names this work for the cluster's host leases (a crawl shard: the same on a retry)."""
    keep_freed_blocks()
    fetcher = fetcher or Fetcher(config.network(), config.fetch_policy(), _ROBOTS)
    policy = config.image_policy()
    blocked = read_hash_lists(config.blocklist_image_sha256)
    pdq_lists = HashList.load(config.blocklist_image_pdq) if config.blocklist_image_pdq else None
    results: list[tuple[Outcome, int] | None] = [None] * len(urls)
    attempts = [0] * len(urls)
    decode_slots = threading.BoundedSemaphore(max(1, config.decode_threads))
    leases = cluster_leases() if config.cluster_politeness and urls else None
    scheduler = HostScheduler(
        [(i, host_key(u)) for i, u in enumerate(urls)],
        config.per_host_concurrency,
        config.per_host_rps,
        leases,
        want_slots=2 * max(1, config.threads),
        holder=holder,
    )

    def worker() -> None:
        while (job := scheduler.get()) is not None:
            index, host = job
            attempts[index] += 1
            outcome = download(urls[index], fetcher, policy, blocked, pdq_lists, decode_slots)
            if outcome.status in RETRIED_IN_CRAWL and attempts[index] < config.max_attempts:
                wait = outcome.retry_after
                wait = config.backoff_s * 2 ** (attempts[index] - 1) if wait is None else wait
                scheduler.done(host, retry_item=index, backoff_s=min(wait, config.max_retry_after_s))
                continue
            results[index] = (outcome, attempts[index])
            scheduler.done(host)

    threads = max(1, min(config.threads, len(urls)))
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="crawl") as pool:
            for future in [pool.submit(worker) for _ in range(threads)]:
                future.result()
    finally:
        scheduler.close()
        fetcher.close()
    assert all(r is not None for r in results), "every URL ends with an outcome"
    return results  # type: ignore[return-value]


# --- the stage ---------------------------------------------------------------------------------


def sample_json(row: dict) -> bytes:
    keys = (
        "uid",
        "url",
        "caption",
        "key",
        "status",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
        "format",
        "bytes",
    )
    return json.dumps({k: row[k] for k in keys}, ensure_ascii=False, sort_keys=True).encode()


def crawl_table(table: pa.Table, outcomes: dict[int, tuple[Outcome, int]], tar: TarWriter) -> tuple[pa.Table, dict]:
    """The crawl parquet rows for an ingest table (outcomes by row index), writing successes to `tar`."""
    rows, counts, image_bytes = [], Counter(), 0
    for i, src in enumerate(table.to_pylist()):
        refused = src.get("status")
        outcome, attempts = outcomes.get(i, (Outcome(refused or "invalid_url", "refused at ingest"), 0))
        row = {
            "uid": src["uid"],
            "url": src["url"],
            "caption": src["caption"],
            "key": src["uid"],
            "attempts": attempts,
            **outcome.image_columns(),
        }
        for extra in table.column_names:
            if extra not in row and extra not in ("status", "source_file", "source_row"):
                row[extra] = src[extra]
        counts[outcome.status] += 1
        if outcome.status == schema.SUCCESS:
            tar.add(
                row["key"],
                {_ext(outcome.image): outcome.image, "txt": (row["caption"] or "").encode(), "json": sample_json(row)},
            )
            image_bytes += len(outcome.image)
        rows.append(row)
    out = pa.Table.from_pylist(rows) if rows else schema.empty(schema.CRAWL)
    out = schema.conform(out, schema.CRAWL, "crawl", keep_extra=True)
    stats = {
        "rows": len(rows),
        "success": counts[schema.SUCCESS],
        "statuses": dict(sorted(counts.items())),
        "image_bytes": image_bytes,
    }
    return out, stats


def _ext(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "webp" if data[8:12] == b"WEBP" else "jpg"


def plan_crawl(ctx: PlanContext) -> list[int]:
    return committed_shards(ctx.storage, "ingest")


def with_takedown_lists(config: CrawlConfig, storage) -> CrawlConfig:
    """The config's image blocklists plus what the run's takedowns removed (never fetched again)."""
    return replace(
        config,
        blocklist_image_sha256=(*config.blocklist_image_sha256, *layout.takedown_lists(storage, "image_sha256")),
        blocklist_image_pdq=(*config.blocklist_image_pdq, *layout.takedown_lists(storage, "image_pdq")),
    )


def run_crawl(ctx: ShardContext) -> dict:
    config: CrawlConfig = with_takedown_lists(ctx.config, ctx.storage)
    table = ctx.read_table(layout.ingest_parquet(ctx.shard))
    schema.validate(table, schema.INGEST, layout.ingest_parquet(ctx.shard))
    statuses = table["status"].to_pylist()
    uids = table["uid"].to_pylist()
    bad_uid = {i for i, uid in enumerate(uids) if not schema.is_uid(uid)}  # a failed row, never a failed shard
    urls = table["url"].to_pylist()
    taken_down = read_hash_lists(layout.takedown_lists(ctx.storage, "url_sha256"))  # never fetched again
    gone = {i for i, u in enumerate(urls) if taken_down and hashlib.sha256(u.encode()).hexdigest() in taken_down}
    todo = [i for i, s in enumerate(statuses) if s is None and i not in bad_uid and i not in gone]
    started = time.time()
    results = crawl_rows([urls[i] for i in todo], config, holder=f"{ctx.storage.url()}#crawl/{ctx.name}")
    outcomes = dict(zip(todo, results, strict=True))
    for i in gone:
        outcomes[i] = (Outcome("blocked", "URL taken down (the run's takedown list)"), 0)
    for i in bad_uid:
        outcomes[i] = (Outcome("invalid_uid", f"uid {str(uids[i])[:40]!r} is not 32 lowercase hex digits"), 0)
    with TarWriter(ctx.output_path(layout.crawl_tar(ctx.shard))) as tar:
        out, stats = crawl_table(table, outcomes, tar)
    ctx.write_table(layout.crawl_parquet(ctx.shard), out, distinct=schema.CRAWL_DISTINCT)
    stats["seconds"] = round(time.time() - started, 3)
    return stats


# --- retry-failed ------------------------------------------------------------------------------


def plan_retry(ctx: PlanContext) -> list[int]:
    """Committed crawl shards that have transient failures."""
    shards = []
    for shard in committed_shards(ctx.storage, "crawl"):
        marker = ctx.storage.read_json(layout.marker("crawl", shard))
        if any(schema.is_transient(s) for s in marker["stats"].get("statuses", {})):
            shards.append(shard)
    return shards


def run_retry(ctx: ShardContext) -> dict:
    """Fetch the transient failures of one committed crawl shard again; rewrite its tar and parquet."""
    config: CrawlConfig = with_takedown_lists(ctx.config, ctx.storage)
    old = schema.with_later_crawl_columns(ctx.read_table(layout.crawl_parquet(ctx.shard)))
    rows = old.to_pylist()
    with ctx.storage.open_read(layout.crawl_tar(ctx.shard)) as f:
        kept = {key: sample for key, sample in group_samples(iter_tar_members(f))}
    todo = [i for i, r in enumerate(rows) if schema.is_transient(r["status"])]
    results = crawl_rows([rows[i]["url"] for i in todo], config, holder=f"{ctx.storage.url()}#retry/{ctx.name}")
    fresh = dict(zip(todo, results, strict=True))
    counts = Counter()
    with TarWriter(ctx.output_path(layout.crawl_tar(ctx.shard))) as tar:
        for i, row in enumerate(rows):
            if i in fresh:
                outcome, attempts = fresh[i]
                row.update(outcome.image_columns(), attempts=(row["attempts"] or 0) + attempts)
                if outcome.status == schema.SUCCESS:
                    kept[row["key"]] = {
                        _ext(outcome.image): outcome.image,
                        "txt": (row["caption"] or "").encode(),
                        "json": sample_json(row),
                    }
            if row["status"] == schema.SUCCESS:
                tar.add(row["key"], kept[row["key"]])
            counts[row["status"]] += 1
    ctx.write_table(
        layout.crawl_parquet(ctx.shard),
        schema.conform(pa.Table.from_pylist(rows, schema=old.schema), schema.CRAWL, "crawl", keep_extra=True),
        distinct=schema.CRAWL_DISTINCT,
    )
    return {
        "rows": len(rows),
        "success": counts[schema.SUCCESS],
        "statuses": dict(sorted(counts.items())),
        "retried": len(todo),
        "recovered": sum(1 for o, _ in fresh.values() if o.status == schema.SUCCESS),
    }


def crawl_reads(config: CrawlConfig) -> Reads:
    return Reads(same=("ingest",), external=(*config.blocklist_image_sha256, *config.blocklist_image_pdq))


STAGE = Stage(
    name="crawl", plan=plan_crawl, run_shard=run_crawl, config_key="crawl", rate_key="success", reads=crawl_reads
)
# Rewrites committed shards (and their markers) in place; running it twice only re-fetches what is still failing.
# Its markers record the crawl's own inputs, and the new outputs' identity makes what read the old ones stale.
RETRY_STAGE = Stage(
    name="crawl",
    plan=plan_retry,
    run_shard=run_retry,
    config_key="crawl",
    rate_key="recovered",
    redo=True,
    reads=crawl_reads,
)
