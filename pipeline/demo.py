"""`clipline demo`: the whole flow on the embedded defaults, on this machine.

Generates and serves the synthetic web on loopback (OUT/web/), then runs every
data stage that exists, in order, against it with outputs under OUT/ (or
--storage), and prints what it did. Stages still to come are named, not faked.
Running it twice reuses committed work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from pipeline import stages as stage_registry
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.storage import open_storage
from pipeline.web import SIZES, SyntheticWeb, generate

log = logging.getLogger(__name__)


def demo_config(size: str, out: str) -> RunConfig:
    """The embedded default config of the demo at `size`."""
    return RunConfig(name=f"demo-{size}", out=out)


def run_demo(out: str | Path, size: str = "small", storage: str | None = None, progress: bool = True) -> dict:
    """Run the demo; returns the summary it prints."""
    if size not in SIZES:
        raise ConfigError(f"unknown demo size '{size}' (expected one of {', '.join(SIZES)})")
    out = Path(out)
    timings: dict[str, float] = {}
    started = time.time()
    web_root = generate(out / "web", SIZES[size])
    timings["web"] = time.time() - started
    config = demo_config(size, storage or str(out))
    config = replace(config, runtime=replace(config.runtime, progress=progress))
    summary: dict = {"size": size, "out": str(out), "storage": config.out, "stages": {}}
    with SyntheticWeb(web_root) as web:
        summary["web"] = {
            "url_list": str(web.url_list),
            "urls": web.truth().num_rows,
            "sites": [web.site_url(s) for s in range(web.sites)],
            "heldout": str(web_root / "heldout"),
        }
        selected = stage_registry.select(())
        if selected:
            from pipeline.runner import run_stage  # imports Ray only when there is work

            store = open_storage(config.out)
            for stage in selected:
                t0 = time.time()
                report = run_stage(
                    stage,
                    store,
                    config,
                    executor=config.runtime.executor,
                    max_retries=config.runtime.max_retries,
                    progress=progress,
                )
                timings[stage.name] = time.time() - t0
                summary["stages"][stage.name] = {
                    "shards": report.planned,
                    "ran": len(report.ran),
                    "reused": len(report.skipped),
                    "rows": report.total("rows"),
                }
    summary["not_implemented"] = {
        name: issue for name, issue in stage_registry.PIPELINE_ORDER.items() if name not in stage_registry.STAGES
    }
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.time() - started, 2)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"clipline demo ({summary['size']}): outputs in {summary['storage']}"]
    web = summary["web"]
    lines.append(f"  synthetic web: {web['urls']} URLs on {len(web['sites'])} loopback sites; list {web['url_list']}")
    lines.append(f"  held-out split for evaluation: {web['heldout']}")
    for name, s in summary["stages"].items():
        took = summary["seconds"][name]
        lines.append(f"  {name:<7} {s['shards']} shards ({s['reused']} reused), {s['rows']} rows, {took:.1f}s")
    for name, issue in summary["not_implemented"].items():
        lines.append(f"  {name:<7} not implemented yet (issue {issue})")
    lines.append("  train, eval: not implemented yet (issues #7, #8)")
    lines.append(f"  total {summary['seconds']['total']:.1f}s")
    return "\n".join(lines)
