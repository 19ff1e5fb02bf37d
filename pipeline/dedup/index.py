"""Dedup keys: the exact keys, the caption key and the multi-index over the pHash (which tables, which keys)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import schema


def expected_pairs(n: int, design: dict) -> float:
    """Candidate pairs a design's tables give over n random hashes (pairs sharing a key)."""
    key_bits = 64 * design["match"] / design["blocks"]
    return design["tables"] * n * n / 2 ** (key_bits + 1)


def _designs(threshold: int, max_tables: int):
    for m in range(1, 17):
        for match in range(1, m + 1):
            radius, tables = m - match, math.comb(m, match)
            if radius <= threshold and tables <= max_tables:
                yield {"blocks": m, "match": match, "tables": tables, "radius": radius}


def index_design(
    n: int, threshold: int, budget_per_image: int = 50, max_tables: int = 32, hold_from: int | None = None
) -> dict:
    """The multi-index layout with the largest guaranteed radius whose expected pairs fit the budget.

    With `hold_from`, the radius never falls below the one it has at that many images: past
    it, the layout of that radius with the fewest expected pairs. Pairs per image then grow
    with n (a reduce task joins them in batches, edges.pair_batches)."""
    budget = max(1e6, budget_per_image * n)
    best = {"blocks": 1, "match": 1, "tables": 1, "radius": 0}
    for design in _designs(threshold, max_tables):
        better = (design["radius"], -design["tables"]) > (best["radius"], -best["tables"])
        if better and expected_pairs(n, design) <= budget:
            best = design
    if hold_from is not None and n > hold_from:
        held = index_design(hold_from, threshold, budget_per_image, max_tables)["radius"]
        if best["radius"] < held:
            same = [d for d in _designs(threshold, max_tables) if d["radius"] == held]
            best = min(same, key=lambda d: (expected_pairs(n, d), d["tables"]))
    return best


def _blocks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of each of m blocks of a 64-bit hash."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def table_keys(phash: np.ndarray, design: dict) -> list[np.ndarray]:
    """For each table of the design, the key of every hash (int64): its chosen blocks, concatenated."""
    h = phash.astype(np.int64).view(np.uint64)
    blocks = _blocks(design["blocks"])
    keys = []
    for combo in itertools.combinations(range(design["blocks"]), design["match"]):
        key = np.zeros(len(h), dtype=np.uint64)
        for b in combo:
            shift, width = blocks[b]
            mask = np.uint64((1 << width) - 1)
            key = (key << np.uint64(width)) | ((h >> np.uint64(shift)) & mask)
        keys.append(key.view(np.int64))
    return keys


KEY_BITS = 60  # exact keys: exact_edges keeps a row's kind above them


def exact_key(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """The low 60 bits of an integer hash column (the crawl's sha256_key or pixel_hash) as
    int64 keys, and which rows have a hash at all (a row without one is in no group)."""
    present = values.is_not_null().to_numpy()
    return values.fill_null(0).cast(pl.Int64).to_numpy() & ((1 << KEY_BITS) - 1), present


def caption_key(captions: pl.Series | pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A 63-bit key of the caption, case- and whitespace-folded (0 for an empty caption).

    polars' hash with fixed seeds: stable for one polars version, which is all a run needs
    (keys never leave the dedup stage's own work files).
    """
    folded = pl.Series(captions).fill_null("").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    key = (folded.hash(seed=0).to_numpy() >> np.uint64(1)).astype(np.int64)
    return np.where(folded.to_numpy() == "", 0, np.maximum(key, 1))


def image_rows(shard: int, crawl: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The crawl rows dedup looks at (fetched and hashed images): their mask over the shard, and
    their node ids, the crawl shard in the high 32 bits and the crawl row in the low."""
    ok = ((crawl["status"] == schema.SUCCESS) & crawl["phash"].is_not_null()).fill_null(False).to_numpy()
    return ok, (np.int64(shard) << np.int64(32)) | np.flatnonzero(ok).astype(np.int64)


def run_starts(values: np.ndarray) -> np.ndarray:
    """For sorted values, True where a run of equal values starts (empty in, empty out)."""
    starts = np.ones(len(values), dtype=bool)
    np.not_equal(values[1:], values[:-1], out=starts[1:])
    return starts


def window_arrays(
    sig: pl.Series, phash: np.ndarray, colour: pl.Series, windows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crawl's window signatures (images.window_signature) as (hashes (n, W) int64, colour grids
    (n, W, 48) uint8, texture (n, W) uint8) for the first W windows. A row without one (a crawl made
    before them) has the whole image only: its pHash, its 4-bit colour grid scaled to 8 bits, and a
    texture that never gates it; its other windows are flat, so they never match."""
    from pipeline.images import WINDOW_BYTES, WINDOWS

    n = len(phash)
    hashes = np.zeros((n, windows), dtype=np.int64)
    grids = np.zeros((n, windows, 48), dtype=np.uint8)
    texture = np.zeros((n, windows), dtype=np.uint8)
    size = len(WINDOWS) * WINDOW_BYTES
    arr = sig.to_arrow().cast(pa.large_binary())
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1] if n else np.zeros(1, np.int64)
    has = sig.is_not_null().to_numpy() & (np.diff(offsets) == size)
    if has.any():
        data = np.frombuffer(arr.buffers()[2], np.uint8)
        block = data[offsets[:-1][has][:, None] + np.arange(size)].reshape(-1, len(WINDOWS), WINDOW_BYTES)[:, :windows]
        hashes[has] = np.ascontiguousarray(block[:, :, :8]).view(">u8")[..., 0].astype(np.uint64).view(np.int64)
        grids[has] = block[:, :, 8:56]
        texture[has] = block[:, :, 56]
    old = ~has
    if old.any():
        hashes[old, 0] = phash[old]
        digits = np.frombuffer("".join(colour.filter(pl.Series(old)).fill_null("0" * 48)).encode(), np.uint8)
        grids[old, 0] = ((digits - 48 - 39 * (digits >= 97)) * 17).reshape(-1, 48)  # hex digit 0-f -> 0-255
        texture[old, 0] = 255
    return hashes, grids, texture


def colour_residual(a: np.ndarray, b: np.ndarray, drop: int = 2) -> np.ndarray:
    """Per pair of 16-cell RGB grids (P, 16, 3), how far `a` is from `b` once a gain (0.7-1.4) and an
    offset (±48 levels) per channel are fitted, without the `drop` worst cells (fitted twice): the
    largest channel residual of the (drop + 1)-th worst cell. Brightness and contrast changes fit; an
    overlay over up to `drop` of 16 cells is left out; another picture does not fit."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cells = a.shape[1]
    keep = np.ones(a.shape, dtype=bool)
    for _ in range(2):
        n = keep.sum(axis=1, keepdims=True)
        mb, ma = (b * keep).sum(axis=1, keepdims=True) / n, (a * keep).sum(axis=1, keepdims=True) / n
        cov = ((b - mb) * (a - ma) * keep).sum(axis=1, keepdims=True)
        var = ((b - mb) ** 2 * keep).sum(axis=1, keepdims=True)
        gain = np.clip(np.where(var > 1e-6, cov / np.maximum(var, 1e-6), 1.0), 0.7, 1.4)
        offset = np.clip(ma - gain * mb, -48, 48)
        residual = np.abs(a - (gain * b + offset))
        keep = residual <= np.sort(residual, axis=1)[:, cells - 1 - drop : cells - drop]
    return np.sort(residual.max(axis=2), axis=1)[:, cells - 1 - drop]


def pack_colour(signatures: pl.Series | pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """48-hex-digit colour grids as three int64 columns of 16 digits each (24 bytes, not 48 + offsets)."""
    text = pl.Series(signatures)
    return [
        text.str.slice(16 * i, 16).str.to_integer(base=16, dtype=pl.UInt64).to_numpy().view(np.int64) for i in range(3)
    ]


def colour_distance_packed(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Per pair, the largest difference of one 4-bit channel between two packed colour grids."""
    worst = np.zeros(len(a[0]), dtype=np.int64)
    for wa, wb in zip(a, b, strict=True):
        ua, ub = wa.view(np.uint64), wb.view(np.uint64)
        for shift in range(0, 64, 4):
            da = ((ua >> np.uint64(shift)) & np.uint64(15)).astype(np.int64)
            db = ((ub >> np.uint64(shift)) & np.uint64(15)).astype(np.int64)
            worst = np.maximum(worst, np.abs(da - db))
    return worst
