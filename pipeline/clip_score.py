"""CLIP score for the filter (cosine similarity of each image with its caption), and image embeddings for
semantic dedup, under any checkpoint `training.checkpoint.load_model` reads (OpenAI's ViT-B-32.pt too).

The CLIP score as LAION defines it: the cosine of the L2-normalised image and
text embeddings, the image preprocessed as the checkpoint expects (shorter side
resized to its input size with bicubic, centre crop, its mean and std). LAION
and DataComp filter at OpenAI ViT-B/32 cosine >= 0.28 / top 30%. Images are
decoded from the crawl tar and scored in batches; on a GPU when there is one
(bf16 autocast), else on the CPU. The model is loaded once per worker process.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=2)
def _model(checkpoint: str, device: str):
    from training.checkpoint import load_model

    return load_model(checkpoint, device)


def architecture(checkpoint: str) -> str:
    """'OpenAI ViT-B/32' and the like: what a checkpoint is, in words."""
    from training.pretrained import architecture as name

    model, tokenizer = _model(checkpoint, "cpu")
    return name(model.config, tokenizer.kind)


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def _decoded_batches(images: list[bytes], size: int, batch_size: int):
    """(rows, pixels) per batch of the images that decode; the rest are left out."""
    from pipeline.decode import clip_preprocess

    for start in range(0, len(images), batch_size):
        decoded, rows = [], []
        for i in range(start, min(len(images), start + batch_size)):
            try:
                decoded.append(clip_preprocess(images[i], size))
                rows.append(i)
            except Exception:  # noqa: BLE001 - an undecodable image has no features
                continue
        if rows:
            yield rows, torch.stack(decoded)


@torch.no_grad()
def score(images: list[bytes], captions: list[str | None], checkpoint: str, device: str = "auto",
          batch_size: int = 256) -> np.ndarray:  # fmt: skip
    """Cosine similarity per (image bytes, caption) pair; NaN where the image does not decode."""
    device = pick_device(device)
    model, tokenizer = _model(checkpoint, device)
    out = np.full(len(images), np.nan, dtype=np.float32)
    for rows, pixels in _decoded_batches(images, model.config.image_size, batch_size):
        with _autocast(device):
            image_features = model.encode_image(pixels.to(device))
            text_features = model.encode_text(tokenizer([captions[i] for i in rows]).to(device))
        out[rows] = (image_features.float() * text_features.float()).sum(dim=1).cpu().numpy()
    return out


@torch.no_grad()
def embed(images: list[bytes], checkpoint: str, device: str = "auto", batch_size: int = 256) -> np.ndarray:
    """Unit-length image embeddings, (len(images), embed_dim) float32; NaN rows where an image does not decode."""
    device = pick_device(device)
    model, _ = _model(checkpoint, device)
    out = np.full((len(images), model.config.embed_dim), np.nan, dtype=np.float32)
    for rows, pixels in _decoded_batches(images, model.config.image_size, batch_size):
        with _autocast(device):
            features = model.encode_image(pixels.to(device))
        out[rows] = features.float().cpu().numpy()
    return out
