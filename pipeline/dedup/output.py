"""``dedup`` — per crawl shard: ``dedup/{shard}.parquet`` with uid, dup_of, dup_reason, cluster_size.

Every crawled image gets a row (dup_of null = kept); the rows of clustered
images come from the components step's partitioned cluster file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import layout, schema
from pipeline.dedup.config import CLUSTERS, CLUSTERS_SCHEMA, PLAN, REASON_NAMES, REASONS
from pipeline.dedup.index import image_rows
from pipeline.shuffle import map_files, read_partition
from pipeline.stage import PlanContext, ShardContext


def plan_dedup(ctx: PlanContext) -> list[int]:
    return ctx.storage.read_json(PLAN)["crawl_shards"]  # the shards the clusters were found in


def run_dedup(ctx: ShardContext) -> dict:
    crawl = ctx.read_frame(layout.crawl_parquet(ctx.shard), columns=["uid", "status", "phash"])
    ok, gid = image_rows(ctx.shard, crawl)
    # Each clustered node's row among the shard's images (both sorted by gid): a positional
    # take, nulls for the images in no cluster, instead of a join and a sort.
    row = np.full(len(gid), -1, dtype=np.int64)
    reason = np.full(len(gid), len(REASONS), dtype=np.int8)  # a row of no cluster: kept, alone
    size = np.ones(len(gid), dtype=np.int32)
    # each graph partition's file (none for a partition without a cluster): this shard's pieces
    clusters = read_partition(ctx.storage, map_files(ctx.storage, CLUSTERS), ctx.shard, CLUSTERS_SCHEMA)
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
    table = schema.conform(pa.table(out), schema.DEDUP, layout.dedup_parquet(ctx.shard))
    ctx.write_table(layout.dedup_parquet(ctx.shard), table, distinct=("uid", "dup_of"))
    kept = int(table["dup_of"].null_count)
    return {"rows": table.num_rows, "kept": kept, "duplicates": table.num_rows - kept}
