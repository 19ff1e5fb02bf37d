"""Lineage: what each committed shard was made from, so a rerun redoes exactly the shards whose inputs changed.

A stage declares what one of its shards reads (`Reads`): upstream stages at the
same shard index, upstream stages whole (global steps: dedup components, the
shard route, the manifest), work files such as a plan, and files the config
names (blocklists, checkpoints). Before a stage runs, the driver turns that into
each shard's *inputs*: a name and an identity per input. The marker of a shard
records them beside its config hash; the shard is committed only while both are
unchanged, and a stale one is redone.

A marker's own identity is what its readers record:
- where every output of the shard is hashed (user-facing parquet and tars), the
  hashes of its outputs: a redone shard whose outputs came out byte-identical
  keeps its identity, so nothing downstream of it is redone (a changed blocklist
  that touches 2 of 400 filter shards redoes 2 shards' worth of work downstream);
- otherwise (work files, hashed by nobody), its config hash and inputs: the same
  derivation gives the same identity.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pipeline import layout
from pipeline.errors import StorageError
from pipeline.storage import Storage, split_location


@dataclass(frozen=True)
class Reads:
    """What one shard of a stage reads."""

    same: tuple[str, ...] = ()  # upstream stages (or steps), read at this shard's index
    every: tuple[str, ...] = ()  # upstream stages read whole: every committed shard of each
    files: tuple[str, ...] = ()  # work files under OUT the shard reads (a plan), by content
    external: tuple[str, ...] = ()  # locations the config names (blocklists, a checkpoint), by content


ReadsOf = Callable[[Any], "Reads | None"]  # the stage config -> what a shard reads; None: the step does not run


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def marker_identity(marker: dict) -> str:
    """The identity of a committed shard, as its readers record it (see the module docstring)."""
    if marker.get("identity"):
        return marker["identity"]
    return shard_identity(marker.get("outputs") or {}, marker.get("config_sha256"), marker.get("inputs") or {})


def shard_identity(outputs: dict, config_hash: str | None, inputs: dict) -> str:
    if outputs and all("sha256" in o for o in outputs.values()):
        return _digest({rel: o["sha256"] for rel, o in outputs.items()})
    sizes = {rel: o.get("bytes") for rel, o in outputs.items()}
    return _digest({"config": config_hash, "inputs": inputs, "outputs": sizes})


def location_identity(location: str, storage: Storage | None = None) -> str:
    """sha256 of a file's content: OUT-relative with `storage`, else a local path or URI."""
    store, rel = (storage, location) if storage is not None else split_location(location)
    h = hashlib.sha256()
    try:
        with store.open_read(rel) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except StorageError:
        return "missing"
    return h.hexdigest()


class InputReader:
    """Identities of upstream markers and files for one stage run, each read once."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._markers: dict[str, dict[int, str]] = {}
        self._files: dict[tuple[str, bool], str] = {}

    def markers(self, stage: str) -> dict[int, str]:
        """{shard: identity} of every committed shard of `stage`."""
        if stage not in self._markers:
            from pipeline.stage import committed_shards, read_marker

            shards = committed_shards(self.storage, stage)
            with ThreadPoolExecutor(max_workers=16) as pool:
                found = list(pool.map(lambda s: (s, read_marker(self.storage, stage, s)), shards))
            self._markers[stage] = {s: marker_identity(m) for s, m in found if m is not None}
        return self._markers[stage]

    def file(self, location: str, under_out: bool) -> str:
        key = (location, under_out)
        if key not in self._files:
            self._files[key] = location_identity(location, self.storage if under_out else None)
        return self._files[key]

    def inputs(self, reads: Reads, shard: int) -> dict[str, str]:
        """The inputs of `shard`: a name per input (`crawl/00003`, `dedup/_map/*`, `file:...`) and its identity."""
        found = {}
        for stage in reads.same:
            found[f"{stage}/{layout.shard_name(shard)}"] = self.markers(stage).get(shard, "missing")
        for stage in reads.every:
            found[f"{stage}/*"] = _digest(sorted(self.markers(stage).items()))
        for rel in reads.files:
            found[f"file:{rel}"] = self.file(rel, under_out=True)
        for location in reads.external:
            found[f"config-file:{location}"] = self.file(location, under_out=False)
        return found


def expected_inputs(reads_of: ReadsOf | None, config: Any, storage: Storage, shards: Iterable[int]) -> dict[int, dict]:
    """Each shard's inputs for a stage run ({} for a stage that declares no reads)."""
    reads = reads_of(config) if reads_of is not None else None
    if reads is None:
        return {}
    reader = InputReader(storage)
    return {shard: reader.inputs(reads, shard) for shard in shards}


def staleness(marker: dict, config_hash: str, inputs: dict | None) -> str | None:
    """Why a committed shard must be redone (one line), or None when it is still what its config says."""
    if marker.get("config_sha256") != config_hash:
        return "its stage config changed"
    if inputs is None:
        return None
    recorded = marker.get("inputs")
    if recorded is None:
        return "committed before lineage was recorded"
    changed = sorted(k for k in set(inputs) | set(recorded) if inputs.get(k) != recorded.get(k))
    if not changed:
        return None
    shown = ", ".join(changed[:3]) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
    return f"input changed: {shown}"
