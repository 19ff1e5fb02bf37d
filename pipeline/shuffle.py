"""Partitioned work files for map → reduce steps: M map tasks write M files, not M × R.

A map task writes its rows for all R partitions into one file, partition after
partition, each as a self-contained Arrow IPC stream, and a sidecar index of
R + 1 little-endian int64 byte offsets. A reducer reads, from each map file,
16 bytes of the index and then one byte range: two ranged reads per map file,
whatever R is (a footer listing R pieces would cost R times more to read).

The rows are hashes and ids, which do not compress; uncompressed IPC writes
about 9x faster than zstd parquet and reads without decoding.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.stage import ShardContext
from pipeline.storage import Storage

INDEX_SUFFIX = ".idx"


def write_partitioned(ctx: ShardContext, rel: str, table: pa.Table, parts: np.ndarray, partitions: int) -> None:
    """Stage `rel` (+ its index) holding `table`'s rows grouped by `parts` (values in [0, partitions)).

    Rows already in partition order are written as they are (no copy): a caller that
    builds big tables can gather each column straight into that order.
    """
    if len(parts) > 1 and not (parts[:-1] <= parts[1:]).all():
        order = np.argsort(parts, kind="stable")
        table, parts = table.take(pa.array(order)), parts[order]
    rows = table.combine_chunks()
    batch = rows.to_batches()[0] if rows.num_rows else None
    bounds = np.searchsorted(parts, np.arange(partitions + 1))
    offsets = np.zeros(partitions + 1, dtype="<i8")
    with pa.OSFile(str(ctx.output_path(rel)), "wb") as sink:
        for p in range(partitions):
            start, stop = int(bounds[p]), int(bounds[p + 1])
            if stop > start:
                with pa.ipc.new_stream(sink, table.schema) as writer:
                    writer.write_batch(batch.slice(start, stop - start))
            offsets[p + 1] = sink.tell()
    with open(ctx.output_path(rel + INDEX_SUFFIX), "wb") as f:
        f.write(offsets.tobytes())


def read_pieces(storage: Storage, rels: list[str], partition: int) -> list[pa.Table]:
    """Partition `partition`'s rows from each map file in `rels` that has any."""
    pieces = []
    for rel in rels:
        start, stop = np.frombuffer(storage.read_range(rel + INDEX_SUFFIX, 8 * partition, 8 * partition + 16), "<i8")
        if stop > start:
            data = storage.read_range(rel, int(start), int(stop))
            pieces.append(pa.ipc.open_stream(pa.py_buffer(data)).read_all())
    return pieces


def read_partition(storage: Storage, rels: list[str], partition: int, schema: pa.Schema) -> pa.Table:
    """Partition `partition`'s rows from every map file in `rels`, as one table of `schema`."""
    pieces = read_pieces(storage, rels, partition)
    return pa.concat_tables(pieces).cast(schema) if pieces else schema.empty_table()


def map_files(storage: Storage, prefix: str) -> list[str]:
    """The partitioned files under `prefix` (their indexes left out)."""
    return storage.list(prefix, suffix=".arrow")
