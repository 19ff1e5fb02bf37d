"""CLIP-style curation benchmark: metadata matching with clipline (polars' Aho-Corasick over Arrow columns)
vs pyahocorasick used from a Python loop (MetaCLIP's released matcher), on the same entries and captions;
then the balancing pass at 10M rows.

Entries (500,000 by default): WordNet's lemmas (Debian's wordnet-base, unpacked into
.cache/ when not installed) plus the most frequent words and bigrams of the caption
corpus, as CLIP's list joins WordNet and frequent Wikipedia n-grams. Captions (>= 1M):
real translated sentences from Debian's gettext catalogues (52 languages) mixed with
the synthetic web's captions, repeated to the size asked for.

Each side runs in its own subprocess with one thread (POLARS_MAX_THREADS=1), twice in
the order A B B A; the figure is the median. Both sides' matches are compared caption
by caption. Peak RSS is the side's whole process (captions and entries included); the
automaton's own share is the RSS growth while it is built and used, minus the output.

    python bench/curation.py --quick     # 100k entries, 200k captions, balancing at 1M rows
    python bench/curation.py             # 500k entries, 1M captions, balancing at 10M rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, realish_captions, run_subprocess  # noqa: E402

WORDNET = Path("/usr/share/wordnet")
CACHED_WORDNET = REPO / ".cache" / "wordnet" / "usr" / "share" / "wordnet"


def wordnet_dir() -> Path:
    if (WORDNET / "index.noun").exists():
        return WORDNET
    if not (CACHED_WORDNET / "index.noun").exists():
        deb = REPO / ".cache" / "deb"
        deb.mkdir(parents=True, exist_ok=True)
        subprocess.run("apt-get download wordnet-base && dpkg -x wordnet-base_*.deb ../wordnet", shell=True,
                       cwd=deb, check=True, capture_output=True)  # fmt: skip
    return CACHED_WORDNET


def make_inputs(work: Path, n_entries: int, n_captions: int) -> tuple[Path, Path]:
    """entries.txt and captions.parquet, deterministic."""

    import polars as pl

    from pipeline.curation import corpus_terms, wordnet_lemmas

    mixed = realish_captions(100_000)
    captions = (mixed * (n_captions // len(mixed) + 1))[:n_captions]
    lemmas = wordnet_lemmas(wordnet_dir())
    words, bigrams = corpus_terms(mixed, min_count=2, bigram_min_count=2, min_pmi=0.0)
    entries = list(dict.fromkeys([*lemmas, *words, *bigrams]))[:n_entries]
    (work / "entries.txt").write_text("\n".join(entries) + "\n")
    pl.DataFrame({"caption": captions}).write_parquet(work / "captions.parquet")
    return work / "entries.txt", work / "captions.parquet"


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def side(name: str, entries_file: str, captions_file: str, out_file: str) -> None:
    """One side's run in this process: prints a JSON line."""
    import polars as pl

    entries = tuple(Path(entries_file).read_text().splitlines())
    captions = pl.read_parquet(captions_file)["caption"]
    base = rss()
    start = time.perf_counter()
    if name == "clipline":
        from pipeline.curation import match

        shard = 100_000  # as the filter runs: one automaton per crawl shard
        parts = [match(captions.slice(i, shard), entries) for i in range(0, len(captions), shard)]
        found = pl.concat(parts)
    else:
        import ahocorasick

        from pipeline.curation import PUNCTUATION

        automaton = ahocorasick.Automaton()
        for i, e in enumerate(entries):
            automaton.add_word(f" {e} ", i)  # the first id of a repeated entry is overwritten: entries are unique
        automaton.make_automaton()
        out = []
        for c in captions.to_list():
            text = f" {c or ''} "
            for p in PUNCTUATION:
                text = text.replace(p, f" {p} ")
            for ch in "\t\n\r":
                text = text.replace(ch, " ")
            out.append(sorted({i for _, i in automaton.iter(text)}))
        found = pl.Series("metadata_ids", out, dtype=pl.List(pl.Int32))
    seconds = time.perf_counter() - start
    grown = rss() - base
    pl.DataFrame({"ids": found}).write_parquet(out_file)
    print(json.dumps({"seconds": seconds, "rss_growth": grown, "matches": int(found.list.len().sum())}))


def balancing(rows: int, entries: int) -> dict:
    """Counting and the per-sample decision over `rows` rows with Zipf-distributed entries (3 a row on average)."""
    import numpy as np
    import polars as pl

    from pipeline.curation import balanced, entry_counts

    rng = np.random.default_rng(0)
    per_row = rng.poisson(3, rows).astype(np.int64)
    flat = (rng.zipf(1.3, per_row.sum()) - 1) % entries
    offsets = np.concatenate([[0], np.cumsum(per_row)])
    import pyarrow as pa

    ids = pl.from_arrow(pa.ListArray.from_arrays(offsets.astype(np.int32), flat.astype(np.int32)))
    uids = pl.Series([f"{x:032x}" for x in rng.integers(0, 2**63, rows, dtype=np.int64)])
    start = time.perf_counter()
    counted = entry_counts(ids)
    counts = np.zeros(entries, dtype=np.int64)
    part = counted.filter(pl.col("entry") >= 0)
    counts[part["entry"].to_numpy()] = part["count"].to_numpy()
    count_s = time.perf_counter() - start
    start = time.perf_counter()
    keep = balanced(uids, ids, counts, 20_000 * rows / 400e6)
    decide_s = time.perf_counter() - start
    return {"rows": rows, "count_rows_per_s": round(rows / count_s), "decide_rows_per_s": round(rows / decide_s),
            "kept": int(keep.sum())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args.side, *args.files)
        return
    n_entries, n_captions, n_rows = (100_000, 200_000, 1_000_000) if args.quick else (500_000, 1_000_000, 10_000_000)
    os.environ["POLARS_MAX_THREADS"] = "1"
    import polars as pl

    with tempfile.TemporaryDirectory(prefix="clipline-bench-curation-") as tmp:
        work = Path(tmp)
        entries, captions = make_inputs(work, n_entries, n_captions)
        runs: dict[str, list[dict]] = {"clipline": [], "pyahocorasick": []}
        for name in ("clipline", "pyahocorasick", "pyahocorasick", "clipline"):
            out = work / f"{name}.parquet"
            runs[name].append(run_subprocess(__file__, ["--side", name, "--files", str(entries), str(captions),
                                                         str(out)]))  # fmt: skip
        a = pl.read_parquet(work / "clipline.parquet")["ids"]
        b = pl.read_parquet(work / "pyahocorasick.parquet")["ids"]
        identical = a.to_list() == b.to_list()
        n_entries_real = len(entries.read_text().splitlines())
    rate = {k: n_captions / statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    balance = balancing(n_rows, n_entries_real)
    per_core = rate["clipline"]
    hours = 400e6 / per_core / 3600 + 400e6 / balance["count_rows_per_s"] / 3600 + 400e6 / balance[
        "decide_rows_per_s"] / 3600  # fmt: skip
    report = {
        "entries": n_entries_real,
        "captions": n_captions,
        "identical_matches": identical,
        "matches": runs["clipline"][0]["matches"],
        "captions_per_s_per_core": {k: round(v) for k, v in rate.items()},
        "ratio": round(rate["clipline"] / rate["pyahocorasick"], 2),
        "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
        "automaton_rss_growth_mb": {k: round(max(r["rss_growth"] for r in v) / 2**20) for k, v in runs.items()},
        "seconds": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
        "balancing": balance,
        "projection_400m_core_hours": round(hours, 2),
        "machine": machine(),
    }
    name = "curation-quick.json" if args.quick else "curation.json"
    (REPO / "bench" / "results" / name).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}))


if __name__ == "__main__":
    main()
