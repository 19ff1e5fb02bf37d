"""Pipeline benchmark and the 400M cost model: every data stage end to end on the synthetic web, at 2-3 sizes.

Each stage runs as its own `clipline <stage> --executor inline` subprocess (one
process, so its CPU time is exactly the stage's cost) against the synthetic web
served on loopback. Per stage and size: wall seconds, core-seconds (user + sys)
and peak RSS. The marginal cost per input URL is the slope of core-seconds over
the sizes (a least-squares line; the intercept is start-up: imports, Ray-free
planning); linearity is checked by how well the line fits. The projection for
400M input URLs is slope x 4e8, in core-hours, and the wall-clock on N workers
of 16 cores. (There is no peer here: docs/performance.md compares it with LAION-400M's
published figure instead.)

Caveat: the synthetic web's images are small (64-512 px); web images cost more
to decode, so the crawl projection is a lower bound for CPU (the crawl's real
bound is the network and the remote hosts' politeness limits).

    python bench/pipeline.py --quick     # tiny + small webs
    python bench/pipeline.py             # tiny + small + medium
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402

STAGES = ("ingest", "crawl", "dedup", "filter", "shard", "stats")
LAION_400M = {"core_hours": 3.5 * 24 * 16, "note": "LAION-400M: 3.5 days on one 16-core machine with img2dataset"}


# `python -m pipeline ARGS`, then this process's own peak RSS (KiB) as the last line of stderr.
WRAPPER = """
import resource, runpy, sys
sys.argv = ["clipline", *sys.argv[1:]]
try:
    runpy.run_module("pipeline", run_name="__main__")
finally:
    print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_stage(stage: str, config: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, "-q", stage, "--config", str(config), "--executor", "inline"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-2000:]}")
    return {
        "wall_s": wall,
        "core_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": int(done.stderr.strip().splitlines()[-1].split()[-1]) / 1024,
    }


def run_size(size: str, work: Path) -> dict:
    from pipeline.config import dump_config
    from pipeline.demo import demo_config
    from pipeline.web import SIZES, SyntheticWeb, generate

    root = generate(work / size / "web", SIZES[size])
    with SyntheticWeb(root) as web:
        config = demo_config(size, str(work / size / "out"), web.root)
        path = work / size / "run.yaml"
        path.write_text(dump_config(config))
        stages = {stage: run_stage(stage, path) for stage in STAGES}
        urls = web.truth().num_rows
    funnel = json.loads((work / size / "out" / "dataset/stats/stats.json").read_text())["funnel"]
    return {"urls": urls, "funnel": funnel, "stages": stages}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, r2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys) or 1e-12
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True)) / ss
    return a, b, r2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = ("tiny", "small") if args.quick else ("tiny", "small", "medium")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {size: run_size(size, Path(tmp)) for size in sizes}
    xs = [runs[s]["funnel"]["input_rows"] for s in sizes]
    model, total_per_url = {}, 0.0
    for stage in STAGES:
        a, b, r2 = fit(xs, [runs[s]["stages"][stage]["core_s"] for s in sizes])
        b = max(b, 0.0)
        model[stage] = {"startup_core_s": a, "core_s_per_1M": b * 1e6, "r2": r2,
                        "peak_rss_mb": max(runs[s]["stages"][stage]["peak_rss_mb"] for s in sizes)}  # fmt: skip
        total_per_url += b
    core_hours = total_per_url * 4e8 / 3600
    projection = {
        "input_urls": 400_000_000,
        "core_hours": core_hours,
        "wall_hours": {f"{n} x 16 cores": core_hours / (16 * n) for n in (1, 8, 64)},
        "laion_400m_core_hours": LAION_400M["core_hours"],
        "ratio_vs_laion": LAION_400M["core_hours"] / core_hours if core_hours else None,
    }
    print(
        f"\n{'stage':8} "
        + " ".join(f"{s + ' core-s':>16}" for s in sizes)
        + f" {'core-s / 1M URLs':>17} {'fit r2':>7} {'peak RSS':>9}"
    )
    for stage in STAGES:
        row = " ".join(f"{runs[s]['stages'][stage]['core_s']:16.1f}" for s in sizes)
        m = model[stage]
        print(f"{stage:8} {row} {m['core_s_per_1M']:17.0f} {m['r2']:7.3f} {m['peak_rss_mb']:7.0f}MB")
    print(f"input URLs: {', '.join(f'{s} {x}' for s, x in zip(sizes, xs, strict=True))}")
    walls = ", ".join(f"{k} {v:.1f} h" for k, v in projection["wall_hours"].items())
    print(f"400M URLs: {core_hours:.0f} core-hours; wall: {walls}")
    print(f"LAION-400M with img2dataset: {LAION_400M['core_hours']:.0f} core-hours (3.5 days x 16 cores)")
    out = REPO / "bench" / "results" / "pipeline.json"
    out.write_text(json.dumps({"bench": "pipeline", "quick": args.quick, "runs": runs, "model": model,
                               "projection": projection, "machine": machine()}, indent=1))  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
