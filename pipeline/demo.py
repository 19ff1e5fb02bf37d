"""`clipline demo`: the whole flow on the embedded defaults, on this machine.

Generates and serves the synthetic web on loopback (OUT/web/), runs every data
stage in order against it with outputs under OUT/ (or --storage), trains a tiny
CLIP on the final shards (OUT/train/), evaluates it (zero-shot and retrieval on
the web's held-out split, linear probe on it and on Fashion-MNIST when
installed; OUT/eval/eval.json) and prints what it did, with the time per stage.
Running it twice reuses committed work (the trainer resumes from its checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from pipeline import layout
from pipeline import stages as stage_registry
from pipeline.config import RunConfig, dump_config
from pipeline.crawl import CrawlConfig
from pipeline.errors import ConfigError
from pipeline.ingest import IngestConfig
from pipeline.shard import ShardConfig
from pipeline.storage import open_storage
from pipeline.web import SIZES, SyntheticWeb, generate
from pipeline.web.server import SITE_NET

log = logging.getLogger(__name__)


def demo_config(size: str, out: str, web_root: Path) -> RunConfig:
    """The embedded default config of the demo at `size`, crawling the synthetic web at `web_root`."""
    shard_size = {"tiny": 100, "small": 500, "medium": 2500}[size]
    return RunConfig(
        name=f"demo-{size}",
        out=out,
        ingest=IngestConfig(
            inputs=(str(web_root / "urls.parquet"),),
            shard_size=shard_size,
            blocklist_url_sha256=(str(web_root / "blocklist_url_sha256.txt"),),
        ),
        crawl=CrawlConfig(
            image_size=64,
            resize_mode="center_crop",
            min_image_size=32,
            max_aspect_ratio=6.0,
            timeout_s=3.0,
            deadline_s=5.0,
            backoff_s=0.5,
            max_retry_after_s=2.0,
            allow_networks=(f"{SITE_NET}.0/24",),  # the synthetic web, explicitly; nothing else private
            dns=False,  # every URL is numeric: no name lookup may leave the machine
            blocklist_image_sha256=(str(web_root / "blocklist_image_sha256.txt"),),
        ),
        shard=ShardConfig(samples_per_shard={"tiny": 100, "small": 500, "medium": 2000}[size]),
    )


# Training budget per size: enough for zero-shot well above chance on the held-out split, on 2 CPU cores.
TRAIN = {"tiny": dict(epochs=30, batch=32), "small": dict(epochs=16, batch=64), "medium": dict(epochs=6, batch=128)}


def train_config(size: str, manifest: str, out: Path, epochs: int | None = None):
    from training.data import DataConfig
    from training.trainer import TrainConfig

    budget = TRAIN[size]
    return TrainConfig(
        data=manifest,
        out=str(out / "train"),
        model="tiny",
        epochs=epochs or budget["epochs"],
        lr=1e-3,
        warmup_steps=20,
        vocab_size=2048,
        context_length=24,
        log_every=50,
        save_every=200,
        loader=DataConfig(batch_size=budget["batch"], num_workers=1, image_size=64),
    )


def evaluate_demo(train_dir: Path, web_root: Path, out: Path) -> dict:
    """Zero-shot + retrieval + linear on the held-out split; linear (and zero-shot) on Fashion-MNIST if present."""
    from eval import datasets as eval_datasets
    from eval.benchmark import fashion_mnist_wds, report_html, write_benchmark_jsons
    from eval.run import evaluate
    from training.checkpoint import load_model, resolve_checkpoint

    model, tokenizer = load_model(resolve_checkpoint(str(train_dir)))
    results = evaluate(model, tokenizer, ("zeroshot", "retrieval", "linear"), [f"heldout={web_root / 'heldout'}"])
    if eval_datasets.find_fashion_mnist():
        # the real-data evaluation goes the way of any CLIP_benchmark dataset: written once in its layout, read back
        fashion = fashion_mnist_wds(out / "eval" / "wds_fashion-mnist", max_train=2000, max_test=1000)
        extra = evaluate(model, tokenizer, ("zeroshot", "linear"), [f"fashion-mnist=clip_benchmark:{fashion}"])
        for task in ("zeroshot", "linear"):
            results[task].update(extra[task])
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    write_benchmark_jsons(results, str(train_dir), out / "eval")
    (out / "eval" / "eval.html").write_text(report_html(results, str(train_dir)))
    return results


def serve_web(web_root: Path, out_store) -> SyntheticWeb:
    """Serve on the port of the last run, so its committed URLs stay valid; else start the stages afresh."""
    state = web_root / "server.json"
    previous = json.loads(state.read_text())["port"] if state.exists() else 0
    try:
        web = SyntheticWeb(web_root, previous).start()
    except OSError:
        log.warning("port %d of the last run is taken: serving on a new port, data stages start afresh", previous)
        for name in out_store.list():
            if name.split("/", 1)[0] in layout.STAGES:
                out_store.delete(name)
        web = SyntheticWeb(web_root, 0).start()
    state.write_text(json.dumps({"port": web.port}))
    return web


def run_demo(out: str | Path, size: str = "small", storage: str | None = None, progress: bool = True,
             epochs: int | None = None) -> dict:  # fmt: skip
    """Run the demo; returns the summary it prints."""
    if size not in SIZES:
        raise ConfigError(f"unknown demo size '{size}' (expected one of {', '.join(SIZES)})")
    out = Path(out)
    timings: dict[str, float] = {}
    started = time.time()
    web_root = generate(out / "web", SIZES[size])
    timings["web"] = time.time() - started
    config = demo_config(size, storage or str(out), web_root)
    config = replace(config, runtime=replace(config.runtime, progress=progress))
    store = open_storage(config.out)
    store.write_bytes(layout.CONFIG_FILE, dump_config(config).encode())  # rerun any stage: run --config OUT/config.yaml
    summary: dict = {"size": size, "out": str(out), "storage": config.out, "stages": {}}
    web = serve_web(web_root, store)
    try:
        summary["web"] = {
            "url_list": str(web.url_list),
            "urls": web.truth().num_rows,
            "sites": [web.site_url(s) for s in range(web.sites)],
            "heldout": str(web_root / "heldout"),
        }
        from pipeline.runner import run_pipeline  # imports Ray only when there is work

        for stage in stage_registry.select(()):
            (report,) = run_pipeline([stage], store, config)
            timings[stage.name] = timings.get(stage.name, 0.0) + report.seconds
            summary["stages"][stage.name] = {
                "shards": report.planned,
                "ran": len(report.ran),
                "reused": len(report.skipped),
                "rows": report.total("rows"),
                "stats": _merged(report.stats.values()),
            }
    finally:
        web.stop()
    summary["funnel"] = store.read_json(layout.STATS_JSON)["funnel"]
    summary["report"] = store.url(layout.REPORT_HTML)
    summary["manifest"] = store.url(layout.MANIFEST)
    from pipeline.launch import train

    started_stage = time.time()
    summary["train"] = train(train_config(size, summary["manifest"], out, epochs))
    timings["train"] = time.time() - started_stage
    started_stage = time.time()
    summary["eval"] = evaluate_demo(out / "train", web_root, out)
    timings["eval"] = time.time() - started_stage
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.time() - started, 2)
    return summary


def _merged(stats) -> dict:
    """Per-shard stats summed: numbers add, nested counts (statuses) add per key."""
    total: dict = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, dict):
                inner = total.setdefault(k, {})
                for kk, vv in v.items():
                    inner[kk] = inner.get(kk, 0) + vv
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def format_summary(summary: dict) -> str:
    lines = [f"clipline demo ({summary['size']}): outputs in {summary['storage']}"]
    web = summary["web"]
    lines.append(f"  synthetic web: {web['urls']} URLs on {len(web['sites'])} loopback sites; list {web['url_list']}")
    lines.append(f"  held-out split for evaluation: {web['heldout']}")
    for name, s in summary["stages"].items():
        took = summary["seconds"][name]
        lines.append(f"  {name:<14} {s['shards']:>4} shards ({s['reused']} reused) {s['rows']:>7} rows  {took:6.1f}s")
    crawl = summary["stages"].get("crawl")
    if crawl:
        statuses = crawl["stats"].get("statuses", {})
        ok = statuses.get("success", 0)
        lines.append(
            f"  crawl: {ok} of {crawl['rows']} URLs fetched; other statuses: "
            + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items(), key=lambda kv: -kv[1]) if k != "success")
        )
    components = summary["stages"].get("dedup/_components")
    if components:
        found = components["stats"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(found.get("by_reason", {}).items()))
        lines.append(
            f"  dedup: {found.get('duplicates', 0)} duplicates in {found.get('clusters', 0)} clusters"
            + (f" ({reasons})" if reasons else "")
        )
    lines.append("  funnel: " + " -> ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["funnel"].items()))
    lines.append(f"  dataset: {summary['manifest']}")
    lines.append(f"  report:  {summary['report']}")
    train = summary["train"]
    lines.append(
        f"  train          {train['step']} steps, {train['epoch']} epochs, last loss {train['loss']:.3f}  "
        f"{summary['seconds']['train']:6.1f}s -> {Path(summary['out']) / 'train'}"
    )
    lines.append(
        f"  eval           {summary['seconds']['eval']:6.1f}s -> {Path(summary['out']) / 'eval' / 'eval.json'}"
    )
    for task, by_set in summary["eval"].items():
        if not isinstance(by_set, dict):
            continue
        for name, m in by_set.items():
            if task == "zeroshot":
                shown = f"top1 {m['top1']:.3f} (chance {1 / m['classes']:.3f}), top5 {m['top5']:.3f}"
            elif task == "retrieval":
                shown = (
                    f"image->text R@1 {m['image_to_text_R@1']:.3f} R@5 {m['image_to_text_R@5']:.3f}, text->image "
                    f"R@1 {m['text_to_image_R@1']:.3f} R@5 {m['text_to_image_R@5']:.3f} ({m['images']} images)"
                )
            else:
                shown = f"top1 {m['top1']:.3f} (L2 {m['l2']:g}, {m['train']} train / {m['test']} test)"
            lines.append(f"    {task:9} {name:14} {shown}")
    lines.append(f"  total {summary['seconds']['total']:.1f}s")
    return "\n".join(lines)
