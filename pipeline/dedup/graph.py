"""The graph steps between the edges and the clusters: no task holds more than a partition's share.

The reduce writes its edges partitioned by the pair's smaller node into G graph
partitions (G grows with the number of images: ``images_per_graph_partition``).

``dedup/_rounds`` — connected components as rounds of map-reduce, G tasks a round
(Kiveris et al., "Connected Components in MapReduce and Beyond", 2014). The state
is an edge list with both directions of every edge, partitioned by its first node,
so a task holds whole neighbourhoods. Round 0 reads the edges (a pair's corner-window
edges count where two corners matched) and replaces them by the stars of a union-find
over its partition: the same components, with every component that lies in one
partition already a star. Then large-star (odd rounds: every node's larger neighbours
move to the smallest node of its neighbourhood) and small-star (even rounds: a node
and its smaller neighbours move to the smallest of them) alternate. Neither changes
the components; together they make each one a star around its smallest node in
O(log² n) rounds. A round whose input is already such a forest (every node has only
larger neighbours, or exactly one, smaller) reports no unsettled node, and is the last:
the stage plans one round more while the last one reports any.

``dedup/_label`` — per graph partition: each edge gets its component (the centre of
its smaller node's star) and goes to the partition of the component; each node's
component goes to the node's crawl shard.

``dedup/_nodes`` — per crawl shard: the uid and area of its clustered nodes, read
once, go to their components' partitions. ``dedup/_components`` then has, per graph
partition, every edge and every node of its components (pipeline/dedup/components.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import layout
from pipeline.dedup.config import (
    EDGES_SCHEMA,
    LABEL,
    NODE_LABELS_SCHEMA,
    NODES,
    NODES_SCHEMA,
    PAIRS_SCHEMA,
    PLAN,
    REDUCE,
    ROUNDS,
)
from pipeline.errors import ClipError
from pipeline.layout import shard_name
from pipeline.lineage import expected_inputs, staleness
from pipeline.shuffle import map_files, node_partition, read_partition, write_partitioned
from pipeline.stage import PlanContext, ShardContext, committed_shards, config_sha256, read_marker

ROUND = 1 << 20  # a round's shard index: round * ROUND + partition

# Over a node u's pairs (u, v): the smallest node of its neighbourhood, u included (a star's centre for a leaf).
LOWEST = pl.min_horizontal(pl.col("v").min(), pl.col("u").first())
MAX_ROUNDS = 200  # O(log² n) rounds: ~ 2 log2(n) in practice, far under this at any n


def round_shards(r: int, partitions: int) -> list[int]:
    return [r * ROUND + p for p in range(partitions)]


def round_files(r: int, partitions: int) -> list[str]:
    return [f"{ROUNDS}/{shard_name(s)}.arrow" for s in round_shards(r, partitions)]


def last_round(storage) -> int:
    """The round the components converged in (the stage ran every round up to it)."""
    shards = committed_shards(storage, ROUNDS)
    return max(shards) // ROUND if shards else 0


def plan_rounds(ctx: PlanContext) -> list[int]:
    """Rounds 0..r: up to the first round not committed fresh, or one past the last committed
    round while that one still reported unsettled nodes."""
    from pipeline.dedup import ROUNDS_STAGE  # the stage's own reads, for its markers' freshness

    partitions = ctx.storage.read_json(PLAN)["graph_partitions"]
    inputs = expected_inputs(ROUNDS_STAGE.reads, ctx.config, ctx.storage, [0])[0]  # every shard reads the same
    config_hash = config_sha256(ctx.config)
    committed = committed_shards(ctx.storage, ROUNDS)
    with ThreadPoolExecutor(16) as pool:  # every round's markers, once a pass (round trips on S3)
        found = dict(zip(committed, pool.map(lambda s: read_marker(ctx.storage, ROUNDS, s), committed), strict=True))
    for r in range(MAX_ROUNDS):
        markers = [found.get(s) for s in round_shards(r, partitions)]
        if any(m is None or staleness(m, config_hash, inputs) is not None for m in markers):
            return round_shards_upto(r, partitions)
        if r > 0 and not sum(m["stats"]["unsettled"] for m in markers):
            return round_shards_upto(r, partitions)
    raise ClipError(f"dedup components did not converge in {MAX_ROUNDS} rounds")


def round_shards_upto(r: int, partitions: int) -> list[int]:
    return [s for q in range(r + 1) for s in round_shards(q, partitions)]


def strong_edges(storage, partition: int) -> pl.DataFrame:
    """The edges of one graph partition (pairs whose smaller node is in it), after the corner
    rule: a pair's corner-window edges count where two corners matched."""
    from pipeline.dedup.components import corner_edges

    edges = read_partition(storage, map_files(storage, REDUCE), partition, EDGES_SCHEMA)
    return corner_edges(pl.from_arrow(edges)).sort(["a", "b", "reason"])  # in an order of its own, not the group_by's


def run_round(ctx: ShardContext) -> dict:
    r, p = divmod(ctx.shard, ROUND)
    partitions = ctx.storage.read_json(PLAN)["graph_partitions"]
    if r == 0:
        edges = strong_edges(ctx.storage, p)
        pairs, unsettled = local_stars(edges["a"].to_numpy(), edges["b"].to_numpy()), None
        rows = edges.height
    else:
        pairs = pl.from_arrow(read_partition(ctx.storage, round_files(r - 1, partitions), p, PAIRS_SCHEMA))
        rows = pairs.height
        pairs, unsettled = star_round(pairs, large=r % 2 == 1)
    both = pl.concat([pairs, pairs.select(u="v", v="u")]).unique().sort(["u", "v"])
    write_partitioned(
        ctx, f"{ROUNDS}/{ctx.name}.arrow", both.to_arrow(), node_partition(both["u"].to_numpy(), partitions), partitions
    )
    return {"rows": rows, "edges": both.height // 2, "unsettled": unsettled}


def local_stars(a: np.ndarray, b: np.ndarray) -> pl.DataFrame:
    """Edges (node, smallest node of its component) for one partition's edges: the same components."""
    from pipeline.dedup.components import connected_components

    if not len(a):
        return pl.DataFrame(schema={"u": pl.Int64, "v": pl.Int64})
    nodes, label = connected_components(a, b)
    keep = nodes != label
    return pl.DataFrame({"u": nodes[keep], "v": label[keep]})


def star_round(pairs: pl.DataFrame, large: bool) -> tuple[pl.DataFrame, int]:
    """One large-star or small-star step over whole neighbourhoods (`pairs`: every (u, v) of the
    partition's nodes u), and how many of those nodes were not settled yet (see the module docstring)."""
    pairs = pairs.unique()
    hood = pairs.group_by("u").agg(
        n=pl.len(),
        smaller=(pl.col("v") < pl.col("u")).sum(),
        low=LOWEST,
    )
    settled = (pl.col("smaller") == 0) | ((pl.col("n") == 1) & (pl.col("smaller") == 1))
    unsettled = hood.filter(~settled).height
    if large:  # each larger neighbour v of u moves to the smallest node of u's neighbourhood
        out = pairs.join(hood.select("u", "low"), on="u").filter(pl.col("v") > pl.col("u")).select(u="v", v="low")
    else:  # u and each smaller neighbour move to the smallest of those neighbours
        smaller = pairs.filter(pl.col("v") < pl.col("u"))
        low = smaller.group_by("u").agg(low=pl.col("v").min())
        moved = smaller.join(low, on="u").select(u="v", v="low").filter(pl.col("u") != pl.col("v"))
        out = pl.concat([moved, low.select("u", v="low")])
    return out, unsettled


def plan_label(ctx: PlanContext) -> list[int]:
    return list(range(ctx.storage.read_json(PLAN)["graph_partitions"]))


def run_label(ctx: ShardContext) -> dict:
    plan = ctx.storage.read_json(PLAN)
    partitions = plan["graph_partitions"]
    stars = read_partition(ctx.storage, round_files(last_round(ctx.storage), partitions), ctx.shard, PAIRS_SCHEMA)
    # A node's component: the centre of its star, the smallest node (itself for a centre).
    label = pl.from_arrow(stars).group_by("u").agg(label=LOWEST).sort("u").rename({"u": "gid"})
    edges = strong_edges(ctx.storage, ctx.shard).join(label, left_on="a", right_on="gid", how="left")
    if edges["label"].null_count():
        raise AssertionError(f"{LABEL}/{ctx.name}: an edge's node has no component")
    edge_parts = node_partition(edges["label"].to_numpy(), partitions)
    write_partitioned(
        ctx,
        f"{LABEL}/edges/{ctx.name}.arrow",
        edges.drop("label").to_arrow().cast(EDGES_SCHEMA),
        edge_parts,
        partitions,
    )
    crawl_shards = max(plan["crawl_shards"]) + 1
    node_parts = (label["gid"].to_numpy() >> 32).astype(np.int32)
    write_partitioned(
        ctx, f"{LABEL}/nodes/{ctx.name}.arrow", label.to_arrow().cast(NODE_LABELS_SCHEMA), node_parts, crawl_shards
    )
    return {"rows": edges.height, "nodes": label.height}


def plan_nodes(ctx: PlanContext) -> list[int]:
    return ctx.storage.read_json(PLAN)["crawl_shards"]


def run_nodes(ctx: ShardContext) -> dict:
    """The uid and area (width x height) of this crawl shard's clustered nodes, sent to their
    components' partitions: the crawl is read once, by the shard's own task."""
    partitions = ctx.storage.read_json(PLAN)["graph_partitions"]
    labels = read_partition(ctx.storage, map_files(ctx.storage, f"{LABEL}/nodes"), ctx.shard, NODE_LABELS_SCHEMA)
    labels = labels.sort_by("gid")
    gid = labels["gid"].to_numpy()
    columns = ["uid", "original_width", "original_height"]
    crawl = ctx.read_table(layout.crawl_parquet(ctx.shard), columns=columns).take(pa.array(gid & 0xFFFFFFFF))
    w, h = (crawl[c].to_numpy().astype(np.int64) for c in columns[1:])
    nodes = pa.table([gid, w * h, crawl["uid"].cast(pa.string())], schema=NODES_SCHEMA)
    parts = node_partition(labels["label"].to_numpy(), partitions)
    write_partitioned(ctx, f"{NODES}/{ctx.name}.arrow", nodes, parts, partitions)
    return {"rows": len(gid)}
