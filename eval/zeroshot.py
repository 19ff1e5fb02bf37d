"""Zero-shot classification: class names x prompt templates, ensembled as in the CLIP paper."""

from __future__ import annotations

import numpy as np
import torch


def classifier(encode_text, classnames, templates) -> torch.Tensor:
    """(dim, classes): per class, the mean of its normalised template embeddings, renormalised."""
    weights = []
    for name in classnames:
        emb = encode_text([t.format(name) for t in templates])  # (templates, dim), normalised
        mean = emb.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def scores(image_features: torch.Tensor, labels: np.ndarray, weights: torch.Tensor, classnames=()) -> dict:
    """top-1, top-5 and mean per-class recall of argmax(image @ weights) against `labels`; with `classnames`,
    each class's recall and the most frequent confusions too (for the report)."""
    logits = image_features @ weights  # (images, classes)
    labels_t = torch.as_tensor(labels)
    k = min(5, weights.shape[1])
    top = logits.topk(k, dim=1).indices
    top1 = (top[:, 0] == labels_t).float()
    top5 = (top == labels_t[:, None]).any(dim=1).float()
    recalls = [float(top1[labels_t == c].mean()) for c in range(weights.shape[1]) if (labels_t == c).any()]
    extra = {}
    if classnames:
        present = [c for c in range(weights.shape[1]) if (labels_t == c).any()]
        extra["per_class"] = [
            {"class": classnames[c], "recall": float(top1[labels_t == c].mean()), "images": int((labels_t == c).sum())}
            for c in present
        ]
        wrong = labels_t != top[:, 0]
        pairs = torch.stack([labels_t[wrong], top[wrong, 0]], dim=1).tolist()
        counted = sorted(((n, t, p) for (t, p), n in _count(pairs).items()), key=lambda x: (-x[0], x[1], x[2]))
        extra["confusions"] = [{"true": classnames[t], "predicted": classnames[p], "images": n}
                               for n, t, p in counted[:20]]  # fmt: skip
    return {
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "mean_per_class_recall": float(np.mean(recalls)),
        "classes": int(weights.shape[1]),
        "images": int(len(labels)),
        **extra,
    }


def _count(pairs: list) -> dict:
    found: dict = {}
    for t, p in pairs:
        found[(t, p)] = found.get((t, p), 0) + 1
    return found
