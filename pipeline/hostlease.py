"""Cluster-wide politeness: one crawl task at a time fetches from a host.

Each crawl task's scheduler (crawl.HostScheduler) keeps a host to
`per_host_concurrency` requests in flight and `per_host_rps` starts a second.
With many crawl tasks at once, on many nodes, those limits would add up: a
host whose URLs are spread over 100 shards would see 100 times the configured
load. So a task only fetches from a host while it holds the host's lease:

- leases are exclusive, granted by one small Ray actor that every crawl task of
  the cluster asks (`HostLeases`; named, so two crawl jobs on one cluster share it);
- shares are fair: while others wait, a task holds at most its share of the
  hosts in demand (hosts over live holders), and one holding more is told at its
  next renewal to hand the extra back once nothing of them is in flight, so a
  few hosts are spread over the tasks instead of all going to the first to ask;
- the holder gives a host back when it has nothing of it in flight or queued,
  saying when the next request may start, so the rate holds across handovers;
- a holder renews its leases while it runs; a lease not renewed within `ttl_s`
  (20 s: its task died) expires, and its holder, if it was only slow, learns it
  lost the host at its next renewal and stops starting requests there. A crawl
  shard's retry is the same holder as the attempt that died (OUT and the shard
  name it), so it takes its hosts back at once.

Tasks waiting for a busy host work on their other hosts meanwhile. Without Ray
(the inline executor runs one task at a time) no lease is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

ACTOR_NAME, NAMESPACE = "clipline-host-leases", "clipline"
TTL_S = 20.0  # a lease not renewed for this long is free again


class HostLeases:
    """The lease table: host -> (holder, expiry), when each host's next request may start (wall time),
    and who is waiting for what, for fair shares."""

    def __init__(self, ttl_s: float = TTL_S):
        self.ttl_s = ttl_s
        self.held: dict[str, tuple[str, float]] = {}
        self.by_holder: dict[str, set[str]] = {}
        self.wanted: dict[str, set[str]] = {}  # holder -> hosts it asked for and did not get
        self.seen: dict[str, float] = {}  # holder -> when it last called (alive while within ttl_s)
        self.not_before: dict[str, float] = {}
        self.forget_at = 1024  # not_before entries in the past are dropped when the table passes this

    def _share(self, now: float) -> int:
        """Hosts one holder may hold while others wait: the hosts in demand (held, or asked for) over
        the live holders that hold or want any."""
        for holder in [h for h, t in self.seen.items() if t < now - self.ttl_s]:  # dead: its wants go
            del self.seen[holder]
            self.wanted.pop(holder, None)
        waiting = set().union(*self.wanted.values()) - self.held.keys() if self.wanted else set()
        contenders = sum(1 for h in self.seen if self.by_holder.get(h) or self.wanted.get(h))
        return max(1, -(-(len(self.held) + len(waiting)) // max(1, contenders)))

    def acquire(self, holder: str, hosts: Iterable[str]) -> dict[str, float]:
        """The hosts of `hosts` now leased to `holder` (free or expired, while it holds under its fair
        share, or its own already), each with the wall time before which it must not start a request there."""
        now = time.time()
        self.seen[holder] = now
        hosts = list(hosts)
        mine = self.by_holder.setdefault(holder, set())
        self.wanted[holder] = set(hosts) - mine
        share = self._share(now)
        granted = {}
        for host in hosts:
            lease = self.held.get(host)
            if lease is not None and lease[0] != holder and lease[1] >= now:
                continue
            if lease is None or lease[0] != holder:
                if len(mine) >= share:
                    continue
                if lease is not None:
                    self.by_holder.get(lease[0], set()).discard(host)
            self.held[host] = (holder, now + self.ttl_s)
            mine.add(host)
            self.wanted[holder].discard(host)
            granted[host] = self.not_before.get(host, 0.0)
        return granted

    def release(self, holder: str, host: str, not_before: float) -> None:
        """`holder` gives `host` back; its next request anywhere may start at `not_before` (wall time)."""
        lease = self.held.get(host)
        if lease is not None and lease[0] == holder:
            del self.held[host]
            self.by_holder.get(holder, set()).discard(host)
        self.not_before[host] = max(self.not_before.get(host, 0.0), not_before)
        if len(self.not_before) > self.forget_at:
            now = time.time()
            self.not_before = {h: t for h, t in self.not_before.items() if t > now}
            self.forget_at = max(1024, 2 * len(self.not_before))

    def renew(self, holder: str, hosts: Iterable[str]) -> tuple[list[str], list[str]]:
        """Extend `holder`'s leases. Returns (lost, give_back): those of `hosts` it no longer holds
        (expired and taken), and hosts it should hand back (once nothing of them is in flight)
        because it holds more than its share while others wait for them."""
        now = time.time()
        self.seen[holder] = now
        mine = self.by_holder.get(holder, set())
        for host in mine:
            self.held[host] = (holder, now + self.ttl_s)
        lost = [h for h in hosts if h not in mine]
        share = self._share(now)
        give_back = []
        if len(mine) > share:
            others = set().union(*(w for h, w in self.wanted.items() if h != holder)) if self.wanted else set()
            give_back = sorted(mine & others)[: len(mine) - share]
        return lost, give_back

    def finish(self, holder: str) -> None:
        """`holder` is done: every lease it still holds is free (a crawl task's last call)."""
        for host in self.by_holder.pop(holder, set()):
            if self.held.get(host, ("",))[0] == holder:
                del self.held[host]
        self.wanted.pop(holder, None)
        self.seen.pop(holder, None)


class RemoteLeases:
    """HostLeases' interface over the cluster's lease actor (made on first use)."""

    ttl_s = TTL_S  # the actor's, made with the default

    def __init__(self):
        import ray

        self._ray = ray
        actor = ray.remote(num_cpus=0, max_restarts=-1)(HostLeases)
        # On the head node, which the cluster lives and dies with (a worker node may be lost mid-crawl).
        self.actor = actor.options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            resources={"node:__internal_head__": 0.001},
        ).remote()

    def acquire(self, holder: str, hosts: Iterable[str]) -> dict[str, float]:
        return self._ray.get(self.actor.acquire.remote(holder, list(hosts)))

    def release(self, holder: str, host: str, not_before: float) -> None:
        self.actor.release.remote(holder, host, not_before)  # in order with this caller's later calls

    def renew(self, holder: str, hosts: Iterable[str]) -> tuple[list[str], list[str]]:
        return self._ray.get(self.actor.renew.remote(holder, list(hosts)))

    def finish(self, holder: str) -> None:
        self._ray.get(self.actor.finish.remote(holder))


def cluster_leases() -> RemoteLeases | None:
    """The cluster's lease actor when this process is part of a Ray cluster, else None."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not ray.is_initialized():
        return None
    try:
        return RemoteLeases()
    except Exception as e:  # noqa: BLE001 - no actor: the limits per task, said once per task
        log.warning("host leases unavailable (%s): the per-host limits hold per crawl task", e)
        return None
