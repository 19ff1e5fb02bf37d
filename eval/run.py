"""`clipline eval`: zero-shot, retrieval and linear probe of a checkpoint; the trainer calls the same code.

    evaluate(model, tokenizer, tasks=("zeroshot", "retrieval"), datasets=("heldout=OUT/web/heldout",))

Each task runs on each dataset that supports it (zero-shot and linear need
labels, retrieval needs captions). The result has docs/design.md's eval.json shape:
``{"zeroshot": {DATASET: {...}}, "retrieval": {...}, "linear": {...}}`` plus the
template version. Features are computed in eval mode without augmentation, so the
numbers of the in-loop evaluation equal those of ``clipline eval`` on the same
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from eval import datasets as eval_datasets
from eval import linear, retrieval, zeroshot
from eval.templates import VERSION, templates_for
from pipeline.errors import ClipError
from training.checkpoint import load_model, resolve_checkpoint

log = logging.getLogger(__name__)
TASKS = ("zeroshot", "retrieval", "linear")


def _autocast(device):
    """bf16 autocast on CUDA (public ViT-L/14s fit and run twice as fast); full precision on the CPU."""
    cuda = torch.device(device).type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)


# Set by evaluate() for the image encodings it runs: a progress bar; the checkpoint's identity (features are
# cached per checkpoint, dataset and preprocessing when it is known); DataLoader workers (None: by size).
_RUN = {"progress": False, "checkpoint": None, "workers": None}
FEATURES_FORMAT = "clip_preprocess/1"  # bump when the preprocessing changes: cached features are then stale


class _Images(torch.utils.data.Dataset):
    def __init__(self, evalset, indices, size: int):
        self.evalset, self.indices, self.size = evalset, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.evalset.load_image(int(self.indices[i]), self.size)


def _features_path(model, evalset, indices) -> Path | None:
    """Where the image features of (checkpoint, dataset, preprocessing, images) are cached, if they can be."""
    from training.checkpoint import cache_root

    if not _RUN["checkpoint"] or not evalset.meta.get("identity"):
        return None
    c = model.config
    key = hashlib.sha256(
        json.dumps(
            [
                _RUN["checkpoint"],
                evalset.meta["identity"],
                FEATURES_FORMAT,
                c.image_size,
                list(c.image_mean),
                list(c.image_std),
                np.asarray(indices).tolist(),
            ]
        ).encode()
    )
    return cache_root().parent / "features" / f"{key.hexdigest()[:40]}.pt"  # fmt: skip


@torch.no_grad()
def encode_images(model, evalset, indices, device, batch: int = 256) -> torch.Tensor:
    """Unit image features of `indices`, batched through DataLoader workers (autocast on CUDA), cached when the
    checkpoint and the dataset have identities."""
    from tqdm import tqdm

    cached = _features_path(model, evalset, indices)
    if cached is not None and cached.exists():
        return torch.load(cached, weights_only=True)
    workers = _RUN["workers"] if _RUN["workers"] is not None else (min(8, os.cpu_count() or 1) if len(indices) >= 2048
                                                                   else 0)  # fmt: skip
    batches = torch.utils.data.DataLoader(_Images(evalset, indices, model.config.image_size), batch_size=batch,
                                          num_workers=workers, collate_fn=torch.stack)  # fmt: skip
    out = []
    bar = tqdm(total=len(indices), desc=f"eval {evalset.name}", unit="img", disable=not _RUN["progress"],
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)  # fmt: skip
    for images in batches if len(indices) else ():
        with _autocast(device):
            out.append(model.encode_image(images.to(device)).float().cpu())
        bar.update(len(images))
    bar.close()
    features = torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        torch.save(features, tmp)
        tmp.replace(cached)
    return features


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], device, batch: int = 512) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch):
        with _autocast(device):
            out.append(model.encode_text(tokenizer(texts[start : start + batch]).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def run_zeroshot(model, tokenizer, evalset, device) -> dict:
    test = np.flatnonzero(evalset.split == "test") if evalset.split is not None else np.arange(evalset.count)
    features = encode_images(model, evalset, test, device)
    templates = evalset.meta.get("templates") or templates_for(evalset.name)
    weights = zeroshot.classifier(lambda texts: encode_texts(model, tokenizer, texts, device), evalset.classnames,
                                  templates)  # fmt: skip
    return zeroshot.scores(features, evalset.labels[test], weights, evalset.classnames)


def run_retrieval(model, tokenizer, evalset, device) -> dict:
    images = encode_images(model, evalset, np.arange(evalset.count), device)
    texts, owner = [], []
    for i, caps in enumerate(evalset.captions):
        texts.extend(caps)
        owner.extend([i] * len(caps))
    text_features = encode_texts(model, tokenizer, texts, device)
    return retrieval.recall_at_k(images, text_features, torch.tensor(owner))


def run_linear(model, tokenizer, evalset, device, seed: int = 0) -> dict:
    if evalset.split is not None:
        train, test = np.flatnonzero(evalset.split == "train"), np.flatnonzero(evalset.split == "test")
    else:
        order = np.random.default_rng(seed).permutation(evalset.count)
        train, test = np.sort(order[: evalset.count // 2]), np.sort(order[evalset.count // 2 :])
    features = encode_images(model, evalset, np.concatenate([train, test]), device)
    return linear.probe(
        features[: len(train)],
        evalset.labels[train],
        features[len(train) :],
        evalset.labels[test],
        classes=len(evalset.classnames),
        seed=seed,
    )


RUNNERS = {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "linear": run_linear}


def supports(task: str, evalset) -> bool:
    return evalset.captions is not None if task == "retrieval" else evalset.labels is not None


def evaluate(model, tokenizer, tasks, datasets, device="cpu", progress: bool = False, checkpoint: str | None = None,
             workers: int | None = None) -> dict:  # fmt: skip
    """Every task on every dataset that supports it, in eval.json's shape. `datasets`: specs, EvalSets, or
    (EvalSet, its tasks) pairs (a suite). `progress`: a bar (images/s, ETA) per dataset's image features;
    `checkpoint`: the model's identity, under which image features are cached."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ClipError(f"eval: unknown task(s) {', '.join(unknown)} (tasks: {', '.join(TASKS)})")
    model.eval()
    results: dict = {task: {} for task in tasks}
    sets = [d if isinstance(d, tuple) else (eval_datasets.load(d) if isinstance(d, str) else d, None)
            for d in datasets]  # fmt: skip
    _RUN.update(progress=progress, checkpoint=checkpoint, workers=workers)
    try:
        for task in tasks:
            for evalset, only in sets:
                if supports(task, evalset) and (only is None or task in only):
                    results[task][evalset.name] = RUNNERS[task](model, tokenizer, evalset, device)
    finally:
        _RUN.update(progress=False, checkpoint=None, workers=None)
    results["templates"] = VERSION
    return results


def format_table(results: dict) -> str:
    lines = [f"{'task':10} {'dataset':14} metrics"]
    for task in TASKS:
        for name, metrics in results.get(task, {}).items():
            shown = {
                k: v for k, v in metrics.items() if isinstance(v, float) and ("R@" in k or "top" in k or "recall" in k)
            }
            lines.append(f"{task:10} {name:14} " + "  ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    return "\n".join(lines)


def checkpoint_identity(location: str) -> str:
    """The files that make the model at `location`, by path, size and modification time (the feature cache's key)."""
    from training.checkpoint import checkpoint_files

    stats = [(f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in checkpoint_files(location)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]


def main_eval(checkpoint_location: str, tasks, datasets, out: str | None, device: str = "cpu",
              progress: bool = False, suite: str | None = None, workers: int | None = None) -> dict:  # fmt: skip
    """`clipline eval`: eval.json at `out`, and beside it one CLIP_benchmark-style JSON per (dataset, task) and
    eval.html. With `suite`, the suite file's datasets (each with its tasks) instead of `datasets`."""
    from eval.benchmark import load_suite, report_html, suite_sets, write_benchmark_jsons

    if suite:
        datasets, tasks = suite_sets(load_suite(suite)), list(tasks or TASKS)
    model, tokenizer = load_model(resolve_checkpoint(checkpoint_location), device)
    results = evaluate(model, tokenizer, tasks, datasets, device, progress=progress,
                       checkpoint=checkpoint_identity(checkpoint_location), workers=workers)  # fmt: skip
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1) + "\n")
        write_benchmark_jsons(results, checkpoint_location, Path(out).parent)
        (Path(out).parent / "eval.html").write_text(report_html(results, checkpoint_location))
    return results
