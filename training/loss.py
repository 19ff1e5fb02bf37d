"""Contrastive losses: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss, local-rows style under DDP.

Under DDP each rank gathers every rank's features *with gradients* (the
gather's backward sums the gradients back to the rank that owns each feature)
and computes the loss of its own rows against all columns. Memory is then linear in the global batch
(local × global logits, not global × global), and since DDP averages gradients
over ranks, the update equals that of the single-process loss on the whole
global batch — tests/training/test_loss.py checks this with two gloo processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward hands each rank the summed gradient of its own rows.

    Written on two collectives every backend has (all_gather, all_reduce) rather than on
    torch.distributed.nn.functional.all_gather, which torch 2.13 deprecates (a FutureWarning
    every step). All ranks must pass the same number of rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every row: sum the contributions
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of `x` concatenated in rank order (differentiable), and this rank's row offset.

    Every rank must pass the same number of rows (the loader's batches are fixed-size).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), dist.get_rank() * x.shape[0]


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against every pair of the global batch.

    image, text: (local_batch, dim), L2-normalised; scale: exp(logit_scale).
    """
    all_image, offset = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_per_image = scale * image @ all_text.T  # (local, global)
    logits_per_text = scale * text @ all_image.T  # (local, global)
    return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): each (image, text) pair is a binary positive/negative, local rows × all."""
    all_text, offset = gather_with_grad(text)
    logits = (scale * image @ all_text.T + bias).float()  # (local, global)
    signs = -torch.ones_like(logits)
    signs[torch.arange(image.shape[0]), torch.arange(image.shape[0]) + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


LOSSES = {"clip": clip_loss, "siglip": siglip_loss}


def reference_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The CLIP paper's pseudocode, verbatim in spirit: the whole batch in one process (the test oracle)."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
