"""Image bytes to a model's input tensor: the one decoder of training, evaluation and CLIP scoring (ground floor).

The crawl's own checks and normalisation (format allow-list, bomb check,
resize modes) are in pipeline/images.py; this module only turns stored, already
normalised images into uint8 tensors for a model.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch


def decode_image(data: bytes, size: int, rng: np.random.Generator | None, scale=(0.9, 1.0)) -> torch.Tensor:
    """JPEG draft-mode decode at reduced size, random resized crop (or centre crop), resize: uint8 (3, size, size).

    The crop is a tensor slice and the resize torch's uint8 antialiased bicubic on a channels-last
    tensor, which is PIL's filter but measured 2.5x faster here than PIL's resize (0.3 vs 1.1 ms at 256 px).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale when that still covers `size`
        pixels = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # (h, w, 3) uint8
    h, w = pixels.shape[:2]
    if rng is None:
        side = min(w, h)
        x, y, cw, ch = (w - side) // 2, (h - side) // 2, side, side
    else:
        area = w * h * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = max(1, int(round(min(w, math.sqrt(area * ratio)))))
        ch = max(1, int(round(min(h, math.sqrt(area / ratio)))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = torch.from_numpy(pixels).permute(2, 0, 1)[:, y : y + ch, x : x + cw]  # (3, ch, cw)
    if (ch, cw) == (size, size):
        return crop.contiguous()
    batch = crop[None].contiguous(memory_format=torch.channels_last)
    resized = torch.nn.functional.interpolate(batch, size=(size, size), mode="bicubic", antialias=True)
    return resized[0]  # (3, size, size) uint8, channels-last in memory: the batch's stack copies it anyway


def clip_preprocess(data: bytes, size: int) -> torch.Tensor:
    """OpenAI CLIP's evaluation transform, as public checkpoints expect it: the full image in RGB, the shorter side
    resized to `size` with PIL's bicubic filter, then a centre crop of size x size; uint8 (3, size, size).

    The CLIP score LAION filtered with and the features OpenCLIP, CLIP_benchmark and transformers'
    CLIPImageProcessor compute come from this transform; `decode_image` (draft-mode decode, crop, then
    resize) is faster and close, and is what training uses.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        if short != size:
            other = int(size * long / short)
            im = im.resize((size, other) if w <= h else (other, size), Image.BICUBIC)
        w, h = im.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        pixels = np.asarray(im.crop((left, top, left + size, top + size)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
