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
cluster with another. clipline's figures come from its dedup stage itself, run inline over
crawl rows of these images (`clusters: star`, the default, and `clusters: components`); they
are clusters, so the other methods are shown pairwise, as the connected components their pairs
join into, and as the greedy stars the stage's default makes of them (each duplicate matches its
keeper itself). `exact_pixels` across formats and across
JPEGs with the same coefficients is reported too.

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
EXACT_FORMATS = ("png", "webp")  # the same pixels in another format: exact_pixels when the JPEG decodes at full scale
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


def legacy_matrix(processed: list[images.ProcessedImage], threshold: int = 8, tolerance: int = 1) -> np.ndarray:
    """clipline's rule before the windowed signature (to 2026-12-02): the whole image's pHash within 8
    bits and every cell of the 4-bit colour grid within 1."""
    phash = _popcount_matrix(_to_bits([p.phash for p in processed]))
    grids = np.array([[int(c, 16) for c in p.colour_sig] for p in processed], dtype=np.int16)
    colour = np.zeros_like(phash)
    for j in range(grids.shape[1]):
        colour = np.maximum(colour, np.abs(grids[:, j][:, None] - grids[:, j][None, :]).astype(np.uint16))
    return (phash <= threshold) & (colour <= tolerance)


def clipline_matrix(processed: list[images.ProcessedImage], work: Path, **dedup) -> np.ndarray:
    """clipline's dedup stage itself (inline, near and exact checks, captions off) over crawl rows of
    the processed images: two images are the same when they end in one cluster."""
    import hashlib

    import pyarrow as pa

    from pipeline import schema
    from pipeline.config import RunConfig
    from pipeline.dedup import STAGES, DedupConfig
    from pipeline.runner import run_pipeline
    from pipeline.stage import marker_path
    from pipeline.storage import open_storage

    store = open_storage(work)
    rows = []
    for i, p in enumerate(processed):
        uid = f"{i:032x}"
        digest = hashlib.sha256(p.data).hexdigest()
        rows.append(
            {"uid": uid, "url": f"http://photo/{i}", "caption": None, "key": f"{i:09d}", "status": schema.SUCCESS,
             "width": p.width, "height": p.height, "original_width": p.original_width,
             "original_height": p.original_height, "sha256": digest, "sha256_key": schema.sha256_key(digest),
             "phash": p.phash, "colour_sig": p.colour_sig, "window_sig": p.window_sig, "pixel_hash": p.pixel_hash}
        )  # fmt: skip
    table = pa.Table.from_pylist(rows)
    for field in schema.CRAWL:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(len(rows), field.type))
    store.write_parquet("crawl/00000.parquet", schema.conform(table, schema.CRAWL, "bench"))
    store.write_json(marker_path("crawl", 0), {"stats": {"success": len(rows)}, "config_sha256": "bench"})
    config = DedupConfig(**{"caption": False, **dedup})
    run_pipeline(list(STAGES), store, RunConfig(out=store.uri, dedup=config), executor="inline", progress=False)
    out = store.read_parquet("dedup/00000.parquet").to_pydict()
    cluster = np.array([int(d or u, 16) for u, d in zip(out["uid"], out["dup_of"], strict=True)])
    return cluster[:, None] == cluster[None, :]


def window_rule_matrix(processed: list[images.ProcessedImage], threshold: int = 10, tolerance: float = 8.0,
                       texture: int = 4) -> np.ndarray:  # fmt: skip
    """The dedup stage's near rule as all-pairs decisions (no index, no clusters) on the crawl's
    window signatures: the whole image or the centre window matches, or two corner windows do."""
    import polars as pl

    from pipeline.dedup.index import colour_residual, window_arrays

    n = len(processed)
    phash = np.array([p.phash for p in processed], dtype=np.int64)
    sig = pl.Series([p.window_sig for p in processed], dtype=pl.Binary)
    hashes, grids, flat = window_arrays(sig, phash, pl.Series([p.colour_sig for p in processed]), 6)
    close = [np.bitwise_count(h[:, None] ^ h[None, :]) <= threshold for h in hashes.view(np.uint64).T]
    matched = []
    for w in range(6):
        textured = flat[:, w] >= texture
        i, j = np.nonzero(np.triu(close[w] & textured[:, None] & textured[None, :], 1))
        fits = colour_residual(grids[i, w].reshape(-1, 16, 3), grids[j, w].reshape(-1, 16, 3)) <= tolerance
        m = np.zeros((n, n), dtype=bool)
        m[i[fits], j[fits]] = m[j[fits], i[fits]] = True
        matched.append(m)
    corners = sum(m.astype(np.int8) for m in matched[2:]) >= 2
    return matched[0] | matched[1] | corners | np.eye(n, dtype=bool)


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


def restamped(jpeg: bytes, text: bytes = b"re-served") -> bytes:
    """The same JPEG with a COM segment after its SOI: the same coefficients (so the same decoded
    pixels at every DCT scale) in other bytes, as a CDN that adds or strips metadata serves it."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def dct_scale(data: bytes, policy: images.ImagePolicy) -> int:
    """The DCT scale (1, 2, 4 or 8) the crawl decodes a JPEG at: Pillow's own draft for the target."""
    img = Image.open(io.BytesIO(data))
    width = img.width
    img.draft(None, images.target_size(img.width, img.height, policy))
    return round(width / img.width)  # the scaled width is rounded up


def exact_pixels(
    data: list[bytes], processed: list[images.ProcessedImage], origin: np.ndarray, kind: list[str], policy
) -> dict:
    """How many copies share their original's pixel hash.
    - `jpeg_same_coefficients`: each original with a COM segment added; must be all.
    - per lossless format, the original's decoded pixels in it: equal when the original JPEG decodes
      at full scale (`full_scale` of them: under twice the output); a DCT-scaled one's PNG has other
      pixels at that scale, and is found as a near duplicate (the format's recall)."""
    first = {int(o): i for i, (o, k) in enumerate(zip(origin, kind, strict=True)) if k == "original"}
    again = {o: images.process(restamped(data[i]), policy) for o, i in first.items()}
    same = sum(p.pixel_hash == processed[first[o]].pixel_hash for o, p in again.items())
    out = {"jpeg_same_coefficients": {"equal": same, "of": len(again)}}
    for fmt in EXACT_FORMATS:
        rows = [(int(o), p) for o, p, k in zip(origin, processed, kind, strict=True) if k == fmt]
        out[f"jpeg_vs_{fmt}_of_its_pixels"] = {
            "equal": sum(p.pixel_hash == processed[first[o]].pixel_hash for o, p in rows),
            "of": len(rows),
            "full_scale": sum(dct_scale(data[first[o]], policy) == 1 for o, _ in rows),
        }
    return out


def closure(same: np.ndarray) -> np.ndarray:
    """The pairs in one cluster once a pairwise matrix's duplicates are joined transitively (what dedup keeps)."""
    label = np.empty(len(same), dtype=np.int64)
    for i, members in enumerate(clusters(same)):
        label[members] = i
    return label[:, None] == label[None, :]


def stars(same: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The clusters dedup's `clusters: star` makes of a pairwise matrix (the stage's own
    star_keepers), with keepers in its order: the largest area, then the lowest index (as the
    stage's uids are)."""
    from pipeline.dedup.components import keeper_ranks, star_keepers

    a, b = np.nonzero(np.triu(same, 1))
    index = np.concatenate([a, b]).astype(np.int32)
    order = np.arange(len(same), dtype=np.int64)
    keeper, _ = star_keepers(index, np.zeros(len(a), dtype=bool), keeper_ranks(order, [order.astype(np.uint64)], area))
    return keeper[:, None] == keeper[None, :]


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 tiles")
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
    with tempfile.TemporaryDirectory() as work:
        ours = clipline_matrix(processed, Path(work) / "default")
        components = clipline_matrix(processed, Path(work) / "components", clusters="components")
        whole = clipline_matrix(processed, Path(work) / "whole", near_windows=1)
    area = np.array([p.original_width * p.original_height for p in processed])
    methods = {
        "clipline dedup (6 windows, pHash<=10, colour fit<=8)": ours,
        "clipline dedup, clusters: components": components,
        "clipline dedup, whole image only (near_windows: 1)": whole,
        "clipline's rule as all-pairs decisions (no index)": window_rule_matrix(processed),
        "clipline before windows (pHash<=8, 4-bit colour<=1)": legacy_matrix(processed),
        "imagehash pHash<=10": imagehash_matrix(decoded),
        "PDQ<=31": pdq,
    }
    report = {
        "photos": {"pictures": len(paths), "tiles": len(photos), "images": len(data), "packages": PACKAGES},
        "pairwise": {name: scores(m, origin, kind) for name, m in methods.items()},
        "clustered": {name: scores(closure(m), origin, kind) for name, m in methods.items()},
        "stars": {name: scores(stars(m, area), origin, kind) for name, m in methods.items()},
        "exact_pixels": exact_pixels(data, processed, origin, kind, policy),
        "pdq_quality_below_50": int((quality < 50).sum()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
