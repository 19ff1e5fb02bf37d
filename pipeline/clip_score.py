"""CLIP score for the filter: cosine similarity of each image with its caption under a clipline checkpoint.

The second filtering pass (LAION and DataComp filter at CLIP ViT-B/32 cosine
>= 0.28 / top 30%): images are decoded from the crawl tar, centre-cropped to
the model's size and scored in batches; on a GPU when there is one (with bf16
autocast), else on the CPU. The model is loaded once per worker process.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=2)
def _model(checkpoint: str, device: str):
    from eval.run import load_model, resolve_checkpoint

    return load_model(resolve_checkpoint(checkpoint), device)


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


@torch.no_grad()
def score(images: list[bytes], captions: list[str | None], checkpoint: str, device: str = "auto",
          batch_size: int = 256) -> np.ndarray:  # fmt: skip
    """Cosine similarity per (image bytes, caption) pair; NaN where the image does not decode."""
    from training.data import decode_image

    device = pick_device(device)
    model, tokenizer = _model(checkpoint, device)
    size = model.config.image_size
    out = np.full(len(images), np.nan, dtype=np.float32)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    for start in range(0, len(images), batch_size):
        decoded, rows = [], []
        for i in range(start, min(len(images), start + batch_size)):
            try:
                decoded.append(decode_image(images[i], size, rng=None))
                rows.append(i)
            except Exception:  # noqa: BLE001 - an undecodable image has no score
                continue
        if not rows:
            continue
        with autocast:
            image_features = model.encode_image(torch.stack(decoded).to(device))
            text_features = model.encode_text(tokenizer([captions[i] for i in rows]).to(device))
        out[rows] = (image_features.float() * text_features.float()).sum(dim=1).cpu().numpy()
    return out
