"""Image checks and normalisation for the crawl, in the order that keeps it safe and cheap.

1. the format from magic bytes, against an allow-list (never the Content-Type);
2. the dimensions from the header only, against a pixel limit (decompression
   bombs are refused before any pixel is allocated), then min size / max area /
   aspect ratio;
3. decode: a JPEG DCT-scaled (libjpeg's 1/2, 1/4, 1/8) to the smallest scale that
   still covers the target; other formats at full size under a per-process pixel
   budget, box-reduced at once by an integer factor that still covers 1.5x the
   target; EXIF orientation applied, converted to RGB (CMYK, 16-bit, palette+alpha,
   LA/RGBA composited on white, first frame of an animation). The pixel hash is of
   the decoded pixels, so it is equal across formats when a JPEG decodes at full
   scale (under twice the target), and across JPEGs with the same coefficients at
   every scale; a PNG of a larger JPEG's full-size pixels is a near duplicate;
4. resize per img2dataset's modes and interpolations (area when shrinking) and encode.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline import pdq
from pipeline.stage import release_memory

ALLOWED_FORMATS = ("jpeg", "png", "webp", "gif")
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}  # the only decoders ever opened


class DecodeBudget:
    """How many pixels this process decodes at once: a thread waits while its decode would exceed it.

    PNG, GIF and WebP decode at full size whatever the target: a 137 KiB PNG of 6000x6000 pixels is
    144 MB as RGBA. With 64 crawl threads a handful of such files at once killed a worker; under the
    budget they take turns. A single image larger than the budget still runs, alone."""

    def __init__(self, pixels: int):
        self.capacity = pixels
        self.used = 0
        self._cv = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        cost = min(pixels, self.capacity)
        with self._cv:
            while self.used and self.used + cost > self.capacity:
                self._cv.wait()
            self.used += cost
        try:
            yield
        finally:
            if pixels >= TRIM_ABOVE_PIXELS:
                # Pillow's 16 MB blocks come from the decoding thread's malloc arena, which keeps them
                # when freed: without a trim, 8 threads taking turns still held 8 decodes' worth (1.4 GB).
                release_memory()
            with self._cv:
                self.used -= cost
                self._cv.notify_all()


DECODE_BUDGET = DecodeBudget(64_000_000)  # about 256 MB of RGBA pixels a process
TRIM_ABOVE_PIXELS = 4_000_000  # after a decode this large, freed memory goes back to the OS
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
# img2dataset's interpolation names as Pillow filters. Pillow has no fractional-area filter: its BOX
# weighs whole pixels in or out, about twice as far from a true area mean (OpenCV's INTER_AREA,
# img2dataset's default for shrinking) as its antialiased bilinear or bicubic (on web photos shrunk
# 1-2x: 2.4 levels RMS against 0.6 and 0.8; which of the two is closer depends on the ratio). So
# "area" is the bilinear filter, a triangle as wide as the scale, at 2/3 of bicubic's cost.
INTERPOLATIONS = {
    "area": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def sniff_format(data: bytes) -> str | None:
    """The format named by the first bytes, or None when nothing image-like is recognised."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"8BPS"):
        return "psd"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "eps"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "heif"
    if head.startswith(b"\xff\x0a") or head[4:12] == b"jP  \r\n\x87\n" or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "jxl_or_jp2"
    return None


class ImageRefused(Exception):
    """An image that fails a check; `status` is the crawl status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImagePolicy:
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    downscale_interpolation: str = "area"  # img2dataset's names and defaults (see INTERPOLATIONS)
    upscale_interpolation: str = "lanczos"
    encode_format: str = "jpg"  # jpg, png or webp
    encode_quality: int = 95
    min_image_size: int = 0  # smaller side, in pixels, before resizing
    max_image_area: float = float("inf")  # width * height, before resizing
    max_aspect_ratio: float = float("inf")  # larger side / smaller side
    max_image_pixels: int = 50_000_000  # decompression-bomb limit, from the header (Pillow's own is 89M)
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS
    pdq: bool = True  # compute the PDQ hash (hash lists at crawl, filter and takedown need it)


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    format: str  # the source format
    phash: int  # 64-bit DCT perceptual hash of the whole upright image (as a signed int64)
    colour_sig: str  # 4x4 grid of mean colours, 4 bits a channel, as 48 hex digits: pHash is grey-only
    pixel_hash: int  # 64-bit hash of the decoded pixels at 32x32: equal for equal decoded pixels
    window_sig: bytes  # WINDOWS x (pHash, 8-bit colour grid, texture): the near-duplicate signature (WINDOW_BYTES)
    pdq: str | None  # PDQ (pipeline/pdq.py), 64 hex digits: what abuse hash lists are shared in
    pdq_quality: int | None  # PDQ's quality, 0-100 (below 50: too flat to match on); None: not computed


# DCT-II basis for 32 samples, rows = frequencies (orthonormal scaling does not matter for signs).
_N = 32
_DCT = np.cos(np.pi / _N * (np.arange(_N)[:, None]) * (np.arange(_N)[None, :] + 0.5)).astype(np.float32)


def signatures(rgb: Image.Image) -> tuple[int, str, int]:
    """(pHash, colour signature, pixel hash) of an RGB image: `image_signatures` without the windows."""
    return image_signatures(rgb)[:3]


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as Pillow's "L"

# The near-duplicate signature's windows: the whole image, its centre 2/3, and its four corner 2/3
# windows, as (x0, y0, x1, y1) in sixths of the width and height. An overlay in a corner or along an
# edge (logo, caption bar, watermark) or the white corners of a small rotation leave one window
# clean, and that window still matches (bench/dedup_quality.py).
WINDOWS = ((0, 0, 6, 6), (1, 1, 5, 5), (0, 0, 4, 4), (2, 0, 6, 4), (0, 2, 4, 6), (2, 2, 6, 6))
WINDOW_BYTES = 8 + 48 + 1  # a window's pHash (big-endian), 4x4 grid of mean colours at 8 bits (RGB), texture


def image_signatures(rgb: Image.Image) -> tuple[int, str, int, bytes]:
    """(pHash, colour signature, pixel hash, window signature) of an RGB image, all from one 96x96
    box downscale: one pass over the pixels, then arithmetic on 27,648 numbers.

    Each window (WINDOWS) is 32x32 box means of the grid: the whole image as 3x3 means, a 2/3
    window as 2x2 means (a sixth of the image is 16 grid pixels). Per window: its 64-bit DCT pHash
    (the 8x8 lowest frequencies of its grey 32x32 against their median, DC left out), the mean
    colour of a 4x4 grid at 8 bits a channel, and its texture (the standard deviation of the grey
    levels, capped at 255): WINDOW_BYTES each, the near-duplicate signature.

    Of the whole image (window 0) also, for the exact and legacy checks and decontamination:
    - pHash: window 0's, as a signed int64 (compare with XOR + popcount); robust to re-encoding,
      resizing and small crops;
    - colour signature: the 4x4 grid at 4 bits a channel, as 48 hex digits (pHash is grey-only);
    - pixel hash: the first 64 bits of the sha256 of the 32x32 pixels at 5 bits a channel, a signed
      int64: equal for equal decoded pixels.
    """
    grid = np.asarray(rgb.resize((96, 96), Image.Resampling.BOX), dtype=np.float32)  # (96, 96, 3)
    # Box means as sums of strided views: numpy's mean over reshaped axes was 5x slower.
    half = (grid[0::2, 0::2] + grid[1::2, 0::2] + grid[0::2, 1::2] + grid[1::2, 1::2]) * np.float32(1 / 4)
    whole = sum(grid[i::3, j::3] for i in range(3) for j in range(3)) * np.float32(1 / 9)
    smalls = np.stack([whole] + [half[8 * y0 : 8 * y1, 8 * x0 : 8 * x1] for x0, y0, x1, y1 in WINDOWS[1:]])
    n = len(WINDOWS)  # smalls: (n, 32, 32, 3)
    greys = smalls @ _LUMA
    cells = smalls.reshape(n, 4, 8, 96).sum(axis=2).reshape(n, 4, 4, 8, 3).sum(axis=3) * np.float32(1 / 64)
    coeffs = (_DCT @ greys @ _DCT.T)[:, :8, :8].reshape(n, 64)
    bits = np.packbits(coeffs > np.median(coeffs[:, 1:], axis=1, keepdims=True), axis=1)  # most significant first
    out = np.empty((n, WINDOW_BYTES), dtype=np.uint8)
    out[:, :8] = bits
    out[:, 8:56] = np.rint(cells).reshape(n, 48)  # cells row-major, RGB
    out[:, 56] = np.minimum(255, np.rint(greys.std(axis=(1, 2))))
    phash = int(bits[0].view(">i8")[0])
    colour = "".join("0123456789abcdef"[v] for v in (cells[0].astype(np.uint8) >> 4).ravel())
    pixels = np.rint(smalls[0]).astype(np.uint8) >> 3
    pixel_hash = int.from_bytes(hashlib.sha256(pixels.tobytes()).digest()[:8], "big", signed=True)
    return phash, colour, pixel_hash, out.tobytes()


def window_signature(rgb: Image.Image) -> bytes:
    """The near-duplicate signature of an RGB image (see image_signatures)."""
    return image_signatures(rgb)[3]


def colour_distance(a: str, b: str) -> int:
    """The largest difference of one channel of one cell between two colour signatures (0-15)."""
    return max(abs(int(x, 16) - int(y, 16)) for x, y in zip(a, b, strict=True))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        if arr.max(initial=0) > 255:
            arr = arr >> 8 if arr.max() < 65536 else arr >> 24
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # CMYK, L, 1, P, YCbCr, F ...


def target_size(width: int, height: int, policy: ImagePolicy) -> tuple[int, int]:
    """The size to resize a width × height image to, before any crop or border."""
    s, mode = policy.image_size, policy.resize_mode
    if mode == "no":
        return width, height
    if mode in ("keep_ratio", "center_crop"):
        scale = s / min(width, height)
    else:  # border, keep_ratio_largest
        scale = s / max(width, height)
    if policy.resize_only_if_bigger and scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def process(data: bytes, policy: ImagePolicy) -> ProcessedImage:
    """Check, decode, normalise, resize and encode one downloaded image, or raise ImageRefused."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRefused("not_an_image", "no image signature in the first bytes" if data else "empty body")
    if fmt not in policy.allowed_formats:
        raise ImageRefused("format_not_allowed", f"format {fmt} is not in the allow-list")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[fmt]])  # parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRefused("decompression_bomb", str(e).split(",")[0]) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRefused("decode_error", f"cannot parse the header: {e}") from e
    width, height = img.size
    if width * height > policy.max_image_pixels:
        raise ImageRefused("decompression_bomb", f"header declares {width}x{height} pixels")
    if width < 1 or height < 1:
        raise ImageRefused("decode_error", f"header declares {width}x{height}")
    if min(width, height) < policy.min_image_size:
        raise ImageRefused("image_too_small", f"{width}x{height} is under {policy.min_image_size} pixels")
    if width * height > policy.max_image_area:
        raise ImageRefused("image_too_large", f"{width}x{height} is over {policy.max_image_area:g} pixels")
    if max(width, height) / min(width, height) > policy.max_aspect_ratio:
        raise ImageRefused("bad_aspect_ratio", f"{width}x{height} is beyond aspect ratio {policy.max_aspect_ratio:g}")
    target = target_size(width, height, policy)
    try:
        if fmt == "jpeg" and policy.resize_mode != "no":
            # DCT-domain scaling (1/2, 1/4, 1/8) while the result still covers the target: a quarter
            # of the decode and of the resize's input or less (see the module's docstring for what
            # this means for exact_pixels).
            img.draft(None, target)
        with DECODE_BUDGET.hold(img.width * img.height):
            img.load()
            img = _reduced(img, target) if policy.resize_mode != "no" else img
        # Rotation and compositing on white after the reduction: at full size each was another copy.
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
        rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageRefused("decode_error", f"cannot decode: {e}") from e
    original_width, original_height = (height, width) if _rotated(img, width, height) else (width, height)
    # Dedup signatures, of the whole upright image before any crop/resize (computed here: it is decoded once).
    *hashes, windows = image_signatures(rgb)
    # PDQ of the decoded copy (DCT-scaled or reduced to the target's scale): ~0.5 ms an image
    pdq_hash, pdq_quality = pdq.pdq_of_image(rgb) if policy.pdq else (None, None)
    out = resize(rgb, policy)
    out.info = {}  # none of the source's metadata (a JPEG comment was written out again): pixels only
    buf = io.BytesIO()
    if policy.encode_format == "jpg":
        out.save(buf, "JPEG", quality=policy.encode_quality)
    elif policy.encode_format == "webp":
        out.save(buf, "WEBP", quality=policy.encode_quality)
    else:
        out.save(buf, "PNG")
    size = (out.width, out.height, original_width, original_height)
    return ProcessedImage(buf.getvalue(), *size, fmt, *hashes, windows, pdq_hash, pdq_quality)


def _reduced(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """A decoded image box-reduced by an integer factor that keeps at least 1.5x the target size (as
    JPEG draft mode kept at least 1x, but every format alike); the signatures and the resize then work
    on the small copy: an 800 px photo for a 256 px target is resized from 400 px, not 800."""
    factor = min(img.width // -(-3 * target[0] // 2), img.height // -(-3 * target[1] // 2))
    if factor < 2:
        return img
    if img.mode == "P":  # reduce() works on pixel values, not palette indices
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "La", "CMYK", "I", "F"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    return img.reduce(factor)


def _rotated(img: Image.Image, width: int, height: int) -> bool:
    """Whether EXIF orientation swapped the sides (img is after exif_transpose, maybe reduced)."""
    if width == height:
        return False
    return (img.width > img.height) != (width > height)


def resize(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    """img2dataset's resize modes on an RGB image, with its interpolations: `downscale_interpolation`
    when the image shrinks, `upscale_interpolation` when it grows."""
    if policy.resize_mode == "no":
        return img
    w, h = target_size(img.width, img.height, policy)
    s = policy.image_size
    shrinks = w < img.width or h < img.height
    resample = INTERPOLATIONS[policy.downscale_interpolation if shrinks else policy.upscale_interpolation]
    if policy.resize_mode == "center_crop" and (w > s or h > s):
        # Resample only what the crop keeps: the crop of the whole resize within rounding (±2 levels),
        # for 25-45% less work on 4:3 to 16:9 photos.
        left, top = max(0, (w - s) // 2), max(0, (h - s) // 2)
        width, height = min(s, w), min(s, h)
        if (w, h) == img.size:
            return img.crop((left, top, left + width, top + height))
        sx, sy = img.width / w, img.height / h
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        return img.resize((width, height), resample, box=box, reducing_gap=3.0)
    if (w, h) != img.size:
        img = img.resize((w, h), resample, reducing_gap=3.0)
    if policy.resize_mode == "border" and (img.width, img.height) != (s, s):
        # Padded to a square (black border), as img2dataset does, also when not resized.
        canvas = Image.new("RGB", (max(s, img.width), max(s, img.height)), (0, 0, 0))
        canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
        img = canvas
    return img
