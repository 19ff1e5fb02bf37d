"""A small clipline dataset written directly (tar + parquet + manifest), and DDP worker functions."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats import TarWriter
from pipeline.storage import file_sha256

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def image_bytes(colour: str, seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def make_dataset(root: Path, counts: list[int], extra_members: dict | None = None) -> Path:
    """Shards of `counts` samples each; sample i is a colour swatch captioned 'a {colour} square'.

    extra_members: {shard: {key: {ext: bytes}}} samples appended to a shard's tar (not to its parquet).
    Returns the manifest path.
    """
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s, n in enumerate(counts):
        rows = []
        tar_path = root / "shards" / f"{s:05d}.tar"
        with TarWriter(tar_path) as tar:
            for _ in range(n):
                colour = list(COLOURS)[i % len(COLOURS)]
                uid = hashlib.sha256(f"sample {i}".encode()).hexdigest()[:32]
                caption = f"a {colour} square"
                row = {"uid": uid, "key": uid, "url": f"http://127.0.0.1/{i}.jpg", "caption": caption}
                tar.add(uid, {"jpg": image_bytes(colour, i), "txt": caption.encode(), "json": json.dumps(row).encode()})
                rows.append(row)
                i += 1
            for key, members in (extra_members or {}).get(s, {}).items():
                tar.add(key, members)
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"uid": pa.array([], pa.string())}),
                       root / "shards" / f"{s:05d}.parquet")  # fmt: skip
        shards.append(shard_entry(root, s, n))
    manifest = {"format": "clipline-manifest/1", "name": "test", "version": 1, "created": "2026-01-01T00:00:00Z",
                "config_sha256": "x", "num_samples": sum(counts), "shards": shards, "takedowns": []}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def shard_entry(root: Path, s: int, n: int) -> dict:
    tar, parquet = root / "shards" / f"{s:05d}.tar", root / "shards" / f"{s:05d}.parquet"
    return {"tar": f"shards/{s:05d}.tar", "parquet": f"shards/{s:05d}.parquet", "num_samples": n,
            "bytes": tar.stat().st_size, "sha256": file_sha256(tar),
            "parquet_bytes": parquet.stat().st_size, "parquet_sha256": file_sha256(parquet)}  # fmt: skip


def rewrite_manifest(manifest_path: Path) -> None:
    """Recompute the byte counts and checksums after a test damaged a shard on purpose."""
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"] = [
        shard_entry(manifest_path.parent, i, s["num_samples"]) for i, s in enumerate(manifest["shards"])
    ]
    manifest_path.write_text(json.dumps(manifest))
