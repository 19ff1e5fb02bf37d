"""Takedowns that remove: every kind of id, the whole run's datasets, a purge that leaves no removed byte
under OUT (local and on the S3 endpoint), audit records, and standing lists a re-crawl obeys."""

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import polars as pl

from pipeline import layout
from pipeline.cli import main
from pipeline.crawl import run_crawl
from pipeline.formats import group_samples, iter_tar_members
from pipeline.manifest import read_manifest, verify
from pipeline.stage import ShardContext, marker_path
from pipeline.storage import file_sha256
from pipeline.takedown import takedown
from pipeline.web import SyntheticWeb
from tests.pipeline.test_crawl import crawl_config
from tests.pipeline.test_shard import copy, filtered, shard  # noqa: F401 (the fixture)
from training.data import DataConfig, ManifestDataset, loader


def image_bytes(store, shard: int) -> dict[str, bytes]:
    """key -> image bytes of a crawl shard's tar."""
    with store.open_read(layout.crawl_tar(shard)) as f:
        return {k: m["jpg"] for k, m in group_samples(iter_tar_members(f)) if "jpg" in m}


def every_object(store) -> dict[str, bytes]:
    return {rel: store.read_bytes(rel) for rel in store.list("")}


def crawl_rows_of(store) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(store.read_parquet(layout.crawl_parquet(s))) for s in range(4)], how="diagonal")


def trained_uids(location: str) -> set[str]:
    config = DataConfig(batch_size=4, num_workers=0, image_size=16)
    return {u for b in loader(ManifestDataset(read_manifest(location), config)) for u in b["uids"]}


def victims_of(store, manifest) -> dict[str, dict]:
    """Three kept samples of different crawl shards, each with its crawl row and image bytes."""
    rows = crawl_rows_of(store).filter(pl.col("status") == "success")
    kept = set()
    for s in manifest.shards:
        kept |= set(manifest.storage.read_parquet(s["parquet"])["uid"].to_pylist())
    picked = {}
    for n in range(3):
        row = rows.filter(pl.col("uid").is_in(sorted(kept)) & (pl.col("pdq_quality") >= 50))
        row = row.filter(pl.col("key").is_in(list(image_bytes(store, n))))[0].to_dicts()[0]
        picked[row["uid"]] = {**row, "shard": n, "bytes": image_bytes(store, n)[row["key"]]}
    return picked


def test_every_kind_of_id_and_a_purge_that_leaves_no_byte_behind(filtered, tmp_path):  # noqa: F811
    store = copy(filtered, tmp_path)
    manifest = shard(store)
    shutil.copytree(Path(store.uri) / "dataset", Path(store.uri) / "variants/wide/dataset")  # a second dataset
    victims = victims_of(store, manifest)
    (a, va), (b, vb), (c, vc) = victims.items()
    published = {u for s in manifest.shards for u in manifest.storage.read_parquet(s["parquet"])["uid"].to_pylist()}
    location = f"{store.uri}/dataset/manifest.json"

    # 1. by md5 of the image, with a purge after a grace of 2 days: removed now, purged later
    (tmp_path / "md5.txt").write_text(va["md5"].upper() + "\n")
    done = takedown(location, str(tmp_path / "md5.txt"), kind="image_md5", reason="DMCA", purge=True, grace_days=2)
    assert done["removed"] == 1 and done["purged"] == [] and len(done["datasets"]) == 2
    assert a not in trained_uids(location) and a not in trained_uids(f"{store.uri}/variants/wide/dataset/manifest.json")
    assert any(va["bytes"] in data for data in every_object(store).values())  # still in the crawl and v1 shards
    record = store.read_json("takedowns/0001.json")
    assert record["removed_uids"] == [a] and record["reason"] == "DMCA" and record["purge"]["done"] is None

    # 2. by PDQ of the original image (its crawl hash here), through the CLI, purged at once
    (tmp_path / "abuse.pdq").write_text(f"{vb['pdq']} 8\n")
    assert main(["takedown", "--manifest", location, "--uids", str(tmp_path / "abuse.pdq"), "--kind", "image_pdq",
                 "--purge"]) == 0  # fmt: skip
    # 3. by URL, no purge asked: its bytes stay until a purge of its own
    (tmp_path / "urls.txt").write_text(vc["url"] + "\n")
    assert takedown(location, str(tmp_path / "urls.txt"), kind="url")["removed"] >= 1
    assert c in store.read_json("takedowns/0003.json")["removed_uids"]  # with any exact copy of its image
    assert any(vc["bytes"] in data for data in every_object(store).values())

    # A later --purge purges every takedown whose grace has passed: 1 (3 days later) and 3 (no grace).
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    purged = takedown(location, None, purge=True, clock=later)["purged"]
    assert [p["takedown"] for p in purged] == ["takedowns/0001.json", "takedowns/0003.json"]
    assert takedown(location, None, purge=True, clock=later)["purged"] == []  # each once
    removed = {u for n in (1, 2, 3) for u in store.read_json(f"takedowns/{n:04d}.json")["removed_uids"]}
    assert set(victims) <= removed and len(removed) >= 3  # the PDQ list also names the victim's near copies

    # No object under OUT holds a removed image's bytes; everything else is intact and verifies.
    objects = every_object(store)
    for uid, v in victims.items():
        assert [rel for rel, data in objects.items() if v["bytes"] in data] == [], uid
    rewritten = store.read_json("takedowns/0001.json")["purge"]["rewritten"]
    assert f"crawl/{va['shard']:05d}.tar" in rewritten and f"crawl/{va['shard']:05d}.parquet" in rewritten
    assert any(r.startswith("dataset/shards/") for r in rewritten)  # the superseded version 1
    assert any(r.startswith("variants/wide/dataset/shards/") for r in rewritten)
    for name in ("dataset", "variants/wide/dataset"):
        current = read_manifest(f"{store.uri}/{name}/manifest.json")
        assert current.version == 4 and verify(current) == []
        assert current.data["num_samples"] == manifest.data["num_samples"] - len(removed & published)
        for old in range(1, 4):
            archived = read_manifest(f"{store.uri}/{name}/manifest.v{old}.json", allow_superseded=True)
            assert verify(archived) == [], (name, old)
        assert not trained_uids(f"{store.uri}/{name}/manifest.json") & removed
    crawled = crawl_rows_of(store).filter(pl.col("uid").is_in(list(removed)))
    assert crawled["status"].to_list() == ["blocked"] * len(removed)
    assert set(crawled["error_message"].to_list()) == {f"taken down (takedowns/{n:04d}.json)" for n in (1, 2, 3)}
    assert crawled["window_sig"].null_count() == crawled["colour_sig"].null_count() == len(removed)  # no colours left
    for s in range(4):  # the crawl markers record the purged outputs, so `clipline status` tells the truth
        marker = store.read_json(marker_path("crawl", s))
        for rel, out in marker["outputs"].items():
            assert out["sha256"] == file_sha256(Path(store.uri) / rel), rel
    lists = {kind: store.read_bytes(rel).decode() for kind, rel in layout.TAKEDOWN_LISTS.items()}
    for v in victims.values():
        assert hashlib.sha256(v["url"].encode()).hexdigest() in lists["url_sha256"]
        assert v["sha256"] in lists["image_sha256"] and v["pdq"] in lists["image_pdq"]


def test_a_recrawl_never_fetches_a_taken_down_url_again(filtered, tmp_path):  # noqa: F811
    store = copy(filtered, tmp_path)
    manifest = shard(store)
    victim = next(iter(victims_of(store, manifest).values()))
    (tmp_path / "uid.txt").write_text(victim["uid"] + "\n")
    assert takedown(f"{store.uri}/dataset/manifest.json", str(tmp_path / "uid.txt"), purge=True)["removed"] >= 1
    crawled = pl.from_arrow(store.read_parquet(layout.crawl_parquet(victim["shard"])))
    neighbour = crawled.filter((pl.col("status") == "success") & (pl.col("uid") != victim["uid"]))["url"][0]

    def path(url: str) -> str:
        return "/" + url.split("/", 3)[3].split("?")[0]

    # The victim's crawl shard done again from its ingest rows, with the web up (short timeouts: the
    # web's slow faults are not what this test is about).
    web_root = next(Path(filtered.uri).parents[1].glob("crawled-web*/web"))  # the web the fixture crawled
    config = replace(crawl_config(web_root), timeout_s=0.5, deadline_s=1.0, max_attempts=1)
    ctx = ShardContext("crawl", victim["shard"], store, config, None, tmp_path / "staging")
    (tmp_path / "staging").mkdir()
    port = int(victim["url"].split("/")[2].rsplit(":", 1)[1])  # the URLs name the port the web had
    with SyntheticWeb(web_root, port=port) as web:
        run_crawl(ctx)
        hits = {p: n for (_, p), n in web.log.hits.items()}
    redone = pl.read_parquet(ctx.staged[layout.crawl_parquet(victim["shard"])])
    row = redone.filter(pl.col("uid") == victim["uid"])
    assert hits.get(path(neighbour), 0) >= 1  # the shard was crawled again ...
    assert row["status"].to_list() == ["blocked"] and hits.get(path(victim["url"]), 0) == 0  # ... all but the victim
    assert row["error_message"].to_list() == ["URL taken down (the run's takedown list)"]


def test_a_purge_on_the_s3_endpoint_leaves_no_removed_byte(filtered, tmp_path, s3_store):  # noqa: F811
    local = copy(filtered, tmp_path)
    manifest = shard(local)
    victims = victims_of(local, manifest)
    for rel in local.list(""):
        s3_store.put_file(Path(local.uri) / rel, rel)
    location = f"{s3_store.uri}/dataset/manifest.json"
    (tmp_path / "sha.txt").write_text("".join(v["sha256"] + "\n" for v in victims.values()))
    done = takedown(location, str(tmp_path / "sha.txt"), kind="image_sha256", purge=True)
    assert done["removed"] >= 3 and len(done["purged"]) == 1  # with any exact copies under other URLs
    for rel in s3_store.list(""):
        data = s3_store.read_bytes(rel)
        assert not [u for u, v in victims.items() if v["bytes"] in data], rel
    assert verify(read_manifest(location)) == []
    assert verify(read_manifest(f"{s3_store.uri}/dataset/manifest.v1.json", allow_superseded=True)) == []
    audit = json.loads(s3_store.read_bytes("takedowns/0001.json"))
    assert set(victims) <= set(audit["removed_uids"]) and audit["purge"]["rewritten"]
