"""Dedup's graph steps: connected components as partitioned rounds, against one union-find of all edges."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from pipeline.dedup import LABEL_STAGE, ROUNDS_STAGE, DedupConfig
from pipeline.dedup.components import connected_components
from pipeline.dedup.config import EDGES_SCHEMA, LABEL, NODE_LABELS_SCHEMA, PLAN, REASONS, REDUCE, ROUNDS
from pipeline.dedup.graph import ROUND
from pipeline.runner import run_stage
from pipeline.shuffle import map_files, node_partition, read_partition, write_partitioned
from pipeline.stage import ShardContext, committed_shards
from pipeline.storage import open_storage

SHARDS = 4  # crawl shards the node ids come from


def node_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct node ids (crawl shard << 32 | row), in random order."""
    rows = rng.choice(1 << 20, size=n, replace=False)
    return (rng.integers(0, SHARDS, n).astype(np.int64) << 32) | rows


def chain(rng, n):
    ids = node_ids(rng, n)
    return ids[:-1], ids[1:]


def star(rng, n):
    ids = node_ids(rng, n)
    return np.full(n - 1, ids[n // 2]), np.delete(ids, n // 2)


def small_components(rng, n):
    ids = node_ids(rng, n)
    group = rng.integers(0, n // 3, n)
    order = np.argsort(group, kind="stable")
    same = group[order][1:] == group[order][:-1]
    return ids[order][:-1][same], ids[order][1:][same]


def random_sparse(rng, n):
    ids = node_ids(rng, n)
    a, b = rng.integers(0, n, (2, n))
    keep = a != b
    return ids[a[keep]], ids[b[keep]]


def many_at_once(rng, n):
    parts = [chain(rng, n // 2), star(rng, n // 4), small_components(rng, n // 2), random_sparse(rng, n // 2)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_reduce(store, tmp_path, a, b, reason, found_by, partitions, reducers=3):
    """Edges a-b as `reducers` reduce tasks write them: reducer found_by[i] found edge i."""
    store.write_json(PLAN, {"graph_partitions": partitions, "crawl_shards": list(range(SHARDS))})
    for r in range(reducers):
        mine = found_by == r
        table = pa.table([np.minimum(a, b)[mine], np.maximum(a, b)[mine], reason[mine]], schema=EDGES_SCHEMA)
        staging = tmp_path / f"staging{r}"
        staging.mkdir()
        ctx = ShardContext(REDUCE, r, store, DedupConfig(), None, staging)
        parts = node_partition(table["a"].to_numpy(), partitions)
        write_partitioned(ctx, f"{REDUCE}/{ctx.name}.arrow", table, parts, partitions)
        for rel, local in ctx.staged.items():
            store.move_file(local, rel)


def label_nodes(store):
    """Run the rounds and label steps; (node -> component label, the rounds stage's report)."""
    run = SimpleNamespace(dedup=DedupConfig())
    rounds = run_stage(ROUNDS_STAGE, store, run, executor="inline", progress=False)
    run_stage(LABEL_STAGE, store, run, executor="inline", progress=False)
    files = map_files(store, f"{LABEL}/nodes")
    labels = pa.concat_tables([read_partition(store, files, s, NODE_LABELS_SCHEMA) for s in range(SHARDS)])
    return dict(zip(labels["gid"].to_pylist(), labels["label"].to_pylist(), strict=True)), rounds


@pytest.mark.parametrize("graph", [chain, star, small_components, random_sparse, many_at_once])
@pytest.mark.parametrize("partitions", [1, 7])
def test_rounds_find_the_components_of_one_union_find(graph, partitions, tmp_path):
    rng = np.random.default_rng([len(graph.__name__), partitions])
    a, b = graph(rng, 3000)
    store = open_storage(tmp_path / "out")
    reason = rng.integers(0, len(REASONS), len(a)).astype(np.int8)
    write_reduce(store, tmp_path, a, b, reason, np.arange(len(a)) % 3, partitions)
    found, report = label_nodes(store)
    nodes, label = connected_components(a, b)
    assert found == dict(zip(nodes.tolist(), label.tolist(), strict=True))  # each node: its component's minimum
    rounds = max(committed_shards(store, ROUNDS)) // ROUND + 1
    assert sorted(report.ran) == [r * ROUND + p for r in range(rounds) for p in range(partitions)]
    assert rounds <= 2 * int(np.log2(len(nodes))) ** 2  # O(log² n)
    settled = [report.stats[(rounds - 1) * ROUND + p]["unsettled"] for p in range(partitions)]
    assert settled == [0] * partitions  # the last round found every component a star, and ended the rounds
    print(f"{graph.__name__}, {partitions} partitions: {rounds} rounds")
    if rounds > 2:
        assert sum(report.stats[(rounds - 2) * ROUND + p]["unsettled"] for p in range(partitions)) > 0


def test_rounds_on_no_edges_and_a_rerun_that_runs_nothing(tmp_path):
    store = open_storage(tmp_path / "out")
    empty = np.zeros(0, np.int64)
    write_reduce(store, tmp_path, empty, empty, empty.astype(np.int8), empty, 3)
    found, report = label_nodes(store)
    assert found == {}
    assert report.ran == [0, 1, 2, ROUND, ROUND + 1, ROUND + 2]  # round 0, and one round that finds it settled
    again = run_stage(ROUNDS_STAGE, store, SimpleNamespace(dedup=DedupConfig()), executor="inline", progress=False)
    assert again.ran == [] and len(again.skipped) == 6


def test_two_corner_windows_found_by_two_reducers_join_a_pair_and_one_corner_does_not(tmp_path):
    ids = node_ids(np.random.default_rng(3), 4)
    # ids 0-1: corner windows 3 and 4 matched, in two reducers; ids 2-3: corner 3 alone.
    a, b = np.array([ids[0], ids[1], ids[2]]), np.array([ids[1], ids[0], ids[3]])
    store = open_storage(tmp_path / "out")
    write_reduce(store, tmp_path, a, b, np.array([-3, -4, -3], dtype=np.int8), np.arange(3), 2)
    found, _ = label_nodes(store)
    low = int(min(ids[0], ids[1]))
    assert found == {int(ids[0]): low, int(ids[1]): low}


NODE_LOSS = r"""
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from pipeline.config import RunConfig
from pipeline.dedup import STAGES, DedupConfig
from pipeline.filter import STAGES as FILTER_STAGES
from pipeline.runner import run_pipeline
from pipeline.shard import STAGES as SHARD_STAGES
from pipeline.stats import STAGES as STATS_STAGES
from pipeline.stage import committed_shards
from pipeline.storage import open_storage

out = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=1, memory=1 << 30) for _ in range(3)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
store = open_storage(out)
run = RunConfig(out=out, dedup=DedupConfig(images_per_graph_partition=4))  # ~80 graph partitions
killed = []
def kill_one():  # a node lost while the component rounds run: its tasks and their shards with it
    while len(committed_shards(store, "dedup/_rounds")) < 100:
        time.sleep(0.01)
    cluster.remove_node(workers[0], allow_graceful=False)
    killed.append(len(committed_shards(store, "dedup/_rounds")))
threading.Thread(target=kill_one, daemon=True).start()
reports = run_pipeline(list(STAGES), store, run, progress=False)
rounds = next(r for r in reports if r.stage == "dedup/_rounds")
run_pipeline([*FILTER_STAGES, *SHARD_STAGES, *STATS_STAGES], store, run, progress=False)  # on the 2 nodes left
print(json.dumps({"killed_after": killed, "rounds_ran": len(rounds.ran)}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_a_node_lost_during_the_component_rounds_and_the_dataset_comes_out_the_same(crawled_web, tmp_path):
    """A simulated 4-node cluster (a head and 3 workers of 1 CPU, 1 GB): dedup with ~80 graph partitions,
    a worker killed while the component rounds run, then filter, shard and stats on what is left."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from pipeline.config import RunConfig
    from pipeline.dedup import STAGES
    from pipeline.filter import STAGES as FILTER_STAGES
    from pipeline.layout import MANIFEST, STATS_JSON
    from pipeline.runner import run_pipeline
    from pipeline.shard import STAGES as SHARD_STAGES
    from pipeline.stats import STAGES as STATS_STAGES
    from tests.conftest import REPO

    reference = open_storage(tmp_path / "reference")
    shutil.copytree(crawled_web[0].uri, reference.uri, dirs_exist_ok=True, ignore=shutil.ignore_patterns("dedup"))
    after = [*STAGES, *FILTER_STAGES, *SHARD_STAGES, *STATS_STAGES]
    run_pipeline(after, reference, RunConfig(out=reference.uri), executor="inline", progress=False)
    out = tmp_path / "cluster"
    shutil.copytree(crawled_web[0].uri, out, ignore=shutil.ignore_patterns("dedup"))
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", NODE_LOSS, str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"killed_after"')))
    assert result["killed_after"] and result["killed_after"][0] < result["rounds_ran"]  # lost mid-rounds
    final = lambda root: {p.name: p.read_bytes() for p in (root / "dedup").glob("0*.parquet")}  # noqa: E731
    assert final(out) == final(tmp_path / "reference") and len(final(out)) == 4
    dataset = lambda root: [(s["tar"], s["sha256"]) for s in json.loads((root / MANIFEST).read_text())["shards"]]  # noqa: E731
    assert dataset(out) == dataset(tmp_path / "reference") and dataset(out)
    funnel = lambda root: json.loads((root / STATS_JSON).read_text())["funnel"]  # noqa: E731
    assert funnel(out) == funnel(tmp_path / "reference")
