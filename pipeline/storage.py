"""One storage API over local directories and s3:// (the only module that knows which).

Commit semantics, the same on both backends:
- every write is whole or absent: locally it goes to a hidden temporary name in
  the same directory and is renamed over the final name; on S3 it is spooled to
  a local file and uploaded as one object (a multipart upload is invisible until
  completed), so no reader ever sees a partial object under a final name;
- stages commit a shard by writing its outputs first and a marker last
  (see pipeline/stage.py); readers trust only marked shards.

S3 honours the standard AWS environment: AWS_ENDPOINT_URL (any S3-compatible
endpoint), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_DEFAULT_REGION / AWS_REGION, AWS_PROFILE. Throttling (SlowDown, 503) and
5xx are retried by botocore's "standard" retry mode with exponential backoff
and jitter (CLIPLINE_S3_MAX_ATTEMPTS, default 10); bad credentials and missing
buckets are not retried and become one-line StorageErrors.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError

T, R = TypeVar("T"), TypeVar("R")
TMP_PREFIX = ".tmp-"  # local temporaries; never listed, never a final name

# Parquet written by clipline: zstd, and statistics on, so DuckDB/polars can prune.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_statistics": True}


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would briefly give files that other threads create meanwhile the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no /proc (not Linux): the usual default


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parquet_options(columns: list[str], work: bool = False, distinct: tuple[str, ...] = ()) -> dict[str, Any]:
    """pq.write_table options for a table of `columns`: PARQUET_OPTIONS, lz4 for `work` files
    (read back by a later step, never by users).

    `distinct`: columns of (nearly) all-different values, such as uids and hashes, written
    plain and without min/max statistics: a dictionary would be built only to be given up,
    and statistics of random ids prune nothing. A 100k-row dedup shard writes 40% faster; a
    crawl shard writes 25% faster, is 15% smaller, and its hash columns read 40% faster.
    """
    options = {**PARQUET_OPTIONS, "compression": "lz4"} if work else dict(PARQUET_OPTIONS)
    if distinct:
        others = [c for c in columns if c not in distinct]
        options.update(use_dictionary=others, write_statistics=others)
    return options


def open_storage(uri: str | os.PathLike) -> "Storage":
    """A Storage rooted at a local path or an s3://bucket/prefix URI."""
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty storage location")
    if uri.startswith("s3://"):
        return S3Storage(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported storage scheme (expected a local path or s3://bucket/prefix)")
    return LocalStorage(uri.removeprefix("file://"))


def split_location(uri: str) -> tuple["Storage", str]:
    """A storage for the file's directory and the file's name: 's3://b/p/x.parquet' → (s3://b/p, 'x.parquet')."""
    head, _, name = uri.rstrip("/").rpartition("/")
    return open_storage(head or "."), name


def read_hash_lists(paths: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Lower-case hex hashes, one a line ('#' starts a comment line), from local or s3:// files."""
    hashes: set[str] = set()
    for path in paths:
        store, name = split_location(path)
        try:
            text = store.read_bytes(name).decode("utf-8", "replace")
        except StorageError as e:
            raise StorageError(f"blocklist {path}: {e}") from e
        hashes.update(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return frozenset(hashes)


def _clean_rel(rel: str) -> str:
    rel = rel.strip("/")
    if any(part in ("..", ".") for part in rel.split("/")):
        raise StorageError(f"{rel}: relative paths may not contain '.' or '..'")
    return rel


class Storage:
    """Base class: the helpers every backend shares, built on a few primitives."""

    uri: str
    # How many small reads (ranged reads of many files) are worth having in flight at once:
    # one for a local disk, more where each read is a network round trip.
    read_concurrency: int = 1

    def map_reads(self, read: Callable[[T], R], items: list[T]) -> list[R]:
        """`read` over `items`, results in order; `read_concurrency` at a time."""
        if self.read_concurrency <= 1 or len(items) <= 1:
            return [read(item) for item in items]
        with ThreadPoolExecutor(min(self.read_concurrency, len(items))) as pool:
            return list(pool.map(read, items))

    # primitives, per backend
    def url(self, rel: str = "") -> str:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Relative names of committed objects under `prefix`, recursively, sorted."""
        raise NotImplementedError

    def open_read(self, rel: str) -> IO[bytes]:
        """A streaming binary reader (the object is not loaded whole)."""
        raise NotImplementedError

    def version(self, rel: str) -> str:
        """A string that changes when the object's content does: S3's ETag and size, a local file's size and mtime."""
        raise NotImplementedError

    def open_seekable(self, rel: str) -> IO[bytes]:
        """A seekable binary reader, for formats read by offset (parquet footers and row groups)."""
        raise NotImplementedError

    def put_file(self, local_path: str | os.PathLike, rel: str) -> None:
        """Copy a local file to `rel`, atomically."""
        raise NotImplementedError

    def move_file(self, local_path: str | os.PathLike, rel: str) -> None:
        """Like put_file for a local file the caller no longer needs (it may be gone afterwards)."""
        self.put_file(local_path, rel)

    def delete(self, rel: str) -> None:
        raise NotImplementedError

    def child(self, rel: str) -> "Storage":
        return open_storage(self.url(rel))

    # shared helpers
    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.writer(rel) as f:
            f.write(data)

    @contextmanager
    def writer(self, rel: str) -> Iterator[IO[bytes]]:
        """Write `rel` through a local temporary file; it appears whole only if the block succeeds."""
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self._spool_dir(rel))
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            self._commit_spooled(tmp, rel)
        except OSError as e:
            raise _os_error(e, self.url(rel)) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _spool_dir(self, rel: str) -> str | None:
        return None

    def _commit_spooled(self, tmp: str, rel: str) -> None:
        self.put_file(tmp, rel)

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of `rel` (one ranged GET on S3)."""
        if stop <= start:
            return b""
        with self.open_seekable(rel) as f:
            f.seek(start)
            return f.read(stop - start)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def _parquet_source(self, rel: str) -> bytes | str:
        """What the parquet readers open: here the whole object (one GET); a local file's path,
        from which they read only the column chunks asked for."""
        with self.open_read(rel) as f:
            return f.read()

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        source = self._parquet_source(rel)
        try:
            # ParquetFile, not read_table: no dataset layer, ~1 ms less a file (the dedup steps read thousands)
            file = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source)
            missing = [c for c in columns or [] if c not in file.schema_arrow.names]
            if missing:  # ParquetFile.read would leave them out without a word
                raise StorageError(f"{self.url(rel)}: no column {', '.join(missing)}")
            return file.read(columns=columns)
        except pa.ArrowInvalid as e:
            raise StorageError(f"{self.url(rel)}: not a readable parquet file ({e})") from e
        except OSError as e:
            raise _os_error(e, self.url(rel)) from e

    def read_frame(self, rel: str, columns: list[str] | None = None) -> pl.DataFrame:
        """`rel` as a polars frame: for code that works in polars, a third faster than
        read_parquet and a conversion (polars decodes strings straight into its own layout)."""
        source = self._parquet_source(rel)
        try:
            return pl.read_parquet(source, columns=columns, glob=False, hive_partitioning=False)
        except pl.exceptions.ColumnNotFoundError:
            names = pl.read_parquet_schema(io.BytesIO(source) if isinstance(source, bytes) else source).names()
            missing = ", ".join(c for c in columns or [] if c not in names)
            raise StorageError(f"{self.url(rel)}: no column {missing}") from None
        except pl.exceptions.ComputeError as e:
            raise StorageError(f"{self.url(rel)}: not a readable parquet file ({str(e).splitlines()[0]})") from e
        except OSError as e:
            raise _os_error(e, self.url(rel)) from e

    def write_parquet(self, rel: str, table: pa.Table, distinct: tuple[str, ...] = ()) -> None:
        with self.writer(rel) as f:
            pq.write_table(table, f, **parquet_options(table.column_names, distinct=distinct))

    def get_file(self, rel: str, local_path: str | os.PathLike) -> None:
        with self.open_read(rel) as src, open(local_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _os_error(e: OSError, where: str) -> StorageError:
    if e.errno == errno.ENOSPC:
        return StorageError(f"{where}: no space left on device")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{where}: permission denied ({e.strerror})")
    return StorageError(f"{where}: {e.strerror or e}")


class LocalStorage(Storage):
    """A directory on a local (or mounted) filesystem; commits by rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def __reduce__(self):
        return (LocalStorage, (self.uri,))

    def _path(self, rel: str) -> Path:
        rel = _clean_rel(rel)
        return self.root / rel if rel else self.root

    def url(self, rel: str = "") -> str:
        return str(self._path(rel))

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int:
        try:
            return self._path(rel).stat().st_size
        except FileNotFoundError as e:
            raise StorageError(f"{self.url(rel)}: not found") from e

    def version(self, rel: str) -> str:
        try:
            st = self._path(rel).stat()
        except FileNotFoundError as e:
            raise StorageError(f"{self.url(rel)}: not found") from e
        return f"{st.st_size}:{st.st_mtime_ns}"

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        names = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
            for name in filenames:
                if name.startswith(TMP_PREFIX) or not name.endswith(suffix):
                    continue
                names.append(os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/"))
        return sorted(names)

    def open_read(self, rel: str) -> IO[bytes]:
        try:
            return open(self._path(rel), "rb")
        except FileNotFoundError as e:
            raise StorageError(f"{self.url(rel)}: not found") from e
        except OSError as e:
            raise _os_error(e, self.url(rel)) from e

    def open_seekable(self, rel: str) -> IO[bytes]:
        return self.open_read(rel)

    def _parquet_source(self, rel: str) -> str:
        path = self._path(rel)
        if not path.is_file():
            raise StorageError(f"{self.url(rel)}: not found")
        return str(path)

    def _spool_dir(self, rel: str) -> str:
        # Spool next to the final name so the commit is a same-filesystem rename.
        parent = self._path(rel).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, str(parent)) from e
        return str(parent)

    def _commit_spooled(self, tmp: str, rel: str) -> None:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600; committed files get what open() would give
        os.replace(tmp, self._path(rel))

    def put_file(self, local_path: str | os.PathLike, rel: str) -> None:
        with self.writer(rel) as dst, open(local_path, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)

    def move_file(self, local_path: str | os.PathLike, rel: str) -> None:
        """A rename when `local_path` is on the same filesystem (no copy: a map task's 3 MB
        shuffle file was 5 ms of copying), else a copy."""
        try:
            self._path(rel).parent.mkdir(parents=True, exist_ok=True)
            with open(local_path, "rb") as f:
                os.fsync(f.fileno())  # durable before it is visible, as writer() makes its files
            self._commit_spooled(os.fspath(local_path), rel)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise _os_error(e, self.url(rel)) from e
            self.put_file(local_path, rel)

    def delete(self, rel: str) -> None:
        try:
            self._path(rel).unlink()
        except FileNotFoundError:
            pass


# --- S3 ----------------------------------------------------------------------------

_clients: dict[tuple, Any] = {}
_buckets_seen: set[str] = set()  # buckets known to exist in this process
_clients_lock = threading.Lock()


def _s3_client():
    """One boto3 client per process and environment (clients are thread-safe; sessions are not)."""
    import boto3
    from botocore.config import Config

    settings = (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "CLIPLINE_S3_MAX_ATTEMPTS",
    )
    key = tuple(os.environ.get(k) for k in settings)
    with _clients_lock:
        if key not in _clients:
            config = Config(
                # total_max_attempts counts the first try; botocore's "max_attempts" would count retries only.
                retries={
                    "mode": "standard",
                    "total_max_attempts": int(os.environ.get("CLIPLINE_S3_MAX_ATTEMPTS", "10")),
                },
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=32,
                # path-style works with every S3-compatible endpoint (moto, MinIO, Ceph); AWS accepts it too.
                s3={"addressing_style": os.environ.get("CLIPLINE_S3_ADDRESSING", "path")},
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            _clients[key] = boto3.session.Session().client("s3", region_name=region, config=config)
        return _clients[key]


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "403",
}


def _s3_error(e: Exception, where: str) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return StorageError(
            f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    if isinstance(e, EndpointConnectionError):
        return StorageError(f"{where}: cannot reach the S3 endpoint ({e})")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _CREDENTIAL_CODES:
            return StorageError(f"{where}: access denied by S3 ({code}); check the AWS credentials and endpoint")
        if code == "NoSuchBucket":
            return StorageError(f"{where}: bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{where}: not found")
        return StorageError(f"{where}: S3 error {code}: {e.response.get('Error', {}).get('Message', '')}")
    return StorageError(f"{where}: {e}")


class S3Storage(Storage):
    """s3://bucket/prefix on any S3-compatible endpoint; commits by whole-object upload."""

    read_concurrency = 16  # of the client's 32 pooled connections

    def __init__(self, uri: str):
        rest = uri.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: missing bucket name (expected s3://bucket/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def __reduce__(self):
        return (S3Storage, (self.uri,))

    @property
    def client(self):
        return _s3_client()

    def _key(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return f"{self.prefix}/{rel}".strip("/") if self.prefix else rel

    def url(self, rel: str = "") -> str:
        key = self._key(rel)
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                if self.bucket not in _buckets_seen:
                    self._check_bucket()
                return False
            raise _s3_error(e, self.url(rel)) from e
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e

    def _check_bucket(self) -> None:
        # HEAD of a missing key in a missing bucket also answers 404; tell the two apart,
        # once per bucket and process (every pending shard asks for its marker).
        try:
            self.client.head_bucket(Bucket=self.bucket)
            _buckets_seen.add(self.bucket)
        except Exception as e:
            err = _s3_error(e, f"s3://{self.bucket}")
            if "not found" in str(err):
                raise StorageError(f"s3://{self.bucket}: bucket does not exist") from e
            raise err from e

    def size(self, rel: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"])
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e

    def version(self, rel: str) -> str:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e
        return f"{head['ContentLength']}:{head.get('ETag', '').strip(chr(34))}"

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        base = self._key(prefix)
        if base:
            base += "/"
        strip = f"{self.prefix}/" if self.prefix else ""
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(suffix):
                        names.append(obj["Key"][len(strip) :])
        except Exception as e:
            raise _s3_error(e, self.url(prefix)) from e
        return sorted(names)

    def open_read(self, rel: str) -> IO[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e
        return _BodyReader(body)

    def open_seekable(self, rel: str) -> IO[bytes]:
        return io.BufferedReader(_S3RangeReader(self, rel, self.size(rel)), buffer_size=1 << 20)

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), Range=f"bytes={start}-{stop - 1}")
            return body["Body"].read()
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e

    def put_file(self, local_path: str | os.PathLike, rel: str) -> None:
        # upload_file switches to multipart above 8 MiB; the object is invisible until complete.
        try:
            self.client.upload_file(os.fspath(local_path), self.bucket, self._key(rel))
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e

    def delete(self, rel: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        except Exception as e:
            raise _s3_error(e, self.url(rel)) from e


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a closeable, readable binary file."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._body.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        return self._body.read(None if size is None or size < 0 else size)

    def close(self) -> None:
        self._body.close()
        super().close()


class _S3RangeReader(io.RawIOBase):
    """Random access to one S3 object through ranged GETs (wrap in a BufferedReader)."""

    def __init__(self, store: S3Storage, rel: str, size: int):
        self._store, self._rel, self._size, self._pos = store, rel, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        if self._pos >= self._size or len(b) == 0:
            return 0
        end = min(self._size, self._pos + len(b)) - 1
        try:
            body = self._store.client.get_object(
                Bucket=self._store.bucket, Key=self._store._key(self._rel), Range=f"bytes={self._pos}-{end}"
            )["Body"]
            data = body.read()
        except Exception as e:
            raise _s3_error(e, self._store.url(self._rel)) from e
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)
