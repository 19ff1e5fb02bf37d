"""Partitioned work files for map → reduce steps: M map tasks write M files, not M × R.

A map task writes its rows for all R partitions into one file: a header of R + 1
little-endian int64 byte offsets, then partition after partition, each as a
self-contained Arrow IPC stream (partition p is bytes offsets[p] .. offsets[p + 1]).
A reducer reads, from each map file, 16 bytes of the header and then one byte
range: two ranged reads per map file, whatever R is (a footer listing R pieces
would cost R times more to read, and an index in a file of its own is a second
object to write, sync and rename for every map task).

The rows are hashes and ids, which do not compress; uncompressed IPC writes
about 9x faster than zstd parquet and reads without decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipeline.stage import ShardContext
from pipeline.storage import Storage


def node_partition(nodes: np.ndarray, partitions: int) -> np.ndarray:
    """Each node id's partition: a mix of all its bits (shard and row), so that one crawl
    shard's nodes spread over every partition."""
    mixed = nodes.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= mixed >> np.uint64(31)
    return (mixed % np.uint64(partitions)).astype(np.int32)


def write_partitioned(ctx: ShardContext, rel: str, table: pa.Table, parts: np.ndarray, partitions: int) -> None:
    """Stage `rel` holding `table`'s rows grouped by `parts` (values in [0, partitions))."""
    write_gathered(ctx, rel, table.schema, parts, partitions, lambda rows: table.take(pa.array(rows)))


def write_gathered(
    ctx: ShardContext,
    rel: str,
    schema: pa.Schema,
    parts: np.ndarray,
    partitions: int,
    gather: Callable[[np.ndarray], pa.Table | pa.RecordBatch],
) -> None:
    """Like write_partitioned for rows that are never held whole: `gather(rows)` builds the rows
    numbered `rows` (one partition's) on demand. Rows whose part is outside [0, partitions) are left out."""
    # numpy's stable sort is a radix sort for 16-bit integers: 3.5x faster than on int32
    # (partition numbers fit up to 32k partitions, ~30 billion rows at the default size).
    order = np.argsort(parts.astype(np.int16) if partitions < 2**15 else parts, kind="stable")
    bounds = np.searchsorted(parts[order], np.arange(partitions + 1))
    offsets = np.zeros(partitions + 1, dtype="<i8")
    offsets[0] = offsets.nbytes
    path = ctx.output_path(rel, work=True)
    with pa.OSFile(str(path), "wb") as sink:
        sink.write(offsets.tobytes())  # the header's place: filled in below
        for p in range(partitions):
            start, stop = int(bounds[p]), int(bounds[p + 1])
            if stop > start:
                rows = gather(order[start:stop])
                with pa.ipc.new_stream(sink, schema) as writer:
                    writer.write(rows)
            offsets[p + 1] = sink.tell()
    with open(path, "r+b") as f:
        f.write(offsets.tobytes())


def read_pieces(storage: Storage, rels: list[str], partition: int) -> list[pa.Table]:
    """Partition `partition`'s rows from each map file in `rels` that has any, in `rels` order
    (the caller knows the files hold more partitions than that). Two small reads a file: on
    S3, round trips, so `storage.read_concurrency` of them at a time."""

    def piece(rel: str) -> pa.Table | None:
        start, stop = np.frombuffer(storage.read_range(rel, 8 * partition, 8 * partition + 16), "<i8")
        if stop <= start:
            return None
        return pa.ipc.open_stream(pa.py_buffer(storage.read_range(rel, int(start), int(stop)))).read_all()

    return [p for p in storage.map_reads(piece, rels) if p is not None]


def read_partition(storage: Storage, rels: list[str], partition: int, schema: pa.Schema) -> pa.Table:
    """Partition `partition`'s rows from every map file in `rels`, as one table of `schema`."""
    pieces = read_pieces(storage, rels, partition)
    return pa.concat_tables(pieces).cast(schema) if pieces else schema.empty_table()


def map_files(storage: Storage, prefix: str) -> list[str]:
    """The partitioned files under `prefix`."""
    return storage.list(prefix, suffix=".arrow")
