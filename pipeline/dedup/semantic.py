"""Semantic dedup (SemDeDup-style, `semantic: true`): image embeddings, k-means centroids, pairs within a centroid.

Two committed steps run before the map: ``dedup/_embed`` (per crawl shard, a
checkpoint's image embeddings as float16) and ``dedup/_centroids`` (one task:
spherical k-means on a sample). The map keys each image by its nearest centroid
(emit_semantic) and the reduce compares the images of one centroid pairwise
(semantic_edges).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import layout
from pipeline.dedup.components import union_find
from pipeline.dedup.config import CENTROIDS, EMBED, EXACT_SCHEMA, KIND_SEMANTIC, REASONS, DedupConfig
from pipeline.dedup.index import image_rows, run_starts
from pipeline.errors import ConfigError
from pipeline.stage import PlanContext, ShardContext, committed_shards


def plan_embed(ctx: PlanContext) -> list[int]:
    config: DedupConfig = ctx.config
    if not config.semantic:
        return []
    if not config.semantic_checkpoint:
        raise ConfigError(
            "dedup.semantic needs dedup.semantic_checkpoint: a clipline run or .pt, OpenAI/OpenCLIP weights "
            "or a Hugging Face CLIPModel directory"
        )
    if not 0 < config.semantic_threshold <= 1:
        raise ConfigError(f"dedup.semantic_threshold must be a cosine in (0, 1], not {config.semantic_threshold}")
    from training.checkpoint import resolve_checkpoint

    resolve_checkpoint(config.semantic_checkpoint)  # a wrong path is one error on the driver, before any task
    return committed_shards(ctx.storage, "crawl")


def run_embed(ctx: ShardContext) -> dict:
    """Unit image embeddings (float16) of the shard's images: ``dedup/_embed/{shard}.parquet`` (gid, embedding)."""
    from pipeline import clip_score
    from pipeline.formats import read_images

    config: DedupConfig = ctx.config
    crawl = ctx.read_frame(layout.crawl_parquet(ctx.shard), columns=["key", "status", "phash"])
    ok, gid = image_rows(ctx.shard, crawl)
    keys = crawl["key"].filter(ok).to_list()
    images = read_images(ctx.storage, layout.crawl_tar(ctx.shard)) if keys else {}
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


def balance(
    x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, most: int, iterations: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, assign): centroids whose clusters hold at most `most` rows of x (as SemDeDup
    balances its k-means), and each row's nearest of them, from `assign`, each row's nearest of
    `centroids`. A larger cluster is replaced by a k-means of its own rows into clusters of about
    most / 2, for up to 4 passes. A cluster of rows too alike to split (copies of one image) stays
    whole. The reduce compares a cluster's images pairwise, so its cost follows the largest cluster."""
    for _ in range(4):
        large = np.flatnonzero(np.bincount(assign, minlength=len(centroids)) > most)
        if not len(large):
            break
        parts = [np.delete(centroids, large, axis=0)]
        for c in large.tolist():
            rows = x[assign == c]
            parts.append(spherical_kmeans(rows, math.ceil(2 * len(rows) / most), iterations, seed=c, device=device))
        split = np.concatenate(parts)
        nearest_split = nearest(x, split, device)
        used = np.unique(nearest_split)  # none that no row is nearest to (copies do not split)
        if len(used) <= len(centroids):
            break
        centroids, assign = split[used], np.searchsorted(used, nearest_split)
    return centroids, assign


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
    assign = nearest(x, centroids, device)
    largest = int(np.bincount(assign).max())
    most = max(2, math.ceil(2 * len(x) / k))  # twice the mean cluster, in the sample
    centroids, assign = balance(x, centroids, assign, most, config.semantic_iterations, device)
    fit = float((x * centroids[assign]).sum(axis=1).mean())
    ctx.write_table(CENTROIDS + ".parquet", pa.table({"centroid": vector_array(centroids)}), work=True)
    return {
        "clusters": len(centroids),
        "sample": len(x),
        "mean_cosine_to_centroid": round(fit, 4),
        "largest_cluster_in_sample": {"k_means": largest, "balanced": int(np.bincount(assign).max())},
    }


def semantic_schema(dim: int) -> pa.Schema:
    return EXACT_SCHEMA.append(pa.field("embedding", pa.list_(pa.float16(), dim)))


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
