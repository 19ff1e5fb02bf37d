"""WebDataset tar writing and reading, shared by the crawl and the final shards.

Tars are plain POSIX tars (readable by `webdataset`, OpenCLIP's --train-data and
`tar`), with members grouped by sample key ({key}.jpg, {key}.txt, {key}.json)
and fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples always
give the same bytes.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import IO, Iterable, Iterator


class TarWriter:
    """Append samples to a tar with deterministic member metadata."""

    def __init__(self, path: str | os.PathLike):
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: {key}.{ext} for each (ext, data), in the order given."""
        if "/" in key or key.startswith(".") or not key:
            raise ValueError(f"unsafe sample key {key!r}")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.samples += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tar_members(fileobj: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, never extracting to disk."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if info.isfile():
                f = tar.extractfile(info)
                yield info.name, f.read() if f else b""


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image members a sample may carry, in the order looked for


def image_member(members: dict[str, bytes]) -> bytes | None:
    """The image bytes of one sample ({ext: data}), or None when it has none."""
    return next((members[e] for e in IMAGE_EXTS if e in members), None)


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members with the same key as one sample: (key, {ext: data})."""
    key, sample = None, {}
    for name, data in members:
        base = name.rsplit("/", 1)[-1]
        k, _, ext = base.partition(".")
        if k != key and sample:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = data
    if sample:
        yield key, sample
