"""Dedup: the index guarantee, union-find, the edge rules, and the whole stage on the synthetic web."""

import hashlib
import random
import shutil
from dataclasses import replace

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.config import RunConfig
from pipeline.dedup import STAGES, DedupConfig, connected_components, index_design, table_keys
from pipeline.errors import ConfigError
from pipeline.runner import run_pipeline
from pipeline.stage import committed_shards, config_sha256, marker_path
from pipeline.storage import open_storage


def flip(h: int, bits: list[int]) -> int:
    v = h & (1 << 64) - 1
    for b in bits:
        v ^= 1 << b
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize("n", [300, 100_000, 10_000_000])
def test_index_guarantees_recall_up_to_its_radius(n):
    design = index_design(n, 8)
    assert design["radius"] == {300: 8, 100_000: 6, 10_000_000: 4}[n]
    rng = random.Random(n)
    hashes, partners = [], []
    for _ in range(300):
        h = rng.getrandbits(64) - (1 << 63)
        hashes.append(h)
        partners.append(flip(h, rng.sample(range(64), design["radius"])))
    a = table_keys(np.array(hashes, dtype=np.int64), design)
    b = table_keys(np.array(partners, dtype=np.int64), design)
    assert len(a) == design["tables"]
    shared = np.zeros(len(hashes), dtype=bool)
    for ka, kb in zip(a, b, strict=True):
        shared |= ka == kb
    assert shared.all()  # every pair within the radius meets in some table


def test_union_find_joins_chains_and_keeps_components_apart():
    a = np.array([5, 7, 100, 101, 9], dtype=np.int64)
    b = np.array([7, 9, 101, 102, 5], dtype=np.int64)
    nodes, label = connected_components(a, b)
    assert dict(zip(nodes.tolist(), label.tolist(), strict=True)) == {5: 5, 7: 5, 9: 5, 100: 100, 101: 100, 102: 100}
    long_chain = np.arange(0, 2000, dtype=np.int64)
    nodes, label = connected_components(long_chain[1:], long_chain[:-1])
    assert set(label.tolist()) == {0}


# --- stage on hand-made crawl shards ----------------------------------------------------------------


def colour(v: int) -> str:
    return f"{v:x}" * 48


def crawl_rows(rows: list[dict]) -> pa.Table:
    """Crawl-shaped rows; fields not given are those of a successful 100x100 image."""
    full = []
    for r in rows:
        uid = r.get("uid") or hashlib.sha256(repr(r).encode()).hexdigest()[:32]
        full.append(
            {
                "uid": uid,
                "url": r.get("url", f"http://x/{uid}"),
                "caption": r.get("caption", f"caption {uid}"),
                "key": uid,
                "status": r.get("status", "success"),
                "error_message": None,
                "width": 64,
                "height": 64,
                "original_width": r.get("w", 100),
                "original_height": r.get("h", 100),
                "sha256": r.get("sha", hashlib.sha256(uid.encode()).hexdigest()),
                "md5": r.get("md5"),
                "http_status": 200,
                "bytes": r.get("bytes", 1000),
                "format": "jpeg",
                "attempts": 1,
                "fetch_ms": 1.0,
                "phash": r.get("phash", random.Random(uid).getrandbits(64) - (1 << 63)),
                "colour_sig": r.get("colour", colour(random.Random(uid + "c").randrange(16))),
                "pixel_hash": r.get("pixels", hashlib.sha256((uid + "p").encode()).hexdigest()[:32]),
            }
        )
    return schema.conform(pa.Table.from_pylist(full), schema.CRAWL, "test")


def store_with_shards(tmp_path, shards: list[list[dict]], name="s"):
    store = open_storage(tmp_path / name)
    for i, rows in enumerate(shards):
        table = crawl_rows(rows) if rows else schema.empty(schema.CRAWL)
        store.write_parquet(f"crawl/{i:05d}.parquet", table)
        success = sum(1 for s in table["status"].to_pylist() if s == "success")
        store.write_json(marker_path("crawl", i), {"stats": {"success": success}, "config_sha256": "x"})
    return store


def dedup(store, executor="inline", **config) -> pl.DataFrame:
    run = RunConfig(out=store.uri, dedup=DedupConfig(**config))
    run_pipeline(list(STAGES), store, run, executor=executor, progress=False)
    return pl.concat(
        [pl.from_arrow(store.read_parquet(f"dedup/{s:05d}.parquet")) for s in committed_shards(store, "dedup")]
    )


def test_a_cluster_of_hundreds_of_copies_across_shards(tmp_path):
    copies = [
        [{"uid": f"u{s}{i:03d}", "sha": "ab" * 32, "w": 100 + (s == 1 and i == 7) * 50} for i in range(200)]
        for s in range(3)
    ]
    out = dedup(store_with_shards(tmp_path, copies))
    assert out.height == 600
    kept = out.filter(pl.col("dup_of").is_null())
    assert kept["uid"].to_list() == ["u1007"]  # the largest resolution wins
    assert out.filter(pl.col("dup_of").is_not_null())["dup_of"].unique().to_list() == ["u1007"]
    assert set(out["dup_reason"].drop_nulls().to_list()) == {"exact_bytes"}
    assert out["cluster_size"].unique().to_list() == [600]


def test_reasons_rules_and_keep_policy(tmp_path):
    base = -1234567890123456789
    rows = [
        {"uid": "a1", "phash": base, "colour": colour(5), "w": 300},
        {"uid": "a2", "phash": flip(base, [1, 9, 20]), "colour": colour(6)},  # near: 3 bits, colour 1
        {"uid": "a3", "phash": flip(base, [1, 9, 20, 33]), "colour": colour(9)},  # 4 bits but another colour
        {"uid": "b1", "pixels": "c" * 32, "w": 50},  # same pixels, other bytes
        {"uid": "b2", "pixels": "c" * 32, "w": 50},
        {"uid": "c1", "phash": 77, "caption": "A Red  Star", "colour": colour(3)},
        {"uid": "c2", "phash": flip(77, list(range(10))), "caption": "a red star", "colour": colour(3)},  # caption
        {"uid": "d1", "status": "not_found", "phash": None, "colour": None, "pixels": None},
    ]
    out = dedup(store_with_shards(tmp_path, [rows[:4], rows[4:]]))
    got = {r["uid"]: (r["dup_of"], r["dup_reason"], r["cluster_size"]) for r in out.iter_rows(named=True)}
    assert got == {
        "a1": (None, None, 2),
        "a2": ("a1", "near", 2),
        "a3": (None, None, 1),
        "b1": (None, None, 2),
        "b2": ("b1", "exact_pixels", 2),  # equal resolution: the lower uid is kept
        "c1": (None, None, 2),
        "c2": ("c1", "caption", 2),
    }
    strict = dedup(store_with_shards(tmp_path, [rows[:4], rows[4:]], "strict"), caption=False, near_threshold=2)
    assert strict.filter(pl.col("dup_reason").is_not_null())["uid"].to_list() == ["b2"]


def test_different_captions_can_be_kept(tmp_path):
    same = {"sha": "ee" * 32, "pixels": "f" * 32, "phash": 42, "colour": colour(1)}  # one image, three captions
    rows = [
        {"uid": "x1", "caption": "a cat", **same},
        {"uid": "x2", "caption": "a dog", **same},
        {"uid": "x3", "caption": "a cat", **same},
    ]
    merged = dedup(store_with_shards(tmp_path, [rows], "m"))
    assert merged["dup_of"].to_list() == [None, "x1", "x1"]
    split = dedup(
        store_with_shards(tmp_path, [rows], "k"), keep_different_captions=True, exact_bytes=False, exact_pixels=False
    )
    assert split["dup_of"].to_list() == [None, None, "x1"]


def test_empty_and_single_shards(tmp_path):
    out = dedup(store_with_shards(tmp_path, [[], [{"uid": "only"}], []]))
    assert out.to_dicts() == [{"uid": "only", "dup_of": None, "dup_reason": None, "cluster_size": 1}]
    assert dedup(store_with_shards(tmp_path, [[]], "e")).height == 0


def test_semantic_dedup_says_what_it_needs(tmp_path):
    with pytest.raises(ConfigError, match="dedup.semantic needs image embeddings from a trained clipline checkpoint"):
        dedup(store_with_shards(tmp_path, [[{"uid": "a"}]]), semantic=True)


# --- on the synthetic web ----------------------------------------------------------------------


def copy_of(store, tmp_path, name):
    shutil.copytree(store.uri, tmp_path / name, ignore=shutil.ignore_patterns("dedup"))
    return open_storage(tmp_path / name)


def test_every_planted_duplicate_found_and_no_distinct_images_merged(crawled_web, tmp_path):
    store = copy_of(crawled_web[0], tmp_path, "run")
    out = dedup(store, executor="ray")
    crawl = pl.concat([pl.from_arrow(store.read_parquet(f"crawl/{s:05d}.parquet")) for s in range(4)])
    rows = crawl.with_columns(shard=pl.int_range(pl.len())).select(["uid", "url"])
    df = out.join(rows, on="uid").join(crawled_web[1], on="url").filter(pl.col("image_id") >= 0)
    df = df.with_columns(cluster=pl.coalesce("dup_of", "uid"))
    merged = df.group_by("cluster").agg(pl.col("image_id").n_unique().alias("images")).filter(pl.col("images") > 1)
    assert merged.height == 0  # precision: no two distinct images in one cluster
    groups = df.group_by("image_id").agg(
        pl.col("cluster").n_unique().alias("clusters"), pl.len(), pl.col("dup_kind").drop_nulls().alias("kinds")
    )
    planted = groups.filter(pl.col("len") > 1)
    kinds = planted["kinds"].explode().value_counts()
    found = dict(zip(kinds["kinds"].to_list(), kinds["count"].to_list(), strict=True))
    print(
        f"planted duplicate groups: {planted.height}, found whole: "
        f"{planted.filter(pl.col('clusters') == 1).height} (recall 100% required); by kind: {found}"
    )
    assert found["exact"] >= 10 and found["near"] >= 10
    assert planted.filter(pl.col("clusters") > 1).height == 0  # recall: every planted group is one cluster
    # Planted copies sit on other sites, so in other shards: the clusters cross shards.
    shard_of = {u: s for s in range(4) for u in store.read_parquet(f"crawl/{s:05d}.parquet")["uid"].to_pylist()}
    crossing = [
        r
        for r in out.filter(pl.col("dup_of").is_not_null()).iter_rows(named=True)
        if shard_of[r["uid"]] != shard_of[r["dup_of"]]
    ]
    assert len(crossing) >= 10


def test_same_input_same_output_also_after_a_killed_run(crawled_web, tmp_path):
    first = copy_of(crawled_web[0], tmp_path, "a")
    dedup(first)
    second = copy_of(crawled_web[0], tmp_path, "b")
    dedup(second)
    outputs = lambda st: {n: st.read_bytes(n) for n in st.list("dedup") if "_committed" not in n}  # noqa: E731
    assert outputs(first) == outputs(second)
    # Killed after the components step and half the final shards: markers gone, outputs half there.
    for stage, shards in (("dedup/_components", [0]), ("dedup", [1, 3])):
        for s in shards:
            second.delete(marker_path(stage, s))
    second.delete("dedup/00001.parquet")
    dedup(second)
    assert outputs(first) == outputs(second)


def test_config_changes_are_not_mixed_in(crawled_web, tmp_path):
    store = copy_of(crawled_web[0], tmp_path, "c")
    dedup(store)
    assert config_sha256(DedupConfig()) != config_sha256(replace(DedupConfig(), near_threshold=4))
    with pytest.raises(Exception, match="committed with another"):
        dedup(store, near_threshold=4)


def test_packed_colour_distance_equals_the_string_one():
    from pipeline.dedup import colour_distance_packed, pack_colour
    from pipeline.images import colour_distance

    rng = random.Random(3)
    a = ["".join(rng.choice("0123456789abcdef") for _ in range(48)) for _ in range(200)]
    b = [x if i % 3 else "".join(rng.choice("0123456789abcdef") for _ in range(48)) for i, x in enumerate(a)]
    b = [y[:10] + "f" + y[11:] if i % 5 == 1 else y for i, y in enumerate(b)]
    got = colour_distance_packed(pack_colour(pa.array(a)), pack_colour(pa.array(b)))
    assert got.tolist() == [colour_distance(x, y) for x, y in zip(a, b, strict=True)]
