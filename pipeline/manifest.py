"""Reading, verifying and taking down from a published dataset manifest (DESIGN.md's manifest.json).

A manifest lists every shard of a dataset with its sample count, byte count and
sha256; shard paths are relative to the manifest. A reader trusts only shards a
manifest lists. A takedown never edits a shard in place: it writes new versions
of the affected shards under new names, archives the old manifest beside the
new one as ``manifest.v{N}.json`` (marked ``superseded_by``) and then replaces
``manifest.json``, so the old version still verifies for audit while readers
of the current one never see a removed sample.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import ClipError, SchemaError
from pipeline.formats import TarWriter, group_samples, iter_tar_members
from pipeline.stage import file_sha256
from pipeline.storage import PARQUET_OPTIONS, Storage, read_hash_lists, split_location

FORMAT = "clipline-manifest/1"


class SupersededManifest(ClipError):
    """The manifest was replaced by a takedown; training on it would use removed samples."""


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest and the storage its shard paths are relative to."""

    data: dict
    storage: Storage  # the manifest's directory
    name: str  # the manifest's file name within it

    @property
    def shards(self) -> list[dict]:
        return self.data["shards"]

    @property
    def version(self) -> int:
        return int(self.data.get("version", 1))

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()


def read_manifest(location: str, allow_superseded: bool = False) -> Manifest:
    """Read and check a manifest (local path or s3:// URI); refuse one a takedown superseded unless allowed."""
    storage, name = split_location(location)
    try:
        data = json.loads(storage.read_bytes(name))
    except ValueError as e:
        raise SchemaError(f"{location}: not a JSON manifest ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SchemaError(f"{location}: not a clipline manifest (format {data.get('format')!r}, expected {FORMAT})")
    for key in ("num_samples", "shards"):
        if key not in data:
            raise SchemaError(f"{location}: manifest has no '{key}'")
    manifest = Manifest(data, storage, name)
    if not allow_superseded:
        newer = data.get("superseded_by")
        if newer is None and name != "manifest.json" and storage.exists("manifest.json"):
            current = json.loads(storage.read_bytes("manifest.json"))
            if current.get("name") == data.get("name") and int(current.get("version", 1)) > manifest.version:
                newer = "manifest.json"
        if newer:
            raise SupersededManifest(
                f"{location} (version {manifest.version}) was superseded by a takedown: use {newer}, "
                "or allow superseded manifests explicitly"
            )
    return manifest


def verify(manifest: Manifest) -> list[str]:
    """Problems found: a listed shard missing, of another size, or with another sha256. Empty = verified."""
    problems = []
    for shard in manifest.shards:
        for path, size, digest in (
            (shard["tar"], shard["bytes"], shard["sha256"]),
            (shard["parquet"], shard.get("parquet_bytes"), shard.get("parquet_sha256")),
        ):
            if not manifest.storage.exists(path):
                problems.append(f"{path}: missing")
                continue
            if size is not None and manifest.storage.size(path) != size:
                problems.append(f"{path}: {manifest.storage.size(path)} bytes, manifest says {size}")
                continue
            if digest is not None:
                h = hashlib.sha256()
                with manifest.storage.open_read(path) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != digest:
                    problems.append(f"{path}: sha256 differs from the manifest")
    return problems


# --- takedown -----------------------------------------------------------------------------------------

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
    manifest.storage.write_bytes(archive, (json.dumps(old, indent=1) + "\n").encode())
    record = {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
    manifest.storage.write_bytes(manifest.name, (json.dumps(new, indent=1) + "\n").encode())  # last: the switch
    return {"removed": len(removed), "version": version, "changed_shards": changed, "archived": archive}
