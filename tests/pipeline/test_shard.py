"""Final shards, manifest, takedown and the statistics report, on the crawled synthetic web."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.dedup import STAGES as DEDUP_STAGES
from pipeline.filter import STAGE as FILTER_STAGE
from pipeline.formats import group_samples, iter_tar_members
from pipeline.manifest import SupersededManifest, read_manifest, verify
from pipeline.runner import run_pipeline
from pipeline.shard import STAGES as SHARD_STAGES
from pipeline.shard import Permutation, ShardConfig
from pipeline.stage import marker_path
from pipeline.stats import STAGES as STATS_STAGES
from pipeline.storage import file_sha256, open_storage
from pipeline.takedown import takedown

N = 40  # samples per shard


def run_config(store, **shard) -> RunConfig:
    return RunConfig(name="web-tiny", out=store.uri, shard=ShardConfig(**{"samples_per_shard": N, **shard}))


@pytest.fixture(scope="module")
def filtered(crawled_web, tmp_path_factory):
    """The crawled web, deduped and filtered once (inline); tests copy it."""
    base = tmp_path_factory.mktemp("shard")
    shutil.copytree(crawled_web[0].uri, base / "run")
    store = open_storage(base / "run")
    run_pipeline([*DEDUP_STAGES, FILTER_STAGE], store, RunConfig(out=store.uri), executor="inline", progress=False)
    return store


def copy(store, tmp_path, name="run"):
    shutil.copytree(store.uri, tmp_path / name)
    return open_storage(tmp_path / name)


def shard(store, executor="inline", **config):
    run_pipeline(list(SHARD_STAGES), store, run_config(store, **config), executor=executor, progress=False)
    return read_manifest(f"{store.uri}/dataset/manifest.json")


def kept_uids(store) -> list[str]:
    """Kept uids in crawl order, shard by shard: the order of an unshuffled dataset."""
    out = []
    for s in range(4):
        kept = set(pl.read_parquet(Path(store.uri) / f"filter/{s:05d}.parquet").filter(pl.col("keep"))["uid"])
        out.extend(u for u in pl.read_parquet(Path(store.uri) / f"crawl/{s:05d}.parquet")["uid"] if u in kept)
    return out


def read_tar(path) -> list[tuple[str, dict]]:
    with open(path, "rb") as f:
        return list(group_samples(iter_tar_members(f)))


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 7, 1000, 4099):
        p = Permutation(n, seed=3)
        forward = p.forward(np.arange(n))
        assert sorted(forward.tolist()) == list(range(n))
        assert (p.inverse(forward) == np.arange(n)).all()
    assert (Permutation(1000, 3).forward(np.arange(1000)) != Permutation(1000, 4).forward(np.arange(1000))).any()


def test_fixed_size_shards_manifest_and_tar_parquet_agree(filtered, tmp_path):
    store = copy(filtered, tmp_path)
    manifest = shard(store, shuffle=False)
    kept = kept_uids(store)
    counts = [s["num_samples"] for s in manifest.shards]
    assert counts[:-1] == [N] * (len(counts) - 1) and 0 < counts[-1] <= N
    assert manifest.data["num_samples"] == sum(counts) == len(kept)
    assert verify(manifest) == []
    order = []
    for entry in manifest.shards:
        samples = read_tar(Path(store.uri) / "dataset" / entry["tar"])
        table = pq.read_table(Path(store.uri) / "dataset" / entry["parquet"])
        assert [k for k, _ in samples] == table["key"].to_pylist() == table["uid"].to_pylist()
        for (key, members), row in zip(samples, table.to_pylist(), strict=True):
            assert set(members) in ({"jpg", "txt", "json"}, {"png", "txt", "json"}, {"webp", "txt", "json"})
            assert members["txt"].decode() == (row["caption"] or "")
            assert json.loads(members["json"])["uid"] == key and json.loads(members["json"])["url"] == row["url"]
        order.extend(table["uid"].to_pylist())
    assert order == kept  # unshuffled: crawl order, every kept sample exactly once


def test_shuffle_is_global_seeded_and_loses_nothing(filtered, tmp_path):
    a = copy(filtered, tmp_path, "a")

    def order(m):
        return [u for s in m.shards for u in pq.read_table(Path(m.storage.uri) / s["parquet"])["uid"].to_pylist()]

    first = order(shard(a))
    b = copy(filtered, tmp_path, "b")
    assert order(shard(b)) == first  # same seed, same order
    kept = kept_uids(a)
    assert sorted(first) == sorted(kept) and first != kept
    # samples of the first output shard come from every crawl shard, not one
    crawl_shard = {u: s for s in range(4) for u in pl.read_parquet(Path(a.uri) / f"crawl/{s:05d}.parquet")["uid"]}
    assert len({crawl_shard[u] for u in first[:N]}) == 4
    c = copy(filtered, tmp_path, "c")
    assert order(shard(c, seed=1)) != first


def test_each_step_reads_its_inputs_once_so_the_cost_stays_linear(filtered, tmp_path, monkeypatch):
    """An output shard takes its piece of each crawl shard's route file: no step reads a crawl
    shard's index once per output shard (crawl shards x output shards reads)."""
    from pipeline.storage import LocalStorage

    reads: list[str] = []
    ranges: list[tuple[str, int, int]] = []
    for method in ("read_parquet", "read_frame", "read_range"):
        original = getattr(LocalStorage, method)
        monkeypatch.setattr(
            LocalStorage, method, lambda self, rel, *a, _o=original, **k: reads.append(rel) or _o(self, rel, *a, **k)
        )
    read_range = LocalStorage.read_range
    monkeypatch.setattr(
        LocalStorage, "read_range", lambda self, rel, a, b: ranges.append((rel, a, b)) or read_range(self, rel, a, b)
    )
    store = copy(filtered, tmp_path)
    manifest = shard(store, samples_per_shard=10)  # 4 crawl shards, many output shards
    outputs = len(manifest.shards)
    assert outputs > 10
    index_reads = [r for r in reads if r.startswith("shard/_index/")]
    assert sorted(index_reads) == [f"shard/_index/{s:05d}.parquet" for s in range(4)]  # once each, by the route step
    route_reads = [r for r in reads if r.startswith("shard/_route/")]
    # an output shard reads, of each route file, 16 bytes of its header and then its range, if any
    route_files = sorted(set(route_reads))
    assert len(route_files) == 4 and all(r.endswith(".arrow") for r in route_files)
    header = [(rel, a, b) for rel, a, b in ranges if rel in route_files and a < 8 * (outputs + 1)]
    assert sorted(header) == sorted((rel, 8 * p, 8 * p + 16) for rel in route_files for p in range(outputs))
    assert outputs <= len(route_reads) - len(header) <= 4 * outputs


def test_images_close_together_share_a_ranged_read(tmp_path):
    from pipeline.shard import read_spans

    class Counting(type(open_storage(tmp_path))):
        reads: list = []

        def read_range(self, rel, start, stop):
            self.reads.append((start, stop))
            return super().read_range(rel, start, stop)

    store = Counting(tmp_path)
    data = bytes(range(256)) * 40  # 10,240 bytes
    store.write_bytes("t.tar", data)
    spans = [(0, 10), (15, 5), (60, 30), (5000, 10), (9000, 100)]
    got = read_spans(store, "t.tar", [o for o, _ in spans], [n for _, n in spans], gap=100)
    assert got == [data[o : o + n] for o, n in spans]
    assert store.reads == [(0, 90), (5000, 5010), (9000, 9100)]
    store.reads.clear()  # adjacent, but a shared read stops at 16 x gap bytes
    got = read_spans(store, "t.tar", list(range(0, 4000, 100)), [100] * 40, gap=100)
    assert b"".join(got) == data[:4000] and store.reads == [(0, 1600), (1600, 3200), (3200, 4000)]


def test_a_changed_kept_set_is_cut_again_never_with_stale_routes(filtered, tmp_path):
    store = copy(filtered, tmp_path)
    first = shard(store)
    # the filter of crawl shard 3 now keeps one sample fewer (as if redone with another rule)
    path = Path(store.uri) / "filter/00003.parquet"
    frame = pl.read_parquet(path)
    fewer = frame.with_columns(keep=(pl.int_range(pl.len()) != frame["keep"].arg_true()[0]) & pl.col("keep"))
    assert fewer["keep"].sum() == frame["keep"].sum() - 1
    pq.write_table(fewer.to_arrow(), path)
    marker = store.read_json(marker_path("filter", 3))
    marker["outputs"]["filter/00003.parquet"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    marker.pop("identity", None)
    store.write_json(marker_path("filter", 3), marker)
    second = shard(store)
    assert second.data["num_samples"] == first.data["num_samples"] - 1 and verify(second) == []
    fresh = copy(store, tmp_path, "fresh")
    for stage in ("shard", "dataset"):
        shutil.rmtree(Path(fresh.uri) / stage)
    third = shard(fresh)
    assert [(s["tar"], s["sha256"]) for s in second.shards] == [(s["tar"], s["sha256"]) for s in third.shards]


def test_killed_run_reruns_to_the_same_manifest(filtered, tmp_path):
    store = copy(filtered, tmp_path)
    first = shard(store, executor="ray").data
    # killed after two shards were uploaded but before their markers, and before the manifest
    for s in (1, 3):
        store.delete(marker_path("shard", s))
    store.delete(marker_path("shard/_manifest", 0))
    store.delete("dataset/manifest.json")
    (Path(store.uri) / "dataset/shards/00001.tar").write_bytes(b"partial")
    second = shard(store).data
    assert {k: v for k, v in first.items() if k != "created"} == {k: v for k, v in second.items() if k != "created"}


def test_other_tools_read_the_shards(filtered, tmp_path, ray_local):
    import webdataset as wds

    store = copy(filtered, tmp_path)
    manifest = shard(store)
    urls = [str(Path(store.uri) / "dataset" / s["tar"]) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png;webp", "txt"))
    assert len(samples) == manifest.data["num_samples"]
    assert all(img.size[0] > 0 for _, img, _ in samples)
    parquets = [str(Path(store.uri) / "dataset" / s["parquet"]) for s in manifest.shards]
    assert pl.scan_parquet(parquets).select(pl.len()).collect().item() == manifest.data["num_samples"]
    import duckdb

    listed = ", ".join(f"'{p}'" for p in parquets)
    assert duckdb.sql(f"select count(distinct uid) from read_parquet([{listed}])").fetchall()[0][0] == len(samples)
    import ray.data

    ds = ray.data.read_parquet(parquets)
    assert ds.count() == manifest.data["num_samples"]
    assert set(ds.schema().names) >= {"uid", "key", "url", "caption", "width", "height", "language"}


def test_takedown_on_s3_rewrites_only_affected_shards_and_keeps_the_old_manifest(filtered, tmp_path, s3_store):
    store = copy(filtered, tmp_path)
    local = shard(store)
    for path in sorted((Path(store.uri) / "dataset").rglob("*")):
        if path.is_file() and "stats" not in path.parts:
            s3_store.put_file(path, f"dataset/{path.relative_to(Path(store.uri) / 'dataset')}")
    location = f"{s3_store.uri}/dataset/manifest.json"
    before = read_manifest(location)
    assert verify(before) == []
    victims = [
        pq.read_table(Path(store.uri) / "dataset" / local.shards[i]["parquet"])["uid"][j].as_py()
        for i, j in ((0, 3), (0, 7), (2, 0))
    ]
    (tmp_path / "takedown.txt").write_text("\n".join(victims) + "\n" + "f" * 32 + "\n")  # one uid not in the set
    assert main(["takedown", "--manifest", location, "--uids", str(tmp_path / "takedown.txt"), "--reason", "DMCA"]) == 0
    after = read_manifest(location)
    assert after.version == 2 and after.data["num_samples"] == before.data["num_samples"] - 3
    assert verify(after) == []
    changed = [i for i, (a, b) in enumerate(zip(before.shards, after.shards, strict=True)) if a != b]
    assert changed == [0, 2]
    remaining = set()
    for entry in after.shards:
        remaining |= set(s3_store.read_parquet(f"dataset/{entry['parquet']}")["uid"].to_pylist())
        with s3_store.open_read(f"dataset/{entry['tar']}") as f:
            keys = [k for k, _ in group_samples(iter_tar_members(io.BytesIO(f.read())))]
        assert len(keys) == entry["num_samples"]
        assert not set(keys) & set(victims)
    assert not remaining & set(victims) and len(remaining) == after.data["num_samples"]
    record = after.data["takedowns"][0]
    assert record["reason"] == "DMCA" and record["removed"] == 3 and sorted(record["removed_uids"]) == sorted(victims)
    # the old manifest is kept for audit, still verifies, and is refused for training unless allowed
    with pytest.raises(SupersededManifest, match="superseded by a takedown"):
        read_manifest(f"{s3_store.uri}/dataset/manifest.v1.json")
    old = read_manifest(f"{s3_store.uri}/dataset/manifest.v1.json", allow_superseded=True)
    assert verify(old) == [] and old.data["num_samples"] == before.data["num_samples"]
    # by URL hash too; a list with nothing in the dataset changes nothing
    url = s3_store.read_parquet(f"dataset/{after.shards[1]['parquet']}")["url"][0].as_py()
    (tmp_path / "urls.txt").write_text(hashlib.sha256(url.encode()).hexdigest() + "\n")
    assert takedown(location, str(tmp_path / "urls.txt"), kind="url_sha256")["removed"] == 1
    (tmp_path / "none.txt").write_text("0" * 32 + "\n")
    assert takedown(location, str(tmp_path / "none.txt"))["removed"] == 0
    assert read_manifest(location).version == 3


def test_stats_report_counts_add_up(filtered, tmp_path):
    store = copy(filtered, tmp_path)
    manifest = shard(store)
    run_pipeline(list(STATS_STAGES), store, run_config(store), executor="inline", progress=False)
    stats = store.read_json("dataset/stats/stats.json")
    funnel = stats["funnel"]
    crawl = pl.concat([pl.read_parquet(Path(store.uri) / f"crawl/{s:05d}.parquet") for s in range(4)])
    filt = pl.concat([pl.read_parquet(Path(store.uri) / f"filter/{s:05d}.parquet") for s in range(4)])
    assert funnel["unique_urls"] == crawl.height
    assert funnel["fetched"] == crawl.filter(pl.col("status") == "success").height == filt.height
    assert funnel["kept_by_filter"] == filt["keep"].sum() == funnel["final"] == manifest.data["num_samples"]
    assert funnel["input_rows"] >= funnel["unique_urls"]
    crawl_drops = sum(v for k, v in stats["drop_reasons"].items() if k.startswith("crawl/"))
    filter_drops = sum(v for k, v in stats["drop_reasons"].items() if k.startswith("filter/"))
    assert crawl_drops == funnel["unique_urls"] - funnel["fetched"]
    assert filter_drops == funnel["fetched"] - funnel["kept_by_filter"]
    assert sum(stats["languages"].values()) == sum(stats["caption_length"].values()) == funnel["final"]
    assert sum(stats["image_size"].values()) == funnel["final"]
    assert sum(d["urls"] for d in stats["top_domains"]) <= funnel["unique_urls"]
    sizes = stats["duplicate_clusters"]["sizes"]
    assert sum(int(k) * v for k, v in sizes.items()) == funnel["fetched"]  # every image in exactly one cluster
    assert len(stats["crawl"]) == 4
    final = pl.concat([pl.read_parquet(Path(store.uri) / "dataset" / s["parquet"]) for s in manifest.shards])
    assert stats["languages"] == dict(final["language"].value_counts().iter_rows())
    assert stats["drop_reasons"]["filter/duplicate"] == filt.filter(pl.col("drop_reason") == "duplicate").height
    page = (Path(store.uri) / "dataset/stats/report.html").read_text()
    assert page.count("<svg") >= 6 and page.count("data:image/jpeg;base64,") >= 10
    # it parses, and nothing in it is fetched from anywhere: every src/href is inline data or a fragment
    from html.parser import HTMLParser

    class Links(HTMLParser):
        found, tags = [], 0

        def handle_starttag(self, tag, attrs):
            self.tags += 1
            self.found += [v for k, v in attrs if k in ("src", "href") and v]

    parser = Links()
    parser.feed(page)
    parser.close()
    assert parser.tags > 100 and parser.found and all(v.startswith(("data:", "#")) for v in parser.found)
