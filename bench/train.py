"""Train-step benchmark: clipline's step vs the CLIP paper's loss written straight, same model, same batch.

One process, same model weights and batch for both sides, measured alternately:
- clipline: CLIP model + `training.loss.clip_loss` (the DDP local-rows form) + AdamW step;
- peer: the same model + the loss from the CLIP paper's pseudocode (logits = s·I·Tᵀ, symmetric
  cross-entropy over the whole batch) + the same AdamW step — what an OpenCLIP-style reference computes.
Reported: samples/s of each, their ratio, and the loss difference on the same features.

    python bench/train.py --quick       # tiny model, 20 steps each
    python bench/train.py               # tiny and small models
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402


def measure(size: str, steps: int, batch: int) -> dict:
    import torch

    from training.loss import clip_loss, reference_clip_loss
    from training.model import CLIP, model_config

    torch.manual_seed(0)
    config = model_config(size, vocab_size=4096, context_length=32)
    images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size), dtype=torch.uint8)
    text = torch.randint(3, 4096, (batch, 32))
    text[:, 20] = 2  # <eot>
    result = {}
    for name, loss_fn in (("clipline", clip_loss), ("reference", lambda i, t, s, b: reference_clip_loss(i, t, s))):
        torch.manual_seed(0)
        model = CLIP(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for step in range(steps + 2):
            if step == 2:  # two warm-up steps
                started = time.perf_counter()
            image_f, text_f, scale, bias = model(images, text)
            loss = loss_fn(image_f, text_f, scale, bias)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - started
        result[name] = {"samples_per_s": steps * batch / seconds, "seconds": seconds}
    with torch.no_grad():
        model = CLIP(config)
        image_f, text_f, scale, _ = model(images, text)
        diff = float((clip_loss(image_f, text_f, scale) - reference_clip_loss(image_f, text_f, scale)).abs())
    return {
        "model": size,
        "parameters": sum(p.numel() for p in CLIP(config).parameters()),
        "batch": batch,
        "image_size": config.image_size,
        **result,
        "ratio": result["clipline"]["samples_per_s"] / result["reference"]["samples_per_s"],
        "loss_difference": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = [("tiny", 20, 64)] if args.quick else [("tiny", 40, 64), ("small", 10, 32), ("B/32", 3, 16)]
    results = [measure(*r) for r in runs]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'model':6} {'batch':>5} {'clipline/s':>10} {'reference/s':>11} {'ratio':>6} {'loss diff':>10}")
    for r in results:
        ours, theirs = r["clipline"]["samples_per_s"], r["reference"]["samples_per_s"]
        print(
            f"{r['model']:6} {r['batch']:5} {ours:10.1f} {theirs:11.1f} {r['ratio']:6.2f} {r['loss_difference']:10.2e}"
        )
    print(f"peak RSS {peak:.0f} MB (both sides in this process)")
    out = REPO / "bench" / "results" / "train.json"
    out.write_text(json.dumps({"bench": "train", "quick": args.quick, "results": results, "peak_rss_mb": peak,
                               "machine": machine()}, indent=1))  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
