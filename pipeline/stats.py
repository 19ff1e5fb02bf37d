"""Stats: the dataset statistics report, ``dataset/stats/stats.json`` and a self-contained ``report.html``.

A map and a reduce. ``stats/_crawl`` (per crawl shard) and ``stats/_final`` (per
final dataset shard) each write their shard's aggregates as a small JSON part,
reading only the columns they need; ``stats`` (one task) adds the parts up and
renders the report. Counts and fixed-bin histograms add exactly; the per-domain
table is a mergeable top-k summary (merge_domains), so the reduce's memory does
not grow with the number of domains. What it reports:

- ``funnel``: input rows → unique URLs → fetched → not duplicates → kept by the
  filter → in the final dataset;
- ``drop_reasons``: every crawl failure status and filter drop reason, counted
  (``crawl/…`` and ``filter/…``);
- ``languages``, ``caption_length``, ``image_size`` and ``aspect_ratio``
  histograms of the final samples;
- ``top_domains`` with URLs, fetch success rate, opt-out rate (X-Robots-Tag or
  robots.txt) and kept samples per domain;
- ``duplicate_clusters`` (cluster size → clusters) and duplicates by reason;
- ``crawl``: throughput and failure kinds per crawl shard in completion order.

The HTML page embeds its charts as inline SVG and its thumbnails as data URIs:
no network, one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from pipeline import layout, schema, variants
from pipeline.filter import domain_of
from pipeline.formats import group_samples, image_member, iter_tar_members
from pipeline.layout import shard_name
from pipeline.stage import IDENTITY, PlanContext, ShardContext, Stage, committed_shards, read_marker

STATS, REPORT, MANIFEST = layout.STATS_JSON, layout.REPORT_HTML, layout.MANIFEST
FUNNEL = ("input_rows", "unique_urls", "fetched", "not_duplicates", "kept_by_filter", "final")
CAPTION_BINS = [0, 10, 20, 40, 80, 160, 320, 640, 1280]
SIZE_BINS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]
ASPECT_BINS = [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0]
OPT_OUT = ("opted_out", "robots_disallowed")


@dataclass(frozen=True)
class StatsConfig:
    top_domains: int = 25  # domains in the report and stats.json
    domain_summary: int = 10_000  # domains each shard's summary keeps (memory of the reduce; see merge_domains)
    thumbnails: int = field(default=24, metadata={IDENTITY: False})  # samples shown in the report
    # thumbnails of dropped samples per reason in the report
    dropped_per_reason: int = field(default=6, metadata={IDENTITY: False})


def _hist(values, bins: list[float]) -> dict[str, int]:
    """Counts per bin '{lo}-{hi}' (the last bin open-ended), every bin present."""
    values = np.asarray(values, dtype=np.float64)
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(bins, bins[1:], strict=False)] + [f"{bins[-1]:g}+"]
    idx = np.clip(np.searchsorted(bins, values[~np.isnan(values)], side="right") - 1, 0, len(labels) - 1)
    counts = np.bincount(idx, minlength=len(labels))
    return {label: int(n) for label, n in zip(labels, counts, strict=True)}


def _counts(series: pl.Series) -> Counter:
    vc = series.drop_nulls().value_counts()
    return Counter(dict(zip(vc[series.name].to_list(), vc["count"].to_list(), strict=True)))


def _marker_total(store, stage: str, key: str) -> int:
    return sum(
        int((read_marker(store, stage, s) or {}).get("stats", {}).get(key, 0)) for s in committed_shards(store, stage)
    )


def _read(store, rel: str, columns: list[str]) -> pl.DataFrame | None:
    return pl.from_arrow(store.read_parquet(rel, columns=columns)) if store.exists(rel) else None


def _manifest_shards(storage) -> list[dict]:
    return storage.read_json(MANIFEST)["shards"] if storage.exists(MANIFEST) else []


def crawl_part(store, s: int, config: StatsConfig) -> dict:
    """One crawl shard's aggregates (and its dedup and filter rows'): what the reduce adds up. The
    per-domain counts are a summary of at most `domain_summary` domains (see merge_domains)."""
    acc = empty_totals()
    crawl = _read(store, layout.crawl_parquet(s), ["uid", "url", "status"])
    crawl = crawl.with_columns(domain=pl.col("url").map_elements(domain_of, return_dtype=pl.Utf8))
    acc["funnel"]["unique_urls"] += crawl.height
    acc["funnel"]["fetched"] += crawl.filter(pl.col("status") == schema.SUCCESS).height
    acc["statuses"] += _counts(crawl["status"])
    kept = pl.Series("uid", [], dtype=pl.Utf8)
    filt = _read(store, layout.filter_parquet(s), ["uid", "keep", "drop_reason", "dup_of"])
    if filt is not None:
        acc["funnel"]["not_duplicates"] += filt.filter(pl.col("dup_of").is_null()).height
        acc["funnel"]["kept_by_filter"] += filt.filter(pl.col("keep")).height
        acc["reasons"] += _counts(filt["drop_reason"])
        kept = filt.filter(pl.col("keep"))["uid"]
        _entries_after(store, layout.filter_parquet(s), acc)
    dedup = _read(store, layout.dedup_parquet(s), ["dup_of", "dup_reason", "cluster_size"])
    if dedup is not None:
        acc["dup_reasons"] += _counts(dedup["dup_reason"])
        sizes = _counts(dedup.filter(pl.col("dup_of").is_null())["cluster_size"])
        acc["clusters"] += Counter({str(k): v for k, v in sizes.items()})
    per = crawl.group_by("domain").agg(
        urls=pl.len(),
        success=(pl.col("status") == schema.SUCCESS).sum(),
        opted_out=pl.col("status").is_in(list(OPT_OUT)).sum(),
        kept=pl.col("uid").is_in(kept.implode()).sum(),
    )
    acc["domains"] = summarise_domains(per, config.domain_summary)
    marker = read_marker(store, "crawl", s) or {}
    stats = marker.get("stats", {})
    acc["crawl"] = [
        {
            "shard": s,
            "finished_at": marker.get("finished_at"),
            "seconds": stats.get("seconds", marker.get("duration_s")),
            "rows": stats.get("rows"),
            "success": stats.get("success"),
            "failures": {k: v for k, v in stats.get("statuses", {}).items() if k != schema.SUCCESS},
        }
    ]
    acc["entries_after"] = [[e, n] for e, n in sorted(acc["entries_after"].items())]  # int keys, not JSON's strings
    return acc


def summarise_domains(per: pl.DataFrame, keep: int) -> dict:
    """A shard's per-domain counts (domain, urls, success, opted_out, kept) as merge_domains takes
    them: its `keep` largest domains by URLs exactly, and the URLs of the largest left out."""
    per = per.select("domain", "urls", "success", "opted_out", "kept")
    per = per.sort(["urls", "domain"], descending=[True, False])
    return {"top": per.head(keep).rows(), "error": int(per["urls"][keep]) if per.height > keep else 0}


def merge_domains(summaries, keep: int) -> tuple[dict[str, list[int]], int]:
    """Per-domain [urls, success, opted_out, kept] from per-shard summaries, holding at most 2 x `keep`
    domains at any time, and the error bound: a domain's true URL count is at least the one
    reported (0 if absent) and at most that plus the bound. Each summary lists its shard's `keep`
    largest domains exactly and, as its error, the URLs of the largest one it left out; whenever
    the merged table passes 2 x `keep` domains, the smallest go and the largest of them is added
    to the error (a mergeable top-k summary, in the manner of Misra-Gries). Error 0: exact."""
    domains: dict[str, list[int]] = {}
    error = 0
    for summary in summaries:
        error += int(summary["error"])
        for domain, *counts in summary["top"]:
            total = domains.setdefault(domain, [0, 0, 0, 0])
            for i, n in enumerate(counts):
                total[i] += int(n)
        if len(domains) > 2 * keep:
            ordered = sorted(domains.items(), key=lambda kv: (-kv[1][0], kv[0]))
            error += ordered[keep][1][0]
            domains = dict(ordered[:keep])
    return domains, error


def final_part(store, shard: dict) -> dict:
    """One final dataset shard's histograms (fixed bins, so they add up exactly)."""
    final = _read(
        store, layout.in_dataset(shard["parquet"]), ["caption", "language", "original_width", "original_height"]
    )
    w, h = final["original_width"].to_numpy().astype(float), final["original_height"].to_numpy().astype(float)
    return {
        "final": final.height,
        "languages": dict(_counts(final["language"])),
        "caption_length": _hist(final["caption"].str.len_chars().fill_null(0).to_numpy(), CAPTION_BINS),
        "image_size": _hist(np.maximum(w, h), SIZE_BINS),
        "aspect_ratio": _hist(np.maximum(w, h) / np.maximum(1.0, np.minimum(w, h)), ASPECT_BINS),
    }


def _entries_after(store, rel: str, acc: dict) -> None:
    """Count the metadata entries of the kept rows (a filter that matched metadata writes metadata_ids), and the
    rows dropped as copies of each evaluation dataset (a decontaminating filter writes eval_overlap)."""
    import pyarrow.parquet as pq

    with store.open_seekable(rel) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if "eval_overlap" in names:
        acc["eval_overlap"] += _counts(_read(store, rel, ["eval_overlap"])["eval_overlap"])
    if "metadata_ids" not in names:
        return
    rows = _read(store, rel, ["keep", "metadata_ids"]).filter(pl.col("keep"))
    counts = rows.select(pl.col("metadata_ids").explode().drop_nulls().value_counts()).unnest("metadata_ids")
    acc["entries_after"].update(dict(zip(counts[counts.columns[0]].to_list(), counts["count"].to_list(), strict=True)))
    acc["metadata"] = True


def curve(counts: list[int], points: int = 120) -> list[list[int]]:
    """(rank, count) of counts sorted in decreasing order, at up to `points` ranks spaced evenly in log(rank)."""
    ordered = sorted((c for c in counts if c > 0), reverse=True)
    if not ordered:
        return []
    ranks = np.unique(np.geomspace(1, len(ordered), num=min(points, len(ordered))).round().astype(int))
    return [[int(r), int(ordered[r - 1])] for r in ranks]


def metadata_balance(store, after: Counter, head: int = 12) -> dict:
    """The metadata entries' distribution before balancing (the counts step) and after (the kept rows)."""
    before, names = Counter(), {}
    for rel in store.list("filter/_counts", suffix=".parquet"):
        part = store.read_frame(rel).filter(pl.col("entry") >= 0)
        before.update(dict(zip(part["entry"].to_list(), part["count"].to_list(), strict=True)))
        if "name" in part.columns:
            names.update(dict(zip(part["entry"].to_list(), part["name"].to_list(), strict=True)))
    name = lambda e: names.get(e, f"#{e}")  # noqa: E731

    def ends(counts: Counter) -> dict:
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return {
            "head": [[name(e), int(n)] for e, n in ordered[:head]],
            "tail": [[name(e), int(n)] for e, n in ordered[-head:]] if len(ordered) > head else [],
        }

    return {
        "entries_matched": {"before": len(before), "after": len(after)},
        "before": {**ends(before), "curve": curve(list(before.values()))} if before else None,
        "after": {**ends(after), "curve": curve(list(after.values()))},
    }


def empty_totals() -> dict:
    return {
        "funnel": Counter(),
        "statuses": Counter(),
        "reasons": Counter(),
        "dup_reasons": Counter(),
        "clusters": Counter(),
        "domains": None,
        "crawl": [],
        "entries_after": Counter(),
        "metadata": False,
        "eval_overlap": Counter(),
    }


def collect(store, config: StatsConfig, crawl_parts=None, final_parts=None) -> dict:
    """Every aggregate of stats.json, added up from the per-shard parts (computed here, one shard
    at a time, when not given): memory a part at a time, plus 2 x `domain_summary` domains."""
    if crawl_parts is None:
        crawl_parts = (crawl_part(store, s, config) for s in committed_shards(store, "crawl"))
    manifest = store.read_json(MANIFEST) if store.exists(MANIFEST) else {"shards": []}
    if final_parts is None:
        final_parts = (final_part(store, shard) for shard in manifest["shards"])
    acc = empty_totals()
    summaries = []
    for part in crawl_parts:
        for key in ("funnel", "statuses", "reasons", "dup_reasons", "clusters", "eval_overlap"):
            acc[key].update(part[key])
        acc["entries_after"].update(dict(part["entries_after"]))
        acc["metadata"] |= part["metadata"]
        acc["crawl"] += part["crawl"]
        summaries.append(part["domains"])
    domains, domain_error = merge_domains(summaries, config.domain_summary)
    acc["funnel"]["input_rows"] = _marker_total(store, "ingest/_map", "rows")
    languages, hists = Counter(), {name: Counter() for name in ("caption_length", "image_size", "aspect_ratio")}
    for part in final_parts:
        acc["funnel"]["final"] += part["final"]
        languages.update(part["languages"])
        for name, counts in hists.items():
            counts.update(part[name])
    top = sorted(domains.items(), key=lambda kv: (-kv[1][0], kv[0]))[: config.top_domains]
    rate = lambda n, d: round(n / d, 4) if d else 0.0  # noqa: E731
    bins = lambda name, edges: {**_hist([], edges), **hists[name]}  # noqa: E731 (every bin, in order)
    return {
        "funnel": {k: int(acc["funnel"][k]) for k in FUNNEL},
        "drop_reasons": {
            **{f"crawl/{k}": int(v) for k, v in sorted(acc["statuses"].items()) if k != schema.SUCCESS},
            **{f"filter/{k}": int(v) for k, v in sorted(acc["reasons"].items())},
        },
        "languages": dict(languages.most_common()),
        "caption_length": bins("caption_length", CAPTION_BINS),
        "image_size": bins("image_size", SIZE_BINS),
        "aspect_ratio": bins("aspect_ratio", ASPECT_BINS),
        "top_domains": [
            {
                "domain": d,
                "urls": int(urls),
                "success_rate": rate(success, urls),
                "opt_out_rate": rate(opted_out, urls),
                "kept": int(kept),
            }
            for d, (urls, success, opted_out, kept) in top
        ],  # fmt: skip
        "top_domains_error": domain_error,  # 0: exact; else a count may be low by up to this many URLs
        "duplicate_clusters": {
            "sizes": dict(sorted(acc["clusters"].items(), key=lambda kv: int(kv[0]))),
            "by_reason": dict(sorted(acc["dup_reasons"].items())),
        },
        "crawl": sorted(acc["crawl"], key=lambda r: (r["finished_at"] or 0, r["shard"])),
        "metadata": metadata_balance(store, acc["entries_after"]) if acc["metadata"] else None,
        "eval_overlap": dict(sorted(acc["eval_overlap"].items())),
        "manifest": {
            **{k: manifest.get(k) for k in ("name", "version", "num_samples", "config_sha256")},
            "removed_by_takedowns": sum(int(t.get("removed", 0)) for t in manifest.get("takedowns") or []),
        },
    }


# --- report.html ---------------------------------------------------------------------------------


def svg_bars(title: str, counts: dict[str, int], width: int = 460) -> str:
    """A horizontal bar chart as inline SVG (no scripts, no external files)."""
    items = list(counts.items())
    if not items:
        return f"<h3>{html.escape(title)}</h3><p>nothing to show</p>"
    top = max(v for _, v in items) or 1
    row, label_w = 18, 170
    parts = [f'<svg width="{width}" height="{row * len(items) + 4}" role="img" aria-label="{html.escape(title)}">']
    for i, (label, value) in enumerate(items):
        y = i * row + 2
        bar = (width - label_w - 60) * value / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="12">{html.escape(str(label)[:28])}'
            "</text>"
            f'<rect x="{label_w}" y="{y}" width="{bar:.1f}" height="{row - 4}" fill="#4c78a8"/>'
            f'<text x="{label_w + bar + 4:.1f}" y="{y + 13}" font-size="12">{value:,}</text>'
        )
    parts.append("</svg>")
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts)


# Drop reasons whose samples the report may show as thumbnails: rules about a caption's form, an
# image's size, language, text match, CLIP score and duplicates. Every other reason (blocked_url,
# blocked_domain, blocked_image: abuse hash lists and opt-outs) and every takedown is shown as a
# count only: a report must never republish what a blocklist exists to keep from being shown.
THUMBNAIL_REASONS = frozenset(
    {
        "duplicate",
        "image_too_small",
        "image_too_large",
        "image_aspect_ratio",
        "image_too_few_bytes",
        "caption_missing",
        "caption_too_short",
        "caption_too_long",
        "caption_too_few_words",
        "caption_too_many_words",
        "caption_filename",
        "caption_boilerplate",
        "caption_url",
        "caption_repeated_chars",
        "language",
        "no_text_match",
        "clip_score",
    }
)
CAPTION_CHARS = 80  # a thumbnail's caption is cut to this before it is escaped


def _thumb(data: bytes, side: int = 96) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _grid(samples: list[tuple[bytes, str]]) -> str:
    cells = [
        f'<figure><img src="{_thumb(img)}" alt=""><figcaption>{html.escape((caption or "")[:CAPTION_CHARS])}'
        "</figcaption></figure>"
        for img, caption in samples
    ]
    return '<div class="grid">' + "".join(cells) + "</div>"


def _images_from_tar(store, rel: str, wanted: set[str]) -> dict[str, bytes]:
    found = {}
    with store.open_read(rel) as f:
        for key, members in group_samples(iter_tar_members(f)):
            if key in wanted:
                found[key] = image_member(members) or b""
                if len(found) == len(wanted):
                    break
    return found


def sample_images(store, config: StatsConfig) -> tuple[list, dict[str, list]]:
    """Thumbnails of final samples (first shard) and of dropped samples per filter reason in THUMBNAIL_REASONS."""
    shards = _manifest_shards(store)
    final = []
    if shards:
        first = shards[0]
        rows = store.read_parquet(layout.in_dataset(first["parquet"]), columns=["key", "caption"]).to_pylist()[
            : config.thumbnails
        ]
        images = _images_from_tar(store, layout.in_dataset(first["tar"]), {r["key"] for r in rows})
        final = [(images[r["key"]], r["caption"]) for r in rows if images.get(r["key"])]
    dropped: dict[str, list] = {}
    for s in committed_shards(store, "filter"):
        filt = _read(store, layout.filter_parquet(s), ["uid", "caption", "drop_reason"]).filter(
            pl.col("drop_reason").is_in(list(THUMBNAIL_REASONS))
        )
        # the first rows of each reason, as many as it still lacks (one pass in polars, not a loop per row)
        shown = {reason: len(samples) for reason, samples in dropped.items()}
        quota = config.dropped_per_reason - pl.col("drop_reason").replace_strict(
            shown, default=0, return_dtype=pl.Int64
        )
        wanted = filt.filter(pl.int_range(pl.len()).over("drop_reason") < quota)
        picks = {uid: (caption, reason) for uid, caption, reason in wanted.iter_rows()}
        if picks:
            images = _images_from_tar(store, layout.crawl_tar(s), set(picks))
            for uid, (caption, reason) in picks.items():
                if images.get(uid):
                    dropped.setdefault(reason, []).append((images[uid], caption))
    return final, dropped


def variants_table(stats: dict) -> str:
    """How this variant differs from the others: final samples and the filter drops that differ most."""
    others = stats.get("variants") or {}
    if not others:
        return ""
    me = stats.get("variant", "(main)")
    mine = others.get(me, {"final": 0, "filter_drops": {}})
    rows = []
    for name, other in others.items():
        diff = other["final"] - mine["final"]
        reasons = set(other["filter_drops"]) | set(mine["filter_drops"])
        deltas = {r: other["filter_drops"].get(r, 0) - mine["filter_drops"].get(r, 0) for r in reasons}
        shown = ", ".join(f"{r} {d:+,}" for r, d in sorted(deltas.items(), key=lambda kv: -abs(kv[1]))[:4] if d)
        rows.append(
            f"<tr><td>{html.escape(name)}{' (this one)' if name == me else ''}</td><td>{other['final']:,}</td>"
            f"<td>{diff:+,}</td><td>{html.escape(shown or '-')}</td></tr>"
        )
    return (
        "<h2>Variants over the same crawl</h2><table><tr><th>variant</th><th>final samples</th>"
        f"<th>vs this one</th><th>filter drops vs this one</th></tr>{''.join(rows)}</table>"
    )


def svg_loglog(title: str, curves: dict[str, list[list[int]]], width: int = 460, height: int = 260) -> str:
    """Count against rank, both on log scales, one polyline per curve (inline SVG)."""
    colours = ["#4c78a8", "#e45756", "#54a24b"]
    points = [p for c in curves.values() for p in c]
    if not points:
        return f"<h3>{html.escape(title)}</h3><p>nothing to show</p>"
    lx = np.log10(max(p[0] for p in points) or 1) or 1
    ly = np.log10(max(p[1] for p in points) or 1) or 1
    pad = 40
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{width - 10}" y="{height - 8}" text-anchor="end" font-size="11">entry rank (log)</text>',
             f'<text x="4" y="20" font-size="11">count (log), max {10 ** ly:,.0f}</text>']  # fmt: skip
    x = lambda r: pad + (width - pad - 10) * np.log10(r) / lx  # noqa: E731
    y = lambda n: height - pad - (height - pad - 20) * np.log10(n) / ly  # noqa: E731
    for i, (label, c) in enumerate(curves.items()):
        xy = " ".join(f"{x(r):.1f},{y(n):.1f}" for r, n in c)
        parts.append(f'<polyline points="{xy}" fill="none" stroke="{colours[i % 3]}" stroke-width="2"/>')
        parts.append(f'<text x="{width - 10}" y="{30 + 14 * i}" text-anchor="end" font-size="12" '
                     f'fill="{colours[i % 3]}">{html.escape(label)}</text>')  # fmt: skip
    parts.append("</svg>")
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts)


def metadata_html(meta: dict | None) -> str:
    """The metadata entries before and after balancing: head, tail, and the sorted counts on log-log axes."""
    if not meta:
        return ""
    sides = {k: meta[k] for k in ("before", "after") if meta.get(k)}

    def rows(pairs):
        return "".join(f"<tr><td>{html.escape(str(n))}</td><td>{c:,}</td></tr>" for n, c in pairs)

    tables = "".join(
        f"<div><h3>{side} balancing: head</h3><table>{rows(v['head'])}</table>"
        f"<h3>{side} balancing: tail</h3><table>{rows(v['tail']) or '<tr><td>-</td></tr>'}</table></div>"
        for side, v in sides.items()
    )
    plot = svg_loglog("Rows per metadata entry, sorted", {f"{k} balancing": v["curve"] for k, v in sides.items()})
    matched = meta["entries_matched"]
    return (
        f"<h2>Metadata entries (CLIP-style curation)</h2><p>{matched['before']:,} entries matched before "
        f'balancing, {matched["after"]:,} in the kept rows.</p><div class="cols"><div>{plot}</div>{tables}</div>'
    )


def render_report(stats: dict, final: list, dropped: dict[str, list]) -> str:
    funnel = stats["funnel"]
    domains = "".join(
        f"<tr><td>{html.escape(d['domain'])}</td><td>{d['urls']:,}</td><td>{d['success_rate']:.1%}</td>"
        f"<td>{d['opt_out_rate']:.1%}</td><td>{d['kept']:,}</td></tr>"
        for d in stats["top_domains"]
    )
    errors = Counter()
    for r in stats["crawl"]:
        errors.update(r["failures"])
    error_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:,}</td></tr>" for k, v in errors.most_common())
    throughput = {
        f"shard {r['shard']}": round((r["rows"] or 0) / r["seconds"]) if r.get("seconds") else 0 for r in stats["crawl"]
    }
    dropped_html = "".join(
        f"<h3>{html.escape(reason)}</h3>{_grid(samples)}" for reason, samples in sorted(dropped.items())
    )
    hidden = {k.split("/", 1)[1]: v for k, v in stats["drop_reasons"].items() if k.startswith("filter/")}
    hidden = {reason: n for reason, n in sorted(hidden.items()) if reason not in THUMBNAIL_REASONS}
    removed = stats["manifest"].get("removed_by_takedowns")
    if removed:
        hidden["removed by takedowns"] = removed
    hidden_html = "".join(f"<li>{html.escape(reason)}: {int(n):,} samples</li>" for reason, n in hidden.items())
    if hidden_html:
        dropped_html += f"<h3>Counts only, never shown</h3><ul>{hidden_html}</ul>"
    name = html.escape(str(stats["manifest"].get("name") or "dataset"))
    version = html.escape(str(stats["manifest"].get("version")))
    cluster_sizes = {f"size {k}": v for k, v in stats["duplicate_clusters"]["sizes"].items()}
    variants_html = variants_table(stats) + metadata_html(stats.get("metadata"))
    if stats.get("eval_overlap"):
        variants_html += svg_bars("Copies of evaluation images dropped, by dataset", stats["eval_overlap"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{name}: dataset report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
.cols {{ display: flex; flex-wrap: wrap; gap: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; width: 110px; font-size: 11px; }} figure img {{ width: 96px; height: 96px; object-fit: contain; }}
</style></head><body>
<h1>{name}</h1>
<p>{funnel["final"]:,} samples in the final dataset, from {funnel["input_rows"]:,} input rows
(manifest version {version}).</p>
<div class="cols">
<div>{svg_bars("Funnel", {k.replace("_", " "): v for k, v in funnel.items()})}</div>
<div>{svg_bars("Drop reasons", dict(sorted(stats["drop_reasons"].items(), key=lambda kv: -kv[1])))}</div>
<div>{svg_bars("Languages (final)", dict(list(stats["languages"].items())[:15]))}</div>
<div>{svg_bars("Caption length, characters (final)", stats["caption_length"])}</div>
<div>{svg_bars("Image size, longer side px (final)", stats["image_size"])}</div>
<div>{svg_bars("Aspect ratio (final)", stats["aspect_ratio"])}</div>
<div>{svg_bars("Duplicate cluster sizes", cluster_sizes)}</div>
<div>{svg_bars("Crawl throughput, URLs/s per shard in completion order", throughput)}</div>
</div>
{variants_html}
<h2>Samples</h2>{_grid(final)}
<h2>Top domains</h2>
<table><tr><th>domain</th><th>URLs</th><th>fetched</th><th>opted out</th><th>kept</th></tr>{domains}</table>
<h2>Crawl errors</h2><table><tr><th>status</th><th>URLs</th></tr>{error_rows}</table>
<h2>Dropped samples, by reason</h2>{dropped_html or "<p>none</p>"}
<p><small>generated {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by clipline stats</small></p>
</body></html>
"""


# --- the stage -------------------------------------------------------------------------------------


CRAWL_PARTS, FINAL_PARTS = "stats/_crawl", "stats/_final"  # the map: one part per crawl / final shard


def plan_stats(ctx: PlanContext) -> list[int]:
    return [0] if committed_shards(ctx.storage, "crawl") else []


def plan_crawl_parts(ctx: PlanContext) -> list[int]:
    return committed_shards(ctx.storage, "crawl")


def run_crawl_part(ctx: ShardContext) -> dict:
    part = crawl_part(ctx.storage, ctx.shard, ctx.config)
    ctx.output_path(f"{CRAWL_PARTS}/{ctx.name}.json", work=True).write_text(json.dumps(part))
    return {"rows": part["funnel"]["unique_urls"]}


def plan_final_parts(ctx: PlanContext) -> list[int]:
    return list(range(len(_manifest_shards(ctx.storage))))


def run_final_part(ctx: ShardContext) -> dict:
    part = final_part(ctx.storage, _manifest_shards(ctx.storage)[ctx.shard])
    ctx.output_path(f"{FINAL_PARTS}/{ctx.name}.json", work=True).write_text(json.dumps(part))
    return {"rows": part["final"]}


def _parts(storage, step: str, shards, compute):
    """Each shard's part as the map step wrote it (computed here if it did not: a shard committed since)."""
    for s in shards:
        rel = f"{step}/{shard_name(s)}.json"
        yield storage.read_json(rel) if storage.exists(rel) else compute(s)


def variant_comparison(storage, own: dict) -> dict:
    """Every dataset variant's final size and filter drop reasons, this one's included; {} with no other variant.

    The unnamed variant (OUT/dataset) is "(main)"; the others are read from OUT/variants/*/dataset/stats."""
    root = getattr(storage, "base", storage)  # a variant's view reads its siblings from the shared root
    me = getattr(storage, "variant", "")
    paths = {"": STATS, **{name: f"{variants.ROOT}/{name}/{STATS}" for name in variants.names(root)}}
    found = {}
    for name, rel in paths.items():
        stats = own if name == me else root.read_json(rel) if root.exists(rel) else None
        if stats is not None:
            reasons = {k.split("/", 1)[1]: v for k, v in stats["drop_reasons"].items() if k.startswith("filter/")}
            found[name or "(main)"] = {"final": stats["funnel"]["final"], "filter_drops": reasons}
    return found if len(found) > 1 else {}


def run_stats(ctx: ShardContext) -> dict:
    store, config = ctx.storage, ctx.config
    shards, crawled = _manifest_shards(store), committed_shards(store, "crawl")
    stats = collect(
        store,
        config,
        crawl_parts=_parts(store, CRAWL_PARTS, crawled, lambda s: crawl_part(store, s, config)),
        final_parts=_parts(store, FINAL_PARTS, range(len(shards)), lambda i: final_part(store, shards[i])),
    )
    stats["variants"] = variant_comparison(ctx.storage, stats)
    stats["variant"] = getattr(ctx.storage, "variant", "") or "(main)"
    final, dropped = sample_images(ctx.storage, ctx.config)
    ctx.output_path(STATS).write_text(json.dumps(stats, indent=1) + "\n")
    ctx.output_path(REPORT).write_text(render_report(stats, final, dropped))
    return {"rows": stats["funnel"]["final"], **stats["funnel"]}


# Always recomputed, parts and all: the report describes whatever is committed now (a takedown changes it).
CRAWL_PARTS_STAGE = Stage(
    name=CRAWL_PARTS,
    plan=plan_crawl_parts,
    run_shard=run_crawl_part,
    config_key="stats",
    redo=True,
    shards_per_task=8,
)
FINAL_PARTS_STAGE = Stage(
    name=FINAL_PARTS,
    plan=plan_final_parts,
    run_shard=run_final_part,
    config_key="stats",
    redo=True,
    shards_per_task=8,
)
STAGE = Stage(name="stats", plan=plan_stats, run_shard=run_stats, config_key="stats", redo=True)
STAGES = (CRAWL_PARTS_STAGE, FINAL_PARTS_STAGE, STAGE)
