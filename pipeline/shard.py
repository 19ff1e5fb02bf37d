"""Shard: write the kept samples as the final dataset, fixed-size tar + parquet shards and a manifest.

Four committed steps:

1. ``shard/_index`` — per crawl shard: the kept rows (filter keep = true) with
   the byte offset and size of each image inside the crawl tar (read from the
   tar headers, never the image bytes), in crawl order.
2. ``shard/_route`` — per crawl shard: each kept row's position in the output,
   [0, kept) laid end to end in crawl-shard order, or with ``shuffle`` a seeded
   bijection of it (a Feistel permutation with cycle walking, nothing global
   materialised), and the rows sent to their output shard through one
   partitioned file a task (pipeline/shuffle.py).
3. ``shard`` — per *output* shard k: the samples at positions [k·N, (k+1)·N),
   its piece of every route file, so every shard but the last has exactly N
   samples whatever the drop rates upstream. Each image is read once with a
   ranged read. Every step reads its input once: the cost stays linear in the
   dataset (an output shard reading whole indexes of every crawl shard would
   be crawl shards × output shards).
4. ``shard/_manifest`` — one task after all shards: ``dataset/manifest.json``
   with each shard's count, bytes and sha256, written last. A reader trusts only
   shards a manifest lists.

Tar members are ``{uid}.jpg`` (or .png/.webp as crawled), ``{uid}.txt`` (the
caption) and ``{uid}.json`` (the parquet row), readable by webdataset and
OpenCLIP without conversion.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import layout, manifest, schema
from pipeline.errors import SchemaError
from pipeline.formats import IMAGE_EXTS, TarWriter
from pipeline.lineage import Reads
from pipeline.shuffle import map_files, read_pieces, write_partitioned
from pipeline.stage import (
    IDENTITY,
    PlanContext,
    ShardContext,
    Stage,
    committed_shards,
    config_sha256,
    read_marker,
)

INDEX, ROUTE, MANIFEST_STAGE = "shard/_index", "shard/_route", "shard/_manifest"  # bookkeeping under shard/
PLAN = "shard/_plan.json"


@dataclass(frozen=True)
class ShardConfig:
    """How the final dataset is cut."""

    samples_per_shard: int = 10_000  # every shard but the last holds exactly this many samples
    shuffle: bool = True  # a seeded global shuffle of sample order across shards
    seed: int = 0  # of the global shuffle
    read_buffer: int = field(default=1 << 20, metadata={IDENTITY: False})  # images closer than this share a ranged read


# --- a seeded permutation of [0, n), computable one element at a time -----------------------


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of x ^ key (uint64 arithmetic wraps, as intended)."""
    z = (x ^ key) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n): a 4-round Feistel network on 2·h bits, cycle-walked into range.

    ``inverse(positions)`` gives the kept index of the sample at each output
    position without building the permutation: O(len(positions)) time and memory.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        self.n = n
        self.half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64((seed * 0x100000001B3 + r * 0x9E3779B1 + 1) & (2**64 - 1)) for r in range(self.ROUNDS)]

    def _round(self, x: np.ndarray, keys) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << h) | right

    def _round_inverse(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in reversed(self.keys):
            left, right = right ^ (_mix(left, key) & self.mask), left
        return (left << h) | right

    def forward(self, index: np.ndarray) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64).copy()
        out = self._round(x, self.keys)
        while (big := out >= self.n).any():  # cycle walking: re-apply until inside [0, n)
            out[big] = self._round(out[big], self.keys)
        return out.astype(np.int64)

    def inverse(self, position: np.ndarray) -> np.ndarray:
        x = np.asarray(position, dtype=np.uint64).copy()
        out = self._round_inverse(x)
        while (big := out >= self.n).any():
            out[big] = self._round_inverse(out[big])
        return out.astype(np.int64)


# --- step 1: index the kept samples of each crawl shard ----------------------------------------

INDEX_SCHEMA = pa.schema(
    [*schema.DATASET, ("image_ext", pa.string()), ("image_offset", pa.int64()), ("image_size", pa.int64())]
)


def plan_index(ctx: PlanContext) -> list[int]:
    return committed_shards(ctx.storage, "filter")


def tar_offsets(fileobj) -> dict[str, tuple[str, int, int]]:
    """uid -> (image extension, data offset, size) from a tar's headers (image bytes are skipped over)."""
    found = {}
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            key, _, ext = info.name.rpartition("/")[2].partition(".")
            if info.isfile() and ext in IMAGE_EXTS:
                found[key] = (ext, info.offset_data, info.size)
    return found


def carried_columns(ctx: ShardContext, present: list[str]) -> list[str]:
    """The input columns ingest carried (ingest.carry_columns) that are here: they travel to the dataset."""
    return [c for c in ctx.run.ingest.carry_columns if c in present]


def run_index(ctx: ShardContext) -> dict:
    kept = pl.from_arrow(ctx.read_table(layout.filter_parquet(ctx.shard))).filter(pl.col("keep"))
    crawl = pl.from_arrow(ctx.read_table(layout.crawl_parquet(ctx.shard)))
    rows = crawl.with_columns(crawl_row=pl.int_range(pl.len())).join(
        kept.select(["uid", "language", "clip_score"]), on="uid", how="inner"
    )
    rows = rows.sort("crawl_row")
    with ctx.storage.open_seekable(layout.crawl_tar(ctx.shard)) as f:
        offsets = tar_offsets(f)
    missing = [u for u in rows["uid"] if u not in offsets]
    if missing:
        raise SchemaError(
            f"{layout.crawl_tar(ctx.shard)} has no image for {len(missing)} kept sample(s), e.g. {missing[0]}"
        )
    ext, offset, size = zip(*(offsets[u] for u in rows["uid"]), strict=True) if rows.height else ((), (), ())
    rows = rows.with_columns(
        image_ext=pl.Series(ext, dtype=pl.Utf8),
        image_offset=pl.Series(offset, dtype=pl.Int64),
        image_size=pl.Series(size, dtype=pl.Int64),
    )
    table = rows.select(INDEX_SCHEMA.names + carried_columns(ctx, rows.columns)).to_arrow()
    table = schema.conform(table, INDEX_SCHEMA, f"{INDEX}/{ctx.name}", keep_extra=True)
    ctx.write_table(f"{INDEX}/{ctx.name}.parquet", table)
    return {"rows": rows.height, "kept": rows.height}


# --- step 2: route each kept sample to its output shard ----------------------------------------

ROUTE_SCHEMA = pa.schema([*INDEX_SCHEMA, ("source", pa.int64()), ("position", pa.int64())])


def _inputs(ctx: PlanContext | ShardContext) -> list[tuple[int, int]]:
    """(crawl shard, kept samples) for every indexed shard, in shard order, from the markers."""
    return [(s, int(read_marker(ctx.storage, INDEX, s)["stats"]["kept"])) for s in committed_shards(ctx.storage, INDEX)]


def write_plan(ctx: PlanContext) -> dict:
    """The cut of the kept samples into output shards (``shard/_plan.json``), from the index markers."""
    config: ShardConfig = ctx.config
    inputs = _inputs(ctx)
    plan = {
        "total": sum(n for _, n in inputs),
        "samples_per_shard": config.samples_per_shard,
        "shuffle": config.shuffle,
        "seed": config.seed,
        "inputs": inputs,
    }
    if not ctx.storage.exists(PLAN) or ctx.storage.read_json(PLAN) != plan:
        ctx.storage.write_json(PLAN, plan)
    return plan


def plan_route(ctx: PlanContext) -> list[int]:
    # A route reads the plan: when the kept set changes, the plan does, and every route (and output
    # shard after it) is redone; positions routed for another cut would scramble the shards.
    return [s for s, _ in write_plan(ctx)["inputs"]]


def output_shards(plan: dict) -> int:
    return math.ceil(plan["total"] / plan["samples_per_shard"])


def run_route(ctx: ShardContext) -> dict:
    config: ShardConfig = ctx.config
    plan = ctx.storage.read_json(PLAN)
    counts = dict(plan["inputs"])
    start = sum(n for s, n in plan["inputs"] if s < ctx.shard)  # kept samples of the crawl shards before this one
    index = ctx.read_table(f"{INDEX}/{ctx.name}.parquet")
    if index.num_rows != counts[ctx.shard]:
        raise SchemaError(f"{INDEX}/{ctx.name}.parquet has {index.num_rows} rows, the plan {counts[ctx.shard]}")
    kept_index = np.arange(start, start + index.num_rows, dtype=np.int64)
    position = Permutation(plan["total"], config.seed).forward(kept_index) if config.shuffle else kept_index
    table = index.append_column("source", pa.array(np.full(index.num_rows, ctx.shard, dtype=np.int64)))
    table = table.append_column("position", pa.array(position))
    parts = position // config.samples_per_shard
    write_partitioned(ctx, f"{ROUTE}/{ctx.name}.arrow", table, parts, output_shards(plan))
    return {"rows": index.num_rows, "total": plan["total"]}


# --- step 3: the output shards -------------------------------------------------------------------


def plan_shards(ctx: PlanContext) -> list[int]:
    return list(range(output_shards(ctx.storage.read_json(PLAN))))  # written by plan_route, just before


def read_spans(storage, rel: str, offsets: list[int], sizes: list[int], gap: int) -> list[bytes]:
    """The byte spans (offset, size) of `rel`, sorted by offset, in few ranged reads: spans less
    than `gap` bytes apart share one read (up to 16 x `gap` bytes of it)."""
    out, i = [], 0
    while i < len(offsets):
        j, stop = i, offsets[i] + sizes[i]
        while j + 1 < len(offsets):
            near = offsets[j + 1] - stop < gap
            if not near or offsets[j + 1] + sizes[j + 1] - offsets[i] > 16 * gap:
                break
            j += 1
            stop = max(stop, offsets[j] + sizes[j])
        data = storage.read_range(rel, offsets[i], stop)
        out.extend(data[offsets[k] - offsets[i] : offsets[k] - offsets[i] + sizes[k]] for k in range(i, j + 1))
        i = j + 1
    return out


def sample_json(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode()  # carried columns too


def run_shard(ctx: ShardContext) -> dict:
    config: ShardConfig = ctx.config
    plan = ctx.storage.read_json(PLAN)
    n = config.samples_per_shard
    positions = np.arange(ctx.shard * n, min(plan["total"], (ctx.shard + 1) * n), dtype=np.int64)
    pieces = read_pieces(ctx.storage, map_files(ctx.storage, ROUTE), ctx.shard)
    # carried columns ride along: a column all null in one crawl shard and typed in another unifies
    routed = pa.concat_tables(pieces, promote_options="permissive") if pieces else ROUTE_SCHEMA.empty_table()
    routed = schema.conform(routed, ROUTE_SCHEMA, f"{ROUTE}/{ctx.name}", keep_extra=True)
    table = pl.from_arrow(routed).sort("position")
    if not np.array_equal(table["position"].to_numpy(), positions):
        first, last = (int(positions[0]), int(positions[-1])) if len(positions) else (0, -1)
        raise SchemaError(
            f"{ROUTE} gives {table.height} samples for dataset shard {ctx.shard}, not positions {first}..{last}: "
            "a route file is missing"
        )

    def fetch(rows: pl.DataFrame) -> dict[str, bytes]:
        tar = layout.crawl_tar(int(rows["source"][0]))
        spans = rows["image_offset"].to_list(), rows["image_size"].to_list()
        found = read_spans(ctx.storage, tar, *spans, config.read_buffer)
        return dict(zip(rows["uid"].to_list(), found, strict=True))

    # One crawl tar's images at a time, several tars at once where each read is a round trip (S3).
    sources = table.sort(["source", "image_offset"]).partition_by("source", maintain_order=True)
    images = {uid: data for found in ctx.storage.map_reads(fetch, sources) for uid, data in found.items()}
    columns = schema.DATASET.names + carried_columns(ctx, table.columns)
    dataset = schema.conform(table.select(columns).to_arrow(), schema.DATASET, f"dataset/{ctx.name}", keep_extra=True)
    with TarWriter(ctx.output_path(layout.dataset_tar(ctx.shard))) as tar:
        for row, ext in zip(dataset.to_pylist(), table["image_ext"], strict=True):
            tar.add(
                row["key"], {ext: images[row["uid"]], "txt": (row["caption"] or "").encode(), "json": sample_json(row)}
            )
    ctx.write_table(layout.dataset_parquet(ctx.shard), dataset)
    return {"rows": dataset.num_rows, "samples": dataset.num_rows, "image_bytes": sum(map(len, images.values()))}


# --- step 3: the manifest -------------------------------------------------------------------------


def plan_manifest(ctx: PlanContext) -> list[int]:
    planned = output_shards(ctx.storage.read_json(PLAN))
    done = committed_shards(ctx.storage, "shard")
    return [0] if done == list(range(planned)) else []


def build_manifest(ctx: ShardContext) -> dict:
    """The manifest of the committed dataset shards (paths relative to the manifest)."""
    shards = []
    for s in committed_shards(ctx.storage, "shard"):
        marker = read_marker(ctx.storage, "shard", s)
        tar = marker["outputs"][layout.dataset_tar(s)]
        parquet = marker["outputs"][layout.dataset_parquet(s)]
        shards.append(
            {
                "tar": layout.manifest_tar(s),
                "parquet": layout.manifest_parquet(s),
                "num_samples": int(marker["stats"]["samples"]),
                "bytes": tar["bytes"],
                "sha256": tar["sha256"],
                "parquet_bytes": parquet["bytes"],
                "parquet_sha256": parquet["sha256"],
            }
        )
    upstream = {name: getattr(ctx.run, name) for name in (*layout.upstream("shard"), "shard")}
    return manifest.new_manifest(ctx.run.name, config_sha256(upstream), shards)


def run_manifest(ctx: ShardContext) -> dict:
    built = build_manifest(ctx)
    ctx.output_path(layout.MANIFEST).write_bytes(manifest.dumps(built))
    return {"rows": built["num_samples"], "shards": len(built["shards"])}


INDEX_STAGE = Stage(
    name=INDEX,
    plan=plan_index,
    run_shard=run_index,
    config_key="shard",
    reads=lambda c: Reads(same=("filter", "crawl")),
)
ROUTE_STAGE = Stage(
    name=ROUTE,
    plan=plan_route,
    run_shard=run_route,
    config_key="shard",
    reads=lambda c: Reads(every=(INDEX,), files=(PLAN,)),
)
SHARD_STAGE = Stage(
    name="shard",
    plan=plan_shards,
    run_shard=run_shard,
    config_key="shard",
    reads=lambda c: Reads(every=(ROUTE,), files=(PLAN,)),
)
MANIFEST_STAGE_ = Stage(
    name=MANIFEST_STAGE,
    plan=plan_manifest,
    run_shard=run_manifest,
    config_key="shard",
    reads=lambda c: Reads(every=("shard",)),
)
STAGES = (INDEX_STAGE, ROUTE_STAGE, SHARD_STAGE, MANIFEST_STAGE_)
