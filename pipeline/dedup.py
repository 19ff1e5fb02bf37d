"""Dedup: exact, near-duplicate and caption duplicates, global across all crawl shards.

Signatures come from the crawl (pipeline/images.py): the bytes' sha256 (as the
integer sha256_key), a 64-bit pixel hash (equal for lossless re-encodes), a 64-bit
pHash and a colour signature. Two images are near-duplicates when their pHashes differ in at most
`near_threshold` bits and their colour grids in at most `colour_tolerance`.

Four committed steps, none of which holds all hashes in one place (six with
semantic dedup, whose two come first: ``dedup/_embed`` per crawl shard, the image
embeddings of a clipline checkpoint; ``dedup/_centroids``, spherical k-means on a
sample of them; the map then keys each image by its nearest centroid and the
reduce compares the images of one centroid pairwise, SemDeDup-style):

1. ``dedup/_map`` — per crawl shard: emit (kind, key, node) rows for the exact
   keys, and (kind, key, node, pHash, colour) rows for the caption key and every
   candidate table of the near index, hash-partitioned by key into one file of
   each sort per shard (pipeline/shuffle.py). A node is its crawl shard and row
   (shard << 32 | row), so no table of uids is written: later steps read them from the crawl.
2. ``dedup/_reduce`` — per partition, with polars: rows sharing a key are
   candidates; pairs are confirmed (Hamming + colour for near) and become edges.
3. ``dedup/_components`` — one task over the edges only (memory O(duplicates),
   not O(N)): connected components by union-find in numpy, so A~B~C is one
   cluster; one keeper per cluster by a deterministic rule.
4. ``dedup`` — per crawl shard: ``dedup/{shard}.parquet`` with ``uid, dup_of,
   dup_reason, cluster_size`` for every crawled image (dup_of null = kept).

The near index is multi-index hashing: the 64 pHash bits are cut into m blocks
and a table keyed on every choice of `match` blocks; two hashes within
m - match bits share at least one table key (pigeonhole), so recall is
guaranteed up to that radius with no all-pairs comparison. The plan picks the
largest guaranteed radius (up to `near_threshold`) whose expected candidate
pairs fit the budget, from the number of images; it is recorded in
``dedup/_plan.json`` and the stats. Beyond it, recall is measured, not assumed.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import schema
from pipeline.errors import ClipError, ConfigError
from pipeline.shuffle import map_files, read_partition, write_gathered
from pipeline.stage import IDENTITY, PlanContext, ShardContext, Stage, committed_shards, release_memory, shard_name

PLAN = "dedup/_plan.json"
MAP, REDUCE, COMPONENTS = "dedup/_map", "dedup/_reduce", "dedup/_components"
CLUSTERS = "dedup/_clusters.arrow"  # every clustered image's dup_of etc., partitioned by crawl shard
# Edge reasons, strongest first: a removed image gets the strongest reason among its own edges.
REASONS = ("exact_bytes", "exact_pixels", "near", "caption", "semantic")
REASON_NAMES = pa.array([*REASONS, None], pa.string())  # by index; the last (null) for a kept image
KIND_BYTES, KIND_PIXELS, KIND_CAPTION, KIND_SEMANTIC, KIND_NEAR = 0, 1, 2, 4, 10  # near table t: kind 10 + t
EMBED, CENTROIDS = "dedup/_embed", "dedup/_centroids"


@dataclass(frozen=True)
class DedupConfig:
    """What counts as a duplicate, and which copy is kept."""

    exact_bytes: bool = True
    exact_pixels: bool = True
    near: bool = True
    near_threshold: int = 8  # max pHash Hamming distance
    colour_tolerance: int = 1  # max difference of one colour-grid channel (0-15)
    caption: bool = True  # same normalised caption on near-identical images
    caption_threshold: int = 12  # looser pHash distance for same-caption pairs
    max_caption_group: int = 2000  # bigger same-caption groups ("photo") are not compared, but counted
    keep_different_captions: bool = False  # True: a duplicate image with another caption is kept
    keep: Literal["largest", "lowest_uid"] = "largest"  # largest resolution (then lowest uid), or lowest uid
    semantic: bool = False  # SemDeDup-style, over image embeddings of a trained clipline checkpoint
    semantic_checkpoint: str | None = None  # a run directory (its latest checkpoint) or a .pt file
    semantic_threshold: float = 0.95  # cosine similarity at or above which two images are semantic duplicates
    semantic_cluster_size: int = 10_000  # k-means clusters = images / this; pairs are compared within one
    semantic_sample: int = 200_000  # embeddings k-means is fitted on (sampled from every shard)
    semantic_iterations: int = 20  # k-means iterations (fewer if the assignment stops changing)
    semantic_device: str = field(default="auto", metadata={IDENTITY: False})  # auto | cpu | cuda
    semantic_batch_size: int = field(default=256, metadata={IDENTITY: False})
    pair_budget_per_image: int = 50  # candidate pairs the near index may cost, per image
    max_tables: int = 32  # emission budget of the near index, per image
    rows_per_partition: int = field(default=1_000_000, metadata={IDENTITY: False})  # memory per reduce task


# --- the near index ------------------------------------------------------------------------


def index_design(n: int, threshold: int, budget_per_image: int = 50, max_tables: int = 32) -> dict:
    """The multi-index layout with the largest guaranteed radius whose expected pairs fit the budget."""
    budget = max(1e6, budget_per_image * n)
    best = {"blocks": 1, "match": 1, "tables": 1, "radius": 0}
    for m in range(1, 17):
        for match in range(1, m + 1):
            radius, tables = m - match, math.comb(m, match)
            if radius > threshold or tables > max_tables:
                continue
            key_bits = 64 * match / m
            pairs = tables * n * n / 2 ** (key_bits + 1)
            better = (radius, -tables) > (best["radius"], -best["tables"])
            if pairs <= budget and better:
                best = {"blocks": m, "match": match, "tables": tables, "radius": radius}
    return best


def _blocks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of each of m blocks of a 64-bit hash."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def table_keys(phash: np.ndarray, design: dict) -> list[np.ndarray]:
    """For each table of the design, the key of every hash (int64): its chosen blocks, concatenated."""
    h = phash.astype(np.int64).view(np.uint64)
    blocks = _blocks(design["blocks"])
    keys = []
    for combo in itertools.combinations(range(design["blocks"]), design["match"]):
        key = np.zeros(len(h), dtype=np.uint64)
        for b in combo:
            shift, width = blocks[b]
            mask = np.uint64((1 << width) - 1)
            key = (key << np.uint64(width)) | ((h >> np.uint64(shift)) & mask)
        keys.append(key.view(np.int64))
    return keys


KEY_BITS = 60  # exact keys: exact_edges keeps a row's kind above them


def exact_key(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """The low 60 bits of an integer hash column (the crawl's sha256_key or pixel_hash) as
    int64 keys, and which rows have a hash at all (a row without one is in no group)."""
    present = values.is_not_null().to_numpy()
    return values.fill_null(0).cast(pl.Int64).to_numpy() & ((1 << KEY_BITS) - 1), present


def caption_key(captions: pl.Series | pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A 63-bit key of the caption, case- and whitespace-folded (0 for an empty caption).

    polars' hash with fixed seeds: stable for one polars version, which is all a run needs
    (keys never leave the dedup stage's own work files).
    """
    folded = pl.Series(captions).fill_null("").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    key = (folded.hash(seed=0).to_numpy() >> np.uint64(1)).astype(np.int64)
    return np.where(folded.to_numpy() == "", 0, np.maximum(key, 1))


def image_rows(shard: int, crawl: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The crawl rows dedup looks at (fetched and hashed images): their mask over the shard, and
    their node ids, the crawl shard in the high 32 bits and the crawl row in the low."""
    ok = ((crawl["status"] == schema.SUCCESS) & crawl["phash"].is_not_null()).fill_null(False).to_numpy()
    return ok, (np.int64(shard) << np.int64(32)) | np.flatnonzero(ok).astype(np.int64)


def run_starts(values: np.ndarray) -> np.ndarray:
    """For sorted values, True where a run of equal values starts (empty in, empty out)."""
    starts = np.ones(len(values), dtype=bool)
    np.not_equal(values[1:], values[:-1], out=starts[1:])
    return starts


# --- step 0 (semantic only): embeddings and k-means centroids ------------------------------


def plan_embed(ctx: PlanContext) -> list[int]:
    config: DedupConfig = ctx.config
    if not config.semantic:
        return []
    if not config.semantic_checkpoint:
        raise ConfigError("dedup.semantic needs dedup.semantic_checkpoint: a trained clipline run directory or .pt")
    if not 0 < config.semantic_threshold <= 1:
        raise ConfigError(f"dedup.semantic_threshold must be a cosine in (0, 1], not {config.semantic_threshold}")
    from eval.run import resolve_checkpoint

    resolve_checkpoint(config.semantic_checkpoint)  # a wrong path is one error on the driver, before any task
    return committed_shards(ctx.storage, "crawl")


def run_embed(ctx: ShardContext) -> dict:
    """Unit image embeddings (float16) of the shard's images: ``dedup/_embed/{shard}.parquet`` (gid, embedding)."""
    from pipeline import clip_score
    from pipeline.formats import read_images

    config: DedupConfig = ctx.config
    crawl = ctx.read_frame(f"crawl/{ctx.name}.parquet", columns=["key", "status", "phash"])
    ok, gid = image_rows(ctx.shard, crawl)
    keys = crawl["key"].filter(ok).to_list()
    images = read_images(ctx.storage, f"crawl/{ctx.name}.tar") if keys else {}
    vectors = clip_score.embed(
        [images.get(k, b"") for k in keys],
        config.semantic_checkpoint,
        clip_score.pick_device(config.semantic_device),
        config.semantic_batch_size,
    )
    decoded = ~np.isnan(vectors).any(axis=1)
    table = pa.table(
        {
            "gid": gid[decoded],
            "embedding": vector_array(vectors[decoded].astype(np.float16)),
        }
    )
    ctx.write_table(f"{EMBED}/{ctx.name}.parquet", table, work=True)
    return {"rows": len(keys), "embedded": int(decoded.sum()), "undecodable": int((~decoded).sum())}


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A (n, d) array as an Arrow column of d-element lists."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def vectors_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow column of d-element lists as a unit-length (n, d) float32 array."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    x = column.flatten().to_numpy().astype(np.float32).reshape(len(column), column.type.list_size)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(x: np.ndarray, centroids: np.ndarray, device: str = "cpu", block: int = 65536) -> np.ndarray:
    """The index of each row's most similar centroid (cosine; rows and centroids unit length)."""
    import torch

    c = torch.from_numpy(centroids).to(device)
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), block):
        sim = torch.from_numpy(x[start : start + block]).to(device) @ c.T
        out[start : start + block] = sim.argmax(dim=1).cpu().numpy()
    return out


def spherical_kmeans(x: np.ndarray, k: int, iterations: int, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """k unit centroids of unit rows x: k-means++ seeding on the cosine distance, then Lloyd steps.

    Deterministic for a given x (a seeded generator; a cluster left empty keeps its centroid).
    The seeding costs k passes over the sample (on the GPU when there is one), which is what
    keeps two seeds from landing in one true cluster and leaving another without any.
    """
    import torch

    rng = np.random.default_rng(seed)
    data = torch.from_numpy(x).to(device)
    chosen = [int(rng.integers(len(x)))]
    best = (data @ data[chosen[0]]).cpu().numpy().astype(np.float64)
    trials = 2 + int(math.log(k))  # greedy k-means++: the best of a few D-weighted candidates
    for _ in range(1, k):
        weight = np.maximum(1.0 - best, 0.0)
        total = weight.sum()
        if total <= 0:  # fewer distinct points than k: the rest are repeats
            chosen.append(int(rng.integers(len(x))))
            continue
        candidates = rng.choice(len(x), size=trials, p=weight / total)
        sims = np.maximum(best[None, :], (data[torch.from_numpy(candidates)] @ data.T).cpu().numpy())
        pick = int(np.argmin(np.maximum(1.0 - sims, 0.0).sum(axis=1)))
        chosen.append(int(candidates[pick]))
        best = sims[pick]
    centroids = x[chosen].copy()
    assign = None
    for _ in range(iterations):
        new = nearest(x, centroids, device)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, assign, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        filled = norms[:, 0] > 0
        centroids[filled] = (sums[filled] / norms[filled]).astype(np.float32)
    return centroids


def plan_centroids(ctx: PlanContext) -> list[int]:
    return [0] if ctx.config.semantic else []


def run_centroids(ctx: ShardContext) -> dict:
    """k-means centroids of a sample of every shard's embeddings (``dedup/_centroids.parquet``)."""
    from pipeline.clip_score import pick_device

    config: DedupConfig = ctx.config
    files = ctx.storage.list(EMBED, suffix=".parquet")
    counts = [ctx.read_table(f, columns=["gid"]).num_rows for f in files]
    total = sum(counts)
    if not total:
        return {"clusters": 0, "sample": 0}
    # Each shard gives its share of the sample, chosen by a generator seeded by the shard: a rerun
    # (or a resumed run) samples the same rows.
    sample = []
    for f, n in zip(files, counts, strict=True):
        take = min(n, math.ceil(config.semantic_sample * n / total))
        if not take:
            continue
        rows = np.sort(np.random.default_rng(int(f.rsplit("/", 1)[-1].split(".")[0])).choice(n, take, replace=False))
        sample.append(vectors_of(ctx.read_table(f, columns=["embedding"])["embedding"].take(pa.array(rows))))
    x = np.concatenate(sample)
    k = max(1, min(len(x), math.ceil(total / config.semantic_cluster_size)))
    device = pick_device(config.semantic_device)
    centroids = spherical_kmeans(x, k, config.semantic_iterations, device=device)
    fit = float((x * centroids[nearest(x, centroids, device)]).sum(axis=1).mean())
    ctx.write_table(CENTROIDS + ".parquet", pa.table({"centroid": vector_array(centroids)}), work=True)
    return {"clusters": k, "sample": len(x), "mean_cosine_to_centroid": round(fit, 4)}


# --- step 1: map -------------------------------------------------------------------------------


def plan_map(ctx: PlanContext) -> list[int]:
    config: DedupConfig = ctx.config
    shards = committed_shards(ctx.storage, "crawl")
    images = sum(
        int(ctx.storage.read_json(f"crawl/_committed/{s:05d}.json")["stats"].get("success", 0)) for s in shards
    )
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
    elif old is not None and committed_shards(ctx.storage, MAP):
        raise ClipError(
            f"the crawl changed since this dedup began ({len(old.get('crawl_shards') or [])} shards and "
            f"{old['images']} images then, {len(shards)} and {images} now): delete "
            f"{ctx.storage.url('dedup')} and run dedup again"
        )
    if plan != old:
        ctx.storage.write_json(PLAN, plan)
    return shards


def _mix(kind: np.ndarray, key: np.ndarray) -> np.ndarray:
    """(kind, key) mixed into one uint64."""
    mixed = key.view(np.uint64) ^ (kind.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return mixed ^ (mixed >> np.uint64(29))


def _partition(kind: np.ndarray, key: np.ndarray, partitions: int) -> np.ndarray:
    return (_mix(kind, key) % np.uint64(partitions)).astype(np.int32)


EXACT_SCHEMA = pa.schema([("kind", pa.int8()), ("key", pa.int64()), ("gid", pa.int64())])
FUZZY_SCHEMA = pa.schema(
    [*EXACT_SCHEMA, ("phash", pa.int64()), ("c0", pa.int64()), ("c1", pa.int64()), ("c2", pa.int64())]
)
CAPTION_FIELD = pa.field("caption_key", pa.int64())  # on fuzzy rows only with keep_different_captions


def fuzzy_schema(config: DedupConfig) -> pa.Schema:
    return FUZZY_SCHEMA.append(CAPTION_FIELD) if config.keep_different_captions else FUZZY_SCHEMA


def semantic_schema(dim: int) -> pa.Schema:
    return EXACT_SCHEMA.append(pa.field("embedding", pa.list_(pa.float16(), dim)))


def run_map(ctx: ShardContext) -> dict:
    config: DedupConfig = ctx.config
    plan = ctx.storage.read_json(PLAN)
    captions_needed = config.caption or config.keep_different_captions
    fuzzy = config.caption or config.near
    columns = ["status", "phash"]  # only what the enabled checks need: at 100k rows a shard, reading is half the map
    columns += [c for c, on in (("sha256_key", config.exact_bytes), ("pixel_hash", config.exact_pixels)) if on]
    columns += (["colour_sig"] if fuzzy else []) + (["caption"] if captions_needed else [])
    crawl = ctx.read_frame(f"crawl/{ctx.name}.parquet", columns=columns)
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


def emit_semantic(ctx: ShardContext, emit) -> int:
    """Each embedded image keyed by its nearest k-means centroid (SemDeDup compares within a cluster)."""
    from pipeline.clip_score import pick_device

    if not ctx.storage.exists(CENTROIDS + ".parquet"):  # no image anywhere embedded
        return 0
    embedded = ctx.read_table(f"{EMBED}/{ctx.name}.parquet")
    centroids = vectors_of(ctx.read_table(CENTROIDS + ".parquet")["centroid"])
    x = vectors_of(embedded["embedding"])
    cluster = nearest(x, centroids, pick_device(ctx.config.semantic_device))
    kind = np.full(len(x), KIND_SEMANTIC)
    gid = embedded["gid"].to_numpy()
    return emit("semantic", semantic_schema(centroids.shape[1]), gid, [kind], [cluster], embedding=x.astype(np.float16))


# --- step 2: reduce -------------------------------------------------------------------------


def pack_colour(signatures: pl.Series | pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """48-hex-digit colour grids as three int64 columns of 16 digits each (24 bytes, not 48 + offsets)."""
    text = pl.Series(signatures)
    return [
        text.str.slice(16 * i, 16).str.to_integer(base=16, dtype=pl.UInt64).to_numpy().view(np.int64) for i in range(3)
    ]


def colour_distance_packed(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Per pair, the largest difference of one 4-bit channel between two packed colour grids."""
    worst = np.zeros(len(a[0]), dtype=np.int64)
    for wa, wb in zip(a, b, strict=True):
        ua, ub = wa.view(np.uint64), wb.view(np.uint64)
        for shift in range(0, 64, 4):
            da = ((ua >> np.uint64(shift)) & np.uint64(15)).astype(np.int64)
            db = ((ub >> np.uint64(shift)) & np.uint64(15)).astype(np.int64)
            worst = np.maximum(worst, np.abs(da - db))
    return worst


EMPTY_EDGES = {"a": pl.Int64, "b": pl.Int64, "reason": pl.Int8}
# dup_reason as its index in REASONS (len(REASONS) for a keeper)
CLUSTERS_SCHEMA = pa.schema(
    [("gid", pa.int64()), ("dup_of", pa.string()), ("reason", pa.int8()), ("cluster_size", pa.int32())]
)


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


def semantic_edges(
    cluster: np.ndarray,
    gid: np.ndarray,
    x: np.ndarray,
    threshold: float,
    block: int = 1024,
    spill: int = 2_000_000,
    max_floats: int = 1 << 24,
) -> pl.DataFrame:
    """Edges between images of one k-means cluster whose embeddings' cosine is >= threshold.

    Within a cluster, similarities are computed a block of rows at a time against the rows
    after it (each pair once); the pairs found are reduced to a spanning star per connected
    group (union-find) whenever they pile up and at the end, so a cluster of many
    near-identical images costs edges linear in its size, not quadratic.
    """
    order = np.lexsort((gid, cluster))
    cluster, gid, x = cluster[order], gid[order], x[order]
    starts = np.flatnonzero(run_starts(cluster))
    stops = np.r_[starts[1:], len(cluster)]
    a_out, b_out = [], []
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        pairs_a, pairs_b, pending = [], [], 0
        rows = max(1, min(block, max_floats // (stop - start)))  # a block's similarities stay <= 64 MB
        for i0 in range(start, stop - 1, rows):
            sim = x[i0 : i0 + rows] @ x[i0:stop].T
            i, j = np.nonzero(sim >= threshold)
            later = j > i  # j counts from i0 too: each pair once, no self-pairs
            pairs_a.append(i[later] + i0)
            pairs_b.append(j[later] + i0)
            pending += int(later.sum())
            if pending > spill:
                pairs_a, pairs_b = _stars(np.concatenate(pairs_a), np.concatenate(pairs_b))
                pending = len(pairs_a[0])
        if pending:
            (a,), (b,) = _stars(np.concatenate(pairs_a), np.concatenate(pairs_b))
            a_out.append(gid[a])
            b_out.append(gid[b])
    a = np.concatenate(a_out) if a_out else np.zeros(0, np.int64)
    b = np.concatenate(b_out) if b_out else np.zeros(0, np.int64)
    return pl.DataFrame({"a": a, "b": b, "reason": np.full(len(a), REASONS.index("semantic"), np.int8)})


def _stars(a: np.ndarray, b: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same components as the edges (a, b), as one edge from each non-root node to its root."""
    nodes, _, root = union_find(a, b)
    leaf = root != np.arange(len(nodes))
    return [nodes[leaf]], [nodes[root[leaf]]]


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


# --- step 3: connected components -------------------------------------------------------------


def union_find(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nodes, index, root): the sorted nodes of the edge list, each edge end's index into
    them (a's then b's), and each node's root: the index of the smallest node of its component."""
    return union_find_ends(np.concatenate([a, b]))


def union_find_ends(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """union_find over one array of edge ends, the a's then the b's (so a caller need not hold
    both a copy and the halves)."""
    nodes, index = dense_index(ends)
    return nodes, index, roots(index, len(nodes))


def dense_index(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, index): the sorted distinct values of `ends`, and each end's index into them
    (np.unique's inverse, 2-3x faster). Node ids of crawl rows have a faster way: gid_index."""
    index = pl.Series(ends).rank("dense").to_numpy().astype(np.int32)
    index -= 1
    nodes = np.empty(int(index.max()) + 1 if len(index) else 0, dtype=np.int64)
    nodes[index] = ends
    return nodes, index


LOW_BITS = (np.uint64(1) << np.arange(64, dtype=np.uint64)) - np.uint64(1)  # LOW_BITS[j]: bits 0 .. j-1 set
CHUNK = 1 << 20  # ends at a time: temporaries of 8 MB, reused, not hundreds of MB of fresh pages


def gid_index(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dense_index for node ids (shard << 32 | row), with no sort: 3x faster at 10M images.

    The crawl's rows are laid end to end (each shard as long as its largest row among `ends`)
    and the ends' rows are marked in a bitmap over them; the nodes are the marked rows in order,
    and an end's index is the number of marks before its own: a running count per 64-bit
    word plus a popcount within the word. Time O(ends + rows); memory one byte a row
    while marking, then a bit (400 MB, then 50 MB, at 400M images).
    """
    if not len(ends):
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    chunks = [ends[c : c + CHUNK] for c in range(0, len(ends), CHUNK)]
    base = np.arange(int(ends.max() >> 32) + 1, dtype=np.int64) << 32
    last = base - 1  # a shard with no node gets length 0
    for chunk in chunks:
        np.maximum.at(last, chunk >> 32, chunk)
    start = np.zeros(len(base) + 1, dtype=np.int64)
    np.cumsum(last - base + 1, out=start[1:])
    shift = start[:-1] - base  # a node's position: its gid + its shard's shift

    def positions(chunk: np.ndarray) -> np.ndarray:
        position = shift[chunk >> 32]
        position += chunk
        return position

    marked = np.zeros(-(-int(start[-1]) // 64) * 64, dtype=bool)
    for chunk in chunks:
        marked[positions(chunk)] = True
    at = np.flatnonzero(marked)
    nodes = at - np.repeat(shift, np.diff(np.searchsorted(at, start)))
    words = np.packbits(marked, bitorder="little").view("<u8")  # bit j of word w: position 64w + j
    del marked, at
    before = np.zeros(len(words), dtype=np.int64)
    np.cumsum(np.bitwise_count(words[:-1]), out=before[1:])
    index = np.empty(len(ends), dtype=np.int32)
    for c, chunk in zip(range(0, len(ends), CHUNK), chunks, strict=True):
        position = positions(chunk)
        w = position >> 6
        rank = before[w]
        rank += np.bitwise_count(words[w] & LOW_BITS[position & 63])
        index[c : c + len(chunk)] = rank
    return nodes, index


def roots(index: np.ndarray, n: int) -> np.ndarray:
    """Each of `n` nodes' root, the smallest node index of its component, for the edges
    index[:half] -- index[half:]."""
    half = len(index) // 2
    ea, eb = index[:half], index[half:]
    parent = np.arange(n, dtype=np.int32)
    while True:
        low = np.minimum(parent[ea], parent[eb])
        np.minimum.at(parent, parent[ea], low)  # hook roots onto the smaller root
        np.minimum.at(parent, parent[eb], low)
        del low
        while not np.array_equal(parent, parent[parent]):  # pointer jumping to the roots
            parent = parent[parent]
        if np.array_equal(parent[ea], parent[eb]):
            return parent


def connected_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, label) for the nodes of the edge list: label = smallest node of its component."""
    nodes, _, root = union_find(a, b)
    return nodes, nodes[root]


def parse_uids(uid: pa.Array) -> tuple[np.ndarray, bool]:
    """(halves, canonical): hex digits 0-15 and 16-31 of each uid as two rows of uint64 that
    order like the text, and whether every uid is DESIGN.md's uid, 32 lowercase hex digits
    (then hex_uids gives the strings back from the halves). Straight from the string bytes (3x
    faster than parsing with polars); a column with any other uid (nulls, other lengths, not
    hex) goes the slow way, where a half that is not hex is 0."""
    n = len(uid)
    if uid.type == pa.string() and not uid.null_count:
        offsets = np.frombuffer(uid.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * uid.offset)
        if (np.diff(offsets) == 32).all():
            text = np.frombuffer(uid.buffers()[2], dtype=np.uint8, count=32 * n, offset=int(offsets[0]))
            text = text.reshape(n, 32)
            digit = text - np.uint8(ord("0")) < 10
            lower = text - np.uint8(ord("a")) < 6
            upper = text - np.uint8(ord("A")) < 6
            if (digit | lower | upper).all():
                nibble = (text & np.uint8(15)) + np.uint8(9) * (text >> np.uint8(6))  # letters: low bits + 9
                halves = ((nibble[:, 0::2] << np.uint8(4)) | nibble[:, 1::2]).view(">u8").astype(np.uint64).T
                return halves, not upper.any()
    halves = np.empty((2, n), dtype=np.uint64)
    for half in (0, 1):
        digits = pl.Series(uid).str.slice(16 * half, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
        halves[half] = digits.fill_null(0).to_numpy()
    return halves, False


def hex_uids(halves: np.ndarray, null: np.ndarray) -> pa.Array:
    """The uid strings (32 lowercase hex digits) of `halves` (see parse_uids), one per False of
    `null` in order, and nulls where `null` is True: built from buffers, no string at a time."""
    big_endian = np.ascontiguousarray(halves.T, dtype=">u8").view(np.uint8).reshape(-1, 16)  # each uid's 16 bytes
    text = np.empty((len(big_endian), 16, 2), dtype=np.uint8)  # a byte's two hex digits
    np.right_shift(big_endian, 4, out=text[:, :, 0])
    np.bitwise_and(big_endian, 15, out=text[:, :, 1])
    text += np.uint8(ord("0")) + np.uint8(ord("a") - ord("0") - 10) * (text > 9)
    offsets = np.zeros(len(null) + 1, dtype=np.int32)
    np.cumsum(np.where(null, 0, 32).astype(np.int32), out=offsets[1:])
    validity = np.packbits(~null, bitorder="little")
    buffers = [pa.py_buffer(validity), pa.py_buffer(offsets), pa.py_buffer(text)]
    return pa.Array.from_buffers(pa.string(), len(null), buffers, null_count=int(null.sum()))


def keepers_by_rule(root: np.ndarray, nodes: np.ndarray, uid_halves: list[np.ndarray], area: np.ndarray | None):
    """For each node, the index of its cluster's keeper: the largest area (when given), then the
    lowest uid, then the lowest gid. The uid (32 hex digits) comes as two integers (`uid_halves`,
    see parse_uids) that order exactly like the string. No sort: each criterion in turn keeps, of
    the candidates left in a cluster, those at the cluster's minimum (one scatter-min a criterion);
    gids are distinct, so one candidate a cluster is left."""
    clusters = int((root == np.arange(len(root))).sum())
    candidate, at = None, root  # None: every node (no gathers for the first criterion)
    best_buffer = np.empty(len(nodes), dtype=np.uint64)  # one buffer for every criterion's minima
    for values in [*([] if area is None else [-area]), *uid_halves, nodes]:
        if candidate is not None:
            if len(candidate) == clusters:  # one left in every cluster (uids rarely tie): done
                break
            values, at = values[candidate], root[candidate]
        best = best_buffer.view(values.dtype)
        best.fill(np.iinfo(values.dtype).max)
        np.minimum.at(best, at, values)
        kept = values == best[at]
        candidate = np.flatnonzero(kept) if candidate is None else candidate[kept]
    keeper = np.empty(len(nodes), dtype=np.int64)
    keeper[root[candidate]] = candidate  # by root: the node index of its cluster's keeper
    return keeper[root]


def read_node_attributes(ctx: ShardContext, shard: int, gids: np.ndarray, area: np.ndarray, halves: np.ndarray):
    """Area (width x height) and uid halves (see parse_uids) of nodes `gids` (sorted) of one crawl
    shard, written into `area` and the two rows of `halves`, which are theirs alone. Returns
    their uids, or None when they are DESIGN.md's uids (hex_uids rebuilds them from the halves)."""
    columns = ["uid", "original_width", "original_height"]
    rows = pa.array(gids & 0xFFFFFFFF)  # a node's low 32 bits are its crawl row
    table = ctx.read_table(f"crawl/{shard_name(shard)}.parquet", columns=columns).take(rows)
    uid = table["uid"].combine_chunks()
    w, h = (table[c].to_numpy().astype(np.int64) for c in columns[1:])
    np.multiply(w, h, out=area)
    halves[:], canonical = parse_uids(uid)
    return None if canonical else uid


def plan_components(ctx: PlanContext) -> list[int]:
    return [0]


def run_components(ctx: ShardContext) -> dict:
    # One task, so the machine's other cores would idle: the crawl reads run on a thread
    # pool (arrow works outside the GIL) while this thread finds the components.
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        return _components(ctx, pool)
    finally:
        pool.shutdown(cancel_futures=True)


def _components(ctx: ShardContext, pool: ThreadPoolExecutor) -> dict:
    config: DedupConfig = ctx.config
    edge_files = ctx.storage.list(REDUCE, suffix=".parquet")
    stats: dict = {"rows": 0, "clusters": 0, "duplicates": 0, "by_reason": {}, "cluster_sizes": {}}
    edges = [ctx.read_table(f) for f in edge_files]
    if not sum(t.num_rows for t in edges):
        return stats
    ends = np.concatenate([t["a"].to_numpy() for t in edges] + [t["b"].to_numpy() for t in edges])
    edge_reason = np.concatenate([t["reason"].to_numpy() for t in edges]).astype(np.int16)
    del edges
    release_memory()  # the decoded edge files (Arrow's pool keeps them): 190 MB at 10M images
    nodes, index = gid_index(ends)
    del ends
    # uid and resolution of the clustered nodes, straight from the crawl: a node's low 32 bits
    # are its crawl row, and nodes are sorted, so each shard's are one slice. They are read
    # while this thread finds the components; each shard fills its own slice of the node
    # arrays (no per-shard pieces held alongside their concatenation).
    node_shards = nodes >> 32
    shards = node_shards[run_starts(node_shards)].tolist()
    bounds = np.searchsorted(node_shards, [*shards, shards[-1] + 1])
    spans = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    area = np.empty(len(nodes), dtype=np.int64)
    halves = np.empty((2, len(nodes)), dtype=np.uint64)
    reading = pool.map(
        partial(read_node_attributes, ctx),
        shards,
        [nodes[span] for span in spans],
        [area[span] for span in spans],
        [halves[:, span] for span in spans],
    )
    root = roots(index, len(nodes))
    # The strongest reason among each node's own edges.
    reasons = np.full(len(nodes), len(REASONS), dtype=np.int16)
    np.minimum.at(reasons, index[: len(edge_reason)], edge_reason)
    np.minimum.at(reasons, index[len(edge_reason) :], edge_reason)
    del edge_reason, index
    uids = list(reading)
    keeper_of = keepers_by_rule(root, nodes, list(halves), None if config.keep == "lowest_uid" else area)
    del area
    is_keeper = keeper_of == np.arange(len(nodes))
    per_root = np.bincount(root, minlength=len(nodes))
    sizes = per_root[root]
    reasons[is_keeper] = len(REASONS)
    if all(u is None for u in uids):  # DESIGN.md's uids: every dup_of straight from its keeper's halves
        dup_of = hex_uids(halves[:, keeper_of[~is_keeper]], is_keeper)
    else:  # one take from every node's uid, in node order (a take across 100 chunks: 100x slower)
        no_nulls = np.zeros(len(nodes), dtype=bool)
        uid = pa.concat_arrays(
            [hex_uids(halves[:, span], no_nulls[span]) if u is None else u for u, span in zip(uids, spans, strict=True)]
        )
        dup_of = uid.take(pa.array(keeper_of, mask=is_keeper))
        del uid
    del uids, halves
    clusters = pa.record_batch([nodes, dup_of, reasons.astype(np.int8), sizes.astype(np.int32)], schema=CLUSTERS_SCHEMA)
    del dup_of

    def gather(rows: np.ndarray) -> pa.RecordBatch:  # one crawl shard's nodes: a run, as nodes are sorted
        return clusters.slice(int(rows[0]), len(rows))

    # One file, partitioned by crawl shard (pipeline/shuffle.py): each final task reads its piece.
    partitions = max(ctx.storage.read_json(PLAN)["crawl_shards"]) + 1
    write_gathered(ctx, CLUSTERS, CLUSTERS_SCHEMA, node_shards, partitions, gather)
    counts = np.bincount(reasons[~is_keeper], minlength=len(REASONS))
    size_values, size_counts = np.unique(per_root[per_root > 0], return_counts=True)
    stats.update(
        rows=len(nodes),
        clusters=int(is_keeper.sum()),
        duplicates=int((~is_keeper).sum()),
        by_reason={r: int(n) for r, n in zip(REASONS, counts.tolist(), strict=True) if n},
        cluster_sizes={str(int(v)): int(c) for v, c in zip(size_values, size_counts, strict=True)},
    )
    return stats


# --- step 4: per shard ----------------------------------------------------------------------


def plan_dedup(ctx: PlanContext) -> list[int]:
    return ctx.storage.read_json(PLAN)["crawl_shards"]  # the shards the clusters were found in


def run_dedup(ctx: ShardContext) -> dict:
    crawl = ctx.read_frame(f"crawl/{ctx.name}.parquet", columns=["uid", "status", "phash"])
    ok, gid = image_rows(ctx.shard, crawl)
    # Each clustered node's row among the shard's images (both sorted by gid): a positional
    # take, nulls for the images in no cluster, instead of a join and a sort.
    row = np.full(len(gid), -1, dtype=np.int64)
    reason = np.full(len(gid), len(REASONS), dtype=np.int8)  # a row of no cluster: kept, alone
    size = np.ones(len(gid), dtype=np.int32)
    clusters = CLUSTERS_SCHEMA.empty_table()
    if ctx.storage.exists(CLUSTERS):  # none when no image has a duplicate
        clusters = read_partition(ctx.storage, [CLUSTERS], ctx.shard, CLUSTERS_SCHEMA)
    if clusters.num_rows:
        at = np.searchsorted(gid, clusters["gid"].to_numpy())
        row[at] = np.arange(clusters.num_rows)
        reason[at] = clusters["reason"].to_numpy()
        size[at] = clusters["cluster_size"].to_numpy()
    out = {
        "uid": crawl["uid"].filter(ok).to_arrow().cast(pa.string()),
        "dup_of": clusters["dup_of"].take(pa.array(row, mask=row < 0)),
        "dup_reason": REASON_NAMES.take(pa.array(reason)),
        "cluster_size": size,
    }
    table = schema.conform(pa.table(out), schema.DEDUP, f"dedup/{ctx.name}")
    ctx.write_table(f"dedup/{ctx.name}.parquet", table, distinct=("uid", "dup_of"))
    kept = int(table["dup_of"].null_count)
    return {"rows": table.num_rows, "kept": kept, "duplicates": table.num_rows - kept}


# Map and per-shard steps take ~25 ms a 100k-row crawl shard: several shards a Ray task.
MAP_STAGE = Stage(name=MAP, plan=plan_map, run_shard=run_map, config_key="dedup", shards_per_task=8)
REDUCE_STAGE = Stage(name=REDUCE, plan=plan_reduce, run_shard=run_reduce, config_key="dedup")
COMPONENTS_STAGE = Stage(name=COMPONENTS, plan=plan_components, run_shard=run_components, config_key="dedup")
STAGE = Stage(name="dedup", plan=plan_dedup, run_shard=run_dedup, config_key="dedup", shards_per_task=8)
EMBED_STAGE = Stage(
    name=EMBED, plan=plan_embed, run_shard=run_embed, config_key="dedup", gpu_when=lambda config: config.semantic
)
CENTROIDS_STAGE = Stage(name=CENTROIDS, plan=plan_centroids, run_shard=run_centroids, config_key="dedup")
STAGES = (EMBED_STAGE, CENTROIDS_STAGE, MAP_STAGE, REDUCE_STAGE, COMPONENTS_STAGE, STAGE)
