"""`clipline takedown`: remove samples from a published dataset, as a new manifest version.

A takedown never edits a shard in place: it writes new versions of the affected
shards under new names, archives the old manifest beside the new one as
``manifest.v{N}.json`` (marked ``superseded_by``) and then replaces
``manifest.json``, so the old version still verifies for audit while readers
of the current one never see a removed sample.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import ClipError
from pipeline.formats import TarWriter, group_samples, iter_tar_members
from pipeline.manifest import dumps, now, read_manifest
from pipeline.storage import PARQUET_OPTIONS, file_sha256, read_hash_lists

KINDS = ("uid", "url_sha256", "image_sha256")


def _matches(table, ids: frozenset[str], kind: str) -> list[bool]:
    if kind == "uid":
        return [u in ids for u in table["uid"].to_pylist()]
    if kind == "url_sha256":
        return [hashlib.sha256(u.encode()).hexdigest() in ids for u in table["url"].to_pylist()]
    return [(s or "") in ids for s in table["sha256"].to_pylist()]


def _versioned(path: str, version: int) -> str:
    stem, _, ext = path.rpartition(".")
    base = stem.split(".v")[0]
    return f"{base}.v{version}.{ext}"


def takedown(location: str, ids_file: str, kind: str = "uid", reason: str = "") -> dict:
    """Remove samples from a published dataset; returns what was done (see the module docstring).

    ids_file: one id a line (local or s3://): uids, or sha256 of the URL, or sha256 of the image bytes.
    """
    if kind not in KINDS:
        raise ClipError(f"takedown: unknown id kind '{kind}' (one of {', '.join(KINDS)})")
    manifest = read_manifest(location)
    ids = read_hash_lists([ids_file])
    if not ids:
        raise ClipError(f"takedown: {ids_file} lists no ids")
    version = manifest.version + 1
    new_shards, removed, changed = [], [], []
    with tempfile.TemporaryDirectory(prefix="clipline-takedown-") as tmp:
        for shard in manifest.shards:
            table = manifest.storage.read_parquet(shard["parquet"])
            hit = _matches(table, ids, kind)
            if not any(hit):
                new_shards.append(shard)
                continue
            gone = {u for u, h in zip(table["uid"].to_pylist(), hit, strict=True) if h}
            removed.extend(sorted(gone))
            kept = table.filter([not h for h in hit])
            tar_path, parquet_path = Path(tmp) / "shard.tar", Path(tmp) / "shard.parquet"
            with manifest.storage.open_read(shard["tar"]) as f, TarWriter(tar_path) as out:
                for key, members in group_samples(iter_tar_members(f)):
                    if key not in gone:
                        out.add(key, members)
            pq.write_table(kept, parquet_path, **PARQUET_OPTIONS)
            entry = {
                "tar": _versioned(shard["tar"], version),
                "parquet": _versioned(shard["parquet"], version),
                "num_samples": kept.num_rows,
                "bytes": tar_path.stat().st_size,
                "sha256": file_sha256(tar_path),
                "parquet_bytes": parquet_path.stat().st_size,
                "parquet_sha256": file_sha256(parquet_path),
            }
            manifest.storage.put_file(tar_path, entry["tar"])
            manifest.storage.put_file(parquet_path, entry["parquet"])
            new_shards.append(entry)
            changed.append({"from": shard["tar"], "to": entry["tar"], "removed": len(gone)})
    if not removed:
        return {"removed": 0, "version": manifest.version, "changed_shards": []}
    archive = f"manifest.v{manifest.version}.json"
    old = dict(manifest.data, superseded_by=manifest.name)
    manifest.storage.write_bytes(archive, dumps(old))
    record = {
        "version": version,
        "created": now(),
        "reason": reason,
        "kind": kind,
        "requested": len(ids),
        "removed": len(removed),
        "removed_uids": removed,
        "shards": changed,
        "previous": archive,
    }
    new = dict(
        manifest.data,
        version=version,
        created=record["created"],
        num_samples=sum(s["num_samples"] for s in new_shards),
        shards=new_shards,
        takedowns=[*manifest.data.get("takedowns", []), record],
    )
    manifest.storage.write_bytes(manifest.name, dumps(new))  # last: the switch
    return {"removed": len(removed), "version": version, "changed_shards": changed, "archived": archive}
