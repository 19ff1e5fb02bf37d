"""Dedup's map and reduce: candidate rows hash-partitioned by key, then confirmed pairs (edges) per partition.

``dedup/_map`` — per crawl shard: (kind, key, node) rows for the exact keys and
(kind, key, node, pHash, colour grid) rows for the caption key (the whole image's
signature) and every table of the near index for every window of the image (that
window's signature), partitioned by key into one shuffle file of each sort per shard.
``dedup/_reduce`` — per partition, with polars: rows sharing a key are
candidates; pairs are confirmed (Hamming + colour fit in the window for near) and
become edges.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import layout
from pipeline.dedup.config import (
    CENTROIDS,
    EDGES_SCHEMA,
    EMPTY_EDGES,
    EXACT_SCHEMA,
    GRID_COLUMNS,
    IDENTICAL,
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
    colour_residual,
    exact_key,
    image_rows,
    index_design,
    run_starts,
    table_keys,
    window_arrays,
)
from pipeline.dedup.semantic import emit_semantic, semantic_edges, semantic_schema, vector_array, vectors_of
from pipeline.shuffle import map_files, node_partition, read_partition, write_gathered, write_partitioned
from pipeline.stage import PlanContext, ShardContext, committed_shards
from pipeline.storage import StorageError


def plan_map(ctx: PlanContext) -> list[int]:
    config: DedupConfig = ctx.config
    shards = committed_shards(ctx.storage, "crawl")
    images = sum(int(ctx.storage.read_json(layout.marker("crawl", s))["stats"].get("success", 0)) for s in shards)
    budget, hold = config.pair_budget_per_image, config.hold_radius_from
    design = index_design(images, config.near_threshold, budget, config.max_tables, hold)
    windows = None
    if config.near_windows > 1:
        windows = index_design(images, config.near_threshold, budget, config.window_tables, hold)
    layout_ = window_layout({"near_index": design, "window_index": windows}, config.near_windows)
    fuzzy = config.caption + (sum(d["tables"] for _, d in layout_) if config.near else 0)
    # Rows the map emits, one per image and kind turned on, in units of a 41-byte row (what
    # rows_per_partition was sized for): a fuzzy row carries a window's colours too, 74 bytes.
    width = sum(f.type.bit_width for f in fuzzy_schema(config)) / 8 / 41
    emitted = images * max(1, config.exact_bytes + config.exact_pixels + round(fuzzy * width))
    dim = None  # the embedding width, for the reducers' shuffle schema (no embeddings: no semantic rows)
    if config.semantic and ctx.storage.exists(CENTROIDS + ".parquet"):
        dim = ctx.storage.read_parquet(CENTROIDS + ".parquet")["centroid"].type.list_size
        emitted += images * (1 + dim // 16)  # a semantic row carries its float16 embedding: ~dim/16 key rows
    plan = {
        "images": images,
        "crawl_shards": shards,  # what every later step works on, whatever is committed since
        "near_index": design,  # the whole image's
        "window_index": windows,  # each other window's (images.WINDOWS), or None with near_windows: 1
        "partitions": max(1, math.ceil(emitted / config.rows_per_partition)),
        "graph_partitions": max(1, math.ceil(images / config.images_per_graph_partition)),
        "embedding_dim": dim,
    }
    old = ctx.storage.read_json(PLAN) if ctx.storage.exists(PLAN) else None
    same_index = old is not None and (old["near_index"], old.get("window_index", -1)) == (design, windows)
    if same_index and (old.get("crawl_shards"), old["images"]) == (shards, images) and old.keys() == plan.keys():
        plan = {**old, "embedding_dim": dim}  # keep the first run's partitioning (resume)
    # Otherwise the crawl changed (or the settings did): a new plan, and every step that reads it is redone.
    if plan != old:
        ctx.storage.write_json(PLAN, plan)
    return shards


def window_layout(plan: dict, windows: int) -> list[tuple[int, dict]]:
    """Per window, (its first near kind, its index design): the whole image on the plan's
    near_index from KIND_NEAR, then each other window on window_index; table t is kind first + t."""
    whole = plan["near_index"]
    out = [(KIND_NEAR, whole)]
    for w in range(1, windows):
        out.append((KIND_NEAR + whole["tables"] + (w - 1) * plan["window_index"]["tables"], plan["window_index"]))
    return out


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
    crawl = _read_crawl(ctx, columns + (["window_sig"] if fuzzy else []))
    ok, gid = image_rows(ctx.shard, crawl)
    t = crawl.filter(ok)
    n = len(gid)
    captions = caption_key(t["caption"]) if captions_needed else None

    def emit(kind: str, table_schema: pa.Schema, gid, kinds: list, keys: list, sources=None, **carried) -> int:
        # Row i is key kinds[i // n] of image i % n, its carried values at sources[i // n][i % n] (the
        # image itself by default); each partition's rows are gathered when written, so the map never
        # holds all emitted rows (at 100k images x 16 kinds, 100 MB).
        kind_all = np.concatenate(kinds).astype(np.int16) if kinds else np.zeros(0, np.int16)
        key_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        source = np.concatenate(sources) if sources else None
        parts = _partition(kind_all, key_all, plan["partitions"])
        parts[kind_all < 0] = plan["partitions"]  # no key (an empty caption, a flat window): left out

        def gather(rows: np.ndarray) -> pa.RecordBatch:
            image = rows % len(gid)
            at = image if source is None else source[rows]
            extra = [_column(carried[f.name][at]) for f in list(table_schema)[3:]]
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
    if fuzzy:  # no fuzzy checks on: no fuzzy file (the reducers find none)
        windows = config.near_windows if config.near else 1
        phash = t["phash"].to_numpy().astype(np.int64)
        hashes, grids, texture = window_arrays(t["window_sig"], phash, t["colour_sig"], windows)
        kinds, keys, sources = [], [], []
        image = np.arange(n)
        if config.caption:  # the whole image's signature (window 0)
            kinds.append(np.where(captions != 0, KIND_CAPTION, -1))
            keys.append(captions)
            sources.append(image)
        if config.near:  # window w's table: kind base(w) + table
            for w, (base, design) in enumerate(window_layout(plan, windows)):
                flat = texture[:, w] < config.min_texture
                for table, key in enumerate(table_keys(hashes[:, w], design)):
                    kinds.append(np.where(flat, -1, base + table))
                    keys.append(key)
                    sources.append(w * n + image)
        # carried values window-major: window w of image i at w * n + i
        carried = {"phash": hashes.T.ravel()}
        packed = np.ascontiguousarray(grids.transpose(1, 0, 2)).reshape(windows * n, 48).view(np.int64)
        carried.update((g, packed[:, j]) for j, g in enumerate(GRID_COLUMNS))
        if config.keep_different_captions:
            carried["caption_key"] = np.tile(captions, windows)
        emitted += emit("fuzzy", fuzzy_schema(config), gid, kinds, keys, sources, **carried)
    if config.semantic:
        emitted += emit_semantic(ctx, emit)
    return {"rows": len(gid), "emitted": emitted}


def _read_crawl(ctx: ShardContext, columns: list[str]) -> pl.DataFrame:
    """The crawl shard's `columns`; a crawl made before window signatures has none (window_sig null)."""
    try:
        return ctx.read_frame(layout.crawl_parquet(ctx.shard), columns=columns)
    except StorageError as e:
        if "window_sig" not in columns or "no column window_sig" not in str(e):
            raise
    crawl = ctx.read_frame(layout.crawl_parquet(ctx.shard), columns=[c for c in columns if c != "window_sig"])
    return crawl.with_columns(window_sig=pl.lit(None, pl.Binary))


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


def grids_of(frame: pl.DataFrame, suffix: str = "") -> np.ndarray:
    """The packed colour-grid columns g0..g5 of `frame` as (rows, 16, 3) uint8."""
    packed = np.stack([frame[g + suffix].to_numpy() for g in GRID_COLUMNS], axis=1)
    return np.ascontiguousarray(packed).view(np.uint8).reshape(-1, 16, 3)


def pair_batches(rows: pl.DataFrame, pairs_per_batch: int) -> list[pl.DataFrame]:
    """`rows` in batches of whole groups (by the running count of candidate pairs, so a batch holds
    under `pairs_per_batch` of them plus its last group's): a reduce task's join memory stays
    bounded however many pairs its partition holds (with hold_radius_from, a partition's pairs
    grow with N while its rows do not)."""
    sizes = rows.group_by("group").len().sort("group")
    pairs = sizes["len"].cast(pl.Int64)
    pairs = pairs * (pairs - 1) // 2
    if pairs.sum() <= pairs_per_batch:
        return [rows]
    batch = sizes.select("group", batch=(pairs.cum_sum() - pairs) // pairs_per_batch)  # by the pairs before it
    return [part.drop("batch") for part in rows.join(batch, on="group").partition_by("batch")]


def fuzzy_edges(frame: pl.DataFrame, config: DedupConfig, plan: dict) -> pl.DataFrame:
    """Confirmed near / caption edges among rows of one kind sharing a key.

    A near kind is one table of one window (window_layout); its rows carry
    that window's pHash and colour grid. A window matches when the pHashes are within
    near_threshold and the colours fit (colour_residual). A match of the whole images or of
    their centre windows is an edge (reason near); a corner window's is a weak edge (reason
    -window), which components counts as near only where two corner windows of the pair match:
    one corner alone (4/9 of the image) merged distinct photos of one style and scenes with the
    same ground (bench/dedup_quality.py). A pair of windows meets in every table whose key blocks
    agree; only the first such table's reducer emits it (a test on the two pHashes alone), so each
    window pair is one edge, not up to `tables` (at 10M rows that was 12x the edges, and the
    components step's memory). Two copies alike in several windows still give an edge per window.
    """
    # One int64 per (kind, key), so grouping and joining hash one column, not two.
    group = ["group"]
    layout_ = window_layout(plan, config.near_windows if config.near else 1)
    first_kinds = [base for base, _ in layout_]
    frame = frame.with_columns(group=pl.Series(_mix(frame["kind"].to_numpy(), frame["key"].to_numpy()).view(np.int64)))
    frame = frame.filter(pl.col("group").is_duplicated()).with_columns(size=pl.len().over(group))
    frame = frame.filter((pl.col("kind") != KIND_CAPTION) | (pl.col("size") <= config.max_caption_group))
    caption = pl.col("kind") == KIND_CAPTION
    window = pl.lit(-1)
    for w, base in enumerate(first_kinds):
        window = pl.when(pl.col("kind") >= base).then(w).otherwise(window)
    reason_of = pl.when(caption).then(3).when(window < 2).then(2).otherwise(-window).cast(pl.Int8)
    # Identical (pHash, colour[, caption]) in a group collapse onto one representative first,
    # so a cluster of k copies costs k rows, not k^2 / 2 pairs.
    signature = ["phash", *GRID_COLUMNS, *(["caption_key"] if config.keep_different_captions else [])]
    frame = frame.with_columns(rep=pl.col("gid").min().over([*group, *signature]))
    first_of_window = pl.col("kind").is_in(first_kinds)
    # Their edges are a star: flagged IDENTICAL, so components can count a strong one's ends as one image.
    collapsed = frame.filter(
        (pl.col("gid") != pl.col("rep")) & (caption | first_of_window)  # identical: the window's table 0
    ).select(
        a=pl.col("gid"),
        b="rep",
        reason=pl.when(reason_of >= 0).then(reason_of + IDENTICAL).otherwise(reason_of).cast(pl.Int8),
    )
    reps = frame.filter(pl.col("gid") == pl.col("rep"))
    # Candidate pairs are joined narrow (most fail the Hamming test); the survivors get their signatures.
    narrow = reps.select([*group, "kind", "gid", "phash"])
    limit = pl.when(caption).then(config.caption_threshold).otherwise(config.near_threshold)
    pairs = pl.concat(
        [
            batch.join(batch, on=group, suffix="_b")
            .filter(pl.col("gid") < pl.col("gid_b"))
            .filter((pl.col("phash") ^ pl.col("phash_b")).bitwise_count_ones() <= limit)
            for batch in pair_batches(narrow, config.pairs_per_batch)
        ]
    )
    signatures = reps.select(["gid", *signature[1:]]).unique("gid")
    pairs = pairs.join(signatures, on="gid").join(signatures, left_on="gid_b", right_on="gid", suffix="_b")
    if config.keep_different_captions:
        pairs = pairs.filter((pl.col("caption_key") == pl.col("caption_key_b")) | caption)
    fits = colour_residual(grids_of(pairs), grids_of(pairs, "_b")) <= config.colour_tolerance
    pairs = pairs.filter(pl.Series(fits))
    kind, a, b = pairs["kind"].to_numpy().astype(np.int64), pairs["phash"].to_numpy(), pairs["phash_b"].to_numpy()
    first = np.full(len(kind), -1, dtype=np.int64)  # each pair's first table's kind, in its window
    for w, (base, design) in enumerate(layout_):
        last = layout_[w + 1][0] if w + 1 < len(layout_) else np.iinfo(np.int64).max
        here = (kind >= base) & (kind < last)
        if here.any():
            first[here] = first_table(a[here], b[here], design) + base
    pairs = pairs.filter(caption | (pl.col("kind") == pl.Series(first, dtype=pl.Int64)))
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
    fuzzy_parts = [fuzzy_edges(part, config, plan) for part in fuzzy.partition_by("kind")]
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
    # Partitioned by the pair's smaller node for the graph steps: a pair's edges (one per window
    # that matched) meet in one partition, whichever reducers found them.
    a, b = edges["a"].to_numpy(), edges["b"].to_numpy()
    table = pa.table([np.minimum(a, b), np.maximum(a, b), edges["reason"].to_arrow()], schema=EDGES_SCHEMA)
    parts = node_partition(table["a"].to_numpy(), plan["graph_partitions"])
    write_partitioned(ctx, f"{REDUCE}/{ctx.name}.arrow", table, parts, plan["graph_partitions"])
    return {"rows": exact.height + fuzzy.height, "edges": edges.height, "caption_groups_skipped": skipped}
