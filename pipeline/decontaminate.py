"""Decontamination: training samples that are copies of evaluation images are dropped (`eval_overlap`).

DataComp removes near-duplicates of its evaluation images from its training
pools; `filter.decontaminate: [eval dataset specs]` does that here. Each
evaluation image gets the crawl's own signatures (pipeline/images.py: the
sha256 of its bytes, the pixel hash, the 64-bit pHash and the 4x4 colour grid,
computed the same way from the same decode), once, in the committed step
``filter/_evalsig`` (one task a dataset). A crawled image overlaps an
evaluation image when its bytes are the same, its pixels are the same (a
lossless re-encode), or its pHash is within `decontaminate_near_bits` and its
colour grid within `decontaminate_colour_tolerance` (resized, recompressed,
re-encoded copies). With `decontaminate_checkpoint`, a crawled image whose
embedding under that checkpoint has cosine >= `decontaminate_semantic_threshold`
with an evaluation image's is a copy too (crops, watermarks, edits that move a
hash): the step stores the evaluation images' embeddings beside their
signatures. The filter records which evaluation dataset a dropped row
overlaps (`eval_overlap`), and the stats count them per dataset.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import layout
from pipeline.stage import PlanContext, ShardContext

EVALSIG = "filter/_evalsig"
SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("index", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("pixel_hash", pa.int64()),
        pa.field("phash", pa.int64()),
        pa.field("colour_sig", pa.string()),
    ]
)


def image_signatures(data: bytes) -> tuple[str, int, int, str] | None:
    """(sha256, pixel hash, pHash, colour grid) of stored image bytes, decoded as the crawl decodes; None if it
    does not decode."""
    from PIL import Image, ImageOps

    from pipeline.images import _to_rgb, signatures

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            upright = ImageOps.exif_transpose(img) or img
            phash, colour, pixels = signatures(_to_rgb(upright))
    except Exception:  # noqa: BLE001 - an undecodable evaluation image has no signature to match
        return None
    return hashlib.sha256(data).hexdigest(), pixels, phash, colour


def plan_evalsig(ctx: PlanContext) -> list[int]:
    return list(range(len(ctx.config.decontaminate)))


def evalsig_parquet(index: int) -> str:
    return f"{EVALSIG}/{layout.shard_name(index)}.parquet"


def run_evalsig(ctx: ShardContext) -> dict:
    """The signatures of every image of the evaluation dataset `decontaminate[shard]`."""
    from pipeline.evaldata import read_spec

    config = ctx.config
    raw = read_spec(config.decontaminate[ctx.shard])
    rows, images = [], []
    for i in range(raw.count):
        data = raw.read(i)
        found = image_signatures(data)
        if found is not None:
            rows.append((raw.name, i, *found))
            images.append(data)
    table = pa.Table.from_pylist([dict(zip(SCHEMA.names, r, strict=True)) for r in rows], schema=SCHEMA)
    if config.decontaminate_checkpoint:
        from pipeline import clip_score

        vectors = clip_score.embed(images, config.decontaminate_checkpoint, config.clip_device, config.clip_batch_size)
        table = table.append_column("embedding", pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())))
    ctx.write_table(evalsig_parquet(ctx.shard), table)
    return {"images": raw.count, "signed": len(rows), "dataset": raw.name}


def load_signatures(storage) -> pl.DataFrame:
    parts = [storage.read_frame(rel) for rel in storage.list(EVALSIG, suffix=".parquet")]
    return pl.concat(parts) if parts else pl.from_arrow(SCHEMA.empty_table())


def semantic_overlaps(found: np.ndarray, embeddings: np.ndarray, signatures: pl.DataFrame, threshold: float) -> None:
    """Mark in `found` the rows whose unit embedding (NaN rows: not decoded) has cosine >= threshold with an
    evaluation image's (`signatures`' embedding column)."""
    if "embedding" not in signatures.columns or signatures.height == 0 or len(embeddings) == 0:
        return
    evals = np.stack(signatures["embedding"].to_list()).astype(np.float32)
    names = signatures["dataset"].to_numpy()
    ok = ~np.isnan(embeddings).any(axis=1)
    best = np.full(len(embeddings), -np.inf, dtype=np.float32)
    which = np.zeros(len(embeddings), dtype=np.int64)
    for start in range(0, len(evals), 8192):
        sims = np.nan_to_num(embeddings, nan=0.0) @ evals[start : start + 8192].T  # (rows, block)
        top = sims.argmax(axis=1)
        value = sims[np.arange(len(sims)), top]
        better = value > best
        best[better], which[better] = value[better], top[better] + start
    for row in np.flatnonzero(ok & (best >= threshold)):
        if found[row] is None:
            found[row] = names[which[row]]


def overlaps(frame: pl.DataFrame, signatures: pl.DataFrame, near_bits: int, colour_tolerance: int,
             block: int = 4096, embeddings: np.ndarray | None = None, threshold: float = 1.0) -> pl.Series:  # fmt: skip
    """Per crawl row of `frame` (sha256, pixel_hash, phash, colour_sig), the evaluation dataset it copies, or null;
    `embeddings` (one unit vector a row) adds the semantic check."""
    from pipeline.dedup.index import colour_distance_packed, pack_colour

    found = np.full(frame.height, None, dtype=object)
    if signatures.height == 0 or frame.height == 0:
        return pl.Series("eval_overlap", found, dtype=pl.Utf8)
    by_sha = dict(zip(signatures["sha256"].to_list(), signatures["dataset"].to_list(), strict=True))
    by_pixels = dict(zip(signatures["pixel_hash"].to_list(), signatures["dataset"].to_list(), strict=True))
    for i, (sha, pixels) in enumerate(zip(frame["sha256"].to_list(), frame["pixel_hash"].to_list(), strict=True)):
        found[i] = by_sha.get(sha) or by_pixels.get(pixels)
    if near_bits >= 0:
        eval_hash = signatures["phash"].to_numpy().view(np.uint64)
        eval_colour = pack_colour(signatures["colour_sig"])
        names = signatures["dataset"].to_numpy()
        rows = frame["phash"].fill_null(0).to_numpy().view(np.uint64)
        row_colour = pack_colour(frame["colour_sig"].fill_null("0" * 48))
        has = frame["phash"].is_not_null().to_numpy()
        for start in range(0, frame.height, block):
            stop = min(frame.height, start + block)
            close = np.bitwise_count(rows[start:stop, None] ^ eval_hash[None, :]) <= near_bits  # (block, eval)
            r, e = np.nonzero(close)
            if r.size == 0:
                continue
            r += start
            same = colour_distance_packed([c[r] for c in row_colour], [c[e] for c in eval_colour]) <= colour_tolerance
            for row, ev in zip(r[same], e[same], strict=True):
                if has[row] and found[row] is None:
                    found[row] = names[ev]
    if embeddings is not None:
        semantic_overlaps(found, embeddings, signatures, threshold)
    return pl.Series("eval_overlap", found, dtype=pl.Utf8)
