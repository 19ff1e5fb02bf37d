"""Column names and types of every stage's outputs, in one place.

Every table a stage writes is conformed to one of these schemas before it is
committed, and every table a stage reads is validated against one, so a
missing or mistyped column is a one-line error naming the file and column
instead of a KeyError deep in a worker.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable

import pyarrow as pa

from pipeline.errors import SchemaError

# --- uid ---------------------------------------------------------------------


def compute_uid(normalised_url: str, caption: str) -> str:
    """docs/design.md's uid: first 32 hex chars of sha256(normalised_url + "\\n" + caption)."""
    digest = hashlib.sha256(f"{normalised_url}\n{caption}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def compute_uids(urls: Iterable[str], captions: Iterable[str]) -> pa.Array:
    """compute_uid over two aligned columns, as a pyarrow string array."""
    return pa.array([compute_uid(u, c) for u, c in zip(urls, captions, strict=True)], type=pa.string())


UID_PATTERN = re.compile(r"[0-9a-f]{32}")


def is_uid(value: object) -> bool:
    """A well-formed uid: 32 lowercase hex digits (compute_uid's form), safe as a tar key."""
    return isinstance(value, str) and UID_PATTERN.fullmatch(value) is not None


def sha256_key(digest: str) -> int:
    """The crawl's ``sha256_key``: the first 60 bits (15 hex digits) of a sha256 hex digest.

    Dedup groups images by it: reading and parsing 64-digit hex strings was over a third of
    dedup's map step, and an integer column reads ~10x faster. 60 bits, not 64, leave a
    group key's top bits for the kind of key (pipeline/dedup.py exact_edges)."""
    return int(digest[:15], 16)


# --- crawl status vocabulary ----------------------------------------------------
# Every input URL ends with exactly one status. "permanent" failures are never
# re-fetched (by `crawl --retry-failed` either); "transient" ones may be.

SUCCESS = "success"
STATUS_KINDS: dict[str, str] = {
    SUCCESS: "ok",
    # refused before any request
    "invalid_url": "permanent",
    "invalid_uid": "permanent",  # an ingest row whose uid is not 32 lowercase hex digits (never a tar key)
    "refused_scheme": "permanent",
    "refused_address": "permanent",
    "blocked": "permanent",
    "robots_disallowed": "permanent",
    # HTTP outcomes
    "not_found": "permanent",  # 404, 410
    "legal_unavailable": "permanent",  # 451
    "http_client_error": "permanent",  # other 4xx
    "rate_limited": "transient",  # 429 after its retries
    "server_error": "transient",  # 5xx after its retries
    "opted_out": "permanent",  # X-Robots-Tag noai / noimageai / noindex ...
    "redirect_error": "permanent",  # loop, too many hops, bad scheme
    # transport
    "timeout": "transient",
    "connection_error": "transient",
    "dns_error": "transient",
    "truncated": "transient",  # Content-Length mismatch, cut chunked body
    "too_large": "permanent",  # byte cap, compression bomb
    # image checks
    "not_an_image": "permanent",
    "format_not_allowed": "permanent",
    "decompression_bomb": "permanent",
    "image_too_small": "permanent",
    "image_too_large": "permanent",
    "bad_aspect_ratio": "permanent",
    "decode_error": "permanent",
}


def is_transient(status: str) -> bool:
    """True for failures worth fetching again later (timeouts, 5xx, 429...)."""
    return STATUS_KINDS.get(status) == "transient"


# --- schemas -------------------------------------------------------------------

INGEST = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),  # normalised; the raw value when it is invalid
        pa.field("caption", pa.string()),  # normalised
        pa.field("status", pa.string()),  # null: to be fetched; else why it was refused before any fetch
        pa.field("source_file", pa.int32()),  # index into ingest/_plan.json "inputs"
        pa.field("source_row", pa.int64()),  # row number within that file
    ]
)

CRAWL = pa.schema(
    [
        # img2dataset's columns, same names and meaning
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        # clipline's additions
        pa.field("sha256_key", pa.int64()),  # sha256's first 60 bits: dedup's exact-bytes key (see sha256_key)
        pa.field("md5", pa.string()),  # of the downloaded bytes, like sha256 (some blocklists use it)
        pa.field("http_status", pa.int16()),
        pa.field("bytes", pa.int64()),
        pa.field("format", pa.string()),
        pa.field("attempts", pa.int8()),
        pa.field("fetch_ms", pa.float32()),
        # dedup signatures of the whole decoded image (pipeline/images.py)
        pa.field("phash", pa.int64()),  # 64-bit DCT perceptual hash (compare with XOR + popcount)
        pa.field("colour_sig", pa.string()),  # 4x4 mean colours, 4 bits a channel: 48 hex digits
        # near-dup signature: 6 windows x (pHash, 4x4 colours at 8 bits, texture), 342 bytes (images.WINDOWS)
        pa.field("window_sig", pa.binary()),
        pa.field("pixel_hash", pa.int64()),  # decoded pixels at 32x32, 5 bits a channel: lossless re-encodes
        pa.field("pdq", pa.string()),  # PDQ perceptual hash, 64 hex digits (hash lists: blocklist_image_pdq)
        pa.field("pdq_quality", pa.int8()),  # PDQ's quality 0-100; under 50 never matched
    ]
)

# Crawl columns of (nearly) all-different values: written plain, without statistics
# (storage.parquet_options).
CRAWL_DISTINCT = (
    *("uid", "url", "key", "sha256", "sha256_key", "md5"),
    *("phash", "colour_sig", "window_sig", "pixel_hash", "pdq"),
)

DEDUP = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("dup_of", pa.string()),
        pa.field("dup_reason", pa.string()),
        pa.field("cluster_size", pa.int32()),
    ]
)

FILTER = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),
        pa.field("language", pa.string()),
        pa.field("language_score", pa.float32()),
        pa.field("clip_score", pa.float32()),
    ]
)

DATASET = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("language", pa.string()),
        pa.field("clip_score", pa.float32()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "ingest": INGEST,
    "crawl": CRAWL,
    "dedup": DEDUP,
    "filter": FILTER,
    "dataset": DATASET,
}


def column_names() -> list[str]:
    """Every column a stage of clipline writes, in any of its tables."""
    return sorted({name for table in (INGEST, CRAWL, DEDUP, FILTER, DATASET) for name in table.names})


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Types that can be cast without loss of meaning count as matching."""
    if actual == expected or pa.types.is_null(actual):
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual) or pa.types.is_string_view(actual)
    if pa.types.is_binary(expected):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual) or pa.types.is_binary_view(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    return False


LATER_CRAWL_COLUMNS = ("md5", "window_sig", "pdq", "pdq_quality")  # recorded by newer crawls only


def with_later_crawl_columns(crawl: pa.Table) -> pa.Table:
    """A crawl table with LATER_CRAWL_COLUMNS as nulls where a crawl made before them lacks them."""
    for name in LATER_CRAWL_COLUMNS:
        if name not in crawl.column_names:
            crawl = crawl.append_column(name, pa.nulls(crawl.num_rows, CRAWL.field(name).type))
    return crawl


def validate(table: pa.Table | pa.Schema, schema: pa.Schema, where: str) -> None:
    """Raise SchemaError naming `where` and the first missing or mistyped column."""
    actual = table if isinstance(table, pa.Schema) else table.schema
    for field in schema:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            have = ", ".join(actual.names) or "none"
            raise SchemaError(f"{where}: missing column '{field.name}' ({field.type}); columns present: {have}")
        if not _same_kind(actual.field(idx).type, field.type):
            raise SchemaError(
                f"{where}: column '{field.name}' has type {actual.field(idx).type}, expected {field.type}"
            )


def conform(table: pa.Table, schema: pa.Schema, where: str, keep_extra: bool = False) -> pa.Table:
    """Validate, then cast to `schema` and order its columns first.

    Extra columns are kept after them (``keep_extra``) or dropped. Nulls in a
    non-nullable column are an error.
    """
    validate(table, schema, where)
    columns, fields = [], []
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            column = column.cast(field.type)
        if not field.nullable and column.null_count:
            raise SchemaError(f"{where}: column '{field.name}' has {column.null_count} null value(s)")
        columns.append(column)
        fields.append(field)
    if keep_extra:
        for name in table.column_names:
            if schema.get_field_index(name) < 0:
                columns.append(table.column(name))
                fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def empty(schema: pa.Schema) -> pa.Table:
    """A zero-row table of `schema` (a shard whose rows were all dropped is still written)."""
    return schema.empty_table()
