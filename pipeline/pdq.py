"""PDQ, the open perceptual hash that abuse hash lists are shared in (Meta's ThreatExchange).

The algorithm as its hashing document and reference code define it, written here in numpy:
luma (ITU-R 601) → two passes of a Jarosz box filter (a centred box of ceil(side / 128)
along rows, then columns, shrinking at the edges) → the 64 × 64 samples at the cell centres
→ the 16 × 16 lowest non-constant DCT-II frequencies → each bit: coefficient > their median
(the lower of the middle two). 256 bits, written as 64 hex digits, bit k = i * 16 + j at
2**k. Quality (0-100) counts the significant gradients of the 64 × 64 samples; lists are
matched only on hashes of quality ≥ 50 in the reference tools, because flat images hash to
noise.

The blur and the sampling are one linear map a side, non-zero only in a band of 2 × the blur's
window a sample, so a hash is two banded products: ~0.1 ms on a web photo, where the same map as
two dense (64 × side) matrix products took ~0.6 (97% of the multiply-adds on zeros). The sums
round differently from the reference's running sums, so a coefficient at the median could come
out on the other side; on the test photographs the hashes and qualities are equal to the
reference's bit for bit. Images of 512 px and more are
box-reduced first (see pdq()) and land within 16 bits of the reference (median 0). A match is
a Hamming distance ≤ 31 of 256 (the reference's threshold).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

BITS = 256
MATCH_DISTANCE = 31  # the reference's "same image" threshold
MIN_QUALITY = 50  # below: too flat for the hash to mean anything
_MIN_SIDE = 5

_FREQ, _AT = np.arange(1, 17)[:, None], np.arange(64)[None, :]
_D = (np.sqrt(2.0 / 64.0) * np.cos(np.pi / 128.0 * _FREQ * (2 * _AT + 1))).astype(np.float32)  # DCT-II rows 1..16


@functools.lru_cache(maxsize=1024)  # web images repeat their common sizes
def _band(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's two passes of a box filter along an axis of length n, then its sampling at
    the 64 cell centres, as one linear map (the filter is linear) in band form: (64, span) input
    indices and their (64, span) weights, so an image costs two banded products instead of four
    passes over every pixel.

    The box: out[o] = mean(in[lo(o) : hi(o)]) with lo = o - (w - half), hi = o + half, clipped
    to the axis, for the window w = ceil(n / 128) and half = (w + 2) // 2. Sample i averages the
    inputs k of its window, each of which averages the inputs of its own window: a weight
    1 / (len(s_i) len(k)) on [lo(k), hi(k)) for each k, all within a span of 2w - 1 inputs, which
    starts where it fits in the axis (indices are never clipped, so no weight counts twice).
    A few dozen small arrays: web images come in so many sizes that this runs for most of them."""
    at = ((np.arange(64) + 0.5) * n / 64).astype(np.int64)
    window = (n + 127) // 128
    if window <= 1:
        return at[:, None], np.ones((64, 1), dtype=np.float32)
    half = (window + 2) // 2

    def lo(o):
        return np.maximum(o - (window - half), 0)

    def hi(o):
        return np.minimum(o + half, n)

    k = lo(at)[:, None] + np.arange(window)[None, :]  # (64, window): the inputs of each sample's window
    valid = k < hi(at)[:, None]
    k = np.minimum(k, n - 1)
    weight = valid / ((hi(at) - lo(at))[:, None] * (hi(k) - lo(k)))
    span = 2 * window - 1
    index = np.minimum(lo(k[:, 0]), n - span)[:, None] + np.arange(span)[None, :]  # (64, span)
    inside = (lo(k)[:, :, None] <= index[:, None, :]) & (index[:, None, :] < hi(k)[:, :, None])
    return index, (weight[:, :, None] * inside).sum(axis=1).astype(np.float32)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (h, w, 3) uint8 array, float32."""
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    return r * np.float32(0.299) + g * np.float32(0.587) + b * np.float32(0.114)


def _sample(grey: np.ndarray) -> np.ndarray:
    """The 64 × 64 samples of a float32 luma image: the band along its rows, then along its columns."""
    rows, row_weights = _band(grey.shape[0])
    cols, col_weights = _band(grey.shape[1])
    by_rows = np.einsum("ik,ikw->iw", row_weights, grey[rows])  # (64, w)
    return np.einsum("jk,ijk->ij", col_weights, by_rows[:, cols])  # (64, 64)


def pdq_floats(grey: np.ndarray) -> tuple[np.ndarray, int]:
    """The 16 × 16 DCT coefficients of a float32 luma image, and its quality."""
    if grey.shape != (64, 64):
        grey = _sample(grey)
    steps = np.concatenate([(grey[:-1] - grey[1:]).ravel(), (grey[:, :-1] - grey[:, 1:]).ravel()])
    gradients = np.abs(np.trunc(steps * np.float32(100) / np.float32(255))).astype(np.int64).sum()
    return _D @ grey @ _D.T, int(min(100, gradients // 90))


def pdq(rgb: np.ndarray, exact_up_to: int = 512) -> tuple[str, int]:
    """(hash as 64 hex digits, quality 0-100) of an (h, w, 3) uint8 RGB array.

    An image whose shorter side is at least `exact_up_to` is first box-reduced by an integer
    factor that keeps that side at `exact_up_to // 2` or more (the reference's own blur is a
    box of side / 128, so little changes: within 16 bits of the reference on real photos, median
    0, for a quarter of the work or less); smaller images hash as the reference does."""
    if min(rgb.shape[:2]) < _MIN_SIDE:
        return "0" * 64, 0
    factor = min(rgb.shape[:2]) // (exact_up_to // 2)
    if factor >= 2:
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
    return _hash(luma(rgb))


def pdq_of_image(img, exact_up_to: int = 512) -> tuple[str, int]:
    """`pdq` of an RGB PIL image as the crawl hashes it: Pillow's integer luma (a third of the time
    of the float one) and the reduction after it, on one channel. On 196 web-sized photos through the
    crawl's decode this lands as far from the reference as `pdq` does (median 4 bits, at most 20)."""
    if min(img.size) < _MIN_SIDE:
        return "0" * 64, 0
    grey = img.convert("L")
    factor = min(img.size) // (exact_up_to // 2)
    if factor >= 2:
        grey = grey.reduce(factor)
    return _hash(np.asarray(grey, dtype=np.float32))


def _hash(grey: np.ndarray) -> tuple[str, int]:
    coeffs, quality = pdq_floats(grey)
    flat = coeffs.ravel()
    median = np.partition(flat, 127)[127]  # the lower median of 256, as the reference's torben()
    bits = flat > median  # bit k = i * 16 + j
    value = int.from_bytes(np.packbits(bits[::-1]).tobytes(), "big")  # bit k at 2**k
    return f"{value:064x}", quality


def unpack(hexes: list[str] | np.ndarray) -> np.ndarray:
    """64-hex-digit hashes as (n, 4) uint64 words, for distances with XOR + popcount."""
    if not len(hexes):
        return np.zeros((0, 4), dtype=np.uint64)
    raw = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").reshape(-1, 4)
    return raw.astype(np.uint64)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between every row of `a` (n, 4) and every row of `b` (m, 4): (n, m)."""
    out = np.zeros((len(a), len(b)), dtype=np.int32)
    for w in range(4):
        out += np.bitwise_count(a[:, w][:, None] ^ b[:, w][None, :]).astype(np.int32)
    return out


@dataclass(frozen=True)
class HashList:
    """PDQ hash lists (`blocklist_image_pdq` files): one hex hash a line, optionally followed by
    a distance (comma or space between; the list's default is MATCH_DISTANCE), '#' comments.
    An image matches an entry within the entry's distance; hashes of quality below MIN_QUALITY
    are never matched (flat images hash to noise), as the reference tools do."""

    words: np.ndarray  # (n, 4) uint64
    limit: np.ndarray  # (n,) each entry's distance
    source: np.ndarray  # (n,) index into names
    names: tuple[str, ...]  # the files' names (their last path part)

    @classmethod
    def load(cls, paths: tuple[str, ...] | list[str]) -> "HashList":
        from pipeline.errors import ClipError
        from pipeline.storage import StorageError, split_location

        hexes, limits, sources = [], [], []
        for i, path in enumerate(paths):
            store, name = split_location(path)
            try:
                text = store.read_bytes(name).decode("utf-8", "replace")
            except StorageError as e:
                raise StorageError(f"blocklist {path}: {e}") from e
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.replace(",", " ").split()
                digits = parts[0].lower()
                if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
                    raise ClipError(f"blocklist {path}:{n}: a PDQ hash is 64 hex digits, got {parts[0][:70]!r}")
                if len(parts) > 1 and not (parts[1].isdigit() and int(parts[1]) <= BITS):
                    raise ClipError(f"blocklist {path}:{n}: the distance must be 0-{BITS}, got {parts[1]!r}")
                hexes.append(digits)
                limits.append(int(parts[1]) if len(parts) > 1 else MATCH_DISTANCE)
                sources.append(i)
        names = tuple(p.rstrip("/").rpartition("/")[2] for p in paths)
        return cls(unpack(hexes), np.array(limits, dtype=np.int32), np.array(sources, dtype=np.int32), names)

    def __len__(self) -> int:
        return len(self.limit)

    def match(self, hexes: list[str | None], quality: list[int | None], chunk: int = 4096) -> list[str | None]:
        """Per image, the name of the first list holding an entry within its distance, or None
        (no hash, a flat image, or no entry that close). Brute force in chunks: XOR + popcount
        of every image against every entry (about 10⁸ pairs a second a core)."""
        out: list[str | None] = [None] * len(hexes)
        rows = [i for i, (h, q) in enumerate(zip(hexes, quality, strict=True)) if h and (q or 0) >= MIN_QUALITY]
        if not len(self) or not rows:
            return out
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            d = distances(unpack([hexes[i] for i in part]), self.words)
            hit = d <= self.limit[None, :]
            first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
            for i, entry in zip(part, first.tolist(), strict=True):
                if entry >= 0:
                    out[i] = self.names[self.source[entry]]
        return out
