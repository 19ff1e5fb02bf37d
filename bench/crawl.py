"""Crawl benchmark: clipline crawl vs raw img2dataset, same URLs of the loopback synthetic web.

Both sides crawl the same work shards: the web's images (no faults) are ingested
once, untimed, and img2dataset reads clipline's ingest/*.parquet files as its
URL list (this is also the way to run raw img2dataset on clipline work shards:
`img2dataset --url_list OUT/ingest --input_format parquet ...`). Same resize
(center_crop to --size px), JPEG quality 95, webdataset output, 2 processes ×
32 threads. clipline runs with every guard on (address guard, deadline, byte
cap, robots.txt, X-Robots-Tag, format allow-list, bomb check); its per-host
politeness is widened (16 in flight, no rate cap per host) and held per crawl
task, not across the cluster (`cluster_politeness` off), because this web has
only a few hosts and the comparison is about throughput, not manners: with 8
hosts, two tasks holding cluster-wide host leases take turns on them, which a
web of millions of hosts does not make them do. `--leases` measures with the
leases on (results in crawl[-photos]-leases.json). Ray is
started before the clock starts (a cluster is long-lived); img2dataset's own
start-up (its process pool) is inside its time.

Each side runs in its own subprocess; the parent serves the web and samples the
side's process tree for peak RSS. Prints a table and writes bench/results/crawl.json.

    python bench/crawl.py --quick        # ~1,500 images, under a minute
    python bench/crawl.py                # 12,000 images, 3 rounds
    python bench/crawl.py --photos       # 1,200 real photographs, 320-1,600 px, JPEG q85, to 256 px
    python bench/crawl.py --photos --images 4800   # every core busy to the end, as at scale

--photos serves web-sized real photographs instead of the synthetic images: crops of the
photographs in Debian's wallpaper packages (bench/dedup_quality.py fetches them), each at a
random longest side of 320-1,600 px, JPEG q85, the same bytes for both sides. Results go to
bench/results/crawl-photos.json (crawl-photos-N.json for another --images N). With 1,200 photos in
shards of 1,000, each side ends on its big shard alone; 4,800 keep both processes busy, which is
the steady state of a large crawl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, run_subprocess  # noqa: E402


def run_side(side: str, shards: Path, work: Path, size: int, allow: str, leases: bool) -> dict:
    """Run one side in a subprocess; its JSON report plus the peak RSS of its process tree."""
    args = ["--side", side, "--urls", str(shards), "--work", str(work), "--size", str(size), "--allow", allow]
    return run_subprocess(__file__, args + (["--leases"] if leases else []))


# --- the two sides (run in the subprocess) --------------------------------------------------


def bench_config(urls: Path, work: Path, size: int, allow: str, leases: bool = False):
    from pipeline.config import RunConfig
    from pipeline.crawl import CrawlConfig
    from pipeline.ingest import IngestConfig

    return RunConfig(
        out=str(work),
        ingest=IngestConfig(inputs=(str(urls),), shard_size=1000),
        crawl=CrawlConfig(
            image_size=size,
            resize_mode="center_crop",
            encode_quality=95,
            allow_networks=(allow,),
            dns=False,
            threads=32,
            per_host_concurrency=16,
            per_host_rps=0.0,
            timeout_s=10,
            cluster_politeness=leases,
        ),
    )


def ingest_once(urls: Path, work: Path, size: int, allow: str) -> Path:
    """The work shards both sides crawl (not timed: img2dataset has no such step)."""
    from pipeline.ingest import STAGES
    from pipeline.runner import run_pipeline
    from pipeline.storage import open_storage

    config = bench_config(urls, work, size, allow)
    run_pipeline(list(STAGES), open_storage(work), config, executor="inline", progress=False)
    return work / "ingest"


def side_clipline(shards: Path, work: Path, size: int, allow: str, leases: bool) -> dict:
    import shutil

    import ray

    from pipeline.crawl import STAGE
    from pipeline.runner import run_stage
    from pipeline.storage import open_storage

    shutil.copytree(shards, work / "ingest")  # this round's own copy of the committed work shards
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    store = open_storage(work)
    run = bench_config(shards, work, size, allow, leases)
    started = time.perf_counter()
    report = run_stage(STAGE, store, run, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "urls": report.total("rows"), "success": report.total("success")}


def side_img2dataset(shards: Path, work: Path, size: int, allow: str, leases: bool) -> dict:
    import glob

    import pyarrow.parquet as pq
    from img2dataset import download

    started = time.perf_counter()
    download(
        url_list=str(shards),  # the folder of work-shard parquet files
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(work),
        processes_count=2,
        thread_count=32,
        image_size=size,
        resize_mode="center_crop",
        encode_quality=95,
        encode_format="jpg",
        number_sample_per_shard=1000,
        timeout=10,
        retries=0,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    seconds = time.perf_counter() - started
    stats = [pq.read_table(p) for p in glob.glob(str(work / "*.parquet"))]
    success = sum(sum(1 for s in t["status"].to_pylist() if s == "success") for t in stats)
    return {"seconds": seconds, "urls": sum(t.num_rows for t in stats), "success": success}


def plant_photos(root: Path, files: list[str], seed: int = 0) -> dict:
    """Overwrite the web's image files with real photographs: a random crop of one of the wallpapers
    (half to all of its width), scaled to a longest side of 320-1,600 px, JPEG q85."""
    import io

    import numpy as np
    from PIL import Image

    from bench.dedup_quality import fetch_photos

    rng = np.random.default_rng(seed)
    pictures = fetch_photos()
    sizes, total = [], 0
    for p, path in enumerate(pictures):
        with Image.open(path) as img:
            img.draft("RGB", (img.width // 2, img.height // 2))
            picture = img.convert("RGB")
        for name in files[p :: len(pictures)]:
            w = int(picture.width * rng.uniform(0.5, 1.0))
            h = min(picture.height, int(w * rng.uniform(0.6, 1.0)))
            x, y = int(rng.integers(0, picture.width - w + 1)), int(rng.integers(0, picture.height - h + 1))
            photo = picture.crop((x, y, x + w, y + h))
            photo.thumbnail((int(rng.integers(320, 1601)),) * 2, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            photo.save(buf, "JPEG", quality=85)
            (root / "files" / name).write_bytes(buf.getvalue())
            sizes.append(max(photo.size))
            total += buf.tell()
    return {"photos": len(sizes), "pictures": len(pictures), "longest_side_median": int(np.median(sizes)),
            "mean_bytes": total // max(1, len(sizes))}  # fmt: skip


# --- driver ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1,500 images, one round")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="output image side (64; 256 with --photos)")
    parser.add_argument("--photos", action="store_true", help="1,200 web-sized real photographs (see above)")
    parser.add_argument("--sites", type=int, default=8, help="hosts of the synthetic web")
    parser.add_argument("--leases", action="store_true", help="clipline with cluster-wide host leases (see above)")
    parser.add_argument("--side", choices=("clipline", "img2dataset"), help=argparse.SUPPRESS)
    parser.add_argument("--urls", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--allow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        fn = side_clipline if args.side == "clipline" else side_img2dataset
        print(json.dumps(fn(args.urls, args.work, args.size, args.allow, args.leases)))
        return

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.web import SyntheticWeb, WebSpec, generate

    images = args.images or (1200 if args.photos else 1500 if args.quick else 12000)
    args.size = args.size or (256 if args.photos else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    base = Path(tempfile.mkdtemp(prefix="clipline-bench-crawl-"))
    spec = WebSpec(
        images=images,
        heldout=0,
        content_sites=args.sites,
        faults=False,
        exact_dup_fraction=0.0,
        near_dup_fraction=0.0,
        junk_caption_fraction=0.0,
    )
    root = generate(base / "web", spec)
    planted = None
    if args.photos:
        catalog = pq.read_table(root / "catalog.parquet").to_pylist()
        planted = plant_photos(root, sorted(r["file"] for r in catalog if r["behaviour"] == "image" and r["file"]))
        print(f"photos: {planted}", flush=True)
    results: dict[str, list[dict]] = {"clipline": [], "img2dataset": []}
    with SyntheticWeb(root) as web:
        truth = web.truth()
        images_only = truth.filter(pc.equal(truth["behaviour"], "image")).select(["url", "caption"])
        urls = base / "urls.parquet"
        pq.write_table(images_only, urls)
        shards = ingest_once(urls, base / "ingested", args.size, web.allow_list()[0])
        for r in range(rounds):
            for side in ("img2dataset", "clipline") if r % 2 else ("clipline", "img2dataset"):
                rep = run_side(side, shards, base / f"{side}-{r}", args.size, web.allow_list()[0], args.leases)
                rep["images_per_s"] = rep["success"] / rep["seconds"]
                rep["cpu_ms_per_image"] = 1000 * rep["cpu_s"] / max(1, rep["success"])
                results[side].append(rep)
                print(
                    f"round {r}: {side:<11} {rep['success']:>6}/{rep['urls']} images in {rep['seconds']:6.2f}s "
                    f"= {rep['images_per_s']:7.1f} img/s, {rep['cpu_ms_per_image']:5.1f} CPU-ms an image, "
                    f"peak RSS {rep['peak_rss_mb']} MB",
                    flush=True,
                )

    best = {side: max(reps, key=lambda x: x["images_per_s"]) for side, reps in results.items()}
    ratio = best["clipline"]["images_per_s"] / best["img2dataset"]["images_per_s"]
    summary = {
        "benchmark": "crawl",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "inputs": {
            "images": len(images_only),
            "sites": args.sites,
            "image_size": args.size,
            "rounds": rounds,
            "resize_mode": "center_crop",
            "processes": 2,
            "threads": 32,
            "cluster_politeness": args.leases,
            "photos": planted,
        },
        "clipline": best["clipline"],
        "img2dataset": best["img2dataset"],
        "all_rounds": results,
        "ratio_images_per_s": round(ratio, 3),
        # the CPU each side's whole process tree used per image, start-up included (Ray's start and the
        # workers' imports; img2dataset's pool), median over rounds: what a cluster pays
        "cpu_ms_per_image": {
            s: round(statistics.median(r["cpu_ms_per_image"] for r in v), 2) for s, v in results.items()
        },
        "same_success_count": best["clipline"]["success"] == best["img2dataset"]["success"],
    }
    print()
    print(f"{'side':<12}{'images/s':>10}{'success':>10}{'peak RSS MB':>13}")
    for side in ("clipline", "img2dataset"):
        b = best[side]
        print(f"{side:<12}{b['images_per_s']:>10.1f}{b['success']:>10}{b['peak_rss_mb']:>13}")
    print(f"ratio clipline/img2dataset: {ratio:.2f}x   same successes: {summary['same_success_count']}")
    cpu = summary["cpu_ms_per_image"]
    print(f"CPU-ms an image (median): clipline {cpu['clipline']}, img2dataset {cpu['img2dataset']}")
    name = ("crawl-photos" if args.photos else "crawl") + ("-leases" if args.leases else "")
    name += f"-{images}" if args.photos and images != 1200 else ""  # e.g. crawl-photos-4800.json
    out = REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
