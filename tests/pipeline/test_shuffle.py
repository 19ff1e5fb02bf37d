"""Partitioned work files: one file per map task, one ranged read per (map file, partition)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.shuffle import read_partition, write_partitioned
from pipeline.stage import ShardContext

SCHEMA = pa.schema([("key", pa.int64()), ("row", pa.int64())])


def test_each_partition_reads_back_exactly_its_rows_from_every_map_file(store, tmp_path):
    partitions, expected = 7, {p: [] for p in range(7)}
    rels = []
    for m in range(3):
        keys = np.random.default_rng(m).integers(0, 1 << 40, size=500 * (m + 1))
        keys[:50] = 3  # a partition holding many rows of each file
        parts = (keys % partitions).astype(np.int32)
        parts[parts == 5] = 4  # partition 5 stays empty in every file
        rows = np.arange(len(keys)) + 10_000 * m
        staging = tmp_path / f"stage{m}"
        staging.mkdir()
        ctx = ShardContext("test/_map", m, store, None, None, staging)
        write_partitioned(
            ctx, f"map/{m:05d}.arrow", pa.table({"key": keys, "row": rows}, schema=SCHEMA), parts, partitions
        )
        for rel, local in ctx.staged.items():
            store.put_file(local, rel)
        rels.append(f"map/{m:05d}.arrow")
        for k, r, p in zip(keys.tolist(), rows.tolist(), parts.tolist(), strict=True):
            expected[p].append((k, r))
        header = 8 * (partitions + 1)
        index = np.frombuffer(store.read_range(f"map/{m:05d}.arrow", 0, header), "<i8")
        assert index[0] == header and index[-1] == store.size(f"map/{m:05d}.arrow")
        assert index[6] == index[5]  # an empty partition takes no bytes
    for p in range(partitions):
        table = read_partition(store, rels, p, SCHEMA)
        assert table.schema == SCHEMA
        assert list(zip(table["key"].to_pylist(), table["row"].to_pylist(), strict=True)) == expected[p]
    assert read_partition(store, rels, 5, SCHEMA).num_rows == 0
    assert read_partition(store, [], 0, SCHEMA).num_rows == 0


def test_ranged_reads(store):
    store.write_bytes("blob", bytes(range(256)))
    assert store.read_range("blob", 10, 14) == bytes([10, 11, 12, 13])
    assert store.read_range("blob", 250, 256) == bytes(range(250, 256))
    assert store.read_range("blob", 7, 7) == b""
