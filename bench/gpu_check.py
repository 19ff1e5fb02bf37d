"""GPU check: the CUDA paths that CI (CPU only) never runs, one line per check. Run by bench/gpu_check.sh.

1. ``step``: a ViT-B/32 training step (forward, CLIP loss, backward, fused AdamW) under bf16
   autocast: samples/s and peak memory;
2. ``ddp``: the local-rows CLIP loss over nccl (2 processes on 2 GPUs, else 1) against the
   one-process loss of the whole batch: the largest difference of loss and gradients;
3. ``loader``: the streaming loader with ``num_workers`` = the machine's cores, batches moved
   to the GPU (pinned memory), samples/s;
4. ``compile``: steps/s of a small model with ``torch.compile`` and without.

``--smoke`` runs every check on the CPU with a tiny model (gloo instead of nccl), to check the
script itself on a machine without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def line(check: str, **figures) -> None:
    print(f"{check:8} " + "  ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def batch(config, n: int, device):
    images = torch.randint(0, 256, (n, 3, config.image_size, config.image_size), dtype=torch.uint8, device=device)
    text = torch.randint(3, config.vocab_size, (n, config.context_length), device=device)
    text[:, 0], text[:, -1] = 1, 2
    return images, text


def step_check(size: str, n: int, device, dtype, steps: int = 10) -> dict:
    from training.loss import clip_loss
    from training.model import CLIP, model_config

    config = model_config(size, vocab_size=49408 if size == "B/32" else 1000, context_length=77)
    model = CLIP(config, eot_id=2).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    images, text = batch(config, n, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one():
        with torch.autocast(device.type, dtype=dtype):
            i, t, s, _ = model(images, text)
            loss = clip_loss(i, t, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        one()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = one()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    loss = round(float(loss.detach()), 4)
    return {"samples_per_s": round(n / seconds, 1), "peak_gib": round(memory, 2), "loss": loss}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ddp_worker(rank: int, world: int, port: int, backend: str, out: str) -> None:
    import torch.distributed as dist

    from training.loss import clip_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).to(device)
    net = torch.nn.parallel.DistributedDataParallel(layer, device_ids=[rank] if backend == "nccl" else None)
    x_img, x_txt = torch.randn(16, 64, device=device), torch.randn(16, 64, device=device)
    local = slice(rank * 16 // world, (rank + 1) * 16 // world)
    image = torch.nn.functional.normalize(net(x_img[local]), dim=-1)
    text = torch.nn.functional.normalize(net(x_txt[local]) * 1.5, dim=-1)
    loss = clip_loss(image, text, torch.tensor(10.0, device=device))
    loss.backward()
    torch.save({"loss": loss.detach().cpu(), "grad": layer.weight.grad.cpu()}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def ddp_check(smoke: bool) -> dict:
    from training.loss import reference_clip_loss

    gpus = torch.cuda.device_count()
    backend, world = ("gloo", 2) if smoke else ("nccl", 2 if gpus >= 2 else 1)
    with tempfile.TemporaryDirectory() as out:
        from tests.conftest import free_port

        mp.spawn(ddp_worker, args=(world, free_port(), backend, out), nprocs=world, join=True)
        parts = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x_img, x_txt = torch.randn(16, 64), torch.randn(16, 64)
    image = torch.nn.functional.normalize(layer(x_img), dim=-1)
    text = torch.nn.functional.normalize(layer(x_txt) * 1.5, dim=-1)
    loss = reference_clip_loss(image, text, torch.tensor(10.0))
    loss.backward()
    mean_loss = sum(p["loss"] for p in parts) / world
    return {
        "backend": backend,
        "processes": world,
        "loss_diff": f"{abs(float(mean_loss - loss)):.2e}",
        "grad_diff": f"{max(float((p['grad'] - layer.weight.grad).abs().max()) for p in parts):.2e}",
    }


def loader_check(device, samples: int, source: int) -> dict:
    from bench.loader import make_shards
    from training.data import DataConfig, ManifestDataset, loader, open_manifest
    from training.tokenizer import Tokenizer

    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        manifest_path = make_shards(Path(tmp), samples, source)
        config = DataConfig(batch_size=64, num_workers=workers, image_size=224)
        tokenizer = Tokenizer.openai()
        dataset = ManifestDataset(open_manifest(str(manifest_path), config), config, tokenizer, 0, 1, 0, {})
        start, seen = time.perf_counter(), 0
        for b in loader(dataset):
            if b["uids"]:
                b["images"].to(device, non_blocking=True)
                b["text"].to(device, non_blocking=True)
                seen += len(b["uids"])
        sync(device)
        seconds = time.perf_counter() - start
    return {"workers": workers, "samples": seen, "samples_per_s": round(seen / seconds, 1)}


def compile_check(size: str, n: int, device) -> dict:
    from training.model import CLIP, model_config

    config = model_config(size, vocab_size=1000, context_length=77)
    images, text = batch(config, n, device)
    figures = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = CLIP(config, eot_id=2).to(device).eval()
        run = torch.compile(model) if name == "compiled" else model
        with torch.no_grad():
            for _ in range(3):
                run(images, text)
            sync(device)
            start = time.perf_counter()
            for _ in range(10):
                run(images, text)
            sync(device)
        figures[f"{name}_samples_per_s"] = round(10 * n / (time.perf_counter() - start), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every check on the CPU with a tiny model")
    parser.add_argument("--batch", type=int, default=256, help="samples a step for the ViT-B/32 check")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        line("gpu", status="no CUDA device: nothing checked (run --smoke to check the script on a CPU)")
        return
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    line("device", name=json.dumps(name), torch=torch.__version__, gpus=torch.cuda.device_count())
    size, n = ("tiny", 8) if args.smoke else ("B/32", args.batch)
    line("step", size=size, batch=n, precision="bf16", **step_check(size, n, device, torch.bfloat16))
    line("ddp", **ddp_check(args.smoke))
    line("loader", **loader_check(device, 250 if args.smoke else 3000, 256 if args.smoke else 512))
    line("compile", size="tiny" if args.smoke else "small", **compile_check("tiny" if args.smoke else "small", n,
                                                                              device))  # fmt: skip


if __name__ == "__main__":
    main()
