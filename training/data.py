"""Streaming dataset over a clipline manifest: shards split by rank and worker, seeded shuffles, exact resume.

How an epoch is laid out (all of it a pure function of the manifest, seed and epoch):

- *units*: each shard is a unit; when there are fewer shards than consumers
  (ranks × workers), each shard is cut into equal sample ranges so every
  consumer can get work (no hang, R3);
- units are shuffled with (seed, epoch) and dealt round-robin to consumers
  ``rank * num_workers + worker``;
- a consumer streams its units in order; inside a unit the samples are
  permuted with (seed, epoch, unit) — a shuffle over a whole shard's encoded
  bytes, held only one unit at a time — and cut into batches.

Every batch carries the consumer's position after it (unit, offset). The
trainer keeps the latest position of every consumer and the next worker the
DataLoader would have asked; a resumed run skips finished units without reading
them, restarts inside the current unit at the recorded offset, and rotates its
workers so the DataLoader's round-robin continues where it stopped. Random
crops are seeded per (seed, epoch, uid). So the sequence of batches after a
resume is exactly the one the uninterrupted run would have produced (R4).

Faults: a corrupt image or a tar cut mid-stream skips the sample (or the rest of
the unit) and is counted (R1); a repeated sample key is skipped and counted (R2);
only image and text members are ever decoded — nothing is unpickled (R5); a
shard missing or shorter than the manifest says is a clear error, or skipped
and counted with ``on_bad_shard: skip`` (R7).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.decode import decode_image
from pipeline.errors import ClipError
from pipeline.formats import group_samples, image_member, iter_tar_members
from pipeline.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


class DataError(ClipError):
    """The dataset cannot be read as its manifest describes."""


@dataclass(frozen=True)
class DataConfig:
    """How samples are read, shuffled, decoded and batched."""

    batch_size: int = 64  # per rank
    num_workers: int = 2  # DataLoader worker processes per rank
    seed: int = 0  # shard, sample and crop shuffles
    shuffle: bool = True  # shuffle shards and the samples inside them, per epoch
    image_size: int = 64  # the model's input side in pixels
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: fraction of the image area kept
    on_bad_shard: str = "error"  # "error" or "skip" a shard missing or shorter than the manifest says
    allow_superseded: bool = False  # train on a manifest a takedown replaced (not recommended)


@dataclass(frozen=True)
class Unit:
    shard: int  # index into the manifest's shards
    start: int  # sample range within the shard
    stop: int
    skip: int = 0  # samples of its seeded order already trained on (a unit left over from another world size)


def epoch_units(counts: list[int], consumers: int, epoch: int, seed: int, shuffle: bool) -> list[list[Unit]]:
    """Units of work per consumer for one epoch (see the module docstring)."""
    pieces = max(1, math.ceil(consumers / max(1, len(counts))))
    units = []
    for shard, n in enumerate(counts):
        bounds = np.linspace(0, n, pieces + 1).round().astype(int) if pieces > 1 else [0, n]
        units.extend(Unit(shard, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)
    if shuffle:
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(units))
        units = [units[i] for i in order]
    return [units[c::consumers] for c in range(consumers)]


def plan_units(plan: list, consumers: int) -> list[list[Unit]]:
    """An epoch's remaining units, [[shard, start, stop, skip], ...], dealt round-robin to `consumers`."""
    units = [Unit(*map(int, p)) for p in plan]
    return [units[c::consumers] for c in range(consumers)]


def remaining_plan(per_consumer: list[list[Unit]], positions: dict[int, tuple[int, int]]) -> list[list[int]]:
    """What is left of an epoch, as units with the samples already trained on skipped, from every consumer's
    position (its unit, and the offset in that unit's seeded order). The samples of a unit keep their
    order whoever reads them, so another number of consumers (ranks x workers) continues the epoch
    with no sample repeated and none skipped. Units are taken round-robin across the consumers, the
    order they were being read in."""
    left = []
    for consumer, units in enumerate(per_consumer):
        at, offset = positions.get(consumer, (0, 0))
        mine = []
        for u, unit in enumerate(units):
            skip = unit.skip if u > at else max(unit.skip, offset) if u == at else None
            if skip is not None and skip < unit.stop - unit.start:
                mine.append([unit.shard, unit.start, unit.stop, skip])
        left.append(mine)
    return [mine[k] for k in range(max(map(len, left), default=0)) for mine in left if k < len(mine)]


def _uid_seed(uid: str) -> int:
    return int(hashlib.sha256(uid.encode()).hexdigest()[:12], 16)


class ManifestDataset(IterableDataset):
    """Yields whole batches (DataLoader batch_size=None): images uint8, caption token ids, uids, position."""

    def __init__(
        self,
        manifest: Manifest,
        config: DataConfig,
        tokenizer=None,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        state: dict | None = None,
    ):
        self.manifest = manifest
        self.config = config
        self.tokenizer = tokenizer
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.workers = max(1, config.num_workers)
        state = state or {}
        self.positions = {int(k): tuple(v) for k, v in state.get("positions", {}).items()}
        self.rotation = int(state.get("next_worker", 0))
        self.plan = state.get("plan")  # the rest of an epoch begun under another world size, if any

    @property
    def consumers(self) -> int:
        return self.world_size * self.workers

    def units(self) -> list[list[Unit]]:
        if self.plan is not None:
            return plan_units(self.plan, self.consumers)
        counts = [int(s["num_samples"]) for s in self.manifest.shards]
        return epoch_units(counts, self.consumers, self.epoch, self.config.seed, self.config.shuffle)

    def _check_shard(self, shard: dict) -> bool:
        store, path = self.manifest.storage, shard["tar"]
        problem = None
        if not store.exists(path):
            problem = f"{path} is listed in the manifest but missing"
        elif store.size(path) < int(shard["bytes"]):
            problem = f"{path} has {store.size(path)} bytes, the manifest says {shard['bytes']}"
        if problem and self.config.on_bad_shard != "skip":
            raise DataError(problem + " (set on_bad_shard: skip to train on without it)")
        if problem:
            log.warning("skipping shard: %s", problem)
        return problem is None

    def unit_samples(self, unit: Unit, counts: dict) -> list[tuple[str, dict]]:
        """The unit's valid samples (encoded), in its seeded order."""
        shard = self.manifest.shards[unit.shard]
        if not self._check_shard(shard):
            counts["bad_shards"] += 1
            counts["skipped_samples"] += unit.stop - unit.start
            return []
        samples, seen, index = [], set(), -1
        try:
            with self.manifest.storage.open_read(shard["tar"]) as f:
                for key, members in group_samples(iter_tar_members(f)):
                    if key in seen:
                        counts["duplicate_keys"] += 1  # R2: a second sample under a key already read
                        continue
                    seen.add(key)
                    index += 1
                    if index < unit.start:
                        continue
                    if index >= unit.stop:
                        break
                    image = image_member(members)
                    if image is None:
                        counts["no_image"] += 1
                        continue
                    samples.append((key, {"image": image, "txt": members.get("txt", b"")}))
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # R1: the tar ends mid-member
            counts["truncated_shards"] += 1
            counts["skipped_samples"] += max(0, unit.stop - unit.start - len(samples))
            log.warning("%s: cut mid-stream after %d samples (%s)", shard["tar"], len(samples), e)
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, self.epoch, 2, unit.shard, unit.start]).permutation(
                len(samples)
            )
            samples = [samples[i] for i in order]
        return samples

    def consumer_batches(self, consumer: int) -> Iterator[dict]:
        """The batches of one consumer from its recorded position on."""
        units = self.units()[consumer]
        start_unit, start_offset = self.positions.get(consumer, (0, 0))
        batch, counts = [], Counter()
        for u in range(start_unit, len(units)):
            samples = self.unit_samples(units[u], counts)
            for offset in range(max(units[u].skip, start_offset if u == start_unit else 0), len(samples)):
                key, sample = samples[offset]
                rng = np.random.default_rng([self.config.seed, self.epoch, _uid_seed(key)])
                try:
                    image = decode_image(sample["image"], self.config.image_size, rng, self.config.crop_scale)
                except Exception:  # noqa: BLE001 - any decoder failure is a corrupt sample (R1)
                    counts["corrupt_images"] += 1
                    continue
                batch.append((key, image, sample["txt"].decode("utf-8", "replace")))
                if len(batch) == self.config.batch_size:
                    yield self._collate(
                        batch, consumer, (u, offset + 1) if offset + 1 < len(samples) else (u + 1, 0), counts
                    )
                    batch, counts = [], Counter()
        # A last partial batch is dropped: every rank must take the same number of equal steps. Counts since the
        # last batch come as a bookkeeping item with no samples; its position is past the end, so a resumed
        # run does not yield it again.
        if any(counts.values()):
            yield {"uids": [], "counts": dict(counts), "consumer": consumer, "position": (len(units), 0)}

    def _collate(self, batch, consumer: int, position: tuple[int, int], counts: dict) -> dict:
        uids = [k for k, _, _ in batch]
        captions = [c for _, _, c in batch]
        return {
            "images": torch.stack([im for _, im, _ in batch]),  # (batch, 3, size, size) uint8
            "text": self.tokenizer(captions) if self.tokenizer else None,  # (batch, context) int64
            "uids": uids,
            "captions": captions,
            "consumer": consumer,
            "position": position,
            "counts": dict(counts),
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info else 0
        if info and info.num_workers != self.workers:
            raise AssertionError("DataLoader num_workers must equal DataConfig.num_workers")
        logical = (physical + self.rotation) % self.workers  # continue the round-robin where it stopped
        yield from self.consumer_batches(self.rank * self.workers + logical)


def loader(dataset: ManifestDataset) -> DataLoader:
    """A DataLoader over whole batches; workers are persistent only within one epoch (exact order)."""
    workers = dataset.config.num_workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked: no tokenizer threads before
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )


def next_worker(consumer: int, workers: int) -> int:
    """After a batch from `consumer`, the logical worker the DataLoader asks next."""
    return (consumer % workers + 1) % workers


def open_manifest(location: str, config: DataConfig) -> Manifest:
    manifest = read_manifest(location, allow_superseded=config.allow_superseded)
    if not manifest.shards:
        raise DataError(f"{location}: the manifest lists no shards")
    return manifest


def manifest_captions(manifest: Manifest, limit: int = 2_000_000) -> Iterator[str]:
    """Captions from the parquet sidecars (for training the tokenizer), up to `limit`."""
    n = 0
    for shard in manifest.shards:
        for caption in manifest.storage.read_parquet(shard["parquet"], columns=["caption"])["caption"].to_pylist():
            yield caption or ""
            n += 1
            if n >= limit:
                return
