"""`clipline ablate`: dataset variants → shards → matched-compute training (several seeds) → eval → one comparison.

DataComp's loop in one command. The data run's `variants:` are the arms; they
share one ingest, crawl and dedup (pipeline/variants.py). Every arm trains the
same model for the same number of samples seen, once per seed, and is evaluated
on the same tasks at the end of its training. Results:
``OUT/ablate/ablate.json``, ``OUT/ablate/report.html`` (dataset size against
each metric, with the seeds' spread) and a table in the terminal.

Resumable like everything else: each (variant, seed) writes
``OUT/ablate/{variant}/seed-{seed}/result.json`` when it is done, and a rerun
with the same settings reuses it; a training killed midway resumes from its
checkpoint.
"""

from __future__ import annotations

import html
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import configio, layout, variants
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.stage import config_sha256
from pipeline.storage import open_storage
from training.trainer import TrainConfig

log = logging.getLogger(__name__)
ABLATE = "ablate"


@dataclass(frozen=True)
class AblateConfig:
    """An ablation: the data run (its `variants:` are the arms), the training each arm gets, and the evaluation."""

    run: RunConfig = field(default_factory=RunConfig)  # the data config: shared ingest, crawl, dedup + variants
    train: TrainConfig = field(default_factory=TrainConfig)  # the model and optimiser every arm trains with
    samples_seen: int = 10_000  # matched compute: every arm trains on this many samples (repeating its data)
    seeds: tuple[int, ...] = (0,)  # one training per seed and arm: the spread of a result
    eval_tasks: tuple[str, ...] = ("zeroshot", "retrieval")
    eval_datasets: tuple[str, ...] = ()  # eval.run specs: heldout=DIR, fashion-mnist, a folder, a manifest


def load(path: str | Path, overrides=()) -> AblateConfig:
    config = configio.load(AblateConfig, path, overrides)
    check(config)
    return config


def check(config: AblateConfig) -> None:
    if not config.run.variants:
        raise ConfigError("ablate: run.variants names no variant to compare (e.g. none: {filter: {preset: none}})")
    if not config.seeds or config.samples_seen < 1:
        raise ConfigError("ablate: give at least one seed and samples_seen >= 1")
    if not config.eval_datasets:
        raise ConfigError("ablate: eval_datasets is empty: every arm needs the same evaluation")


def arm_config(config: AblateConfig, name: str, seed: int, manifest: str, out: str) -> TrainConfig:
    """One arm's training: the shared settings, this variant's data, this seed, and steps for samples_seen."""
    train = config.train
    steps = math.ceil(config.samples_seen / train.loader.batch_size)
    return replace(
        train,
        data=manifest,
        out=out,
        seed=seed,
        epochs=1_000_000,  # max_steps decides: a smaller dataset is repeated, not trained less
        max_steps=steps,
        eval_every=0,
        eval_tasks=config.eval_tasks,
        eval_datasets=config.eval_datasets,
        loader=replace(train.loader, seed=seed),
    )


def run_ablate(config: AblateConfig) -> dict:
    """Data for every variant, then each (variant, seed) trained and evaluated unless already done."""
    from pipeline.cli import run_data
    from pipeline.launch import train

    check(config)
    base = open_storage(config.run.out)
    run_data(config.run, [])  # shared stages, then each variant's filter, shard and stats (resumable)
    arms: dict = {}
    for name in config.run.variants:
        view = variants.VariantStorage(base, name)
        manifest = view.read_json(layout.MANIFEST)
        size = manifest["num_samples"]
        runs = {}
        for seed in config.seeds:
            where = f"{ABLATE}/{name}/seed-{seed}"
            arm = arm_config(config, name, seed, view.url(layout.MANIFEST), base.url(f"{where}/train"))
            # the same training on the same data (its shards' hashes, not the manifest's timestamp)
            identity = config_sha256({"train": arm, "data": [s["sha256"] for s in manifest["shards"]]})
            done = base.read_json(f"{where}/result.json") if base.exists(f"{where}/result.json") else None
            if done is None or done.get("identity") != identity:
                started = time.time()
                metrics = train(arm)
                done = {"identity": identity, "seconds": round(time.time() - started, 1), **_result(metrics)}
                base.write_json(f"{where}/result.json", done)
            else:
                log.info("ablate: %s seed %d already trained and evaluated", name, seed)
            runs[str(seed)] = {k: v for k, v in done.items() if k != "identity"}
        arms[name] = {"samples": size, "runs": runs, **_spread(runs)}
    results = {
        "format": "clipline-ablate/1",
        "samples_seen": config.samples_seen,
        "seeds": list(config.seeds),
        "model": config.train.model,
        "eval_tasks": list(config.eval_tasks),
        "eval_datasets": list(config.eval_datasets),
        "variants": arms,
    }
    results["report"] = base.url(f"{ABLATE}/report.html")
    base.write_json(f"{ABLATE}/ablate.json", results)
    base.write_bytes(f"{ABLATE}/report.html", render_report(results).encode())
    return results


def _result(metrics: dict) -> dict:
    """The numbers of one trained arm: its final loss and steps, and every scalar eval metric."""
    out = {"step": metrics.get("step"), "loss": metrics.get("loss"), "metrics": {}}
    for task, by_set in (metrics.get("eval") or {}).items():
        for dataset, values in by_set.items() if isinstance(by_set, dict) else ():
            for metric, value in values.items():
                if isinstance(value, float):
                    out["metrics"][f"{task}/{dataset}/{metric}"] = value
    return out


def _spread(runs: dict) -> dict:
    """Mean, min and max over the seeds of every metric."""
    names = sorted({m for r in runs.values() for m in r["metrics"]})
    values = {m: [r["metrics"][m] for r in runs.values() if m in r["metrics"]] for m in names}
    return {
        "mean": {m: statistics.fmean(v) for m, v in values.items()},
        "min": {m: min(v) for m, v in values.items()},
        "max": {m: max(v) for m, v in values.items()},
    }


HEADLINE = ("top1", "image_to_text_R@1", "text_to_image_R@1")  # metrics shown in the table and plotted


def headline_metrics(results: dict) -> list[str]:
    found = sorted({m for arm in results["variants"].values() for m in arm["mean"]})
    return [m for m in found if m.rsplit("/", 1)[-1] in HEADLINE]


def _cell(arm: dict, metric: str) -> str:
    """mean [min, max] over the seeds."""
    if metric not in arm["mean"]:
        return "-"
    return f"{arm['mean'][metric]:.3f} [{arm['min'][metric]:.3f}, {arm['max'][metric]:.3f}]"


def format_table(results: dict) -> str:
    metrics = headline_metrics(results)
    lines = [f"ablate: {results['samples_seen']:,} samples seen per arm, seeds {results['seeds']}"]
    lines.append(f"{'variant':24} {'samples':>8}  " + "  ".join(f"{m:>28}" for m in metrics))
    for name, arm in results["variants"].items():
        lines.append(f"{name:24} {arm['samples']:>8,}  " + "  ".join(f"{_cell(arm, m):>28}" for m in metrics))
    return "\n".join(lines)


def _scatter(results: dict, metric: str, width: int = 360, height: int = 220) -> str:
    """Dataset size (x) against one metric (y): a dot per variant at its mean, a bar over its seeds' range."""
    arms = [(n, a) for n, a in results["variants"].items() if metric in a["mean"]]
    xs = [a["samples"] for _, a in arms]
    lo = min(min(a["min"][metric] for _, a in arms), 0.0)
    hi = max(max(a["max"][metric] for _, a in arms), lo + 1e-9)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = 40

    def px(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - (y - lo) / (hi - lo) * (height - 2 * pad)

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(metric)}">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" font-size="11">dataset size</text>',
             f'<text x="4" y="{pad - 10}" font-size="11">{lo:.2f}..{hi:.2f}</text>']  # fmt: skip
    for name, arm in arms:
        x = px(arm["samples"])
        parts.append(
            f'<line x1="{x:.1f}" y1="{py(arm["min"][metric]):.1f}" x2="{x:.1f}" y2="{py(arm["max"][metric]):.1f}" '
            'stroke="#4c78a8" stroke-width="2"/>'
            f'<circle cx="{x:.1f}" cy="{py(arm["mean"][metric]):.1f}" r="4" fill="#4c78a8"/>'
            f'<text x="{x + 6:.1f}" y="{py(arm["mean"][metric]) - 6:.1f}" font-size="11">{html.escape(name)}</text>'
        )
    return f"<figure><figcaption>{html.escape(metric)}</figcaption>{''.join(parts)}</svg></figure>"


def render_report(results: dict) -> str:
    metrics = headline_metrics(results)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{arm['samples']:,}</td>"
        + "".join(
            f"<td>{arm['mean'][m]:.3f} [{arm['min'][m]:.3f}, {arm['max'][m]:.3f}]</td>"
            if m in arm["mean"]
            else "<td>-</td>"
            for m in metrics
        )
        + "</tr>"
        for name, arm in results["variants"].items()
    )
    plots = "".join(_scatter(results, m) for m in metrics)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>clipline ablation</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }} figure {{ margin: 0; }}</style></head><body>
<h1>Ablation: {len(results["variants"])} dataset variants</h1>
<p>Each variant trained a {html.escape(str(results["model"]))} model on {results["samples_seen"]:,} samples
(matched compute), once per seed ({html.escape(str(results["seeds"]))}); mean [min, max] over the seeds,
evaluated on {html.escape(", ".join(results["eval_datasets"]))}.</p>
<table><tr><th>variant</th><th>dataset samples</th>{head}</tr>{rows}</table>
<h2>Dataset size against each metric</h2><div class="plots">{plots}</div>
<p><small>generated {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by clipline ablate</small></p>
</body></html>
"""


def demo_config(out: str | Path, web_root: Path, seeds: tuple[int, ...] = (0, 1)) -> AblateConfig:
    """`clipline ablate --demo` on the tiny web: no filter, the basic filter, the basic filter keeping duplicates,
    and CLIP's curation (`clip-wit`: metadata matching and balancing) with a list built from the web's own text."""
    import pyarrow.parquet as pq

    from pipeline.curation import build_metadata
    from pipeline.demo import demo_config as demo_run
    from pipeline.demo import train_config

    run = demo_run("tiny", str(out), web_root)
    # CLIP-style queries for the synthetic web: its words and high-PMI bigrams seen 20 times or more (colours,
    # shapes, "red circle"...), built as `clipline metadata --corpus` builds them; balanced to 2% of the pool an
    # entry (a caption names several entries, so about a third of the matched rows is balanced out)
    corpus = Path(out) / "web-captions.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    captions = pq.read_table(web_root / "catalog.parquet", columns=["caption"])["caption"].to_pylist()
    corpus.write_text("\n".join(c for c in captions if c) + "\n")
    metadata = Path(out) / "clip-wit-metadata.txt"
    metadata.write_text("\n".join(build_metadata(None, [str(corpus)], 20, 20, 2.0)) + "\n")
    run = replace(
        run,
        name="ablate-demo",
        variants={
            "none": {"filter": {"preset": "none"}},
            "basic": {"filter": {"preset": "basic"}},
            "basic-with-duplicates": {"filter": {"preset": "basic", "drop_duplicates": False}},
            "clip-wit": {"filter": {"preset": "clip-wit", "metadata": str(metadata), "balance_per_entry": 0.02}},
        },
    )
    train = train_config("tiny", "", Path(out))
    return AblateConfig(
        run=run,
        train=replace(train, log_every=100, save_every=100),
        samples_seen=3_000,
        seeds=seeds,
        eval_tasks=("zeroshot", "retrieval"),
        eval_datasets=(f"heldout={web_root / 'heldout'}",),
    )


def run_demo_ablate(out: str | Path) -> dict:
    """The demo ablation: serve the tiny synthetic web, run the four variants, train, evaluate, compare."""
    from pipeline.demo import serve_web
    from pipeline.web import SIZES, generate

    out = Path(out)
    web_root = generate(out / "web", SIZES["tiny"])
    config = demo_config(out, web_root)
    web = serve_web(web_root, open_storage(str(out)))
    try:
        return run_ablate(config)
    finally:
        web.stop()
