"""Dedup: exact, near-duplicate and caption duplicates, global across all crawl shards.

Signatures come from the crawl (pipeline/images.py): the bytes' sha256 (as the
integer sha256_key), a 64-bit pixel hash (equal for lossless re-encodes), and the
window signature: a pHash and a colour grid for the whole image, its centre and its
four corner windows. Two images are near-duplicates when, in the whole image or the
centre (or in two corners), their pHashes differ in at most `near_threshold` bits and
their colours fit within `colour_tolerance`.

Four committed steps, none of which holds all hashes in one place (six with
semantic dedup, whose two come first: ``dedup/_embed`` per crawl shard, the image
embeddings of a clipline checkpoint; ``dedup/_centroids``, spherical k-means on a
sample of them; the map then keys each image by its nearest centroid and the
reduce compares the images of one centroid pairwise, SemDeDup-style):

1. ``dedup/_map`` — per crawl shard: emit (kind, key, node) rows for the exact
   keys, and (kind, key, node, a window's pHash and colours) rows for the caption
   key and every candidate table of the near index of every window, hash-partitioned
   by key into one file of each sort per shard (pipeline/shuffle.py). A node is its crawl shard and row
   (shard << 32 | row), so no table of uids is written: later steps read them from the crawl.
2. ``dedup/_reduce`` — per partition, with polars: rows sharing a key are
   candidates; pairs are confirmed (Hamming + colour fit for near) and become edges.
3. the graph steps (``graph``) and ``dedup/_components``, per graph partition
   (memory O(duplicates / partitions)): a pair's corner-window edges count where
   two corners matched; connected components in rounds of map-reduce; per
   component, keepers in a deterministic order, each duplicate matching its
   keeper itself (``clusters: star``) or every component one cluster.
4. ``dedup`` — per crawl shard: ``dedup/{shard}.parquet`` with ``uid, dup_of,
   dup_reason, cluster_size`` for every crawled image (dup_of null = kept).

One module a job: ``config`` (settings, work-file names, shuffle schemas),
``index`` (the keys and the near index), ``semantic`` (embeddings, centroids,
pairs within a centroid), ``edges`` (map and reduce), ``components`` (clusters
and keepers), ``output`` (the per-shard files users read).

The near index is multi-index hashing: the 64 pHash bits are cut into m blocks
and a table keyed on every choice of `match` blocks; two hashes within
m - match bits share at least one table key (pigeonhole), so recall is
guaranteed up to that radius with no all-pairs comparison. The plan picks the
largest guaranteed radius (up to `near_threshold`) whose expected candidate
pairs fit the budget, from the number of images; it is recorded in
``dedup/_plan.json`` and the stats. Beyond it, recall is measured, not assumed.
"""

from __future__ import annotations

from pipeline.dedup.components import plan_components, run_components
from pipeline.dedup.config import CENTROIDS, COMPONENTS, EMBED, LABEL, MAP, NODES, PLAN, REDUCE, ROUNDS, DedupConfig
from pipeline.dedup.edges import plan_map, plan_reduce, run_map, run_reduce
from pipeline.dedup.graph import plan_label, plan_nodes, plan_rounds, run_label, run_nodes, run_round
from pipeline.dedup.output import plan_dedup, run_dedup
from pipeline.dedup.semantic import plan_centroids, plan_embed, run_centroids, run_embed
from pipeline.lineage import Reads
from pipeline.stage import Stage

__all__ = ["DedupConfig", "STAGES", "COMPONENTS"]


def embed_reads(config: DedupConfig) -> Reads | None:
    if not config.semantic:
        return None  # the step does not run
    from training.checkpoint import checkpoint_files

    checkpoint = checkpoint_files(config.semantic_checkpoint) if config.semantic_checkpoint else ()
    return Reads(same=("crawl",), external=checkpoint)


def map_reads(config: DedupConfig) -> Reads:
    if config.semantic:
        return Reads(same=("crawl", EMBED), every=(CENTROIDS,), files=(PLAN,))
    return Reads(same=("crawl",), files=(PLAN,))


# Map and per-shard steps take ~25 ms a 100k-row crawl shard: several shards a Ray task.
MAP_STAGE = Stage(name=MAP, plan=plan_map, run_shard=run_map, config_key="dedup", shards_per_task=8, reads=map_reads)
REDUCE_STAGE = Stage(
    name=REDUCE,
    plan=plan_reduce,
    run_shard=run_reduce,
    config_key="dedup",
    reads=lambda c: Reads(every=(MAP,), files=(PLAN,)),
)
ROUNDS_STAGE = Stage(
    name=ROUNDS,
    plan=plan_rounds,
    run_shard=run_round,
    config_key="dedup",
    shards_per_task=8,
    repeat=True,  # planned again after each round until one finds every component a star
    reads=lambda c: Reads(every=(REDUCE,), files=(PLAN,)),
)
LABEL_STAGE = Stage(
    name=LABEL,
    plan=plan_label,
    run_shard=run_label,
    config_key="dedup",
    shards_per_task=8,
    reads=lambda c: Reads(every=(REDUCE, ROUNDS), files=(PLAN,)),
)
NODES_STAGE = Stage(
    name=NODES,
    plan=plan_nodes,
    run_shard=run_nodes,
    config_key="dedup",
    shards_per_task=8,
    reads=lambda c: Reads(same=("crawl",), every=(LABEL,), files=(PLAN,)),
)
COMPONENTS_STAGE = Stage(
    name=COMPONENTS,
    plan=plan_components,
    run_shard=run_components,
    config_key="dedup",
    shards_per_task=8,
    reads=lambda c: Reads(every=(LABEL, NODES), files=(PLAN,)),
)
STAGE = Stage(
    name="dedup",
    plan=plan_dedup,
    run_shard=run_dedup,
    config_key="dedup",
    shards_per_task=8,
    reads=lambda c: Reads(same=("crawl",), every=(COMPONENTS,)),
)
EMBED_STAGE = Stage(
    name=EMBED,
    plan=plan_embed,
    run_shard=run_embed,
    config_key="dedup",
    gpu_when=lambda config: config.semantic,
    reads=embed_reads,
)
CENTROIDS_STAGE = Stage(
    name=CENTROIDS,
    plan=plan_centroids,
    run_shard=run_centroids,
    config_key="dedup",
    reads=lambda c: Reads(every=(EMBED,)) if c.semantic else None,
)
STAGES = (
    EMBED_STAGE,
    CENTROIDS_STAGE,
    MAP_STAGE,
    REDUCE_STAGE,
    ROUNDS_STAGE,
    LABEL_STAGE,
    NODES_STAGE,
    COMPONENTS_STAGE,
    STAGE,
)
