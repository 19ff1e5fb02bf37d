"""`clipline ablate` on the crawled tiny web: variants, matched-compute training per seed, eval, comparison."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

from pipeline import ablate, layout
from pipeline.cli import main
from pipeline.storage import open_storage
from tests.pipeline.test_lineage import config_for, copy_crawl
from training.data import DataConfig
from training.trainer import TrainConfig


def small_ablation(store, web_root: Path) -> ablate.AblateConfig:
    run = replace(
        config_for(store, web_root),
        variants={"none": {"filter": {"preset": "none"}}, "basic": {"filter": {"preset": "basic"}}},
    )
    train = TrainConfig(model="tiny", vocab_size=300, context_length=16, warmup_steps=1, log_every=1, save_every=2,
                        loader=DataConfig(batch_size=16, num_workers=0, image_size=32))  # fmt: skip
    return ablate.AblateConfig(
        run=run,
        train=train,
        samples_seen=48,  # 3 steps of 16 for every arm, whatever its dataset's size
        seeds=(0, 1),
        eval_tasks=("zeroshot", "retrieval"),
        eval_datasets=(f"heldout={web_root / 'heldout'}",),
    )


def test_ablate_trains_every_variant_and_seed_once_and_resumes(crawled_web, tmp_path):
    store = copy_crawl(crawled_web, tmp_path)
    web_root = Path(crawled_web[0].uri).parent / "web"
    config = small_ablation(store, web_root)
    results = ablate.run_ablate(config)

    assert set(results) == {"format", "samples_seen", "seeds", "model", "eval_tasks", "eval_datasets", "variants",
                            "report"}  # fmt: skip
    assert (results["format"], results["samples_seen"], results["seeds"]) == ("clipline-ablate/1", 48, [0, 1])
    assert list(results["variants"]) == ["none", "basic"]
    for name, arm in results["variants"].items():
        manifest = store.read_json(f"variants/{name}/{layout.MANIFEST}")
        assert arm["samples"] == manifest["num_samples"] > 0
        assert set(arm) == {"samples", "runs", "mean", "min", "max"} and set(arm["runs"]) == {"0", "1"}
        for run in arm["runs"].values():
            assert set(run) == {"seconds", "step", "loss", "metrics"} and run["step"] == 3  # matched compute
            assert {"zeroshot/heldout/top1", "retrieval/heldout/image_to_text_R@1"} <= set(run["metrics"])
        top1 = [r["metrics"]["zeroshot/heldout/top1"] for r in arm["runs"].values()]
        assert arm["min"]["zeroshot/heldout/top1"] == min(top1) and arm["max"]["zeroshot/heldout/top1"] == max(top1)
    assert results["variants"]["none"]["samples"] > results["variants"]["basic"]["samples"]
    assert json.loads(store.read_bytes("ablate/ablate.json")) == results
    page = (Path(store.uri) / "ablate/report.html").read_text()
    assert page.count("<svg") == len(ablate.headline_metrics(results)) >= 3 and "basic" in page
    trained = sorted(p.parents[2].relative_to(Path(store.uri) / "ablate") for p in
                     (Path(store.uri) / "ablate").rglob("checkpoints/latest.json"))  # fmt: skip
    assert [str(p) for p in trained] == ["basic/seed-0", "basic/seed-1", "none/seed-0", "none/seed-1"]

    # killed after the first arm: the others never finished. A rerun redoes only those.
    kept = Path(store.uri) / "ablate/none/seed-0"
    stamps = {p: p.stat().st_mtime_ns for p in kept.rglob("*") if p.is_file()}
    for arm in ("none/seed-1", "basic/seed-0", "basic/seed-1"):
        shutil.rmtree(Path(store.uri) / "ablate" / arm)
    again = ablate.run_ablate(config)
    assert {p: p.stat().st_mtime_ns for p in kept.rglob("*") if p.is_file()} == stamps  # not retrained
    assert again["variants"]["none"]["runs"]["0"] == results["variants"]["none"]["runs"]["0"]
    assert all(again["variants"][n]["runs"][s]["step"] == 3 for n in ("none", "basic") for s in ("0", "1"))


def test_ablate_says_what_is_missing_in_one_line(tmp_path, capsys):
    assert main(["ablate"]) == 2
    assert capsys.readouterr().err == "clipline: error: ablate: give --config FILE or --demo\n"
    (tmp_path / "a.yaml").write_text("run: {out: " + str(tmp_path / "o") + "}\n")
    assert main(["ablate", "--config", str(tmp_path / "a.yaml")]) == 2
    assert "ablate: run.variants names no variant to compare" in capsys.readouterr().err
    store = open_storage(tmp_path / "o")
    assert not store.exists(layout.CONFIG_FILE)  # nothing ran
