"""``dedup/_components``: the clusters of one graph partition and one keeper per cluster.

Per graph partition, over the edges and nodes of its components only (the graph
steps, pipeline/dedup/graph.py, bring them together; memory O(duplicates / G)):
keepers in a deterministic order, each duplicate matching its keeper itself (star_keepers; or
each connected component one cluster, `clusters: components`), and each member's relation to
its keeper, in numpy; the cluster rows written to one file partitioned by crawl shard for the output step.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.dedup.config import (
    CLUSTERS,
    CLUSTERS_SCHEMA,
    COMPONENTS,
    EDGES_SCHEMA,
    IDENTICAL,
    LABEL,
    NODES,
    NODES_SCHEMA,
    PLAN,
    REASONS,
    DedupConfig,
    joins_as_one,
)
from pipeline.shuffle import map_files, read_partition, write_gathered
from pipeline.stage import PlanContext, ShardContext


def corner_edges(edges: pl.DataFrame) -> pl.DataFrame:
    """Near edges where a pair's weak edges (reason -window: a corner window matched) come from two
    corner windows or more; the strong edges as they are."""
    weak = edges.filter(pl.col("reason") < 0)
    if not weak.height:
        return edges
    weak = weak.select(a=pl.min_horizontal("a", "b"), b=pl.max_horizontal("a", "b"), reason="reason")
    both = weak.group_by(["a", "b"]).agg(pl.col("reason").n_unique().alias("windows")).filter(pl.col("windows") >= 2)
    near = both.select("a", "b", reason=pl.lit(REASONS.index("near"), pl.Int8))
    return pl.concat([edges.filter(pl.col("reason") >= 0), near])


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
    while marking, then a bit (400 MB, then 50 MB, at 400M images), so where the rows are more
    than 64 times the ends (one graph partition of many) it sorts instead (dense_index).
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
    if start[-1] > 64 * len(ends):  # a graph partition's few nodes among many rows: a sort costs less
        return dense_index(ends)
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


def keeper_relation(index: np.ndarray, edge_reason: np.ndarray, keeper_of: np.ndarray) -> np.ndarray:
    """Each node's relation to its keeper, as a REASONS index (len(REASONS) for a keeper): the
    strongest reason r such that a path of edges all at least as strong as r joins the node to its
    keeper. Four byte-identical copies joined to their keeper by a near edge are `near` duplicates
    of it, not `exact_bytes` ones. One union-find per reason, over the edges that strong or stronger."""
    n, half = len(keeper_of), len(edge_reason)
    relation = np.full(n, len(REASONS), dtype=np.int16)
    open_ = keeper_of != np.arange(n)  # members whose relation is not known yet
    for r in np.unique(edge_reason).tolist():
        strong = edge_reason <= r
        sub = np.concatenate([index[:half][strong], index[half:][strong]])
        root = roots(sub, n)
        joined = open_ & (root == root[keeper_of])
        relation[joined] = r
        open_ &= ~joined
        if not open_.any():
            break
    return relation


def connected_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, label) for the nodes of the edge list: label = smallest node of its component."""
    nodes, _, root = union_find(a, b)
    return nodes, nodes[root]


def parse_uids(uid: pa.Array) -> tuple[np.ndarray, bool]:
    """(halves, canonical): hex digits 0-15 and 16-31 of each uid as two rows of uint64 that
    order like the text, and whether every uid is docs/design.md's uid, 32 lowercase hex digits
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


def keeper_ranks(nodes: np.ndarray, uid_halves: list[np.ndarray], area: np.ndarray | None) -> np.ndarray:
    """Each node's place in the order keepers are chosen in (0 first): the largest area (when
    given), then the lowest uid, then the lowest gid. The uid (32 hex digits) comes as two
    integers (`uid_halves`, see parse_uids) that order exactly like the string. (polars' sort by
    several columns: 2.5x numpy's lexsort.)"""
    keys = [*([] if area is None else [-area]), *uid_halves, nodes]
    names = [f"k{i}" for i in range(len(keys))]
    order = pl.DataFrame(dict(zip(names, keys, strict=True))).select(pl.arg_sort_by(names)).to_series().to_numpy()
    rank = np.empty(len(nodes), dtype=np.int64)
    rank[order] = np.arange(len(nodes))
    return rank


def greedy_rest(u: np.ndarray, v: np.ndarray, best: np.ndarray, state: np.ndarray) -> None:
    """star_keepers' rounds finished one group at a time, in rank order, over the open edges u -- v:
    a group not removed yet is kept and removes its open neighbours. O(edges), in a Python loop
    over the groups left: for components whose rounds would be many (a long chain of ever better
    groups costs a round per two of them)."""
    ends, other = np.concatenate([u, v]), np.concatenate([v, u])
    order = np.argsort(ends, kind="stable")
    ends, other = ends[order], other[order]
    groups, starts = np.unique(ends, return_index=True)
    stops = np.append(starts[1:], len(ends))
    for i in np.argsort(best[groups]).tolist():
        if state[groups[i]] == 0:
            state[groups[i]] = 1
            neighbours = other[starts[i] : stops[i]]
            state[neighbours[state[neighbours] == 0]] = 2


def star_keepers(
    index: np.ndarray, as_one: np.ndarray, rank: np.ndarray, max_rounds: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(keeper_of, ties): each node's keeper (a node index) and the edges that tie members to
    their keepers, for the edges index[:half] -- index[half:].

    Edges marked `as_one` join their ends into one image (a group; every edge: connected
    components). Between groups, keepers are chosen greedily in rank order: a group is kept
    unless an edge joins it to a group kept before it, and a removed group goes to the best kept
    group it has an edge to. So every duplicate matches its keeper itself: a chain A~B~C of
    distinct images keeps C when C does not match A. The same keepers as the one-at-a-time
    greedy, found in rounds: each round keeps the open groups with no better open neighbour and
    removes their open neighbours; after `max_rounds`, greedy_rest finishes what is left."""
    n, half = len(rank), len(as_one)
    ea, eb = index[:half], index[half:]
    group = roots(np.concatenate([ea[as_one], eb[as_one]]), n)  # each node's group, by its smallest node
    best = np.full(n, n, dtype=np.int64)  # by group: the best rank in it, its head's
    np.minimum.at(best, group, rank)
    heads = np.flatnonzero(rank == best[group])
    node_of_rank = np.empty(n, dtype=np.int64)
    node_of_rank[rank] = np.arange(n)
    u, v = group[ea[~as_one]], group[eb[~as_one]]
    between = u != v
    u, v = u[between], v[between]
    state = np.zeros(n, dtype=np.int8)  # by group: 0 open, 1 kept, 2 removed
    open_u, open_v, blocked = u, v, np.zeros(n, dtype=bool)
    for _ in range(max_rounds):
        if not len(open_u):
            break
        blocked[np.where(best[open_u] < best[open_v], open_v, open_u)] = True  # has a better open neighbour
        ends = np.concatenate([open_u, open_v])
        state[ends[~blocked[ends]]] = 1
        blocked[ends] = False
        state[open_v[state[open_u] == 1]] = 2
        state[open_u[state[open_v] == 1]] = 2
        still = (state[open_u] == 0) & (state[open_v] == 0)
        open_u, open_v = open_u[still], open_v[still]
    greedy_rest(open_u, open_v, best, state)
    owner = best.copy()  # by group: its keeper's rank (a kept group's own head)
    owner[state == 2] = n
    for member, kept in ((u, v), (v, u)):
        joined = (state[member] == 2) & (state[kept] != 2)
        np.minimum.at(owner, member[joined], best[kept[joined]])
    keeper_group = group[node_of_rank[owner[group[heads]]]]  # by head: its keeper's group
    keeper_of_group = np.empty(n, dtype=np.int64)
    keeper_of_group[group[heads]] = keeper_group
    gu, gv = group[ea], group[eb]
    ties = as_one | (keeper_of_group[gu] == gv) | (keeper_of_group[gv] == gu)
    return node_of_rank[owner[group]], ties


def plan_components(ctx: PlanContext) -> list[int]:
    return list(range(ctx.storage.read_json(PLAN)["graph_partitions"]))


def run_components(ctx: ShardContext) -> dict:
    """One graph partition: every edge and node of its components (pipeline/dedup/graph.py), so
    the clusters, keepers and relations come out exactly as from all edges at once."""
    config: DedupConfig = ctx.config
    stats: dict = {"rows": 0, "clusters": 0, "duplicates": 0, "by_reason": {}, "cluster_sizes": {}}
    edges = read_partition(ctx.storage, map_files(ctx.storage, f"{LABEL}/edges"), ctx.shard, EDGES_SCHEMA)
    if not edges.num_rows:
        return stats
    ends = np.concatenate([edges["a"].to_numpy(), edges["b"].to_numpy()])
    edge_reason = edges["reason"].to_numpy().astype(np.int16)
    del edges
    nodes, index = gid_index(ends)
    del ends
    attributes = read_partition(ctx.storage, map_files(ctx.storage, NODES), ctx.shard, NODES_SCHEMA).sort_by("gid")
    if not np.array_equal(attributes["gid"].to_numpy(), nodes):
        raise AssertionError(f"{COMPONENTS}/{ctx.name}: the nodes of the edges and of their uids differ")
    uid = attributes["uid"].combine_chunks()
    halves, canonical = parse_uids(uid)
    area = attributes["area"].to_numpy()
    del attributes
    rank = keeper_ranks(nodes, list(halves), None if config.keep == "lowest_uid" else area)
    as_one = np.ones(len(edge_reason), dtype=bool) if config.clusters == "components" else joins_as_one(edge_reason)
    keeper_of, ties = star_keepers(index, as_one, rank)
    del rank, as_one
    is_keeper = keeper_of == np.arange(len(nodes))
    edge_reason[edge_reason >= IDENTICAL] -= IDENTICAL
    reasons = keeper_relation(index[np.concatenate([ties, ties])], edge_reason[ties], keeper_of)
    del edge_reason, index, ties
    per_keeper = np.bincount(keeper_of, minlength=len(nodes))
    sizes = per_keeper[keeper_of]
    reasons[is_keeper] = len(REASONS)
    if canonical:  # docs/design.md's uids: every dup_of straight from its keeper's halves
        dup_of = hex_uids(halves[:, keeper_of[~is_keeper]], is_keeper)
    else:
        dup_of = uid.take(pa.array(keeper_of, mask=is_keeper))
    del uid, halves
    clusters = pa.record_batch([nodes, dup_of, reasons.astype(np.int8), sizes.astype(np.int32)], schema=CLUSTERS_SCHEMA)
    del dup_of

    def gather(rows: np.ndarray) -> pa.RecordBatch:  # one crawl shard's nodes: a run, as nodes are sorted
        return clusters.slice(int(rows[0]), len(rows))

    # Partitioned by crawl shard (pipeline/shuffle.py): each final task reads its piece of every partition's file.
    partitions = max(ctx.storage.read_json(PLAN)["crawl_shards"]) + 1
    write_gathered(ctx, f"{CLUSTERS}/{ctx.name}.arrow", CLUSTERS_SCHEMA, nodes >> 32, partitions, gather)
    counts = np.bincount(reasons[~is_keeper], minlength=len(REASONS))
    size_values, size_counts = np.unique(per_keeper[per_keeper > 0], return_counts=True)
    stats.update(
        rows=len(nodes),
        clusters=int(is_keeper.sum()),
        duplicates=int((~is_keeper).sum()),
        by_reason={r: int(n) for r, n in zip(REASONS, counts.tolist(), strict=True) if n},
        cluster_sizes={str(int(v)): int(c) for v, c in zip(size_values, size_counts, strict=True)},
    )
    return stats
