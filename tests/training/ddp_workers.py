"""Functions run in spawned gloo processes by the DDP tests (importable by name, as spawn needs)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def loss_worker(rank: int, world: int, port: int, loss_name: str, out_dir: str) -> None:
    """Each rank computes the local-rows loss on its half of a fixed global batch; saves loss and grads."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from training.loss import LOSSES

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    layer = torch.nn.parallel.DistributedDataParallel(layer)
    x_img, x_txt = torch.randn(8, 16), torch.randn(8, 16)
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    out = layer(torch.cat([x_img[local], x_txt[local]]))  # one forward through DDP for both towers
    n = out.shape[0] // 2
    image = torch.nn.functional.normalize(out[:n], dim=-1)
    text = torch.nn.functional.normalize(out[n:] * 1.5, dim=-1)
    loss = LOSSES[loss_name](image, text, scale, bias)
    loss.backward()  # DDP averages the gradients over ranks
    torch.save({"loss": loss.detach(), "grad": layer.module.weight.grad.clone()}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # rank 0 hosts the store: no rank leaves while another may still use it
    dist.destroy_process_group()
    # Leave without interpreter finalisation: a gloo worker thread may still hold the last
    # collective's Work, whose captured thread-local state (from the backward pass) holds a Python
    # object; dropping it once finalisation has begun aborts the process ("terminate called
    # without an active exception", ~4% of runs with torch 2.13). The results are saved above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def elastic_worker(rank: int, world: int, port: int, config_json: str, out_dir: str) -> None:
    """One rank of a training run (gloo) that records the uids of every batch it trained on."""
    import json

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    from pipeline import configio
    from training.trainer import Run, TrainConfig

    seen: list[str] = []
    run = Run(configio.from_dict(TrainConfig, json.loads(config_json)))
    run.fit(on_step=lambda r, b: seen.extend(b["uids"]))
    with open(f"{out_dir}/seen-{world}-{rank}.json", "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
