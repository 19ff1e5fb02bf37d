"""CLIP-style curation: metadata matching (vs brute force), exact global counts, deterministic balanced sampling."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import polars as pl
import pytest

from pipeline import curation
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.filter import STAGES as FILTER_STAGES
from pipeline.filter import FilterConfig
from pipeline.runner import run_pipeline
from pipeline.stage import marker_path
from tests.pipeline.test_dedup import store_with_shards


def metaclip_spacing(text: str | None) -> str:
    """MetaCLIP's spacing, written out the plain way (the reference the vectorised form is checked against)."""
    text = f" {text or ''} "
    for p in ",.;:?!`":
        text = text.replace(p, f" {p} ")
    for c in "\t\n\r":
        text = text.replace(c, " ")
    return text


def brute_force(captions, entries, ignore_case=False):
    """`" " + entry + " " in spaced caption`, entry by entry; with ignore_case, entries equal after lower-casing
    are one entry (the first one's id)."""
    key = (lambda e: e.lower()) if ignore_case else (lambda e: e)  # noqa: E731
    first = {}
    for i, e in enumerate(entries):
        first.setdefault(key(e), i)
    out = []
    for c in captions:
        text = key(metaclip_spacing(c))
        out.append(sorted({first[key(e)] for e in entries if f" {key(e)} " in text}))
    return out


ENTRIES = ("new", "new york", "york", "york city", "city", "New York", "cat", "Café", "café au lait", "au", "lait",
           "日本", "東京 タワー", "🐱", "Straße", "hot dog", "dog", "hot", "e.g", "don't")  # fmt: skip
CAPTIONS = [
    "New York city, at night.",
    "a new york city cat!",
    "york",
    None,
    "",
    "the cat\tsat on a hot dog stand;dog",
    "Café au lait: café au lait? CAFÉ",
    "日本 の 東京 タワー 🐱 cat",
    "Straße und STRASSE",
    "don't stop, e.g. now",
    "newyork yorkcity catcat",
]


@pytest.mark.parametrize("ignore_case", [False, True])
def test_matching_equals_brute_force(ignore_case):
    got = curation.match(pl.Series(CAPTIONS), ENTRIES, ignore_case).to_list()
    assert got == brute_force(CAPTIONS, ENTRIES, ignore_case)
    assert got[0] == ([0, 1, 2, 3, 4] if ignore_case else [4, 5])  # prefixes and overlaps all found
    # random captions over a small vocabulary, entries of 1-3 words that overlap and prefix each other
    rng = random.Random(7)
    vocab = ["red", "car", "red car", "big", "big red", "Dog", "dog", "ünï", "x.y", "a", "b"]
    entries = tuple(dict.fromkeys(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3))) for _ in range(60)))
    captions = [
        "".join(
            rng.choice(vocab) + rng.choice([" ", " ", ", ", ".", "!", "\t", "  "]) for _ in range(rng.randint(0, 9))
        )
        for _ in range(2000)
    ]
    assert curation.match(pl.Series(captions), entries, ignore_case).to_list() == brute_force(
        captions, entries, ignore_case
    )


def uid(i: int) -> str:
    return hashlib.sha256(f"row {i}".encode()).hexdigest()[:32]


def test_draws_are_deterministic_uniform_and_depend_on_uid_and_entry():
    uids = pl.Series([uid(i) for i in range(20000)])
    rows = np.arange(20000)
    a = curation.draws(uids, np.full(20000, 3), rows)
    assert np.array_equal(a, curation.draws(uids, np.full(20000, 3), rows))
    b = curation.draws(uids, np.full(20000, 4), rows)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03 and ((a >= 0) & (a < 1)).all()
    counts, _ = np.histogram(a, bins=10, range=(0, 1))
    assert counts.min() > 1800 and counts.max() < 2200  # uniform within ~5 sd


def test_threshold_is_a_count_or_a_fraction_of_the_pool():
    assert curation.threshold(20000, 10**9) == 20000
    assert curation.threshold(0.001, 400_000) == 400
    assert curation.threshold(1e-9, 10) == 1.0


def test_balancing_counts_are_exact_across_shards_and_the_kept_fraction_is_t_over_count(tmp_path):
    """3 shards; 'apple' on 3,000 rows, 'boat' on 900, 'cat' on 60, both apple and boat on 300, nothing on 240."""
    plan = ["apple"] * 3000 + ["boat"] * 900 + ["cat"] * 60 + ["apple and boat"] * 300 + ["nothing here"] * 240
    random.Random(1).shuffle(plan)
    rows = [{"uid": uid(i), "caption": f"a photo, {c}."} for i, c in enumerate(plan)]
    shards = [rows[0:1700], rows[1700:3100], rows[3100:]]
    (tmp_path / "meta.txt").write_text("apple\nboat\ncat\nunused entry\napple\n")  # a repeated entry counts once
    config = FilterConfig(preset="none", drop_duplicates=False, metadata=str(tmp_path / "meta.txt"),
                          metadata_match=True, balance_per_entry=300, metadata_partitions=3)  # fmt: skip
    store = store_with_shards(tmp_path, shards)
    run_pipeline(list(FILTER_STAGES), store, RunConfig(out=store.uri, filter=config), executor="inline",
                 progress=False)  # fmt: skip
    counted = pl.concat([store.read_frame(r) for r in store.list("filter/_counts", suffix=".parquet")]).sort("entry")
    assert dict(counted.select("entry", "count").iter_rows()) == {-1: 4260, 0: 3300, 1: 1200, 2: 60}  # pool, apple..
    assert counted["name"].to_list() == [None, "apple", "boat", "cat"]
    out = pl.concat([store.read_frame(f"filter/{s:05d}.parquet") for s in range(3)])
    assert out.height == 4500
    reasons = dict(out["drop_reason"].value_counts().iter_rows())
    assert reasons["no_metadata_match"] == 240
    by = out.with_columns(c=pl.col("caption").str.extract(r"a photo, (.*)\.")).group_by("c").agg(pl.col("keep").sum())
    kept = dict(by.iter_rows())
    assert kept["cat"] == 60 and kept["nothing here"] == 0  # count <= t: every row kept
    for name, n, p in (("apple", 3000, 300 / 3300), ("boat", 900, 300 / 1200),
                       ("apple and boat", 300, 1 - (1 - 300 / 3300) * (1 - 300 / 1200))):  # fmt: skip
        sd = math.sqrt(n * p * (1 - p))
        assert abs(kept[name] - n * p) < 4.5 * sd, (name, kept[name], n * p)
    assert reasons["balanced_out"] == 4260 - out["keep"].sum()
    marker = store.read_json(marker_path("filter", 0))
    assert marker["stats"]["balance_t"] == 300 and marker["stats"]["pool"] == 4260

    # The report: each entry's rows before balancing (the global counts) and after (the kept rows).
    from pipeline.stats import StatsConfig, collect, metadata_html

    meta = collect(store, StatsConfig())["metadata"]
    assert meta["before"]["head"] == [["apple", 3300], ["boat", 1200], ["cat", 60]]
    kept_rows = out.filter("keep").select(pl.col("metadata_ids").explode()).to_series().value_counts()
    after = {["apple", "boat", "cat"][e]: n for e, n in kept_rows.iter_rows()}
    assert dict(meta["after"]["head"]) == after and after["cat"] == 60
    assert meta["before"]["curve"] == [[1, 3300], [2, 1200], [3, 60]]
    page = metadata_html(meta)
    assert "<polyline" in page and "apple" in page and "before balancing" in page

    # Deterministic: another store gives the same rows; a resumed final step too.
    again = store_with_shards(tmp_path, shards, name="again")
    run_pipeline(list(FILTER_STAGES), again, RunConfig(out=again.uri, filter=config), executor="inline",
                 progress=False)  # fmt: skip
    same = lambda st: [st.read_bytes(f"filter/{s:05d}.parquet") for s in range(3)]  # noqa: E731
    assert same(again) == same(store)
    again.delete(marker_path("filter", 1))
    again.delete("filter/00001.parquet")
    run_pipeline(list(FILTER_STAGES), again, RunConfig(out=again.uri, filter=config), executor="inline",
                 progress=False)  # fmt: skip
    assert same(again) == same(store)


def test_metadata_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="needs filter.metadata"):
        FilterConfig(preset="clip-wit").rules()
    with pytest.raises(ConfigError, match="needs metadata_match"):
        FilterConfig(preset="none", balance_per_entry=10).rules()
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        curation.load_metadata(str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="no such|not found|missing|cannot"):
        curation.load_metadata(str(tmp_path / "none.txt"))


def test_build_metadata_from_wordnet_and_a_corpus(tmp_path):
    wordnet = tmp_path / "wordnet"
    wordnet.mkdir()
    (wordnet / "index.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by\n"
        "hot_dog n 1 1 @ 1 0 07697537\nnew_york n 2 1 @ 2 0 09119277 08695539\ncat n 8 4 ! @ ~ #m 8 1 02121620\n"
    )
    (wordnet / "index.adj").write_text("red a 1 1 & 1 0 00381097\n")
    corpus = tmp_path / "corpus.txt"
    lines = ["the ice cream is cold"] * 40 + ["the dog runs"] * 30 + ["a cat and the dog"] * 5
    corpus.write_text("\n".join(lines) + "\n")
    entries = curation.build_metadata(str(wordnet), [str(corpus)], min_count=30, bigram_min_count=30, min_pmi=1.6)
    assert entries[:4] == ["hot dog", "new york", "cat", "red"]
    assert {"the", "dog", "ice", "cream", "ice cream"} <= set(entries)  # frequent words, a high-PMI bigram
    assert "the dog" not in entries and "the ice" not in entries  # "the" is everywhere: PMI ln 4.2 < 1.6
    assert "runs" in entries and "cat" in entries and len(entries) == len(set(entries))
