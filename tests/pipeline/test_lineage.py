"""Lineage across stages on the crawled web: a change upstream is followed by exactly what depends on it."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import polars as pl

from pipeline import layout
from pipeline import stages as registry
from pipeline.cli import main
from pipeline.config import RunConfig, dump_config, load_config
from pipeline.dedup import STAGES as DEDUP_STAGES
from pipeline.filter import FilterConfig
from pipeline.manifest import read_manifest, verify
from pipeline.runner import run_pipeline
from pipeline.shard import ShardConfig
from pipeline.status import status
from pipeline.storage import open_storage
from pipeline.variants import VariantStorage, variant_config
from tests.pipeline.test_crawl import run_config

AFTER_CRAWL = ["dedup", "filter", "shard", "stats"]


def copy_crawl(crawled_web, tmp_path, name="run"):
    shutil.copytree(crawled_web[0].uri, tmp_path / name)
    return open_storage(tmp_path / name)


def config_for(store, web_root: Path, **filter_settings) -> RunConfig:
    """The crawled web's own ingest and crawl settings (so those stay committed), then the stages after."""
    base = run_config(store.uri, web_root, shard_size=120)
    return replace(base, filter=FilterConfig(**filter_settings), shard=ShardConfig(samples_per_shard=40))


def run(store, config, names=AFTER_CRAWL) -> dict:
    reports = run_pipeline(registry.select(names), store, config, executor="inline", progress=False)
    return {r.stage: r for r in reports}


def kept(store) -> int:
    return sum(
        int(pl.read_parquet(Path(store.uri) / layout.filter_parquet(s))["keep"].sum())
        for s in sorted(int(p.stem) for p in (Path(store.uri) / "filter").glob("*.parquet"))
    )


def test_a_changed_filter_preset_makes_shard_manifest_and_stats_follow(crawled_web, tmp_path):
    store = copy_crawl(crawled_web, tmp_path)
    web_root = Path(crawled_web[0].uri).parent / "web"
    first = run(store, config_for(store, web_root, preset="basic"))
    before = read_manifest(f"{store.uri}/{layout.MANIFEST}")
    assert before.data["num_samples"] == kept(store)

    second = run(store, config_for(store, web_root, preset="none"))
    manifest = read_manifest(f"{store.uri}/{layout.MANIFEST}")
    stats = store.read_json(layout.STATS_JSON)
    # the dataset is what its filter now says, without deleting anything by hand
    assert manifest.data["num_samples"] == kept(store) == stats["funnel"]["final"] > before.data["num_samples"]
    assert verify(manifest) == []
    # what did not depend on the change was not redone
    for step in [s.name for s in DEDUP_STAGES if s.name not in ("dedup/_embed", "dedup/_centroids")]:
        assert second[step].ran == [] and second[step].skipped == first[step].ran, step
    assert second["filter"].ran == [0, 1, 2, 3]
    assert set(second["filter"].stale.values()) == {"its stage config changed"}
    # a filter shard whose output came out byte-identical under the new preset is not indexed again
    changed = sorted(set(second["filter"].ran) - set(second["filter"].unchanged))
    assert changed and second["shard/_index"].ran == changed and second["shard/_manifest"].ran == [0]
    assert set(second["shard"].ran) == set(range(len(manifest.shards)))
    # and a third run redoes nothing at all but the report
    third = run(store, config_for(store, web_root, preset="none"))
    assert {step for step, r in third.items() if r.ran} == {"stats/_crawl", "stats/_final", "stats"}


def test_an_edited_blocklist_redoes_only_the_shards_it_touches(crawled_web, tmp_path):
    store = copy_crawl(crawled_web, tmp_path)
    web_root = Path(crawled_web[0].uri).parent / "web"
    blocklist = tmp_path / "abuse.txt"
    blocklist.write_text("# image hashes\n")
    config = config_for(store, web_root, blocklist_image_sha256=(str(blocklist),))
    run(store, config)
    before = read_manifest(f"{store.uri}/{layout.MANIFEST}").data["num_samples"]
    # one kept image of crawl shard 2, whose bytes appear nowhere else
    filt = pl.read_parquet(Path(store.uri) / layout.filter_parquet(2)).filter(pl.col("keep"))
    crawl = pl.concat([pl.read_parquet(Path(store.uri) / layout.crawl_parquet(s)) for s in range(4)])
    counts = crawl.group_by("sha256").len()
    once = filt.join(crawl.select("uid", "sha256"), on="uid").join(counts, on="sha256").filter(pl.col("len") == 1)
    victim = once.row(0, named=True)
    blocklist.write_text(f"# image hashes\n{victim['sha256']}\n")

    again = run(store, config)
    assert again["filter"].ran == [0, 1, 2, 3]  # every shard read the list again ...
    assert again["filter"].unchanged == [0, 1, 3]  # ... and only shard 2 came out different
    assert set(again["filter"].stale.values()) == {f"input changed: config-file:{blocklist}"}
    assert again["shard/_index"].ran == [2] and again["shard/_index"].skipped == [0, 1, 3]
    for step in [s.name for s in DEDUP_STAGES if s.name not in ("dedup/_embed", "dedup/_centroids")]:
        assert again[step].ran == [], step
    manifest = read_manifest(f"{store.uri}/{layout.MANIFEST}")
    assert manifest.data["num_samples"] == before - 1 and verify(manifest) == []
    final = pl.concat([pl.read_parquet(Path(store.uri) / "dataset" / s["parquet"]) for s in manifest.shards])
    assert victim["uid"] not in set(final["uid"])


def test_status_explains_every_stale_shard_and_a_dry_run_changes_nothing(crawled_web, tmp_path, capsys):
    store = copy_crawl(crawled_web, tmp_path)
    web_root = Path(crawled_web[0].uri).parent / "web"
    config = config_for(store, web_root)
    (tmp_path / "run.yaml").write_text(dump_config(config))
    assert (
        main(["-q", "run", "--config", str(tmp_path / "run.yaml"), *sum((["--stage", n] for n in AFTER_CRAWL), [])])
        == 0
    )
    capsys.readouterr()
    # the run left its resolved config beside the outputs: status reads it
    quiet = replace(config, runtime=replace(config.runtime, progress=False))  # -q is in the resolved config
    (tmp_path / "written.yaml").write_bytes(store.read_bytes(layout.CONFIG_FILE))
    assert load_config(tmp_path / "written.yaml") == quiet
    assert main(["status", store.uri, "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(not r["stale"] or r["stage"].split("/")[0] == "stats" for r in rows.values())  # the report: always
    assert rows["filter"] == {
        "stage": "filter",
        "shards": 4,
        "committed": 4,
        "stale": {},
        "missing": [],
        "would_run": [],
    }

    listing = sorted(p for p in Path(store.uri).rglob("*") if p.is_file())
    snapshot = {p: p.stat().st_mtime_ns for p in listing}
    assert main(["run", "--config", str(store.uri) + "/config.yaml", "--dry-run", "--set", "filter.preset=none"]) == 0
    text = capsys.readouterr().out
    assert "filter" in text and "stale (4): its stage config changed" in text
    assert "stale (4): input will be redone: filter/" not in text  # per shard: each index names its own shard
    assert sorted(p for p in Path(store.uri).rglob("*") if p.is_file()) == listing
    assert {p: p.stat().st_mtime_ns for p in listing} == snapshot  # a dry run writes nothing

    changed = replace(config, filter=FilterConfig(preset="none"))
    rows = {r["stage"]: r for r in status(store, changed, AFTER_CRAWL)}
    assert rows["dedup"]["would_run"] == [] and rows["filter"]["would_run"] == [0, 1, 2, 3]
    assert rows["shard/_index"]["stale"] == {str(s): f"input will be redone: filter/{s:05d}" for s in range(4)}
    assert rows["shard/_route"]["stale"] and rows["shard/_manifest"]["stale"] == {"0": "input will be redone: shard/*"}


def test_retry_failed_successes_reach_the_dataset_on_the_next_run(ray_local, tmp_path):
    from pipeline.web import SyntheticWeb, WebSpec, generate
    from tests.pipeline.test_crawl import crawl_all, read_crawl

    root = generate(tmp_path / "w", WebSpec(images=12, heldout=0))
    store = open_storage(tmp_path / "out")
    with SyntheticWeb(root) as web:
        base = run_config(store.uri, root, shard_size=40, max_attempts=1)
        # every success is kept (the fault URLs serve copies of other images: which copy dedup keeps
        # depends on uids, which hold the server's port), so every recovered sample must reach the dataset
        keep_all = FilterConfig(preset="none", drop_duplicates=False)
        config = replace(base, filter=keep_all, shard=ShardConfig(samples_per_shard=10))
        crawl_all(store, config)
        run(store, config)
        before = {r["uid"]: r["status"] for r in read_crawl(store).to_pylist()}
        (tmp_path / "run.yaml").write_text(dump_config(config))
        assert main(["-q", "crawl", "--retry-failed", "--config", str(tmp_path / "run.yaml")]) == 0
        del web
    after = {r["uid"]: r["status"] for r in read_crawl(store).to_pylist()}
    recovered = {u for u in before if before[u] != "success" and after[u] == "success"}
    assert len(recovered) >= 2, (sorted(before.values()), sorted(after.values()))  # flaky_503 and flaky_429

    def dataset_uids() -> set[str]:
        manifest = read_manifest(f"{store.uri}/{layout.MANIFEST}")
        assert verify(manifest) == []
        return set(
            pl.concat([pl.read_parquet(Path(store.uri) / "dataset" / s["parquet"]) for s in manifest.shards])["uid"]
        )

    assert not recovered & dataset_uids()
    reports = run(store, config)
    filt = pl.concat([pl.read_parquet(p) for p in sorted((Path(store.uri) / "filter").glob("*.parquet"))])
    assert recovered <= set(filt.filter(pl.col("keep"))["uid"]) and recovered <= dataset_uids()
    assert set(filt.filter(pl.col("keep"))["uid"]) == dataset_uids()  # and the dataset is what the filter keeps
    assert reports["dedup/_map"].ran and reports["filter"].ran  # the retried crawl shards were read again


def test_variants_side_by_side_over_one_crawl_carry_columns_to_the_dataset(ray_local, tmp_path, capsys):
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.web import SyntheticWeb, WebSpec, generate

    root = generate(tmp_path / "w", WebSpec(images=40, heldout=0))
    store = open_storage(tmp_path / "out")
    rule = 'NSFW == "UNLIKELY" and similarity > 0.3'
    with SyntheticWeb(root) as web:
        urls = pq.read_table(web.url_list)
        rng = random.Random(0)
        urls = urls.append_column("NSFW", pa.array([rng.choice(["UNLIKELY", "NSFW"]) for _ in range(urls.num_rows)]))
        urls = urls.append_column("similarity", pa.array([round(rng.random(), 3) for _ in range(urls.num_rows)]))
        pq.write_table(urls, tmp_path / "laion.parquet")
        base = run_config(store.uri, root, shard_size=40)
        config = replace(
            base,
            ingest=replace(
                base.ingest, inputs=(str(tmp_path / "laion.parquet"),), carry_columns=("NSFW", "similarity")
            ),
            filter=FilterConfig(preset="none"),
            shard=ShardConfig(samples_per_shard=20),
            variants={"safe": {"filter": {"where": rule}}},
        )
        (tmp_path / "run.yaml").write_text(dump_config(config))
        assert main(["-q", "run", "--config", str(tmp_path / "run.yaml")]) == 0
        hits = sum(web.log.hits.values())
        assert main(["-q", "run", "--config", str(tmp_path / "run.yaml"), "--variant", "strict",
                     "--set", "filter.preset=basic", "--set", "filter.where=similarity > 0.5"]) == 0  # fmt: skip
        assert sum(web.log.hits.values()) == hits  # the variants crawled nothing again
    capsys.readouterr()

    def dataset(prefix: str) -> pl.DataFrame:
        manifest = read_manifest(f"{store.uri}/{prefix}{layout.MANIFEST}")
        assert verify(manifest) == []
        return pl.concat([pl.read_parquet(Path(manifest.storage.uri) / s["parquet"]) for s in manifest.shards])

    main_rows, safe, strict = dataset(""), dataset("variants/safe/"), dataset("variants/strict/")
    assert {"NSFW", "similarity"} <= set(main_rows.columns)  # carried columns reach the final parquet
    assert safe.height == main_rows.filter((pl.col("NSFW") == "UNLIKELY") & (pl.col("similarity") > 0.3)).height
    assert safe.height and safe.filter((pl.col("NSFW") != "UNLIKELY") | (pl.col("similarity") <= 0.3)).is_empty()
    assert strict.height and strict["similarity"].min() > 0.5
    assert set(store.list("variants/safe")) >= {"variants/safe/config.yaml"}
    # each variant's report compares it with the others
    compared = store.read_json(f"variants/strict/{layout.STATS_JSON}")["variants"]
    assert {k: v["final"] for k, v in compared.items()} == {
        "(main)": main_rows.height, "safe": safe.height, "strict": strict.height
    }  # fmt: skip
    assert "Variants over the same crawl" in (Path(store.uri) / "variants/strict" / layout.REPORT_HTML).read_text()

    assert (
        main(
            ["run", "--config", str(tmp_path / "run.yaml"), "--variant", "bad", "--set", "filter.where=LICENSE == 'x'"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("clipline: error: filter.where: no column 'LICENSE' (columns here: NSFW, attempts,")
    assert len(err.splitlines()) == 1


def test_a_variant_over_the_s3_endpoint_has_its_own_lineage(crawled_web, s3_store, tmp_path):
    local = copy_crawl(crawled_web, tmp_path)
    web_root = Path(crawled_web[0].uri).parent / "web"
    run(local, config_for(local, web_root), names=["dedup"])
    for path in sorted(Path(local.uri).rglob("*")):  # the shared crawl and dedup, committed, on S3
        if path.is_file() and path.relative_to(Path(local.uri)).parts[0] in ("ingest", "crawl", "dedup"):
            s3_store.put_file(path, str(path.relative_to(Path(local.uri))))
    config = replace(config_for(s3_store, web_root), variants={"loose": {"filter": {"preset": "none"}}})
    from pipeline.cli import run_data

    assert run_data(config, ["filter", "shard", "stats"], variant="loose") == 0
    manifest = read_manifest(f"{s3_store.uri}/variants/loose/{layout.MANIFEST}")
    assert verify(manifest) == [] and manifest.data["num_samples"] > 0
    assert s3_store.exists("variants/loose/config.yaml") and s3_store.exists(
        "variants/loose/filter/_committed/00000.json"
    )
    assert not s3_store.exists(layout.MANIFEST) and not s3_store.list("filter")  # the unnamed variant untouched
    rows = {r["stage"]: r for r in status(VariantStorage(s3_store, "loose"), variant_config(config, "loose"))}
    assert all(r["would_run"] == [] for step, r in rows.items() if step in ("filter", "shard", "shard/_manifest"))
    assert rows["dedup"]["committed"] == 4  # read from the shared OUT/dedup
