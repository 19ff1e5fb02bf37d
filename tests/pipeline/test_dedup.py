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
from pipeline.dedup import EMBED_STAGE, STAGES, DedupConfig
from pipeline.dedup.components import connected_components
from pipeline.dedup.index import expected_pairs, index_design, table_keys
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


@pytest.mark.parametrize("n", [10_000_000, 100_000_000, 400_000_000])
def test_a_held_radius_does_not_fall_with_n_and_its_pairs_grow_instead(n):
    """Without hold_from the radius falls so that pairs per image stay at the budget; held from 1M it
    stays at 1M's (5 for the whole image on 32 tables, 3 for a window on 6), and the pairs grow."""
    for tables, radius in ((32, 5), (6, 3)):
        assert index_design(1_000_000, 10, 50, tables)["radius"] == radius
        free = index_design(n, 10, 50, tables)
        held = index_design(n, 10, 50, tables, hold_from=1_000_000)
        assert free["radius"] < radius == held["radius"] and held["tables"] <= tables
        assert expected_pairs(n, free) <= 50 * n < expected_pairs(n, held)
        assert index_design(999_999, 10, 50, tables, hold_from=1_000_000) == index_design(999_999, 10, 50, tables)


def test_union_find_joins_chains_and_keeps_components_apart():
    a = np.array([5, 7, 100, 101, 9], dtype=np.int64)
    b = np.array([7, 9, 101, 102, 5], dtype=np.int64)
    nodes, label = connected_components(a, b)
    assert dict(zip(nodes.tolist(), label.tolist(), strict=True)) == {5: 5, 7: 5, 9: 5, 100: 100, 101: 100, 102: 100}
    long_chain = np.arange(0, 2000, dtype=np.int64)
    nodes, label = connected_components(long_chain[1:], long_chain[:-1])
    assert set(label.tolist()) == {0}


def test_gid_index_matches_a_sorted_dense_rank():
    from pipeline.dedup.components import dense_index, gid_index

    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        shards = rng.integers(0, int(rng.integers(1, 7)), n)  # shards with no node between others
        rows = rng.integers(0, int(rng.choice([1, 3, 64, 65, 1000, 5000])), n)  # repeats; word edges
        ends = (shards << 32) | rows
        nodes, index = gid_index(ends)
        expected_nodes, expected_index = dense_index(ends)
        assert nodes.tolist() == expected_nodes.tolist(), trial
        assert index.tolist() == expected_index.tolist(), trial
        assert index.dtype == np.int32
    nodes, index = gid_index(np.zeros(0, np.int64))
    assert len(nodes) == len(index) == 0


def test_uids_parse_into_halves_that_order_like_the_text_and_format_back():
    import pyarrow as pa

    from pipeline.dedup.components import hex_uids, parse_uids

    hex_uids_in = ["0123456789abcdef" * 2, "fedcba9876543210" + "0" * 16, "ffffffffffffffff" + "00000000000000a1"]
    halves, canonical = parse_uids(pa.array(hex_uids_in))
    assert canonical and halves.dtype == np.uint64
    assert [[int(h) for h in row] for row in halves] == [
        [int(u[:16], 16) for u in hex_uids_in],
        [int(u[16:], 16) for u in hex_uids_in],
    ]
    sliced = pa.array(["x", *hex_uids_in]).slice(1)  # an offset into the buffers
    assert (parse_uids(sliced)[0] == halves).all()
    # Back to strings, with nulls where asked.
    null = np.array([True, False, False, True, False])
    assert hex_uids(halves, null).to_pylist() == [None, *hex_uids_in[:2], None, hex_uids_in[2]]
    assert hex_uids(halves[:, :0], np.zeros(0, bool)).to_pylist() == []
    # Upper case orders the same but does not format back: not canonical.
    upper, canonical = parse_uids(pa.array([u.upper() for u in hex_uids_in]))
    assert (upper == halves).all() and not canonical
    # Not docs/design.md's uid: the slow path, a half that is not hex is 0.
    odd, canonical = parse_uids(pa.array(["0123456789abcdef" * 2, "zz" * 16, "abc", None]))
    assert odd.tolist() == [[0x0123456789ABCDEF, 0, 0xABC, 0], [0x0123456789ABCDEF, 0, 0, 0]] and not canonical
    assert parse_uids(pa.array(["g" + "0" * 31]))[0].tolist() == [[0], [0]]


@pytest.mark.parametrize("with_area", [True, False])
def test_keepers_are_the_largest_then_lowest_uid_then_lowest_gid_of_each_cluster(with_area):
    from pipeline.dedup.components import keeper_ranks, star_keepers

    rng = np.random.default_rng(3)
    n = 5000
    cluster = np.sort(rng.integers(0, 800, n))
    nodes = np.sort(rng.choice(1 << 40, n, replace=False)).astype(np.int64)
    area = rng.integers(1, 4, n) * 100  # many ties
    halves = [rng.integers(0, 3, n).astype(np.uint64), rng.integers(0, 3, n).astype(np.uint64)]  # ties too
    chain = np.flatnonzero(cluster[1:] == cluster[:-1])  # each cluster a chain of its nodes, in a shuffled order
    chain = rng.permutation(chain)
    index = np.concatenate([chain, chain + 1]).astype(np.int32)
    rank = keeper_ranks(nodes, halves, area if with_area else None)
    keeper_of, ties = star_keepers(index, np.ones(len(chain), dtype=bool), rank)  # connected components
    assert ties.all()
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        rule = (lambda i: (-area[i], halves[0][i], halves[1][i], nodes[i])) if with_area else None
        rule = rule or (lambda i: (halves[0][i], halves[1][i], nodes[i]))
        assert (keeper_of[members] == min(members, key=rule)).all()


def greedy_stars(n: int, a: list[int], b: list[int], as_one: list[bool], rank: list[int]) -> tuple[list, set]:
    """The reference for star_keepers, one group at a time: groups (joined by as_one edges) in rank
    order; a group is kept unless it has an edge to a group kept before it; a removed group goes to
    its best kept neighbour. Returns each node's keeper and the indices of the tying edges."""
    group = list(range(n))

    def find(x):
        while group[x] != x:
            x = group[x]
        return x

    for x, y, one in zip(a, b, as_one, strict=True):
        if one:
            group[max(find(x), find(y))] = min(find(x), find(y))
    head = {}
    for x in sorted(range(n), key=lambda x: rank[x]):
        head.setdefault(find(x), x)
    neighbours = {g: set() for g in head}
    for x, y, one in zip(a, b, as_one, strict=True):
        if not one and find(x) != find(y):
            neighbours[find(x)].add(find(y))
            neighbours[find(y)].add(find(x))
    keeper_group = {}
    for g in sorted(head, key=lambda g: rank[head[g]]):
        kept = [k for k in neighbours[g] if keeper_group.get(k) == k]
        keeper_group[g] = min(kept, key=lambda k: rank[head[k]]) if kept else g
    keeper_of = [head[keeper_group[find(x)]] for x in range(n)]
    ties = {
        i for i, (x, y, one) in enumerate(zip(a, b, as_one, strict=True))
        if one or keeper_group[find(x)] == find(y) or keeper_group[find(y)] == find(x)
    }  # fmt: skip
    return keeper_of, ties


@pytest.mark.parametrize("max_rounds", [32, 2, 0])
@pytest.mark.parametrize("seed", range(6))
def test_star_keepers_are_the_one_at_a_time_greedy_on_random_graphs(seed, max_rounds):
    """Chains, stars, cliques and sparse random edges, with some edges joining their ends as one
    image: the rounds (and the one-at-a-time finish after max_rounds) give the greedy's keepers
    and ties exactly."""
    from pipeline.dedup.components import star_keepers

    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    rank = rng.permutation(n)
    order = rng.permutation(n)
    a, b = [], []
    for _ in range(3):  # a chain, ranks in the chain's order or not (long chains of ever better groups)
        path = order[rng.integers(0, n, int(rng.integers(2, 40)))]
        if rng.random() < 0.5:
            path = path[np.argsort(rank[path])]
        a += path[:-1].tolist()
        b += path[1:].tolist()
    centre = int(order[0])
    a += [centre] * 20
    b += rng.integers(0, n, 20).tolist()
    clique = rng.integers(0, n, 8)
    for i in range(8):
        for j in range(i + 1, 8):
            a.append(int(clique[i]))
            b.append(int(clique[j]))
    a += rng.integers(0, n, n // 2).tolist()
    b += rng.integers(0, n, n // 2).tolist()
    a, b = zip(*[(x, y) for x, y in zip(a, b, strict=True) if x != y], strict=True)
    as_one = (rng.random(len(a)) < 0.15).tolist()
    index = np.array([*a, *b], dtype=np.int32)
    keeper_of, ties = star_keepers(index, np.array(as_one), rank, max_rounds)
    want_keepers, want_ties = greedy_stars(n, list(a), list(b), as_one, rank.tolist())
    assert keeper_of.tolist() == want_keepers
    assert set(np.flatnonzero(ties).tolist()) == want_ties


# --- stage on hand-made crawl shards ----------------------------------------------------------------


def colour(v: int) -> str:
    return f"{v:x}" * 48


def picture(seed: int, brighter: int = 0) -> str:
    """A colour_sig with structure (16 cells of their own colours), optionally `brighter` by 4-bit steps."""
    cells = random.Random(seed).choices(range(4, 12), k=48)
    return "".join(f"{v + brighter:x}" for v in cells)


def key_of(digest: str) -> int:
    """The crawl's sha256_key of a digest; the made-up digests of some tests ("s" * 64) are not
    hex, and are keyed by a digest of their own."""
    try:
        return schema.sha256_key(digest)
    except ValueError:
        return schema.sha256_key(hashlib.sha256(digest.encode()).hexdigest())


def crawl_rows(rows: list[dict]) -> pa.Table:
    """Crawl-shaped rows; fields not given are those of a successful 100x100 image."""
    full = []
    for r in rows:
        uid = r.get("uid") or hashlib.sha256(repr(r).encode()).hexdigest()[:32]
        sha = r.get("sha", hashlib.sha256(uid.encode()).hexdigest())
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
                "sha256": sha,
                "sha256_key": key_of(sha),
                "md5": r.get("md5"),
                "http_status": 200,
                "bytes": r.get("bytes", 1000),
                "format": "jpeg",
                "attempts": 1,
                "fetch_ms": 1.0,
                "phash": r.get("phash", random.Random(uid).getrandbits(64) - (1 << 63)),
                "colour_sig": r.get("colour", colour(random.Random(uid + "c").randrange(16))),
                "window_sig": r.get("windows"),  # None: the whole image's phash and colour_sig only
                "pixel_hash": r.get("pixels", random.Random(uid + "p").getrandbits(64) - (1 << 63)),
                "pdq": r.get("pdq", f"{random.Random(uid + 'q').getrandbits(256):064x}"),
                "pdq_quality": r.get("pdq_quality", 100),
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


@pytest.mark.parametrize("odd_uid", ["z-odd", "e" * 32])
def test_dup_of_is_the_keepers_uid_whatever_the_uids_look_like(tmp_path, odd_uid):
    # docs/design.md's uids come back from their parsed halves; any other uid (one is enough) makes
    # every uid come from the crawl's strings. Both give the same dup_of.
    low = "0023456789abcdef" * 2
    shards = [
        [{"uid": "f" * 32, "sha": "ab" * 32}, {"uid": "0123456789abcdef" * 2, "sha": "cd" * 32}],
        [{"uid": odd_uid, "sha": "ab" * 32, "w": 500}, {"uid": low, "sha": "cd" * 32}],
    ]
    out = dedup(store_with_shards(tmp_path, shards))
    assert out["dup_of"].to_list() == [odd_uid, low, None, None]


def windows(hashes: list[int], grids: list[bytes], texture: int = 40) -> bytes:
    """A crawl window_sig: per window (images.WINDOWS), its pHash, 48 colour bytes and texture."""
    return b"".join(
        (h & (1 << 64) - 1).to_bytes(8, "big") + g + bytes([texture]) for h, g in zip(hashes, grids, strict=True)
    )


def test_a_corner_window_alone_is_not_a_duplicate_two_corners_or_the_centre_are(tmp_path):
    rng = random.Random(7)
    grid = [bytes(rng.randrange(40, 200) for _ in range(48)) for _ in range(6)]
    base = [rng.getrandbits(64) for _ in range(6)]
    brighter = [bytes(min(255, round(v * 1.1 + 5)) for v in g) for g in grid]  # fits: gain and offset

    def mixed(same: set[int]) -> bytes:
        """Windows in `same`: base's, 3 bits away and brighter; the others: another picture's."""
        hashes = [flip(base[w], [1, 20, 40]) if w in same else rng.getrandbits(64) for w in range(6)]
        others = [bytes(rng.randrange(256) for _ in range(48)) for _ in range(6)]
        return windows(hashes, [brighter[w] if w in same else others[w] for w in range(6)])

    rows = [
        {"uid": "orig", "windows": windows(base, grid), "w": 300},
        {"uid": "one-corner", "windows": mixed({5})},
        {"uid": "two-corners", "windows": mixed({2, 3})},
        {"uid": "centre", "windows": mixed({1})},
        {"uid": "whole", "windows": mixed({0})},
        {"uid": "flat-centre", "windows": windows(
            [flip(base[1], [3]) if w == 1 else rng.getrandbits(64) for w in range(6)], [grid[1]] * 6, texture=2)},
    ]  # fmt: skip
    out = dedup(store_with_shards(tmp_path, [rows[:3], rows[3:]]), caption=False)
    got = {r["uid"]: (r["dup_of"], r["dup_reason"]) for r in out.iter_rows(named=True)}
    assert got == {
        "orig": (None, None),
        "one-corner": (None, None),  # one corner of 4/9 of the image: two other pictures can share it
        "two-corners": ("orig", "near"),
        "centre": ("orig", "near"),
        "whole": ("orig", "near"),
        "flat-centre": (None, None),  # a flat window (texture 2) never matches
    }
    whole_only = dedup(store_with_shards(tmp_path, [rows[:3], rows[3:]], "whole"), caption=False, near_windows=1)
    assert whole_only.filter(pl.col("dup_of").is_not_null())["uid"].to_list() == ["whole"]


def test_reasons_rules_and_keep_policy(tmp_path):
    base = -1234567890123456789
    rows = [
        {"uid": "a1", "phash": base, "colour": picture(1), "w": 300},
        {"uid": "a2", "phash": flip(base, [1, 9, 20]), "colour": picture(1, brighter=2)},  # near: 3 bits, brighter
        {"uid": "a3", "phash": flip(base, [1, 9, 20, 33]), "colour": picture(2)},  # 4 bits but other colours
        {"uid": "b1", "pixels": -12, "w": 50},  # same pixels, other bytes
        {"uid": "b2", "pixels": -12, "w": 50},
        {"uid": "c1", "phash": 77, "caption": "A Red  Star", "colour": colour(3)},
        {"uid": "c2", "phash": flip(77, list(range(12))), "caption": "a red star", "colour": colour(3)},  # caption
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


def test_a_crawl_made_before_window_signatures_dedups_on_the_whole_image(tmp_path):
    """A crawl parquet without the window_sig column: near duplicates from phash and colour_sig alone."""
    base = -1234567890123456789
    rows = [
        {"uid": "a1", "phash": base, "colour": picture(1), "w": 300},
        {"uid": "a2", "phash": flip(base, [1, 9, 20]), "colour": picture(1, brighter=2)},
        {"uid": "a3", "phash": flip(base, [1, 9, 20, 33]), "colour": picture(2)},
    ]
    store = store_with_shards(tmp_path, [rows])
    old = store.read_parquet("crawl/00000.parquet")
    store.write_parquet("crawl/00000.parquet", old.drop_columns(["window_sig"]))
    out = dedup(store, caption=False)
    assert out.select("uid", "dup_of").rows() == [("a1", None), ("a2", "a1"), ("a3", None)]


def test_dup_reason_is_the_members_relation_to_its_keeper(tmp_path):
    """Four byte-identical copies near a larger original point to it as `near`, not `exact_bytes`:
    the keeper has other bytes. A member joined to the keeper by exact bytes stays exact_bytes,
    and a chain exact_bytes -> exact_pixels -> keeper is exact_pixels (the weakest link of the
    strongest path)."""
    base = 0x1234_5678_9ABC_DEF0
    rows = [
        {"uid": "k", "phash": base, "colour": colour(5), "w": 400, "pixels": 1},
        *({"uid": f"copy{i}", "sha": "ee" * 32, "phash": flip(base, [3, 40]), "colour": colour(5)} for i in range(4)),
        {"uid": "m", "phash": 99, "colour": colour(2), "w": 400, "pixels": 7, "sha": "aa" * 32},
        {"uid": "m-bytes", "phash": 99, "colour": colour(2), "pixels": 7, "sha": "aa" * 32},
        {"uid": "m-pixels", "phash": 99, "colour": colour(2), "pixels": 7, "sha": "bb" * 32},
        {"uid": "m-pixels-bytes", "phash": 99, "colour": colour(2), "pixels": 8, "sha": "bb" * 32},
    ]
    store = store_with_shards(tmp_path, [rows[:3], rows[3:]])
    out = dedup(store, caption=False)
    got = {r["uid"]: (r["dup_of"], r["dup_reason"]) for r in out.iter_rows(named=True)}
    assert got == {
        "k": (None, None),
        **{f"copy{i}": ("k", "near") for i in range(4)},
        "m": (None, None),
        "m-bytes": ("m", "exact_bytes"),
        "m-pixels": ("m", "exact_pixels"),
        "m-pixels-bytes": ("m", "exact_pixels"),  # bytes of m-pixels, whose pixels are m's
    }
    by_reason = store.read_json(marker_path("dedup/_components", 0))["stats"]["by_reason"]
    assert by_reason == {"exact_bytes": 1, "exact_pixels": 2, "near": 4}  # the counts follow the relation


def test_a_duplicate_matches_its_keeper_itself_unless_clusters_are_components(tmp_path):
    """A~B~C with A and C 12 bits apart (over near_threshold 10): B is A's duplicate and C is kept,
    as C is not a copy of A; `clusters: components` makes it one cluster. Images with identical
    signatures count as one image: the reduce links r, k and s to the first of them only (a star),
    and the keeper k, larger but not first, still takes both."""
    base = -1234567890123456789
    b = flip(base, list(range(6)))
    sig = {"colour": picture(1), "phash": 4242424242}
    rows = [
        {"uid": "a", "phash": base, "colour": picture(1), "w": 300},
        {"uid": "b", "phash": b, "colour": picture(1), "w": 200},
        {"uid": "c", "phash": flip(b, list(range(20, 26))), "colour": picture(1)},
        {"uid": "r", **sig},
        {"uid": "k", **sig, "w": 300},
        {"uid": "s", **sig},
    ]
    got = {}
    for clusters in ("star", "components"):
        out = dedup(store_with_shards(tmp_path, [rows[:2], rows[2:]], clusters), caption=False, clusters=clusters)
        got[clusters] = {r["uid"]: (r["dup_of"], r["dup_reason"], r["cluster_size"]) for r in out.iter_rows(named=True)}
    assert got["star"] == {
        "a": (None, None, 2),
        "b": ("a", "near", 2),
        "c": (None, None, 1),
        "r": ("k", "near", 3),
        "k": (None, None, 3),
        "s": ("k", "near", 3),
    }
    assert got["components"] == {**got["star"], "a": (None, None, 3), "b": ("a", "near", 3), "c": ("a", "near", 3)}


def test_a_held_radius_finds_a_copy_the_falling_one_misses_in_batches_of_pairs(tmp_path):
    """5,000 images: the radius the pair budget allows is 8 bits; held from 2,000 images it stays 10,
    so a copy 10 bits away is found. A reduce task joins its candidate pairs in batches of
    pairs_per_batch, with the same output as all at once."""
    rng = random.Random(5)
    rows = [{"uid": f"{i:032x}", "phash": rng.getrandbits(64) - (1 << 63), "colour": picture(i)} for i in range(5000)]
    # 10 bits, one in each of the 9 blocks of the radius-8 layout (8 bits, then 7 each): no table shares a key
    copy = flip(rows[0]["phash"], [0, 1, 8, 15, 22, 29, 36, 43, 50, 57])
    rows[4999] = {**rows[4999], "phash": copy, "colour": picture(0), "w": 90}
    shards = [rows[:2500], rows[2500:]]
    store = store_with_shards(tmp_path, shards, "plain")
    plain = dedup(store, caption=False)
    assert store.read_json("dedup/_plan.json")["near_index"]["radius"] == 8
    store = store_with_shards(tmp_path, shards, "held")
    held = dedup(store, caption=False, hold_radius_from=2000)
    plan = store.read_json("dedup/_plan.json")
    assert plan["near_index"]["radius"] == 10 and plan["partitions"] == 1
    assert plain.filter(pl.col("dup_of").is_not_null()).height == 0
    found = held.filter(pl.col("dup_of").is_not_null()).select("uid", "dup_of").rows()
    assert found == [(rows[4999]["uid"], rows[0]["uid"])]
    store = store_with_shards(tmp_path, shards, "spread")
    spread = dedup(store, caption=False, hold_radius_from=2000, pairs_per_batch=20_000)
    assert spread.equals(held)


def test_pair_batches_keep_groups_whole_and_pairs_bounded():
    from pipeline.dedup.edges import pair_batches

    rng = np.random.default_rng(2)
    group = np.repeat(rng.permutation(3000), rng.integers(1, 40, 3000))
    rows = pl.DataFrame({"group": group, "gid": np.arange(len(group))})
    assert pair_batches(rows, 10**9) == [rows]
    batches = pair_batches(rows, 5000)
    assert len(batches) > 20
    assert sorted(pl.concat(batches)["gid"].to_list()) == list(range(len(group)))
    seen = set()
    for batch in batches:
        groups = set(batch["group"].unique().to_list())
        assert not groups & seen  # a group is in one batch, whole
        seen |= groups
        sizes = batch.group_by("group").len()["len"].to_numpy()
        pairs = sizes * (sizes - 1) // 2
        assert pairs.sum() - pairs.max() < 5000  # under the budget but for one group


def test_different_captions_can_be_kept(tmp_path):
    same = {"sha": "ee" * 32, "pixels": 1 << 62, "phash": 42, "colour": colour(1)}  # one image, three captions
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
    store = store_with_shards(tmp_path, [[{"uid": "a"}]])
    with pytest.raises(ConfigError, match="dedup.semantic needs dedup.semantic_checkpoint"):
        dedup(store, semantic=True)
    with pytest.raises(ConfigError, match="semantic_threshold must be a cosine"):
        dedup(store, semantic=True, semantic_checkpoint="x", semantic_threshold=1.5)
    with pytest.raises(Exception, match="no-such-run: a directory without checkpoints/latest.json, config.json"):
        (tmp_path / "no-such-run").mkdir()
        dedup(store, semantic=True, semantic_checkpoint=str(tmp_path / "no-such-run"))
    assert not store.list("dedup/_embed")  # refused on the driver, before any task


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def components_of(nodes: np.ndarray, a: np.ndarray, b: np.ndarray) -> set[frozenset]:
    """Connected components (of two or more nodes) as a set of node sets."""
    found, label = connected_components(a, b) if len(a) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    groups: dict[int, set] = {}
    for n, lab in zip(found.tolist(), label.tolist(), strict=True):
        groups.setdefault(lab, set()).add(n)
    return {frozenset(g) for g in groups.values()}


def brute_force_components(x: np.ndarray, gid: np.ndarray, threshold: float) -> set[frozenset]:
    sim = x @ x.T
    i, j = np.nonzero(np.triu(sim >= threshold, k=1))
    return components_of(gid, gid[i], gid[j])


def planted_embeddings(seed: int = 0, dim: int = 32):
    """Distinct random directions, groups of noisy copies (one of 300), and a chain whose ends are far apart."""
    rng = np.random.default_rng(seed)
    distinct = unit(rng.normal(size=(200, dim)))
    groups = [unit(distinct[i] + rng.normal(scale=0.02, size=(n, dim))) for i, n in ((0, 3), (1, 2), (2, 300))]
    start, direction = unit(rng.normal(size=(2, dim)))
    chain = unit(np.array([start + t * direction for t in (0.0, 0.15, 0.3, 0.45)]))
    x = np.concatenate([distinct, *groups, chain]).astype(np.float32)
    gid = rng.permutation(np.arange(len(x), dtype=np.int64) * 7 + (5 << 32))
    return x, gid, chain


@pytest.mark.parametrize(
    ("block", "spill", "max_floats"), [(1024, 2_000_000, 1 << 24), (16, 500, 1 << 24), (16, 500, 2000)]
)
def test_semantic_edges_are_the_components_of_the_cosine_graph(block, spill, max_floats):
    from pipeline.dedup.semantic import semantic_edges

    x, gid, chain = planted_embeddings()
    threshold = 0.98
    assert float(chain[0] @ chain[-1]) < threshold < float(min(chain[i] @ chain[i + 1] for i in range(3)))
    edges = semantic_edges(np.zeros(len(x), np.int64), gid, x, threshold, block, spill, max_floats)
    got = components_of(gid, edges["a"].to_numpy(), edges["b"].to_numpy())
    expected = brute_force_components(x, gid, threshold)
    assert got == expected
    assert sorted(len(g) for g in expected) == [2 + 1, 3 + 1, 4, 300 + 1]  # groups with their originals, the chain
    assert edges.height == sum(len(g) - 1 for g in expected)  # a star per group: 302 copies, 301 edges
    assert set(edges["reason"].to_list()) == {4}  # REASONS.index("semantic")
    # Split into k-means clusters, pairs are only compared within a cluster.
    cluster = (np.arange(len(x)) % 2).astype(np.int64)
    edges = semantic_edges(cluster, gid, x, threshold, block, spill, max_floats)
    inside = set().union(*(brute_force_components(x[cluster == c], gid[cluster == c], threshold) for c in (0, 1)))
    assert components_of(gid, edges["a"].to_numpy(), edges["b"].to_numpy()) == inside
    assert inside != expected  # the split did cut groups: recall is lost at cluster borders


def test_spherical_kmeans_finds_planted_clusters_and_is_deterministic():
    from pipeline.dedup.semantic import nearest, spherical_kmeans

    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(4, 16)))
    truth = np.repeat(np.arange(4), 100)
    x = unit(centres[truth] + rng.normal(scale=0.05, size=(400, 16)))
    centroids = spherical_kmeans(x, 4, iterations=20)
    assert np.array_equal(centroids, spherical_kmeans(x, 4, iterations=20))
    assign = nearest(x, centroids)
    pairs = {(int(t), int(a)) for t, a in zip(truth, assign, strict=True)}
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4  # each planted cluster is exactly one centroid's


def test_balance_splits_large_clusters_and_leaves_copies_and_small_ones_whole():
    from pipeline.dedup.semantic import balance, nearest, spherical_kmeans

    rng = np.random.default_rng(4)
    centres = unit(rng.normal(size=(4, 16)))
    truth = np.repeat(np.arange(4), [40, 40, 40, 400])
    x = unit(centres[truth] + rng.normal(scale=0.05, size=(len(truth), 16))).astype(np.float32)
    copies = np.repeat(unit(rng.normal(size=(1, 16))), 150, axis=0).astype(np.float32)  # one image, 150 times
    x = np.concatenate([x, copies])
    centroids = spherical_kmeans(x, 5, iterations=20)
    assert np.bincount(nearest(x, centroids)).max() == 400
    balanced, assign = balance(x, centroids, nearest(x, centroids), most=100, iterations=20)
    assert np.array_equal(balanced, balance(x, centroids, nearest(x, centroids), most=100, iterations=20)[0])
    assert np.array_equal(assign, nearest(x, balanced))
    sizes = np.bincount(assign)
    assert sorted(sizes.tolist())[-1] == 150  # the copies, which cannot split
    assert (np.sort(sizes)[:-1] <= 100).all() and sizes.sum() == len(x) and len(balanced) > 5
    for c in range(3):  # the small planted clusters keep their centroid
        mine = nearest(x[: len(truth)][truth == c], centroids)[0]
        assert any(np.array_equal(centroids[mine], b) for b in balanced)


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
    # The graph steps in many partitions (a few dozen images each): the same clusters, keepers, reasons.
    third = copy_of(crawled_web[0], tmp_path, "c")
    dedup(third, executor="ray", images_per_graph_partition=40)
    assert third.read_json("dedup/_plan.json")["graph_partitions"] >= 8
    final = lambda st: {n: st.read_bytes(n) for n in st.list("dedup", suffix=".parquet") if n.count("/") == 1}  # noqa: E731
    assert final(third) == final(first) and len(final(first)) == 4


def test_a_crawl_that_changed_since_dedup_ran_is_deduped_again(tmp_path):
    store = store_with_shards(tmp_path, [[{"uid": "a", "sha": "ab" * 32}], [{"uid": "b", "sha": "ab" * 32}]])
    assert dedup(store)["dup_of"].to_list() == [None, "a"]
    store.write_parquet("crawl/00002.parquet", crawl_rows([{"uid": "c", "sha": "ab" * 32}]))
    store.write_json(marker_path("crawl", 2), {"stats": {"success": 1}, "config_sha256": "x", "identity": "c1"})
    assert dedup(store)["dup_of"].to_list() == [None, "a", "a"]  # a new plan, every step that reads it redone
    store.write_json(marker_path("crawl", 2), {"stats": {"success": 0}, "config_sha256": "x", "identity": "c2"})
    store.write_parquet("crawl/00002.parquet", crawl_rows([{"uid": "c", "sha": "cd" * 32, "status": "not_found"}]))
    assert dedup(store)["dup_of"].to_list() == [None, "a"]  # the crawl shard redone again: its image is gone
    fresh = store_with_shards(
        tmp_path / "fresh",
        [[{"uid": "a", "sha": "ab" * 32}], [{"uid": "b", "sha": "ab" * 32}], []],
    )
    dedup(fresh)
    assert [store.read_bytes(f"dedup/{s:05d}.parquet") for s in (0, 1)] == [
        fresh.read_bytes(f"dedup/{s:05d}.parquet") for s in (0, 1)
    ]


def test_a_changed_config_redoes_dedup_and_mixes_nothing_in(crawled_web, tmp_path):
    store = copy_of(crawled_web[0], tmp_path, "c")
    dedup(store)
    assert config_sha256(DedupConfig()) != config_sha256(replace(DedupConfig(), near_threshold=4))
    dedup(store, near_threshold=4)
    fresh = copy_of(crawled_web[0], tmp_path, "fresh")
    dedup(fresh, near_threshold=4)
    shards = committed_shards(store, "dedup")
    assert shards == committed_shards(fresh, "dedup") and shards
    for s in shards:
        assert store.read_bytes(f"dedup/{s:05d}.parquet") == fresh.read_bytes(f"dedup/{s:05d}.parquet")


def test_packed_colour_distance_equals_the_string_one():
    from pipeline.dedup.index import colour_distance_packed, pack_colour
    from pipeline.images import colour_distance

    rng = random.Random(3)
    a = ["".join(rng.choice("0123456789abcdef") for _ in range(48)) for _ in range(200)]
    b = [x if i % 3 else "".join(rng.choice("0123456789abcdef") for _ in range(48)) for i, x in enumerate(a)]
    b = [y[:10] + "f" + y[11:] if i % 5 == 1 else y for i, y in enumerate(b)]
    got = colour_distance_packed(pack_colour(pa.array(a)), pack_colour(pa.array(b)))
    assert got.tolist() == [colour_distance(x, y) for x, y in zip(a, b, strict=True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A clipline run trained for two steps on colour swatches: a real checkpoint, weak embeddings."""
    from tests.training.helpers import make_dataset
    from training.data import DataConfig
    from training.trainer import Run, TrainConfig

    root = tmp_path_factory.mktemp("semantic-checkpoint")
    config = TrainConfig(data=str(make_dataset(root / "data", [16])), out=str(root / "run"), max_steps=2,
                         vocab_size=300, context_length=16, loader=DataConfig(batch_size=8, num_workers=0,
                         image_size=32))  # fmt: skip
    Run(config).fit()
    return str(root / "run")


def clusters_of(out: pl.DataFrame) -> set[frozenset]:
    """The dedup output's clusters of two or more images, as sets of uids."""
    grouped = (
        out.with_columns(c=pl.coalesce("dup_of", "uid")).group_by("c").agg("uid").filter(pl.col("uid").list.len() > 1)
    )
    return {frozenset(g) for g in grouped["uid"].to_list()}


def test_semantic_dedup_on_the_synthetic_web(crawled_web, checkpoint, tmp_path):
    import torch

    from pipeline.decode import clip_preprocess
    from pipeline.dedup.semantic import vectors_of
    from pipeline.formats import read_images
    from training.checkpoint import load_model, resolve_checkpoint

    only = dict(exact_bytes=False, exact_pixels=False, near=False, caption=False)
    semantic = dict(semantic=True, semantic_checkpoint=checkpoint, **only)
    # The stored embeddings are the checkpoint's, image for image (float16).
    store = copy_of(crawled_web[0], tmp_path, "probe")
    run_pipeline(list([EMBED_STAGE]), store, RunConfig(out=store.uri, dedup=DedupConfig(**semantic)), executor="inline",
                 progress=False)  # fmt: skip
    model, _ = load_model(resolve_checkpoint(checkpoint))
    uids, stored = [], []
    for s in range(4):
        crawl = store.read_parquet(f"crawl/{s:05d}.parquet")
        embedded = store.read_parquet(f"dedup/_embed/{s:05d}.parquet")
        rows = embedded["gid"].to_numpy() & 0xFFFFFFFF
        images = read_images(store, f"crawl/{s:05d}.tar")
        with torch.no_grad():
            pixels = torch.stack([clip_preprocess(images[k], 32) for k in crawl["key"].take(rows).to_pylist()])
            expected = model.encode_image(pixels).numpy()
        x = vectors_of(embedded["embedding"])
        assert np.abs(x - expected).max() < 2e-3
        assert sorted(crawl.filter(pa.compute.equal(crawl["status"], "success"))["uid"].to_pylist()) == sorted(
            crawl["uid"].take(rows).to_pylist()
        )  # every fetched image embedded, once
        uids += crawl["uid"].take(rows).to_pylist()
        stored.append(x)
    x, uid = np.concatenate(stored), np.array(uids)
    # A threshold in a gap of the pair similarities, so float rounding cannot move a pair across it.
    sims = np.sort((x @ x.T)[np.triu_indices(len(x), 1)])
    window = np.flatnonzero((sims[:-1] > 0.995) & (sims[1:] < 0.9995))
    gap = window[np.argmax(sims[window + 1] - sims[window])]
    threshold = float(sims[gap] + sims[gap + 1]) / 2

    # One k-means cluster (fewer images than semantic_cluster_size): the clusters are exactly the
    # connected components of the graph of pairs with cosine >= threshold.
    out = dedup(copy_of(crawled_web[0], tmp_path, "one"), semantic_threshold=threshold, **semantic)
    gid = np.arange(len(uid), dtype=np.int64)
    expected = {frozenset(uid[list(g)]) for g in brute_force_components(x, gid, threshold)}
    assert clusters_of(out) == expected and len(expected) >= 10
    assert set(out["dup_reason"].drop_nulls().to_list()) == {"semantic"}
    crawled = pl.concat([pl.from_arrow(store.read_parquet(f"crawl/{s:05d}.parquet")) for s in range(4)])
    truth = crawled.select(["uid", "url"]).join(crawled_web[1], on="url")
    copied = truth.filter(pl.col("dup_kind") == "exact")["image_id"].implode()
    exact_groups = truth.filter(
        pl.col("image_id").is_in(copied) & (pl.col("dup_kind").is_null() | (pl.col("dup_kind") == "exact"))
    )
    assert exact_groups["image_id"].n_unique() >= 10

    def exact_copies_together(result: pl.DataFrame) -> bool:  # same bytes, same embedding: always one cluster
        joined = exact_groups.join(result, on="uid").with_columns(c=pl.coalesce("dup_of", "uid"))
        return joined.group_by("image_id").agg(pl.col("c").n_unique())["c"].max() == 1

    assert exact_copies_together(out)

    # Many k-means clusters: pairs are compared within a cluster only, so the clusters refine the above.
    split_store = copy_of(crawled_web[0], tmp_path, "split")
    split = dedup(split_store, semantic_threshold=threshold, semantic_cluster_size=60, **semantic)
    marker = split_store.read_json(marker_path("dedup/_centroids", 0))
    k = -(-len(uid) // 60)
    largest = marker["stats"]["largest_cluster_in_sample"]  # balanced: none over twice the mean of k-means' k
    assert marker["stats"]["clusters"] >= k and largest["balanced"] <= 2 * len(uid) / k + 1 < largest["k_means"]
    got = clusters_of(split)
    assert all(any(g <= e for e in expected) for g in got)
    found = sum(len(g) - 1 for g in got) / sum(len(g) - 1 for g in expected)
    print(
        f"semantic duplicates found with {marker['stats']['clusters']} k-means clusters: {found:.0%} of those with one"
    )
    assert exact_copies_together(split)

    # Deterministic: another run gives the same bytes, and a resumed one too.
    again = copy_of(crawled_web[0], tmp_path, "again")
    dedup(again, semantic_threshold=threshold, semantic_cluster_size=60, **semantic)
    outputs = lambda st: {n: st.read_bytes(n) for n in st.list("dedup") if "_committed" not in n}  # noqa: E731
    assert outputs(again) == outputs(split_store)
    for stage, shards in (("dedup/_embed", [2]), ("dedup/_centroids", [0]), ("dedup/_map", [1])):
        for s in shards:
            again.delete(marker_path(stage, s))
    dedup(again, semantic_threshold=threshold, semantic_cluster_size=60, **semantic)
    assert outputs(again) == outputs(split_store)


def test_exact_keys_are_the_low_60_bits_and_a_missing_hash_is_no_key(tmp_path):
    from pipeline.dedup.index import exact_key

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
    keys = pl.Series([schema.sha256_key(d) for d in digests])
    assert keys.to_list() == [int(d[:15], 16) for d in digests]
    key, present = exact_key(keys)
    assert key.tolist() == keys.to_list() and present.all()
    pixels = pl.Series([-1, (1 << 62) + 5, None, 5], dtype=pl.Int64)
    key, present = exact_key(pixels)
    assert key.tolist()[:2] + key.tolist()[3:] == [(1 << 60) - 1, 5, 5]  # top 4 bits dropped
    assert present.tolist() == [True, True, False, True]
    # Two images without a pixel hash (or a sha256_key) are not duplicates of each other.
    rows = [{"uid": u, "pixels": None} for u in ("p1", "p2")]
    out = dedup(store_with_shards(tmp_path, [rows]), near=False, caption=False)
    assert out["dup_of"].to_list() == [None, None]
    with_sha = [{"uid": u, "pixels": None, "sha": "ab" * 32} for u in ("q1", "q2")]
    out = dedup(store_with_shards(tmp_path, [with_sha], "sha"), near=False, caption=False)
    assert out["dup_reason"].to_list() == [None, "exact_bytes"]


def test_exact_edges_star_each_group_to_its_smallest_node_per_kind():
    from pipeline.dedup.config import KIND_BYTES, KIND_PIXELS
    from pipeline.dedup.edges import exact_edges

    top = (1 << 60) - 1  # the largest 60-bit key
    frame = pl.DataFrame(
        {
            "kind": [KIND_BYTES] * 5 + [KIND_PIXELS] * 4,
            "key": [7, 9, 7, 7, top, 7, 9, 9, top],  # the same key of two kinds: two groups
            "gid": [30, 31, 12, 44, 50, 31, 12, 50, 60],
        },
        schema={"kind": pl.Int8, "key": pl.Int64, "gid": pl.Int64},
    )
    edges = exact_edges(frame).sort(["reason", "a"])
    assert edges.rows() == [(30, 12, KIND_BYTES), (44, 12, KIND_BYTES), (50, 12, KIND_PIXELS)]
    assert exact_edges(frame.clear()).height == 0


@pytest.mark.parametrize("key_range", [2, 50, 1 << 60])
def test_exact_edges_agree_with_a_group_by(key_range):
    """Random keys, few distinct values or many whose high bits collide: the stars are those of
    a plain group-by (each group's non-smallest nodes to its smallest)."""
    from pipeline.dedup.config import KIND_BYTES, KIND_PIXELS
    from pipeline.dedup.edges import exact_edges

    rng = np.random.default_rng(key_range)
    n = 5000
    base = rng.integers(0, key_range, size=n // 2, dtype=np.int64)
    copies = base[rng.integers(0, len(base), size=n - len(base))] ^ rng.integers(0, 4, n - len(base))
    key = np.concatenate([base, copies])
    key &= (1 << 60) - 1
    frame = pl.DataFrame(
        {
            "kind": rng.choice([KIND_BYTES, KIND_PIXELS], size=n).astype(np.int8),
            "key": key,
            "gid": rng.permutation(np.arange(n, dtype=np.int64) * 7 + 3),
        }
    )
    groups = frame.group_by(["kind", "key"]).agg(pl.col("gid").min().alias("head"))
    expected = (
        frame.join(groups, on=["kind", "key"])
        .filter(pl.col("gid") != pl.col("head"))
        .select(a="gid", b="head", reason=pl.col("kind"))
    )
    got = exact_edges(frame)
    assert got.height == expected.height > 0
    assert got.sort(["a", "reason"]).rows() == expected.sort(["a", "reason"]).rows()


def test_a_public_checkpoint_on_s3_scores_embeds_and_evaluates(crawled_web, tmp_path, s3, monkeypatch):
    """OpenAI-named weights on the S3 endpoint: semantic dedup's embeddings, the filter's CLIP score and eval."""
    import torch

    pytest.importorskip("transformers")
    from eval.run import main_eval
    from pipeline.decode import clip_preprocess
    from pipeline.filter import STAGE as FILTER
    from pipeline.filter import FilterConfig
    from pipeline.formats import read_images
    from tests.conftest import BUCKET
    from tests.training.helpers import image_bytes
    from tests.training.test_pretrained import hf_reference, openai_state_dict
    from training.checkpoint import cache_root, load_model

    monkeypatch.setenv("CLIPLINE_CACHE", str(tmp_path / "cache"))
    torch.save(openai_state_dict(hf_reference(seed=4)), tmp_path / "ViT-tiny.pt")
    url = f"s3://{BUCKET}/models-{tmp_path.name}/ViT-tiny.pt"
    open_storage(url.rsplit("/", 1)[0]).put_file(tmp_path / "ViT-tiny.pt", "ViT-tiny.pt")
    store = copy_of(crawled_web[0], tmp_path, "public")
    only = dict(exact_bytes=False, exact_pixels=False, near=False, caption=False)
    run = RunConfig(out=store.uri, dedup=DedupConfig(semantic=True, semantic_checkpoint=url, **only),
                    filter=FilterConfig(preset="none", drop_duplicates=False, clip_checkpoint=url))  # fmt: skip
    run_pipeline([EMBED_STAGE, FILTER], store, run, executor="inline", progress=False)
    assert len(list(cache_root().glob("*/ViT-tiny.pt"))) == 1  # fetched once for both steps
    model, tokenizer = load_model(url)
    crawl = store.read_parquet("crawl/00000.parquet").to_pandas().set_index("uid")
    images = read_images(store, "crawl/00000.tar")
    scored = store.read_parquet("filter/00000.parquet").to_pandas()
    assert len(scored) >= 5 and scored["clip_score"].notna().all()
    with torch.no_grad():
        pixels = torch.stack([clip_preprocess(images[crawl.loc[u, "key"]], 32) for u in scored["uid"]])
        expected = (model.encode_image(pixels) * model.encode_text(tokenizer(list(scored["caption"])))).sum(1)
    assert np.abs(scored["clip_score"].to_numpy() - expected.numpy()).max() < 1e-4
    embedded = store.read_parquet("dedup/_embed/00000.parquet")
    assert embedded.num_rows == int((crawl["status"] == "success").sum())
    folder = tmp_path / "folder"
    for c in ("red", "blue"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            (folder / c / f"{i}.jpg").write_bytes(image_bytes(c, i))
    results = main_eval(url, ["zeroshot"], [str(folder)], str(tmp_path / "eval.json"))
    assert set(results["zeroshot"]["folder"]) >= {"top1"}


def test_clip_wit_preset_end_to_end_on_the_synthetic_web(crawled_web, tmp_path):
    """filter: {preset: clip-wit, metadata: FILE}: matched, counted over every shard, balanced, reported."""
    from pipeline.curation import build_metadata, match
    from pipeline.filter import STAGES as FILTER_STAGES
    from pipeline.filter import FilterConfig
    from pipeline.stats import STAGES as STATS

    store = copy_of(crawled_web[0], tmp_path, "wit")
    crawled = pl.concat([pl.from_arrow(store.read_parquet(f"crawl/{s:05d}.parquet")) for s in range(4)])
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(c for c in crawled["caption"].to_list() if c) + "\n")
    entries = build_metadata(None, [str(corpus)], 5, 5, 2.0)
    (tmp_path / "meta.txt").write_text("\n".join(entries) + "\n")
    config = FilterConfig(preset="clip-wit", metadata=str(tmp_path / "meta.txt"), balance_per_entry=0.01,
                          drop_duplicates=False)  # fmt: skip
    run = RunConfig(out=store.uri, filter=config)
    run_pipeline([*FILTER_STAGES, *STATS], store, run, executor="inline", progress=False)
    out = pl.concat([pl.from_arrow(store.read_parquet(f"filter/{s:05d}.parquet")) for s in range(4)])
    fetched = crawled.filter(pl.col("status") == "success")
    assert sorted(out["uid"].to_list()) == sorted(fetched["uid"].to_list())
    expected_ids = match(out["caption"], tuple(entries))
    assert out["metadata_ids"].to_list() == expected_ids.to_list()
    reasons = dict(out["drop_reason"].value_counts().iter_rows())
    unmatched = out.filter(pl.col("metadata_ids").list.len() == 0)
    assert not unmatched["keep"].any()  # unmatched: dropped, by an earlier rule or as no_metadata_match
    assert (unmatched["drop_reason"] == "no_metadata_match").sum() == reasons["no_metadata_match"] > 0
    assert reasons.get("balanced_out", 0) > 0 and out["keep"].sum() > 0
    pool = out.filter(pl.col("drop_reason").is_null() | (pl.col("drop_reason") == "balanced_out"))
    t = max(1.0, 0.01 * pool.height)
    kept = out.filter("keep").select(pl.col("metadata_ids").explode()).to_series().value_counts()
    before = pool.select(pl.col("metadata_ids").explode()).to_series().value_counts()
    before = dict(before.iter_rows())
    for entry, n in kept.iter_rows():  # no entry keeps many more than t of its rows unless others keep them too
        assert n <= before[entry]
    assert max(n for _, n in kept.iter_rows()) < max(before.values())  # the head was cut
    report = store.read_json("dataset/stats/stats.json")
    assert report["metadata"]["before"]["head"][0][1] == max(before.values())
    assert report["drop_reasons"]["filter/balanced_out"] == reasons["balanced_out"]
    assert t < max(before.values())
