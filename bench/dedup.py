"""Dedup benchmark: clipline dedup vs a naive polars group-by (exact) and brute-force Hamming (near).

Input: N synthetic crawl rows (no images needed) in shards of 100k: random 64-bit
pHashes and colour grids, and window signatures (images.WINDOWS: six windows, each a
random pHash, colour grid and texture), with planted exact copies (same bytes) and
planted near-duplicates (every window's pHash with the same 1-8 bits flipped, same
colours, a smaller resolution). clipline runs its
four dedup steps on a local 2-CPU Ray; the peers run on the same rows:
- exact: polars `group_by(sha256)` on the hex digests (what people write by hand on
  img2dataset output), rows/s; and the same on the integer `sha256_key` column that
  clipline's crawl adds and its exact map reads, to show how much of the gap is the
  column's representation;
- near: brute-force XOR/popcount of a sample of rows against all N (the all-pairs
  method, which is also the ground truth for recall on that sample).

Each side runs in a subprocess; peak RSS is sampled over its process tree. The exact
sides run --repeats times (default 3), interleaved, and report the median run.

    python bench/dedup.py --quick          # 1M rows
    python bench/dedup.py --rows 10000000
    python bench/dedup.py --rows 10000000 --hold-radius-from 1000000 --clipline-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, run_subprocess, start_ray_warm  # noqa: E402

SHARD_ROWS = 100_000
CPUS = 2  # the local Ray's CPUs (--cpus)
EXACT, NEAR = 0.10, 0.10


def _splitmix(x):
    import numpy as np

    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def window_sigs(phash, original, near_mask, rng):
    """The window_sig column of rows whose whole-image pHash is `phash`: windows 1-5 and every colour grid
    drawn from the row's original (so copies share them), a near copy's windows with as many bits flipped
    as its whole pHash (`near_mask`: the bits flipped there), every window textured."""
    import numpy as np
    import pyarrow as pa

    from pipeline.images import WINDOW_BYTES, WINDOWS

    m, windows = len(phash), len(WINDOWS)
    seed = original.astype(np.uint64) * np.uint64(64)
    hashes = np.stack([phash.view(np.uint64)] + [_splitmix(seed + np.uint64(w)) for w in range(1, windows)], axis=1)
    flips = np.bitwise_count(near_mask)
    for w in range(1, windows):  # the same number of bits as the whole image, at other places
        ranks = np.argsort(rng.random((m, 64)), axis=1)
        bits = (ranks < flips[:, None]).astype(np.uint64) << np.arange(64, dtype=np.uint64)
        hashes[:, w] ^= np.bitwise_or.reduce(bits, axis=1)
    words = np.stack([_splitmix(seed + np.uint64(8 + k)) for k in range(windows * 6)], axis=1)
    out = np.empty((m, windows, WINDOW_BYTES), dtype=np.uint8)
    out[:, :, :8] = hashes.astype(">u8").view(np.uint8).reshape(m, windows, 8)
    out[:, :, 8:56] = words.view(np.uint8).reshape(m, windows, 48)
    out[:, :, 56] = 5 + (_splitmix(seed + np.uint64(63)) % np.uint64(50)).astype(np.uint8)[:, None]
    size = windows * WINDOW_BYTES
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), m, [None, pa.py_buffer(out.tobytes())])
    return fixed.cast(pa.binary())


def make_rows(n: int, work: Path, seed: int = 0) -> dict:
    """Write N crawl-shaped rows in shards; returns the planted truth (near pairs by distance)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.schema import CRAWL_DISTINCT
    from pipeline.stage import marker_path
    from pipeline.storage import open_storage

    rng = np.random.default_rng(seed)
    phash = rng.integers(-(1 << 63), (1 << 63) - 1, size=n, dtype=np.int64)
    sha = rng.integers(0, 1 << 60, size=n, dtype=np.int64)
    colour = rng.integers(0, 1 << 60, size=n, dtype=np.int64)
    kind = rng.random(n)
    exact = kind < EXACT
    near = (kind >= EXACT) & (kind < EXACT + NEAR)
    originals = np.nonzero(~(exact | near))[0]
    source = originals[rng.integers(0, len(originals), size=n)]  # copies are always of an original row
    sha[exact] = sha[source[exact]]
    phash[exact] = phash[source[exact]]
    colour[exact | near] = colour[source[exact | near]]
    flips = rng.integers(1, 9, size=n)
    near_hash = phash[source].view(np.uint64).copy()
    for i in np.nonzero(near)[0]:
        for bit in rng.choice(64, size=flips[i], replace=False):
            near_hash[i] ^= np.uint64(1) << np.uint64(bit)
    phash[near] = near_hash[near].view(np.int64)
    original = np.where(exact | near, source, np.arange(n))
    near_mask = np.where(near, (phash ^ phash[source]).view(np.uint64), np.uint64(0))
    store = open_storage(work)
    for s in range(0, n, SHARD_ROWS):
        e = min(n, s + SHARD_ROWS)
        hexes = [f"{v:015x}" for v in sha[s:e]]
        table = pa.table(
            {
                "uid": [f"{i:032x}" for i in range(s, e)],
                "status": ["success"] * (e - s),
                "sha256": [h * 4 + "0000" for h in hexes],
                "sha256_key": sha[s:e],  # the first 15 hex digits, as the crawl writes it (schema.sha256_key)
                "pixel_hash": sha[s:e] ^ 0x0123456789ABCDE,  # equal for equal bytes, as decoding is
                "phash": phash[s:e],
                "colour_sig": [f"{v:015x}" * 3 + "000" for v in colour[s:e]],
                "window_sig": window_sigs(phash[s:e], original[s:e], near_mask[s:e], rng),
                "caption": [f"caption {i}" for i in range(s, e)],
                # near copies smaller than their original, as the web's resized copies are: the original
                # (or an exact copy of it) is the keeper, and with star clusters a copy joins it when it matches it
                "original_width": np.where(near_mask[s:e] != 0, 200, 256).astype(np.int32),
                "original_height": np.full(e - s, 256, dtype=np.int32),
            }
        )
        shard = s // SHARD_ROWS
        store.write_parquet(f"crawl/{shard:05d}.parquet", table, distinct=CRAWL_DISTINCT)  # as the crawl writes it
        store.write_json(marker_path("crawl", shard), {"stats": {"success": e - s}, "config_sha256": "bench"})
    near_rows = np.nonzero(near)[0]
    return {
        # arrays, not a dict of tuples: 10M planted pairs at 100M rows
        "near": {"row": near_rows, "source": source[near_rows], "bits": flips[near_rows]},
        "exact_rows": int(exact.sum()),
        "near_rows": int(near.sum()),
    }


def near_recall(work: Path, near: dict) -> dict[int, float]:
    """Recall of the planted near copies by bits flipped: the share that ended in their original's
    cluster. Joins in polars on integer row ids (a dict of every row's cluster was ~15 GB at 100M)."""
    import polars as pl

    out = pl.scan_parquet(str(work / "dedup" / "0*.parquet")).select(
        row=pl.col("uid").str.to_integer(base=16), cluster=pl.coalesce("dup_of", "uid").str.to_integer(base=16)
    )
    pairs = pl.LazyFrame({"row": near["row"], "source": near["source"], "bits": near["bits"]})
    joined = pairs.join(out, on="row").join(out.rename({"row": "source", "cluster": "source_cluster"}), on="source")
    by_bits = (
        joined.group_by("bits")
        .agg(recall=(pl.col("cluster") == pl.col("source_cluster")).mean(), pairs=pl.len())
        .sort("bits")
        .collect()
    )
    assert by_bits["pairs"].sum() == len(near["row"]), "every planted copy has a dedup row"
    return {int(b): round(float(r), 4) for b, r in by_bits.select("bits", "recall").iter_rows()}


# Scratch disk a row takes (measured at 1M rows, 2026-12-02): the crawl-shaped input 0.39 KB; the
# dedup work files 3.23 KB with six windows (the map's shuffle most of it; fewer windows write less);
# the exact-only peer run, a copy of the input and 0.07 KB of work files.
INPUT_KB_PER_ROW, WORK_KB_PER_ROW, EXACT_WORK_KB_PER_ROW = 0.39, 3.23, 0.07


def scratch_needed_gb(n: int, peers: bool) -> float:
    """The scratch disk a run of n rows needs (both runs' files are kept to the end)."""
    per_row = INPUT_KB_PER_ROW + WORK_KB_PER_ROW + (INPUT_KB_PER_ROW + EXACT_WORK_KB_PER_ROW if peers else 0)
    return n * per_row / 1e6


def tree_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def side_clipline(
    work: Path, near_windows: int = 6, graph_images: int | None = None, hold_from: int | None = None
) -> dict:
    from pipeline.config import RunConfig
    from pipeline.dedup import COMPONENTS, STAGES, DedupConfig
    from pipeline.runner import run_pipeline
    from pipeline.stage import committed_shards, read_marker
    from pipeline.storage import open_storage

    start_ray_warm(CPUS)
    store = open_storage(work)
    started = time.perf_counter()
    settings = {"images_per_graph_partition": graph_images} if graph_images else {}
    settings |= {"hold_radius_from": hold_from} if hold_from else {}
    run = RunConfig(out=str(work), dedup=DedupConfig(near_windows=near_windows, **settings))
    reports = run_pipeline(list(STAGES), store, run, progress=False)
    seconds = time.perf_counter() - started
    plan = store.read_json("dedup/_plan.json")
    # Each shard's marker holds its process's peak RSS over that shard: the largest, per step.
    task_peak = {}
    for r in reports:
        peaks = [read_marker(store, r.stage, s).get("peak_rss_mb") for s in committed_shards(store, r.stage)]
        if peaks:
            task_peak[r.stage] = max(p or 0 for p in peaks)
    rounds = next(r for r in reports if r.stage == "dedup/_rounds")
    return {
        "seconds": seconds,
        "stage_seconds": {r.stage: round(r.seconds, 2) for r in reports},
        "task_peak_rss_mb": task_peak,
        "near_index": plan["near_index"],
        "window_index": plan["window_index"],
        "partitions": plan["partitions"],
        "graph_partitions": plan["graph_partitions"],
        "component_rounds": len(rounds.ran) // plan["graph_partitions"],
        "duplicates": next(r for r in reports if r.stage == COMPONENTS).total("duplicates"),
    }


def side_clipline_exact(work: Path) -> dict:
    """clipline dedup with only the exact checks on (bytes and pixels), in a fresh location."""
    import shutil

    from pipeline.config import RunConfig
    from pipeline.dedup import COMPONENTS, STAGES, DedupConfig
    from pipeline.runner import run_pipeline
    from pipeline.storage import open_storage

    exact_work = work.parent / (work.name + "-exact")
    shutil.rmtree(exact_work, ignore_errors=True)  # a fresh location each repeat
    shutil.copytree(work / "crawl", exact_work / "crawl")
    start_ray_warm(CPUS)
    run = RunConfig(out=str(exact_work), dedup=DedupConfig(near=False, caption=False))
    started = time.perf_counter()
    reports = run_pipeline(list(STAGES), open_storage(exact_work), run, progress=False)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "stage_seconds": {r.stage: round(r.seconds, 2) for r in reports},
        "duplicates": next(r for r in reports if r.stage == COMPONENTS).total("duplicates"),
    }


def side_exact_peer(work: Path, column: str = "sha256") -> dict:
    import polars as pl

    started = time.perf_counter()
    frame = pl.scan_parquet(str(work / "crawl" / "*.parquet")).select(column)
    groups = frame.group_by(column).agg(pl.len().alias("n")).filter(pl.col("n") > 1).collect()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "duplicates": int((groups["n"] - 1).sum())}


def side_exact_peer_int(work: Path) -> dict:
    """The same group-by on the crawl's integer sha256_key, which clipline's exact map reads."""
    return side_exact_peer(work, "sha256_key")


def side_near_peer(work: Path) -> dict:
    """Brute force: each sampled row against all N rows (the all-pairs method)."""
    import numpy as np
    import polars as pl

    frame = pl.read_parquet(str(work / "crawl" / "*.parquet"), columns=["phash", "colour_sig"])
    h = frame["phash"].to_numpy().view(np.uint64)
    sample = min(2000, max(200, 2_000_000_000 // len(h)))  # about a minute whatever N is
    colours = frame["colour_sig"].to_numpy()  # synthetic grids: copies share theirs, others differ widely
    rows = np.random.default_rng(1).choice(len(h), size=min(sample, len(h)), replace=False)
    table = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)
    started = time.perf_counter()
    neighbours = {}
    for r in rows:
        x = h ^ h[r]
        d = sum(table[((x >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.int64)] for k in range(4))
        near = np.nonzero((d <= 8) & (colours == colours[r]))[0]
        neighbours[int(r)] = [int(j) for j in near if j != r]
    seconds = time.perf_counter() - started
    return {
        "seconds_sample": seconds,
        "sample": len(rows),
        "projected_seconds_all": seconds * len(h) / len(rows),
        "neighbours": neighbours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M rows")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each exact side (the median is reported)")
    parser.add_argument(
        "--side", choices=("clipline", "clipline_exact", "exact", "exact_int", "near"), help=argparse.SUPPRESS
    )
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=None, help="where rows and work files go (default: temp dir)")
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    parser.add_argument("--near-windows", type=int, default=6, help="dedup.near_windows (1: the whole image only)")
    parser.add_argument("--graph-images", type=int, default=None, help="dedup.images_per_graph_partition")
    parser.add_argument("--hold-radius-from", type=int, default=None, help="dedup.hold_radius_from")
    parser.add_argument(
        "--clipline-only", action="store_true", help="no peers (no exact sides, no brute-force recall sample)"
    )
    parser.add_argument(
        "--same-with-partitions",
        type=int,
        default=None,
        metavar="G",
        help="run clipline again with G graph partitions and check its outputs are byte-identical",
    )
    args = parser.parse_args()
    global CPUS
    CPUS = args.cpus
    if args.side:
        fn = {
            "clipline": side_clipline,
            "clipline_exact": side_clipline_exact,
            "exact": side_exact_peer,
            "exact_int": side_exact_peer_int,
            "near": side_near_peer,
        }[args.side]
        if args.side == "clipline":
            print(json.dumps(fn(args.work, args.near_windows, args.graph_images, args.hold_radius_from)))
        else:
            print(json.dumps(fn(args.work)))
        return

    n = args.rows or (1_000_000 if args.quick else 10_000_000)
    scratch = args.scratch or Path(tempfile.gettempdir())
    if not scratch.is_dir():
        parser.error(f"--scratch {scratch} is not a directory")
    need, free = scratch_needed_gb(n, not args.clipline_only), shutil.disk_usage(scratch).free / 1e9
    if need > free:  # refuse now, not at ENOSPC an hour in
        parser.error(f"{n:,} rows need ~{need:,.0f} GB of scratch disk; {scratch} has {free:,.0f} GB free (--scratch)")
    work = Path(tempfile.mkdtemp(prefix="clipline-bench-dedup-", dir=scratch))
    t0 = time.perf_counter()
    truth = make_rows(n, work)
    print(
        f"generated {n:,} rows in {time.perf_counter() - t0:.1f}s ({truth['exact_rows']:,} exact copies, "
        f"{truth['near_rows']:,} near copies)",
        flush=True,
    )
    results = {}
    # The exact sides take seconds, so this shared machine's noise (+-10%) moves them most:
    # each runs `repeats` times, interleaved, and reports its median run (with every time).
    sides = () if args.clipline_only else ("exact", "exact_int", "clipline_exact")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, done in runs.items():
            done.append(run_subprocess(__file__, ["--side", side, "--work", str(work), "--cpus", str(args.cpus)]))
    for side, done in runs.items():
        results[side] = {
            **sorted(done, key=lambda r: r["seconds"])[len(done) // 2],
            "seconds_runs": [round(r["seconds"], 3) for r in done],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
        }
    clipline_args = ["--near-windows", str(args.near_windows), "--cpus", str(args.cpus)]
    if args.graph_images:
        clipline_args += ["--graph-images", str(args.graph_images)]
    if args.hold_radius_from:
        clipline_args += ["--hold-radius-from", str(args.hold_radius_from)]
    if not args.clipline_only:
        results["near"] = run_subprocess(__file__, ["--side", "near", "--work", str(work)])
    results["clipline"] = run_subprocess(__file__, ["--side", "clipline", "--work", str(work), *clipline_args])
    # Its disk: the input, and every dedup work file (kept to the end of the run).
    results["clipline"] |= {"input_gb": round(tree_gb(work / "crawl"), 2), "scratch_gb": round(tree_gb(work), 2)}
    same_with = None
    if args.same_with_partitions:  # the graph steps in G partitions: the same bytes as in the run above
        other = work.parent / (work.name + "-partitions")
        shutil.copytree(work / "crawl", other / "crawl")
        graph_images = -(-n // args.same_with_partitions)
        extra = [*clipline_args[:4], "--graph-images", str(graph_images)]  # windows and CPUs as above
        results["clipline_partitions"] = run_subprocess(__file__, ["--side", "clipline", "--work", str(other), *extra])
        outputs = sorted(p.name for p in (work / "dedup").glob("0*.parquet"))
        same = all((work / "dedup" / f).read_bytes() == (other / "dedup" / f).read_bytes() for f in outputs)
        same_with = {"graph_partitions": results["clipline_partitions"]["graph_partitions"], "identical": same}
        shutil.rmtree(other, ignore_errors=True)
    for side, result in results.items():
        shown = {k: v for k, v in result.items() if k != "neighbours"}
        print(f"{side:<9} {shown}", flush=True)

    recall = near_recall(work, truth["near"])  # of the planted near copies, by bits flipped
    clip = results["clipline"]
    summary = {
        "benchmark": "dedup",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "inputs": {
            "rows": n,
            "exact_copies": truth["exact_rows"],
            "near_copies": truth["near_rows"],
            "near_threshold": 10,
            "colour_tolerance": 8,
            "near_windows": args.near_windows,
            "hold_radius_from": args.hold_radius_from,
            "exact_repeats": 0 if args.clipline_only else args.repeats,
        },
        "clipline": {**clip, "rows_per_s": n / clip["seconds"]},
        "clipline_other_partitions": results.get("clipline_partitions"),
        "outputs_identical_with_other_partitions": same_with,
        "near_recall_by_distance": recall,
    }
    print()
    print(
        f"clipline dedup (exact + near + caption): {n / clip['seconds']:,.0f} rows/s, peak RSS {clip['peak_rss_mb']} MB"
    )
    if not args.clipline_only:
        # Against the brute-force neighbours of the sample: the same join on those pairs.
        pairs = [(int(r), int(j)) for r, js in results["near"]["neighbours"].items() for j in js]
        sample_recall = 0.0  # no neighbours in the sample: nothing to find (as before, 0 over max(1, 0))
        if pairs:
            rows, others = [r for r, _ in pairs], [j for _, j in pairs]
            sample_recall = near_recall(work, {"row": rows, "source": others, "bits": [0] * len(pairs)})[0]
        exact = results["exact"]
        summary |= {
            "clipline_exact_only": {
                **results["clipline_exact"],
                "rows_per_s": n / results["clipline_exact"]["seconds"],
            },
            "exact_peer_polars_group_by": {**exact, "rows_per_s": n / exact["seconds"]},
            "exact_peer_polars_group_by_int_key": {
                **results["exact_int"],
                "rows_per_s": n / results["exact_int"]["seconds"],
            },
            "near_peer_brute_force": {k: v for k, v in results["near"].items() if k != "neighbours"},
            "near_recall_vs_brute_force_sample": round(sample_recall, 4),
            "ratio_exact_rows_per_s_vs_polars_group_by": round(
                exact["seconds"] / results["clipline_exact"]["seconds"], 3
            ),
            "speedup_vs_brute_force": round(results["near"]["projected_seconds_all"] / clip["seconds"], 1),
        }
        rate = n / exact["seconds"]
        print(f"polars group-by (exact only):          {rate:,.0f} rows/s, peak RSS {exact['peak_rss_mb']} MB")
        print(
            f"brute-force near (projected all rows): {results['near']['projected_seconds_all']:,.0f}s "
            f"vs clipline {clip['seconds']:.0f}s = {summary['speedup_vs_brute_force']}x"
        )
        print(f"near recall vs brute force sample: {sample_recall:.4f}")
    print(f"near index: {clip['near_index']}, windows: {clip['window_index']}; recall by distance: {recall}")
    print(f"per-task peak RSS by step (MB): {clip['task_peak_rss_mb']}")
    if same_with:
        print(f"outputs with {same_with['graph_partitions']} graph partitions identical: {same_with['identical']}")
    shutil.rmtree(work, ignore_errors=True)  # ~36 GB at 10M rows
    shutil.rmtree(work.parent / (work.name + "-exact"), ignore_errors=True)
    suffix = "" if args.near_windows == 6 else f"-windows{args.near_windows}"
    suffix += f"-held{args.hold_radius_from}" if args.hold_radius_from else ""
    out_path = REPO / "bench" / "results" / f"dedup-{n}{suffix}.json"
    out_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
