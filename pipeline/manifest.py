"""A published dataset's manifest.json: built, written, read and verified here (ground floor).

A manifest lists every shard of a dataset with its sample count, byte count and
sha256; shard paths are relative to the manifest. A reader trusts only shards a
manifest lists. FORMAT is the one spelling of the format tag; the layout is in
docs/design.md. Takedowns (pipeline/takedown.py) write new versions of it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from pipeline.errors import ClipError, SchemaError
from pipeline.storage import Storage, split_location

FORMAT = "clipline-manifest/1"
CURRENT = "manifest.json"  # the current version's file name; older versions are manifest.v{N}.json


def now() -> str:
    """A manifest timestamp: ISO-8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_manifest(name: str, config_sha256: str, shards: list[dict]) -> dict:
    """Version 1 of a dataset's manifest over `shards` (entries with tar, parquet, num_samples, bytes, sha256)."""
    return {
        "format": FORMAT,
        "name": name,
        "version": 1,
        "created": now(),
        "config_sha256": config_sha256,
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "shards": shards,
        "takedowns": [],
    }


def dumps(manifest: dict) -> bytes:
    """A manifest's bytes as written: indented JSON and a final newline."""
    return (json.dumps(manifest, indent=1) + "\n").encode()


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
        if newer is None and name != CURRENT and storage.exists(CURRENT):
            current = json.loads(storage.read_bytes(CURRENT))
            if current.get("name") == data.get("name") and int(current.get("version", 1)) > manifest.version:
                newer = CURRENT
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
