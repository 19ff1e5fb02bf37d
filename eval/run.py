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

import json
import logging
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


@torch.no_grad()
def encode_images(model, evalset, indices, device, batch: int = 256) -> torch.Tensor:
    size = model.config.image_size
    out = []
    for start in range(0, len(indices), batch):
        images = evalset.images(indices[start : start + batch], size).to(device)
        with _autocast(device):
            out.append(model.encode_image(images).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


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
    weights = zeroshot.classifier(
        lambda texts: encode_texts(model, tokenizer, texts, device), evalset.classnames, templates_for(evalset.name)
    )
    return zeroshot.scores(features, evalset.labels[test], weights)


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


def evaluate(model, tokenizer, tasks, datasets, device="cpu") -> dict:
    """Every task on every dataset that supports it, in eval.json's shape."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ClipError(f"eval: unknown task(s) {', '.join(unknown)} (tasks: {', '.join(TASKS)})")
    model.eval()
    results: dict = {task: {} for task in tasks}
    sets = [eval_datasets.load(spec) if isinstance(spec, str) else spec for spec in datasets]
    for task in tasks:
        for evalset in sets:
            if supports(task, evalset):
                results[task][evalset.name] = RUNNERS[task](model, tokenizer, evalset, device)
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


def main_eval(checkpoint_location: str, tasks, datasets, out: str | None, device: str = "cpu") -> dict:
    model, tokenizer = load_model(resolve_checkpoint(checkpoint_location), device)
    results = evaluate(model, tokenizer, tasks, datasets, device)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1) + "\n")
    return results
