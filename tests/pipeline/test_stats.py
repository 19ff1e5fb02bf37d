"""The statistics report under hostile input: blocklisted images are never shown, every value is escaped."""

import html
import json
import shutil

import polars as pl

from pipeline import layout
from pipeline.config import RunConfig
from pipeline.filter import STAGE as FILTER_STAGE
from pipeline.filter import FilterConfig
from pipeline.formats import group_samples, image_member, iter_tar_members
from pipeline.runner import run_pipeline
from pipeline.shard import STAGES as SHARD_STAGES
from pipeline.shard import ShardConfig
from pipeline.stats import STAGES as STATS_STAGES
from pipeline.stats import THUMBNAIL_REASONS, _grid, _thumb
from pipeline.storage import open_storage
from pipeline.takedown import takedown
from tests.pipeline.test_shard import filtered  # noqa: F401 - the module fixture: the crawled web, filtered


def crawl_images(store) -> dict[str, bytes]:
    images = {}
    for s in range(4):
        with store.open_read(layout.crawl_tar(s)) as f:
            images.update((key, image_member(members)) for key, members in group_samples(iter_tar_members(f)))
    return images


def test_blocklisted_and_taken_down_images_are_counted_never_shown(filtered, tmp_path):  # noqa: F811
    shutil.copytree(filtered.uri, tmp_path / "run", ignore=shutil.ignore_patterns("filter"))
    store = open_storage(tmp_path / "run")
    crawl = pl.concat([pl.from_arrow(store.read_parquet(layout.crawl_parquet(s))) for s in range(4)])
    ok = crawl.filter(pl.col("status") == "success")
    # 8 images across the shards, the first row of shard 0 (a hit there crashed the filter before) among them
    blocked = ok.gather([0, 3, 17, 40, 77, 120, 150, ok.height - 1])
    (tmp_path / "abuse.txt").write_text("".join(f"{h}\n" for h in blocked["sha256"]))
    config = RunConfig(
        name="web-tiny",
        out=store.uri,
        filter=FilterConfig(blocklist_image_sha256=(str(tmp_path / "abuse.txt"),)),
        shard=ShardConfig(samples_per_shard=40),
    )
    run_pipeline([FILTER_STAGE, *SHARD_STAGES], store, config, executor="inline", progress=False)
    manifest = store.read_json(layout.MANIFEST)
    final = pl.read_parquet(tmp_path / "run" / layout.dataset_parquet(0))
    gone = final["uid"][:2].to_list()
    (tmp_path / "gone.txt").write_text("\n".join(gone) + "\n")
    takedown(f"{store.uri}/{layout.MANIFEST}", str(tmp_path / "gone.txt"), reason="request")
    run_pipeline(list(STATS_STAGES), store, config, executor="inline", progress=False)

    stats = store.read_json(layout.STATS_JSON)
    page = (tmp_path / "run" / layout.REPORT_HTML).read_text()
    images = crawl_images(store)
    filt = pl.concat([pl.read_parquet(tmp_path / "run" / layout.filter_parquet(s)) for s in range(4)])
    # every copy of a listed image is blocked: the web plants byte-identical copies under other URLs
    hits = ok.filter(pl.col("sha256").is_in(blocked["sha256"].to_list()))["uid"]
    assert hits.len() > 8 and set(filt.filter(pl.col("drop_reason") == "blocked_image")["uid"]) == set(hits)
    assert stats["drop_reasons"]["filter/blocked_image"] == hits.len()
    for uid in [*hits, *gone]:
        assert _thumb(images[uid]) not in page, uid
    assert stats["manifest"]["removed_by_takedowns"] == 2 and manifest["version"] == 1
    assert (
        f"<li>blocked_image: {hits.len()} samples</li>" in page and "<li>removed by takedowns: 2 samples</li>" in page
    )
    # the harmless reasons still show their samples
    duplicates = filt.filter(pl.col("drop_reason") == "duplicate")["uid"]
    assert "<h3>duplicate</h3>" in page and any(_thumb(images[u]) in page for u in duplicates)
    assert not {"blocked_url", "blocked_domain", "blocked_image"} & THUMBNAIL_REASONS


def test_every_value_is_escaped_and_captions_are_cut_before_escaping(filtered, tmp_path):  # noqa: F811
    shutil.copytree(filtered.uri, tmp_path / "run")
    store = open_storage(tmp_path / "run")
    config = RunConfig(name="web-tiny", out=store.uri, shard=ShardConfig(samples_per_shard=40))
    run_pipeline(list(SHARD_STAGES), store, config, executor="inline", progress=False)
    manifest = store.read_json(layout.MANIFEST)
    manifest.update(name="<b>n</b>", version='<img src=x onerror="alert(1)">')
    store.write_bytes(layout.MANIFEST, json.dumps(manifest).encode())
    run_pipeline(list(STATS_STAGES), store, config, executor="inline", progress=False)
    page = (tmp_path / "run" / layout.REPORT_HTML).read_text()
    assert "<img src=x" not in page and "<b>n</b>" not in page
    assert f"(manifest version {html.escape(manifest['version'])})" in page

    image = crawl_images(store)[pl.read_parquet(tmp_path / "run" / layout.crawl_parquet(0))["uid"][0]]
    cell = _grid([(image, "a" * 79 + "&b<c")])
    assert "<figcaption>" + "a" * 79 + "&amp;</figcaption>" in cell  # cut at 80 characters, then escaped


def shard_domains(rng, shards: int, domains: int) -> list[pl.DataFrame]:
    """Per-shard domain counts drawn from a Zipf law over `domains` domains (the web's shape)."""
    import numpy as np

    frames = []
    for _ in range(shards):
        drawn = np.minimum(rng.zipf(1.3, 4000), domains) - 1
        urls = np.bincount(drawn, minlength=domains)
        seen = np.flatnonzero(urls)
        frames.append(
            pl.DataFrame(
                {
                    "domain": [f"site{d}.example" for d in seen],
                    "urls": urls[seen],
                    "success": urls[seen] // 2,
                    "opted_out": urls[seen] % 3,
                    "kept": urls[seen] // 4,
                }
            )
        )
    return frames


def test_domain_summaries_merge_within_their_error_bound_and_exactly_when_they_hold_every_domain():
    import numpy as np

    from pipeline.stats import merge_domains, summarise_domains

    frames = shard_domains(np.random.default_rng(7), shards=30, domains=20_000)
    true = pl.concat(frames).group_by("domain").agg(pl.col("urls", "success", "opted_out", "kept").sum())
    true = {d: list(c) for d, *c in true.rows()}
    # A summary holding every domain: the exact table.
    exact, error = merge_domains([summarise_domains(f, 100_000) for f in frames], 100_000)
    assert error == 0 and exact == true
    # 50 a shard, out of thousands: memory bounded, every count within the bound, the head exact.
    merged, error = merge_domains([summarise_domains(f, 50) for f in frames], 50)
    assert 0 < error and len(merged) <= 100 < len(true)
    for domain, (urls, *_) in true.items():
        reported = merged.get(domain, [0])[0]
        assert reported <= urls <= reported + error
    head = sorted(true, key=lambda d: (-true[d][0], d))[:5]
    assert sorted(merged, key=lambda d: (-merged[d][0], d))[:5] == head
    assert all(merged[d] == true[d] for d in head)
