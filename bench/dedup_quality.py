"""Near-duplicate quality on real photographs: clipline's signature vs imagehash's pHash and PDQ.

Photos: the photographs in Debian's wallpaper packages (mate-backgrounds, lomiri-wallpapers-16.04
and -20.04, plasma-workspace-wallpapers; CC-BY / CC-BY-SA / GPL, see their copyright files),
fetched with `apt-get download` into .cache/deb. Each is cut into a grid of tiles, so that
there are a few hundred distinct images, and tiles of one picture are the hard negatives
("different crops of the same scene"); pictures of one package share a style.

Every distinct image is copied the ways the web copies images (JPEG q30-60, resize 0.3-0.7x,
crop 2-10%, brightness and contrast ±10-20%, a caption bar, a logo, a watermark over ≤ 10% of
the area, PNG and WebP of the same pixels, rotation ≤ 3°, a horizontal flip). Every image goes
through the crawl's own decode (pipeline.images.process, 256 px), so the signatures are the
ones a crawl stores.

Reported per method: recall per transform (a copy is found when the method calls it a
duplicate of its original) and false merges: pairs of distinct images (originals and copies of
different originals) the method calls duplicates, and how many distinct images end up in a
cluster with another. `exact_pixels` across formats is reported too.

    python bench/dedup_quality.py            # every photo, 2x3 tiles each
    python bench/dedup_quality.py --quick    # 60 tiles
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import images  # noqa: E402

PACKAGES = ("mate-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "plasma-workspace-wallpapers")
TRANSFORMS = (
    "jpeg",
    "resize",
    "crop",
    "brightness",
    "contrast",
    "caption",
    "logo",
    "watermark",
    "png",
    "webp",
    "rotate",
    "flip",
)
EXACT_FORMATS = ("png", "webp")  # the same pixels in another format: must be exact_pixels duplicates
REPORTED_APART = ("flip",)  # a mirror image is not a copy every user wants merged


def fetch_photos(cache: Path = REPO / ".cache") -> list[Path]:
    """The photographs of the wallpaper packages (downloaded and unpacked once)."""
    root = cache / "photos"
    if not root.exists():
        deb = cache / "deb"
        deb.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=deb, check=True, capture_output=True)
        for package in PACKAGES:
            for f in deb.glob(f"{package}_*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(f), str(root)], check=True)
    share = root / "usr/share"
    found = sorted(share.glob("backgrounds/*_by_*.jpg")) + sorted(share.glob("backgrounds/mate/nature/*.jpg"))
    for d in sorted(share.glob("wallpapers/*/contents/images")):
        jpgs = sorted(d.glob("*.jpg"))
        if jpgs:  # one size of each plasma wallpaper (the JPEG ones are photographs; the PNGs renders)
            found.append(max(jpgs, key=lambda f: f.stat().st_size))
    return found


def tiles(path: Path, rows: int = 2, cols: int = 3, longest: int = 800) -> list[Image.Image]:
    """A photo cut into rows x cols tiles, each scaled so its longest side is at most `longest`."""
    with Image.open(path) as img:
        img.draft("RGB", (img.width // 4, img.height // 4))  # big wallpapers: decode at 1/2-1/4
        rgb = img.convert("RGB")
    w, h = rgb.width // cols, rgb.height // rows
    out = []
    for r in range(rows):
        for c in range(cols):
            tile = rgb.crop((c * w, r * h, (c + 1) * w, (r + 1) * h))
            tile.thumbnail((longest, longest), Image.Resampling.LANCZOS)
            out.append(tile)
    return out


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        img.save(buf, "WEBP", lossless=True)
    else:
        img.save(buf, fmt.upper())
    return buf.getvalue()


def _overlay_box(img: Image.Image, rng: np.random.Generator, area: float) -> tuple[int, int, int, int]:
    """A box of `area` of the image at a random corner, 2:1 wide."""
    w = int(img.width * (2 * area) ** 0.5)
    h = max(1, int(img.width * img.height * area / max(w, 1)))
    x = 0 if rng.random() < 0.5 else img.width - w
    y = 0 if rng.random() < 0.5 else img.height - h
    return x, y, x + w, y + h


def transform(original: Image.Image, name: str, rng: np.random.Generator) -> bytes:
    """One copy of an RGB original, encoded as the web would serve it (JPEG q90 unless said)."""
    img = original
    if name == "jpeg":
        return _jpeg(img, int(rng.integers(30, 61)))
    if name == "resize":
        f = rng.uniform(0.3, 0.7)
        img = img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC)
    elif name == "crop":
        cut = rng.uniform(0.02, 0.10)  # of each side's length, split between its two ends
        left, top = rng.uniform(0, cut) * img.width, rng.uniform(0, cut) * img.height
        right, bottom = img.width * (1 - cut) + left, img.height * (1 - cut) + top
        img = img.crop((round(left), round(top), round(right), round(bottom)))
    elif name in ("brightness", "contrast"):
        f = rng.uniform(0.10, 0.20) * (1 if rng.random() < 0.5 else -1)
        enhancer = ImageEnhance.Brightness if name == "brightness" else ImageEnhance.Contrast
        img = enhancer(img).enhance(1 + f)
    elif name == "caption":  # a bar with text along the bottom, 6-10% of the area
        img = img.copy()
        h = round(img.height * rng.uniform(0.06, 0.10))
        draw = ImageDraw.Draw(img)
        draw.rectangle((0, img.height - h, img.width, img.height), fill=(20, 20, 20))
        draw.text((8, img.height - h + 4), "shared from my holiday album, all rights reserved", fill=(250, 250, 250))
    elif name == "logo":  # an opaque coloured badge in a corner, 2-5% of the area
        img = img.copy()
        box = _overlay_box(img, rng, rng.uniform(0.02, 0.05))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw = ImageDraw.Draw(img)
        draw.rounded_rectangle(box, radius=6, fill=colour)
        draw.ellipse((box[0] + 4, box[1] + 4, box[0] + (box[3] - box[1]) - 4, box[3] - 4), fill=(255, 255, 255))
    elif name == "watermark":  # half-transparent white text block in a corner, 5-10% of the area
        box = _overlay_box(img, rng, rng.uniform(0.05, 0.10))
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        draw.rectangle(box, fill=(255, 255, 255, 90))
        for y in range(box[1] + 2, box[3] - 10, 12):
            draw.text((box[0] + 4, y), "© stockphotos.example", fill=(255, 255, 255, 200))
        img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    elif name in EXACT_FORMATS:  # exactly the pixels a browser shows for the original (JPEG q90)
        return _encode(Image.open(io.BytesIO(_jpeg(img, 90))).convert("RGB"), name)
    elif name == "rotate":
        angle = rng.uniform(1.0, 3.0) * (1 if rng.random() < 0.5 else -1)
        img = img.rotate(angle, Image.Resampling.BICUBIC, expand=False, fillcolor=(255, 255, 255))
    elif name == "flip":
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        raise ValueError(f"unknown transform {name!r}")
    return _jpeg(img, 90)


def corpus(
    photos: list[Image.Image], seed: int = 0, transforms: tuple[str, ...] = TRANSFORMS
) -> tuple[list[bytes], np.ndarray, list[str]]:
    """The originals (JPEG q90) and every transform of each: (encoded images, original index, kind)."""
    rng = np.random.default_rng(seed)
    data, origin, kind = [], [], []
    for i, photo in enumerate(photos):
        data.append(_jpeg(photo, 90))
        origin.append(i)
        kind.append("original")
        for name in transforms:
            data.append(transform(photo, name, rng))
            origin.append(i)
            kind.append(name)
    return data, np.array(origin), kind


# --- methods: each gives a pairwise "duplicate" matrix over all images --------------------------


def _popcount_matrix(bits: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distances of rows of packed uint8 bits."""
    n = len(bits)
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint16)
    out = np.zeros((n, n), dtype=np.uint16)
    for j in range(bits.shape[1]):
        out += table[bits[:, j][:, None] ^ bits[:, j][None, :]]
    return out


def _to_bits(values: list[int], width: int = 64) -> np.ndarray:
    raw = np.array([v & ((1 << width) - 1) for v in values], dtype=object)
    return np.array([list(int(v).to_bytes(width // 8, "big")) for v in raw], dtype=np.uint8)


def clipline_matrix(processed: list[images.ProcessedImage], threshold: int, tolerance: int) -> np.ndarray:
    """clipline's near-duplicate rule on the crawl's signatures, as the dedup reduce applies it."""
    phash = _popcount_matrix(_to_bits([p.phash for p in processed]))
    grids = np.array([[int(c, 16) for c in p.colour_sig] for p in processed], dtype=np.int16)
    colour = np.zeros_like(phash)
    for j in range(grids.shape[1]):
        colour = np.maximum(colour, np.abs(grids[:, j][:, None] - grids[:, j][None, :]).astype(np.uint16))
    return (phash <= threshold) & (colour <= tolerance)


def imagehash_matrix(decoded: list[Image.Image], threshold: int = 10) -> np.ndarray:
    import imagehash

    hashes = [int(str(imagehash.phash(img)), 16) for img in decoded]
    return _popcount_matrix(_to_bits(hashes)) <= threshold


def pdq_matrix(decoded: list[Image.Image], threshold: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """PDQ (Meta's reference, via pdqhash) at its standard match threshold, and each hash's quality."""
    import pdqhash

    bits, quality = [], []
    for img in decoded:
        vector, q = pdqhash.compute(np.asarray(img))
        bits.append(np.packbits(vector.astype(np.uint8)))
        quality.append(q)
    return _popcount_matrix(np.array(bits)) <= threshold, np.array(quality)


# --- the candidate for clipline's next signature (prototype: measured here, not yet in the crawl) ----

_N = 32
_DCT = np.cos(np.pi / _N * (np.arange(_N)[:, None]) * (np.arange(_N)[None, :] + 0.5))
WINDOWS = ("whole", "centre", "top-left", "top-right", "bottom-left", "bottom-right")


def window_signatures(img: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window (the whole image, its centre 2/3 and its four corner 2/3 windows): a 64-bit pHash,
    a 4 x 4 grid of mean colours at 8 bits, and the window's texture (std of its 32 x 32 grey).

    An overlay in a corner or along an edge (logo, caption bar, watermark) and the white corners
    of a small rotation leave at least one window clean, and that window still matches."""
    img = img.copy()
    img.thumbnail((512, 512))
    rgb = np.asarray(img.convert("RGB"))
    h, w = rgb.shape[:2]
    boxes = [(0, 0, w, h), (w // 6, h // 6, w - w // 6, h - h // 6), (0, 0, 2 * w // 3, 2 * h // 3),
             (w // 3, 0, w, 2 * h // 3), (0, h // 3, 2 * w // 3, h), (w // 3, h // 3, w, h)]  # fmt: skip
    hashes, grids, texture = [], [], []
    for x0, y0, x1, y1 in boxes:
        small = np.asarray(Image.fromarray(rgb[y0:y1, x0:x1]).resize((_N, _N), Image.Resampling.BOX), np.float64)
        grey = small @ np.array([0.299, 0.587, 0.114])
        coeffs = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
        hashes.append(int(np.packbits(coeffs > np.median(coeffs[1:])).view(">u8")[0]))
        grids.append(small.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3)).reshape(16, 3))
        texture.append(grey.std())
    return np.array(hashes, dtype=np.uint64), np.array(grids), np.array(texture)


def colour_residual(a: np.ndarray, b: np.ndarray, drop: int = 2) -> np.ndarray:
    """Per pair of 16 x 3 colour grids (P, 16, 3): how far a is from b after the best gain (0.7-1.4)
    and offset (±48 levels) per channel, fitted without the `drop` worst cells (twice), as the
    (drop + 1)-th worst cell's largest channel residual: brightness and contrast changes fit, an
    overlay over up to `drop` cells of 16 is left out, another picture does not fit."""
    keep = np.ones(a.shape, dtype=bool)
    for _ in range(2):
        n = keep.sum(axis=1, keepdims=True)
        mx, my = (b * keep).sum(axis=1, keepdims=True) / n, (a * keep).sum(axis=1, keepdims=True) / n
        cov = ((b - mx) * (a - my) * keep).sum(axis=1, keepdims=True)
        var = ((b - mx) ** 2 * keep).sum(axis=1, keepdims=True)
        gain = np.clip(np.where(var > 1e-6, cov / np.maximum(var, 1e-6), 1.0), 0.7, 1.4)
        offset = np.clip(my - gain * mx, -48, 48)
        residual = np.abs(a - (gain * b + offset))
        keep = residual <= np.sort(residual, axis=1)[:, a.shape[1] - 1 - drop : a.shape[1] - drop]
    cell = residual.max(axis=2)
    return np.sort(cell, axis=1)[:, a.shape[1] - 1 - drop]


def windows_matrix(decoded: list[Image.Image], threshold: int = 8, tolerance: float = 8.0, texture: float = 4.0):
    """Duplicates when some window's pHashes are within `threshold` bits and that window's colours
    within `tolerance` (colour_residual); windows flatter than `texture` (std of grey levels) never
    match (a flat window hashes to noise, and flat windows of two pictures would merge)."""
    sigs = [window_signatures(img) for img in decoded]
    hashes = np.stack([s[0] for s in sigs])
    grids = np.stack([s[1] for s in sigs])
    textured = np.stack([s[2] for s in sigs]) >= texture
    same = np.zeros((len(sigs), len(sigs)), dtype=bool)
    for w in range(len(WINDOWS)):
        h = hashes[:, w]
        close = np.bitwise_count(h[:, None] ^ h[None, :]) <= threshold
        close &= textured[:, w][:, None] & textured[:, w][None, :]
        i, j = np.nonzero(np.triu(close, 1))
        ok = colour_residual(grids[i, w], grids[j, w]) <= tolerance
        same[i[ok], j[ok]] = same[j[ok], i[ok]] = True
    return same | np.eye(len(sigs), dtype=bool)


def clusters(same: np.ndarray) -> list[list[int]]:
    """The connected components of a pairwise duplicate matrix, as sorted lists of image indices."""
    label = np.arange(len(same))
    while True:  # each image takes the smallest label among its duplicates, until nothing changes
        lowest = np.where(same, label[None, :], len(same)).min(axis=1)
        lowest = np.minimum(lowest, label)
        if np.array_equal(lowest, label):
            break
        label = lowest
    groups: dict[int, list[int]] = {}
    for i, root in enumerate(label.tolist()):
        groups.setdefault(root, []).append(i)
    return sorted(groups.values())


def scores(same: np.ndarray, origin: np.ndarray, kind: list[str]) -> dict:
    """Recall per transform and false merges, from a pairwise duplicate matrix."""
    kind_arr = np.array(kind)
    originals = np.flatnonzero(kind_arr == "original")
    first = {int(origin[i]): int(i) for i in originals}
    recall = {}
    for name in TRANSFORMS:
        rows = np.flatnonzero(kind_arr == name)
        found = [bool(same[r, first[int(origin[r])]]) for r in rows]
        recall[name] = round(float(np.mean(found)), 4) if found else None
    distinct = origin[:, None] != origin[None, :]
    upper = np.triu(np.ones_like(same, dtype=bool), 1)
    false_pairs = int((same & distinct & upper).sum())
    orig_block = same[np.ix_(originals, originals)] & np.triu(np.ones((len(originals),) * 2, dtype=bool), 1)
    merged_images = int((same & distinct).any(axis=1).sum())
    counted = [recall[t] for t in TRANSFORMS if t not in REPORTED_APART and recall[t] is not None]
    return {
        "recall": recall,
        "recall_mean": round(float(np.mean(counted)), 4),
        "recall_min": round(float(np.min(counted)), 4),
        "false_pairs": false_pairs,
        "false_pairs_originals": int(orig_block.sum()),
        "images_in_false_merges": merged_images,
    }


def exact_pixels(processed: list[images.ProcessedImage], origin: np.ndarray, kind: list[str]) -> dict:
    """Per lossless format, how many copies share the original's pixel hash (must be all)."""
    first = {int(o): p for o, p, k in zip(origin, processed, kind, strict=True) if k == "original"}
    out = {}
    for fmt in EXACT_FORMATS:
        rows = [(int(o), p) for o, p, k in zip(origin, processed, kind, strict=True) if k == fmt]
        out[f"jpeg_vs_{fmt}_of_its_pixels"] = {
            "equal": sum(p.pixel_hash == first[o].pixel_hash for o, p in rows),
            "of": len(rows),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 tiles")
    parser.add_argument("--threshold", type=int, default=8, help="clipline's near_threshold")
    parser.add_argument("--tolerance", type=int, default=1, help="clipline's colour_tolerance")
    parser.add_argument("--out", default=str(REPO / "bench/results/dedup-quality.json"))
    args = parser.parse_args()
    paths = fetch_photos()
    photos = [t for p in paths for t in tiles(p)]
    if args.quick:
        photos = photos[:60]
    t0 = time.perf_counter()
    data, origin, kind = corpus(photos)
    policy = images.ImagePolicy(image_size=256, resize_mode="border")
    processed = [images.process(d, policy) for d in data]
    decoded = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    pdq, quality = pdq_matrix(decoded)
    methods = {
        f"clipline (pHash<={args.threshold}, colour<={args.tolerance})": clipline_matrix(
            processed, args.threshold, args.tolerance
        ),
        "imagehash pHash<=10": imagehash_matrix(decoded),
        "PDQ<=31": pdq,
        "windows (prototype): pHash<=8 + colour<=8 in one of 6 windows": windows_matrix(decoded),
        "windows (prototype) at pHash<=10": windows_matrix(decoded, threshold=10),
    }
    report = {
        "photos": {"pictures": len(paths), "tiles": len(photos), "images": len(data), "packages": PACKAGES},
        "methods": {name: scores(m, origin, kind) for name, m in methods.items()},
        "exact_pixels": exact_pixels(processed, origin, kind),
        "pdq_quality_below_50": int((quality < 50).sum()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
