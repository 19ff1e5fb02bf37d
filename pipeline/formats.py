"""WebDataset tar writing and reading, shared by the crawl and the final shards.

Tars are plain POSIX tars (readable by `webdataset`, OpenCLIP's --train-data and
`tar`), with members grouped by sample key ({key}.jpg, {key}.txt, {key}.json)
and fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples always
give the same bytes.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from typing import IO, Iterable, Iterator

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class TarWriter:
    """Append samples to a tar with deterministic member metadata."""

    def __init__(self, path: str | os.PathLike):
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: {key}.{ext} for each (ext, data), in the order given.

        A key is letters, digits, '_' and '-' only: a '/' or '\\' would name a path, and a '.' would be
        read back as another key and extension (a uid is 32 hex digits)."""
        if not isinstance(key, str) or not SAFE_KEY.fullmatch(key):
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


BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz magic
MAX_MEMBER_BYTES = 1 << 30  # a member larger than this is refused, not read into memory (images are <= 20 MB)


def iter_tar_members(fileobj: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, never extracting to disk.

    Headers are parsed here (ustar, pax `path`/`size`, GNU long names; checksums checked) rather
    than by `tarfile`, whose per-member Python overhead was a tenth of the training loader's time.
    A stream cut mid-member raises tarfile.ReadError, as tarfile does. Compressed tars are handed
    to tarfile whole.
    """
    head = _read_exact(fileobj, BLOCK)
    if head.startswith(COMPRESSED):
        with tarfile.open(fileobj=io.BytesIO(head + fileobj.read()), mode="r:*") as tar:
            for info in tar:
                if info.isfile():
                    yield info.name, tar.extractfile(info).read()
        return
    if not head:
        raise tarfile.ReadError("empty file")
    long_name, pax = None, {}
    while head and head.count(0) != BLOCK:  # a zero block ends the archive; so does a clean end of stream
        if len(head) < BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        try:
            stored = int(head[148:156].split(b"\0", 1)[0].strip(), 8)
            size = int(pax["size"]) if "size" in pax else _tar_number(head[124:136])
        except ValueError as e:
            raise tarfile.ReadError(f"bad tar header ({e})") from e
        if not 0 <= size <= MAX_MEMBER_BYTES:
            raise tarfile.ReadError(f"a tar member of {size} bytes (more than {MAX_MEMBER_BYTES} or negative)")
        unsigned = sum(head[:148]) + 256 + sum(head[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in head[:148] + head[156:]):
            raise tarfile.ReadError("bad checksum in a tar header")  # (tarfile also accepts signed-char sums)
        data = _read_exact(fileobj, size)
        if len(data) < size or len(_read_exact(fileobj, -size % BLOCK)) < -size % BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        kind = head[156:157]
        if kind == b"x":
            pax = _pax_records(data)
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0]
        elif kind in (b"g", b"K"):
            pass
        else:
            if kind in REGULAR:
                name = head[:100].split(b"\0", 1)[0]
                if head[257:262] == b"ustar" and head[345]:
                    name = head[345:500].split(b"\0", 1)[0] + b"/" + name
                name = pax["path"] if "path" in pax else long_name or name
                yield (name if isinstance(name, str) else name.decode("utf-8", "surrogateescape")), data
            long_name, pax = None, {}
        head = _read_exact(fileobj, BLOCK)


def _read_exact(f: IO[bytes], n: int) -> bytes:
    """n bytes, or fewer only at the end of the stream (raw streams may return short reads)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n and (more := f.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: 'LEN key=value\\n' each, LEN counting the whole record.

    A length that does not move past its own digits, or that runs past the data, is a read error:
    a record of length 0 used to make this loop forever on a crafted or corrupt tar."""
    records, at = {}, 0
    while at < len(data) and data[at : at + 1] != b"\0":
        space = data.find(b" ", at, at + 21)
        digits = data[at:space] if space > at else b""
        if not digits.isdigit():
            raise tarfile.ReadError(f"bad pax record at byte {at}: no length")
        length = int(digits)
        if length <= space - at + 1 or at + length > len(data) or data[at + length - 1 : at + length] != b"\n":
            raise tarfile.ReadError(f"bad pax record at byte {at}: length {length}")
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


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


def read_images(storage, rel: str) -> dict[str, bytes]:
    """{key: image bytes} of a crawl tar (b"" for a sample without an image member)."""
    with storage.open_read(rel) as f:
        return {key: image_member(members) or b"" for key, members in group_samples(iter_tar_members(f))}
