"""Linear probe: multinomial logistic regression on frozen, cached image features, with an L2 sweep.

Full-batch L-BFGS in torch (deterministic on CPU). The regularisation strength is
chosen on a validation split carved from the training features, then the probe is
refit on all training features at that strength and scored on the test split
(without the sweep, results fall well below published ones).
"""

from __future__ import annotations

import numpy as np
import torch

LAMBDAS = tuple(float(x) for x in np.logspace(-6, 2, 9))


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 200) -> torch.Tensor:
    """Weights (dim + 1, classes) minimising cross-entropy + l2 * |W|^2 (bias not penalised)."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(xb.shape[1], classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return float(((xb @ w).argmax(dim=1) == y).float().mean())


def top5_and_recall(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[float, float]:
    """Top-5 accuracy and mean per-class recall (CLIP_benchmark's lp_acc5 and lp_mean_per_class_recall)."""
    logits = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) @ w
    top = logits.topk(min(5, classes), dim=1).indices
    top5 = float((top == y[:, None]).any(dim=1).float().mean())
    hit = (top[:, 0] == y).float()
    recalls = [float(hit[y == c].mean()) for c in range(classes) if (y == c).any()]
    return top5, float(np.mean(recalls)) if recalls else 0.0


def probe(train_x, train_y, test_x, test_y, classes: int, seed: int = 0, val_fraction: float = 0.2) -> dict:
    """Sweep L2 on a validation split of the training set; refit; test accuracy. Inputs are float features."""
    train_x, test_x = train_x.double(), test_x.double()
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(train_y)))
    n_val = max(1, int(len(order) * val_fraction))
    val, fit_idx = order[:n_val], order[n_val:]
    sweep = {
        l2: accuracy(fit(train_x[fit_idx], train_y[fit_idx], classes, l2), train_x[val], train_y[val]) for l2 in LAMBDAS
    }
    best = max(sweep, key=lambda l2: (sweep[l2], l2))  # ties: the stronger regularisation
    w = fit(train_x, train_y, classes, best)
    top5, per_class = top5_and_recall(w, test_x, test_y, classes)
    return {
        "top1": accuracy(w, test_x, test_y),
        "top5": top5,
        "mean_per_class_recall": per_class,
        "l2": best,
        "validation_top1": sweep[best],
        "sweep": {f"{k:g}": v for k, v in sweep.items()},
        "train": int(len(train_y)),
        "test": int(len(test_y)),
    }
