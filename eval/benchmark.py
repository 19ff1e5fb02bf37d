"""Benchmarks as the field reports them: suites of CLIP_benchmark-layout datasets, ImageNet-style folders and
Karpathy-split retrieval sets (read by pipeline/evaldata.py), and results named as CLIP_benchmark names them.

Metrics, as CLIP_benchmark computes and names them: ``acc1``, ``acc5``,
``mean_per_class_recall``; ``image_retrieval_recall@k`` (for each caption, one
of its images among the top k) and ``text_retrieval_recall@k`` (for each image,
one of its captions among the top k); the linear probe's ``lp_acc1``,
``lp_acc5``, ``lp_mean_per_class_recall`` (frozen features, L2 chosen on a
validation split, refit on train + validation).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from eval.datasets import EvalSet, _decode
from pipeline.evaldata import EvalDataError, RawSet, read_spec

TASK_NAMES = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "linear": "linear_probe"}


def eval_set(raw: RawSet) -> EvalSet:
    """An evaluation set over a dataset's stored images, decoded with the checkpoint's preprocessing."""
    meta = {**raw.meta, "templates": raw.templates, "identity": raw.identity}
    return EvalSet(raw.name, raw.count, lambda i, size: _decode(raw.read(i), size), labels=raw.labels,
                   classnames=raw.classnames, captions=raw.captions, split=raw.split, meta=meta)  # fmt: skip


def load_suite(path: str | Path) -> list[dict]:
    """A suite file: `datasets:` a list of entries ({name, kind, path | json + images, tasks}); paths are relative
    to the file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise EvalDataError(f"suite: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise EvalDataError(f"suite: {path} has no `datasets:` list")
    for entry in entries:
        for key in ("path", "json", "images"):
            if key in entry and "://" not in str(entry[key]) and not Path(entry[key]).is_absolute():
                entry[key] = str(path.parent / entry[key])
    return entries


def suite_sets(entries: list[dict]) -> list[tuple[EvalSet, tuple[str, ...] | None]]:
    """(evaluation set, its tasks or None for every task it supports) per suite entry."""
    from eval import datasets

    out = []
    for entry in entries:
        kind = entry.get("kind")
        if kind in ("fashion-mnist", "heldout"):
            evalset = datasets.load(f"{kind}={entry['path']}" if entry.get("path") else kind)
        else:
            evalset = eval_set(read_spec(entry))
        tasks = entry.get("tasks")
        out.append((evalset, tuple(tasks) if tasks else None))
    return out


def fashion_mnist_wds(root: str | Path, max_train: int = 2000, max_test: int = 1000) -> Path:
    """Fashion-MNIST (Debian's dataset-fashion-mnist) written once in CLIP_benchmark's layout (PNG, train and
    test), so that it is read and scored the way any CLIP_benchmark dataset is."""
    import io

    from PIL import Image

    from eval.datasets import FASHION_CLASSES, _idx, find_fashion_mnist
    from eval.templates import templates_for
    from pipeline.evaldata import write_clip_benchmark_wds

    root = Path(root)
    if (root / "test" / "nshards.txt").exists():
        return root
    source = find_fashion_mnist()
    if source is None:
        raise EvalDataError("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or `make setup`)")

    def samples(prefix: str, limit: int):
        pixels = _idx(source / f"{prefix}-images-idx3-ubyte.gz")[:limit]
        labels = _idx(source / f"{prefix}-labels-idx1-ubyte.gz")[:limit]
        out = []
        for image, label in zip(pixels, labels, strict=True):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            out.append((buf.getvalue(), "png", int(label)))
        return out

    return write_clip_benchmark_wds(root, {"train": samples("train", max_train), "test": samples("t10k", max_test)},
                                    FASHION_CLASSES, templates_for("fashion-mnist"))  # fmt: skip


# --- CLIP_benchmark's names --------------------------------------------------------------------------------


def benchmark_metrics(task: str, metrics: dict) -> dict:
    """clipline's metrics of one task under CLIP_benchmark's names."""
    if task == "zeroshot":
        return {"acc1": metrics["top1"], "acc5": metrics["top5"],
                "mean_per_class_recall": metrics["mean_per_class_recall"]}  # fmt: skip
    if task == "retrieval":
        out = {}
        for k in (1, 5, 10):
            if f"text_to_image_R@{k}" in metrics:
                out[f"image_retrieval_recall@{k}"] = metrics[f"text_to_image_R@{k}"]
                out[f"text_retrieval_recall@{k}"] = metrics[f"image_to_text_R@{k}"]
        return out
    return {"lp_acc1": metrics["top1"], "lp_acc5": metrics.get("top5"),
            "lp_mean_per_class_recall": metrics.get("mean_per_class_recall")}  # fmt: skip


def write_benchmark_jsons(results: dict, checkpoint: str, out_dir: str | Path) -> list[Path]:
    """One CLIP_benchmark-style JSON per (dataset, task) of `results` (eval.json's shape) in `out_dir`:
    {dataset, model, pretrained, task, metrics, language}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, long in TASK_NAMES.items():
        for dataset, metrics in results.get(task, {}).items():
            row = {"dataset": dataset, "model": checkpoint, "pretrained": checkpoint, "task": long,
                   "metrics": benchmark_metrics(task, metrics), "language": "en"}  # fmt: skip
            path = out_dir / f"{dataset}_{long}.json"
            path.write_text(json.dumps(row, indent=1) + "\n")
            written.append(path)
    return written


def report_html(results: dict, checkpoint: str) -> str:
    """One page: every metric, and per classification set its per-class accuracy and most frequent confusions."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(TASK_NAMES[t])}</td><td>{e(d)}</td><td>"
        + ", ".join(f"{e(k)} {v:.4f}" for k, v in benchmark_metrics(t, m).items() if isinstance(v, float))
        + "</td></tr>"
        for t in TASK_NAMES
        for d, m in results.get(t, {}).items()
    )
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>eval: {e(checkpoint)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}.bar{background:#4c78a8;"
             "height:10px;display:inline-block}</style></head><body>",
             f"<h1>Evaluation of {e(checkpoint)}</h1><table><tr><th>task</th><th>dataset</th><th>metrics</th>"
             f"</tr>{rows}</table>"]  # fmt: skip
    for dataset, m in results.get("zeroshot", {}).items():
        per_class = m.get("per_class", [])
        cls_rows = "".join(
            f"<tr><td>{e(c['class'])}</td><td>{c['recall']:.3f}</td><td><span class='bar' "
            f"style='width:{200 * c['recall']:.0f}px'></span></td><td>{c['images']}</td></tr>"
            for c in sorted(per_class, key=lambda c: c["recall"])
        )
        confusions = "".join(
            f"<tr><td>{e(c['true'])}</td><td>{e(c['predicted'])}</td><td>{c['images']}</td></tr>"
            for c in m.get("confusions", [])
        )
        parts.append(
            f"<h2>{e(dataset)}: zero-shot per class (worst first)</h2><table><tr><th>class</th><th>recall</th><th>"
            f"</th><th>images</th></tr>{cls_rows}</table><h3>Most frequent confusions</h3><table><tr><th>true</th>"
            f"<th>predicted</th><th>images</th></tr>{confusions or '<tr><td>none</td></tr>'}</table>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)
