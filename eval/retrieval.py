"""Image-text retrieval: Recall@k both ways, several captions per image, similarities in chunks.

A hit for image→text is any of the image's captions in the top k; for text→image,
the caption's own image in the top k. Similarities are computed a chunk of
queries at a time, so memory is O(chunk × N), never N².
"""

from __future__ import annotations

import torch


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 1024,
) -> dict:
    """image_features (images, dim), text_features (texts, dim), text_to_image (texts,) image index per text."""
    n_images = image_features.shape[0]
    kmax = min(max(ks), max(n_images, text_features.shape[0]))
    # text → image: rank of the caption's own image
    t2i_hits = {k: 0 for k in ks}
    for start in range(0, text_features.shape[0], chunk):
        sims = text_features[start : start + chunk] @ image_features.T  # (chunk, images)
        top = sims.topk(min(kmax, n_images), dim=1).indices
        target = text_to_image[start : start + chunk, None]
        for k in ks:
            t2i_hits[k] += int((top[:, :k] == target).any(dim=1).sum())
    # image → text: any of the image's captions
    i2t_hits = {k: 0 for k in ks}
    for start in range(0, n_images, chunk):
        sims = image_features[start : start + chunk] @ text_features.T  # (chunk, texts)
        top = sims.topk(min(kmax, text_features.shape[0]), dim=1).indices
        owner = text_to_image[top]  # (chunk, k): the image each retrieved caption belongs to
        mine = torch.arange(start, start + sims.shape[0])[:, None]
        for k in ks:
            i2t_hits[k] += int((owner[:, :k] == mine).any(dim=1).sum())
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t_hits[k] / n_images
        out[f"text_to_image_R@{k}"] = t2i_hits[k] / text_features.shape[0]
    out["images"], out["texts"] = n_images, int(text_features.shape[0])
    return out
