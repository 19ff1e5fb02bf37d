"""Dedup's map and reduce: candidate rows hash-partitioned by key, then confirmed pairs (edges) per partition.

``dedup/_map`` — per crawl shard: (kind, key, node) rows for the exact keys and
(kind, key, node, pHash, colour) rows for the caption key and every table of the
near index, partitioned by key into one shuffle file of each sort per shard.
``dedup/_reduce`` — per partition, with polars: rows sharing a key are
candidates; pairs are confirmed (Hamming + colour for near) and become edges.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import layout
from pipeline.dedup.config import (
    CENTROIDS,
    EMPTY_EDGES,
    EXACT_SCHEMA,
    KIND_BYTES,
    KIND_CAPTION,
    KIND_NEAR,
    KIND_PIXELS,
    MAP,
    PLAN,
    REDUCE,
    DedupConfig,
    fuzzy_schema,
)
from pipeline.dedup.index import (
    caption_key,
    colour_distance_packed,
    exact_key,
    image_rows,
    index_design,
    pack_colour,
    run_starts,
    table_keys,
)
from pipeline.dedup.semantic import emit_semantic, semantic_edges, semantic_schema, vector_array, vectors_of
from pipeline.shuffle import map_files, read_partition, write_gathered
from pipeline.stage import PlanContext, ShardContext, committed_shards


def plan_map(ctx: PlanContext) -> list[int]:
    config: DedupConfig = ctx.config
    shards = committed_shards(ctx.storage, "crawl")
    images = sum(int(ctx.storage.read_json(layout.marker("crawl", s))["stats"].get("success", 0)) for s in shards)
    design = index_design(images, config.near_threshold, config.pair_budget_per_image, config.max_tables)
    kinds = config.exact_bytes + config.exact_pixels + config.caption + (design["tables"] if config.near else 0)
    emitted = images * max(1, kinds)  # rows the map emits: one per image and kind turned on
    dim = None  # the embedding width, for the reducers' shuffle schema (no embeddings: no semantic rows)
    if config.semantic and ctx.storage.exists(CENTROIDS + ".parquet"):
        dim = ctx.storage.read_parquet(CENTROIDS + ".parquet")["centroid"].type.list_size
        emitted += images * (1 + dim // 16)  # a semantic row carries its float16 embedding: ~dim/16 key rows
    plan = {
        "images": images,
        "crawl_shards": shards,  # what every later step works on, whatever is committed since
        "near_index": design,
        "partitions": max(1, math.ceil(emitted / config.rows_per_partition)),
        "embedding_dim": dim,
    }
    old = ctx.storage.read_json(PLAN) if ctx.storage.exists(PLAN) else None
    if old is not None and (old.get("crawl_shards"), old["images"]) == (shards, images):
        plan = {**old, "embedding_dim": dim}  # keep the first run's partitioning (resume)
    # Otherwise the crawl changed (or the settings did): a new plan, and every step that reads it is redone.
    if plan != old:
        ctx.storage.write_json(PLAN, plan)
    return shards


def _mix(kind: np.ndarray, key: np.ndarray) -> np.ndarray:
    """(kind, key) mixed into one uint64."""
    mixed = key.view(np.uint64) ^ (kind.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return mixed ^ (mixed >> np.uint64(29))


def _partition(kind: np.ndarray, key: np.ndarray, partitions: int) -> np.ndarray:
    return (_mix(kind, key) % np.uint64(partitions)).astype(np.int32)


def run_map(ctx: ShardContext) -> dict:
    config: DedupConfig = ctx.config
    plan = ctx.storage.read_json(PLAN)
    captions_needed = config.caption or config.keep_different_captions
    fuzzy = config.caption or config.near
    columns = ["status", "phash"]  # only what the enabled checks need: at 100k rows a shard, reading is half the map
    columns += [c for c, on in (("sha256_key", config.exact_bytes), ("pixel_hash", config.exact_pixels)) if on]
    columns += (["colour_sig"] if fuzzy else []) + (["caption"] if captions_needed else [])
    crawl = ctx.read_frame(layout.crawl_parquet(ctx.shard), columns=columns)
    ok, gid = image_rows(ctx.shard, crawl)
    t = crawl.filter(ok)
    captions = caption_key(t["caption"]) if captions_needed else None

    def emit(kind: str, table_schema: pa.Schema, gid, kinds: list, keys: list, **carried) -> int:
        # Row i is key kind i // images of image i % images; each partition's rows are gathered
        # when written, so the map never holds all emitted rows (at 100k images x 16 kinds, 100 MB).
        kind_all = np.concatenate(kinds).astype(np.int8) if kinds else np.zeros(0, np.int8)
        key_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        parts = _partition(kind_all, key_all, plan["partitions"])
        parts[kind_all < 0] = plan["partitions"]  # no key (an empty caption): left out

        def gather(rows: np.ndarray) -> pa.RecordBatch:
            image = rows % len(gid)
            extra = [_column(carried[f.name][image]) for f in list(table_schema)[3:]]
            return pa.record_batch([kind_all[rows], key_all[rows], gid[image], *extra], schema=table_schema)

        write_gathered(ctx, f"{MAP}/{kind}/{ctx.name}.arrow", table_schema, parts, plan["partitions"], gather)
        return int((kind_all >= 0).sum())

    kinds, keys = [], []
    for on, kind, column in (
        (config.exact_bytes, KIND_BYTES, "sha256_key"),
        (config.exact_pixels, KIND_PIXELS, "pixel_hash"),
    ):
        if on:
            key, present = exact_key(t[column])
            kinds.append(np.where(present, kind, -1))
            keys.append(key)
    emitted = emit("exact", EXACT_SCHEMA, gid, kinds, keys)
    kinds, keys = [], []
    if config.caption:
        kinds.append(np.where(captions != 0, KIND_CAPTION, -1))
        keys.append(captions)
    if config.near:
        for i, k in enumerate(table_keys(t["phash"].to_numpy().astype(np.int64), plan["near_index"])):
            kinds.append(np.full(len(gid), KIND_NEAR + i))
            keys.append(k)
    if kinds:  # no fuzzy checks on: no fuzzy file (the reducers find none)
        carried = {"phash": t["phash"].to_numpy().astype(np.int64)}
        carried.update(zip(("c0", "c1", "c2"), pack_colour(t["colour_sig"]), strict=True))
        if config.keep_different_captions:
            carried["caption_key"] = captions
        emitted += emit("fuzzy", fuzzy_schema(config), gid, kinds, keys, **carried)
    if config.semantic:
        emitted += emit_semantic(ctx, emit)
    return {"rows": len(gid), "emitted": emitted}


def _column(values: np.ndarray) -> pa.Array:
    return vector_array(values) if values.ndim == 2 else pa.array(values)


def exact_edges(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows sharing an exact key: a star to the smallest node of each group (enough for connectivity).

    Exact keys are 60 bits (exact_key), so a row's kind goes in the top bits and one int64 column
    tells the groups of every kind apart. Most keys are unique, so one radix sort finds the
    repeated ones and their rows at once: each key's high bits with its row number in the low
    bits (the row number makes every value distinct and comes back out of the sorted values,
    an argsort for the price of a sort). Rows whose high bits repeat are the candidates; only
    they are ordered by their whole key (a shared prefix of different keys is a group of one).
    """
    key = frame["key"].to_numpy() | (frame["kind"].to_numpy().astype(np.int64) << 60)
    if len(key) < 2:
        return pl.DataFrame(schema=EMPTY_EDGES)
    bits = (len(key) - 1).bit_length()
    packed = key >> bits
    packed <<= bits
    packed |= np.arange(len(key), dtype=np.int64)
    ordered = pl.Series(packed).sort().to_numpy()
    del packed
    prefix = ordered >> bits
    same = prefix[1:] == prefix[:-1]
    if not same.any():
        return pl.DataFrame(schema=EMPTY_EDGES)
    repeated = np.zeros(len(key), dtype=bool)
    repeated[1:] = same
    repeated[:-1] |= same
    rows = ordered[repeated] & ((1 << bits) - 1)
    key, gid = key[rows], frame["gid"].to_numpy()[rows]
    order = pl.Series(key).arg_sort().to_numpy()
    key, gid = key[order], gid[order]
    first = run_starts(key)
    head = np.minimum.reduceat(gid, np.flatnonzero(first))[np.cumsum(first) - 1]  # each group's smallest node
    leaf = gid != head
    return pl.DataFrame(
        {"a": gid[leaf], "b": head[leaf], "reason": (key[leaf] >> 60).astype(np.int8)}, schema=EMPTY_EDGES
    )


def first_table(a: np.ndarray, b: np.ndarray, design: dict) -> np.ndarray:
    """Per pair of pHashes, the first table of the near index in which their keys are equal."""
    equal = np.stack([x == y for x, y in zip(table_keys(a, design), table_keys(b, design), strict=True)])
    return np.where(equal.any(axis=0), equal.argmax(axis=0), len(equal))


def fuzzy_edges(frame: pl.DataFrame, config: DedupConfig, design: dict) -> pl.DataFrame:
    """Confirmed near / caption edges among rows sharing a (kind, key).

    A near pair meets in every table whose key blocks it agrees on; only the first such
    table's reducer emits it (a test on the two pHashes alone), so each pair is one edge,
    not up to `tables` (at 10M rows that was 12x the edges, and the components step's memory).
    """
    # One int64 per (kind, key), so grouping and joining hash one column, not two.
    group = ["group"]
    frame = frame.with_columns(group=pl.Series(_mix(frame["kind"].to_numpy(), frame["key"].to_numpy()).view(np.int64)))
    frame = frame.filter(pl.col("group").is_duplicated()).with_columns(size=pl.len().over(group))
    frame = frame.filter((pl.col("kind") != KIND_CAPTION) | (pl.col("size") <= config.max_caption_group))
    reason_of = pl.when(pl.col("kind") == KIND_CAPTION).then(3).otherwise(2).cast(pl.Int8)
    # Identical (pHash, colour[, caption]) in a group collapse onto one representative first,
    # so a cluster of k copies costs k rows, not k^2 / 2 pairs.
    signature = ["phash", "c0", "c1", "c2", *(["caption_key"] if config.keep_different_captions else [])]
    frame = frame.with_columns(rep=pl.col("gid").min().over([*group, *signature]))
    collapsed = frame.filter(
        (pl.col("gid") != pl.col("rep")) & pl.col("kind").is_in([KIND_CAPTION, KIND_NEAR])  # identical: table 0
    ).select(a=pl.col("gid"), b="rep", reason=reason_of)
    reps = frame.filter(pl.col("gid") == pl.col("rep"))
    # Candidate pairs are joined narrow (most fail the Hamming test); the survivors get their signatures.
    narrow = reps.select([*group, "kind", "gid", "phash"])
    pairs = narrow.join(narrow, on=group, suffix="_b").filter(pl.col("gid") < pl.col("gid_b"))
    limit = pl.when(pl.col("kind") == KIND_CAPTION).then(config.caption_threshold).otherwise(config.near_threshold)
    pairs = pairs.filter((pl.col("phash") ^ pl.col("phash_b")).bitwise_count_ones() <= limit)
    signatures = reps.select(["gid", *signature[1:]]).unique("gid")
    pairs = pairs.join(signatures, on="gid").join(signatures, left_on="gid_b", right_on="gid", suffix="_b")
    if config.keep_different_captions:
        pairs = pairs.filter((pl.col("caption_key") == pl.col("caption_key_b")) | (pl.col("kind") == KIND_CAPTION))
    colour = colour_distance_packed(
        [pairs[f"c{i}"].to_numpy() for i in range(3)], [pairs[f"c{i}_b"].to_numpy() for i in range(3)]
    )
    pairs = pairs.filter(pl.Series(colour <= config.colour_tolerance))
    first = first_table(pairs["phash"].to_numpy(), pairs["phash_b"].to_numpy(), design) + KIND_NEAR
    pairs = pairs.filter((pl.col("kind") == KIND_CAPTION) | (pl.col("kind") == pl.Series(first, dtype=pl.Int64)))
    return pl.concat([collapsed, pairs.select(a=pl.col("gid"), b=pl.col("gid_b"), reason=reason_of)])


def plan_reduce(ctx: PlanContext) -> list[int]:
    return list(range(ctx.storage.read_json(PLAN)["partitions"]))


def run_reduce(ctx: ShardContext) -> dict:
    config: DedupConfig = ctx.config
    exact = pl.from_arrow(read_partition(ctx.storage, map_files(ctx.storage, f"{MAP}/exact"), ctx.shard, EXACT_SCHEMA))
    fuzzy = pl.from_arrow(
        read_partition(ctx.storage, map_files(ctx.storage, f"{MAP}/fuzzy"), ctx.shard, fuzzy_schema(config))
    )
    skipped = (
        fuzzy.filter(pl.col("kind") == KIND_CAPTION)
        .group_by("key")
        .len()
        .filter(pl.col("len") > config.max_caption_group)
        .height
    )
    plan = ctx.storage.read_json(PLAN)
    # Rows of different kinds never pair: one kind at a time keeps the working set a table's worth.
    fuzzy_parts = [fuzzy_edges(part, config, plan["near_index"]) for part in fuzzy.partition_by("kind")]
    semantic = []
    if config.semantic:
        files = map_files(ctx.storage, f"{MAP}/semantic")
        if files:
            rows = read_partition(ctx.storage, files, ctx.shard, semantic_schema(plan["embedding_dim"]))
            x = vectors_of(rows["embedding"])
            semantic = [semantic_edges(rows["key"].to_numpy(), rows["gid"].to_numpy(), x, config.semantic_threshold)]
    parts = [exact_edges(exact), *fuzzy_parts, *semantic]
    edges = parts[0]  # exact edges alone are distinct (one per image and kind) and in a deterministic order
    if len(parts) > 1:
        edges = pl.concat(parts).unique().sort(["a", "b", "reason"])
    ctx.write_table(f"{REDUCE}/{ctx.name}.parquet", edges.to_arrow(), work=True, distinct=("a", "b"))
    return {"rows": exact.height + fuzzy.height, "edges": edges.height, "caption_groups_skipped": skipped}
