"""Losses: equal to the CLIP paper's formulation, and under DDP (2 gloo processes) equal to one process."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.training.ddp_workers import loss_worker
from training.loss import clip_loss, reference_clip_loss, siglip_loss


def features(n=8, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1) for _ in range(2))


def test_clip_loss_is_the_papers_symmetric_infonce():
    image, text = features()
    scale = torch.tensor(14.3)
    assert torch.allclose(clip_loss(image, text, scale), reference_clip_loss(image, text, scale), atol=1e-6)
    # a perfect model (each image closest to its own caption, large scale) has ~zero loss; a swapped one does not
    eye = torch.eye(8)
    assert float(clip_loss(eye, eye, torch.tensor(100.0))) < 1e-3
    assert float(clip_loss(eye, eye.roll(1, 0), torch.tensor(100.0))) > 10


def test_siglip_loss_counts_every_pair():
    image, text = features()
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(8) - 1
    expected = -torch.nn.functional.logsigmoid(labels * logits).sum() / 8
    assert torch.allclose(siglip_loss(image, text, scale, bias), expected, atol=1e-6)


def single_process(loss_name):
    from training.loss import LOSSES

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x_img, x_txt = torch.randn(8, 16), torch.randn(8, 16)
    out = layer(torch.cat([x_img, x_txt]))
    image = torch.nn.functional.normalize(out[:8], dim=-1)
    text = torch.nn.functional.normalize(out[8:] * 1.5, dim=-1)
    loss = LOSSES[loss_name](image, text, torch.tensor(10.0), torch.tensor(-2.0))
    loss.backward()
    return loss.detach(), layer.weight.grad


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_ddp_gathered_loss_and_gradients_equal_the_single_process_ones(loss_name, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(loss_worker, args=(2, port, loss_name, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loss, grad = single_process(loss_name)
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, atol=1e-6)
    assert torch.allclose(ranks[0]["grad"], ranks[1]["grad"])  # DDP gave both ranks the same averaged gradient
    assert torch.allclose(ranks[0]["grad"], grad, atol=1e-6)
