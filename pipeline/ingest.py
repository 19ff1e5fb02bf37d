"""Ingest: URL lists (parquet/csv/tsv/jsonl, plain/gzip/zstd, local or s3://) → work shards.

Three committed steps, so that 400M rows never sit in one process:

1. ``ingest/_map`` — one task per input chunk (a parquet row-group range, or a
   whole text file, streamed in blocks): normalise URLs and captions, compute
   the uid, refuse what must never be fetched (non-http(s) schemes, invalid
   URLs, blocklisted URL hashes) with a status, and write the rows partitioned
   by uid hash (one file per map part, all partitions in it: pipeline/shuffle.py).
2. ``ingest/_merge`` — one task per partition: drop exact duplicates (same uid,
   i.e. same normalised URL and caption), keeping the first in input order.
3. ``ingest`` — one task per work shard: the driver lays the partitions end to
   end and cuts the result into shards of exactly ``shard_size`` rows (the last
   one smaller); each shard reads only the row groups it needs. Numbering does
   not depend on which file a row came from, and no file leaves a small shard
   behind (img2dataset's "last shard of each file is small").

Rows come out hash-partitioned, so each work shard mixes domains: good for
per-host politeness in the crawl, and for the stats.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import layout, schema
from pipeline.errors import ConfigError, SchemaError
from pipeline.lineage import Reads
from pipeline.shuffle import map_files, read_pieces, write_partitioned
from pipeline.stage import IDENTITY, PlanContext, ShardContext, Stage, shard_name
from pipeline.storage import open_storage, read_hash_lists, split_location

URL_COLUMNS = ("url", "URL", "image_url", "img_url")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "alt", "title")
FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PLAN = "ingest/_plan.json"
MAP, MERGE = "ingest/_map", "ingest/_merge"


@dataclass(frozen=True)
class IngestConfig:
    """Where the URL lists are and how to read and cut them."""

    inputs: tuple[str, ...] = ()  # files, directories or globs (local or s3://)
    url_column: str | None = None  # None: the first of url, URL, image_url, img_url
    caption_column: str | None = None  # None: the first of caption, TEXT, text, alt, title
    carry_columns: tuple[str, ...] = ()  # other input columns to carry through to the crawl output
    shard_size: int = 10_000  # rows per work shard (all but the last)
    sort_query: bool = True  # '?b=2&a=1' and '?a=1&b=2' are the same URL
    max_caption_chars: int = 4_000  # longer captions are cut (and counted)
    blocklist_url_sha256: tuple[str, ...] = ()  # files of sha256(normalised URL) hex lines
    rows_per_partition: int = 2_000_000  # dedup partition size: memory per merge task
    rows_per_chunk: int = field(default=1_000_000, metadata={IDENTITY: False})  # rows per map task / part in memory


# --- normalisation -----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")
_SPACE = re.compile(r"\s+")
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_caption(text: str | None, max_chars: int) -> tuple[str, bool]:
    """NFC, control and zero-width characters removed, whitespace collapsed; (caption, was_cut)."""
    if not text:
        return "", False
    text = _SPACE.sub(" ", _CONTROL.sub(" ", unicodedata.normalize("NFC", text))).strip()
    if len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, False


def normalise_url(raw: str | None, sort_query: bool = True) -> tuple[str, str | None]:
    """(normalised URL, refusal status or None).

    Lower-cases scheme and host, drops default ports, userinfo and the fragment,
    gives an empty path "/", and sorts the query's parameters when asked.
    """
    if raw is None:
        return "", "invalid_url"
    url = raw.strip()
    if not url:
        return "", "invalid_url"
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme and scheme not in DEFAULT_PORTS:
            return url, "refused_scheme"
        host = (parts.hostname or "").rstrip(".")
        port = parts.port  # ValueError for a non-numeric or out-of-range port
    except ValueError:
        return url, "invalid_url"
    if not scheme or not host or any(c in host for c in ' <>"{}|\\^`'):
        return url, "invalid_url"
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    query = "&".join(sorted(parts.query.split("&"))) if sort_query and parts.query else parts.query
    return urlunsplit((scheme, netloc, parts.path or "/", query, "")), None


def url_sha256(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


# --- reading inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str  # parquet, csv, tsv, jsonl
    compression: str | None


def describe(uri: str) -> InputFile:
    suffixes = [s.lower() for s in PurePosixPath(uri.split("://", 1)[-1]).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise ConfigError(f"{uri}: unknown input format (expected .parquet, .csv, .tsv or .jsonl, optionally .gz/.zst)")
    return InputFile(uri, fmt, compression)


def expand_inputs(patterns: tuple[str, ...]) -> list[InputFile]:
    """Files named by paths, directories or globs, sorted, each once."""
    if not patterns:
        raise ConfigError("ingest.inputs is empty: name at least one URL-list file")
    found: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            head = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)].rpartition("/")[0]
            store = open_storage(head or ".")
            rel_glob = pattern[len(head) + 1 :] if head else pattern
            matches = [f"{store.uri}/{n}" for n in store.list() if PurePosixPath(n).match(rel_glob)]
        else:
            store, name = split_location(pattern)
            if store.exists(name):
                matches = [store.url(name)]
            else:
                inner = open_storage(pattern)
                matches = [inner.url(n) for n in inner.list() if _is_input(n)]
        if not matches:
            raise ConfigError(f"{pattern}: no input files found")
        found.extend(matches)
    return [describe(u) for u in sorted(set(found))]


def _is_input(name: str) -> bool:
    try:
        describe(name)
        return not PurePosixPath(name).name.startswith((".", "_"))
    except ConfigError:
        return False


def _text_stream(inp: InputFile) -> pa.NativeFile:
    store, name = split_location(inp.uri)
    stream = pa.PythonFile(store.open_read(name), mode="r")
    return pa.CompressedInputStream(stream, inp.compression) if inp.compression else stream


def input_columns(inp: InputFile) -> list[str]:
    """The column names of an input file, reading only its header."""
    try:
        if inp.format == "parquet":
            store, name = split_location(inp.uri)
            with store.open_seekable(name) as f:
                return pq.ParquetFile(f).schema_arrow.names
        with _text_stream(inp) as stream:
            if inp.format == "jsonl":
                first = stream.read(1 << 22).split(b"\n", 1)[0]
                return list(json.loads(first or b"{}"))
            reader = pacsv.open_csv(
                stream,
                parse_options=pacsv.ParseOptions(delimiter="\t" if inp.format == "tsv" else ","),
                read_options=pacsv.ReadOptions(block_size=1 << 22),
            )
            return reader.schema.names
    except (pa.ArrowInvalid, ValueError) as e:
        raise SchemaError(f"{inp.uri}: cannot read the header ({' '.join(str(e).split())[:200]})") from e


def check_carried(carry_columns: tuple[str, ...]) -> None:
    """A one-line error for a carried column that would overwrite one clipline writes (uid, url, status, ...)."""
    own = set(schema.column_names()) | {"source_file", "source_row"}
    clash = [c for c in carry_columns if c in own]
    if clash:
        raise ConfigError(
            f"ingest.carry_columns: {', '.join(map(repr, clash))} would overwrite clipline's own column(s) of the "
            "same name; rename them in the input (or set ingest.url_column / caption_column) and carry the new name"
        )


def resolve_columns(inp: InputFile, config: IngestConfig) -> tuple[str, str, tuple[str, ...]]:
    """(url column, caption column, carried columns) for this file, or a one-line error (FAULTS M3)."""
    names = input_columns(inp)

    def pick(explicit: str | None, candidates: tuple[str, ...], what: str) -> str:
        if explicit:
            if explicit not in names:
                raise SchemaError(f"{inp.uri}: no {what} column '{explicit}'; columns present: {', '.join(names)}")
            return explicit
        for c in candidates:
            if c in names:
                return c
        raise SchemaError(
            f"{inp.uri}: no {what} column (looked for {', '.join(candidates)}; set ingest.{what}_column); "
            f"columns present: {', '.join(names) or 'none'}"
        )

    url_col = pick(config.url_column, URL_COLUMNS, "url")
    caption_col = pick(config.caption_column, CAPTION_COLUMNS, "caption")
    for c in config.carry_columns:
        if c not in names:
            raise SchemaError(f"{inp.uri}: no column '{c}' to carry; columns present: {', '.join(names)}")
    return url_col, caption_col, tuple(config.carry_columns)


def _as_text(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Strings from a string or binary column; invalid UTF-8 is replaced, never fatal (FAULTS M1)."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else v.decode("utf-8", "replace") for v in column.to_pylist()]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    return column.to_pylist()


def read_batches(
    inp: InputFile, columns: list[str], row_groups: list[int] | None, block: int = 1 << 16
) -> Iterator[pa.RecordBatch]:
    """Stream the named columns of a file in batches; memory stays one block."""
    if inp.format == "parquet":
        store, name = split_location(inp.uri)
        with store.open_seekable(name) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=block, row_groups=row_groups, columns=columns)
        return
    if inp.format == "jsonl":
        with _text_stream(inp) as stream:
            explicit = pa.schema([(c, pa.string()) for c in columns])
            reader = pajson.open_json(
                stream,
                read_options=pajson.ReadOptions(block_size=1 << 22),
                parse_options=pajson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="ignore"),
            )
            yield from reader
        return
    with _text_stream(inp) as stream:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter="\t" if inp.format == "tsv" else ",", newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.binary() for c in columns}
            ),
        )
        yield from reader


# --- step 1: map -----------------------------------------------------------------------------


def plan_map(ctx: PlanContext) -> list[int]:
    """List input chunks, check every file's columns before any work, and record the plan."""
    config: IngestConfig = ctx.config
    if config.shard_size < 1:
        raise ConfigError(f"ingest.shard_size must be at least 1, got {config.shard_size}")
    check_carried(config.carry_columns)
    files = expand_inputs(config.inputs)
    chunks, estimated_rows = [], 0
    for index, inp in enumerate(files):
        resolve_columns(inp, config)
        if inp.format == "parquet":
            store, name = split_location(inp.uri)
            with store.open_seekable(name) as f:
                meta = pq.ParquetFile(f).metadata
            group, rows, first_row = [], 0, 0  # first_row: the chunk's first row number within the file
            for g in range(meta.num_row_groups):
                group.append(g)
                rows += meta.row_group(g).num_rows
                if rows >= config.rows_per_chunk:
                    chunks.append({"file": index, "row_groups": group, "first_row": first_row})
                    group, first_row, rows = [], first_row + rows, 0
            if group or not chunks or chunks[-1]["file"] != index:
                chunks.append({"file": index, "row_groups": group, "first_row": first_row})
            estimated_rows += meta.num_rows
        else:
            store, name = split_location(inp.uri)
            estimated_rows += store.size(name) // (40 if inp.compression else 120)
            chunks.append({"file": index, "row_groups": None, "first_row": 0})
    plan = {
        "inputs": [inp.uri for inp in files],
        "chunks": chunks,
        "partitions": max(1, math.ceil(estimated_rows / config.rows_per_partition)),
    }
    if ctx.storage.exists(PLAN):
        previous = ctx.storage.read_json(PLAN)
        if previous["inputs"] != plan["inputs"]:
            raise ConfigError(f"{ctx.storage.url(PLAN)}: this output location was ingested from other input files")
        plan = previous  # keep the partitioning of the first run (resume)
    else:
        ctx.storage.write_json(PLAN, plan)
    return list(range(len(plan["chunks"])))


def normalise_rows(
    table: pa.Table, url_col: str, caption_col: str, config: IngestConfig, blocked: frozenset[str]
) -> tuple[dict[str, list], dict[str, int]]:
    """Normalised columns of a batch (uid, url, caption, status) and counts of what happened."""
    urls, captions, uids, statuses = [], [], [], []
    counts = {"captions_cut": 0}
    for raw_url, raw_caption in zip(_as_text(table[url_col]), _as_text(table[caption_col]), strict=True):
        url, status = normalise_url(raw_url, config.sort_query)
        caption, cut = normalise_caption(raw_caption, config.max_caption_chars)
        counts["captions_cut"] += cut
        if status is None and blocked and url_sha256(url) in blocked:
            status = "blocked"
        if status is not None:
            counts[status] = counts.get(status, 0) + 1
        urls.append(url)
        captions.append(caption)
        uids.append(schema.compute_uid(url, caption))
        statuses.append(status)
    columns = {"uid": uids, "url": urls, "caption": captions, "status": statuses}
    return {k: pa.array(v, pa.string()) for k, v in columns.items()}, counts


def partition_of(uids: pa.Array, partitions: int) -> np.ndarray:
    """Partition index of each uid: its first 8 hex digits mod `partitions`."""
    first = pl.Series(uids).str.slice(0, 8).str.to_integer(base=16, dtype=pl.Int64)
    return (first % partitions).cast(pl.Int32).to_numpy()


def run_map(ctx: ShardContext) -> dict:
    config: IngestConfig = ctx.config
    plan = ctx.storage.read_json(PLAN)
    chunk = plan["chunks"][ctx.shard]
    inp = describe(plan["inputs"][chunk["file"]])
    url_col, caption_col, carried = resolve_columns(inp, config)
    # the config's URL lists, and what the run's takedowns removed (never fetched again)
    blocked = read_hash_lists((*config.blocklist_url_sha256, *layout.takedown_lists(ctx.storage, "url_sha256")))
    columns = list(dict.fromkeys([url_col, caption_col, *carried]))
    pending: list[pa.Table] = []
    stats: dict[str, int] = {"rows": 0}
    row = first = chunk["first_row"]
    parts_written = 0

    def flush() -> None:
        # Memory stays one part (rows_per_chunk rows) even for a single huge CSV/JSONL file.
        nonlocal pending, parts_written
        if not pending:
            return
        table = pa.concat_tables(pending, promote_options="permissive")
        parts = partition_of(table["uid"].combine_chunks(), plan["partitions"])
        write_partitioned(ctx, f"{MAP}/c{ctx.shard:05d}-{parts_written:04d}.arrow", table, parts, plan["partitions"])
        pending, parts_written = [], parts_written + 1

    try:
        for batch in read_batches(inp, columns, chunk["row_groups"]):
            batch_table = pa.Table.from_batches([batch])
            normal, counts = normalise_rows(batch_table, url_col, caption_col, config, blocked)
            for k, v in counts.items():
                stats[k] = stats.get(k, 0) + v
            normal["source_file"] = pa.array([chunk["file"]] * batch.num_rows, pa.int32())
            normal["source_row"] = pa.array(range(row, row + batch.num_rows), pa.int64())
            for c in carried:
                column = batch_table[c]
                binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
                normal[c] = pa.array(_as_text(column), pa.string()) if binary else column
            pending.append(pa.table(normal))
            row += batch.num_rows
            if sum(t.num_rows for t in pending) >= config.rows_per_chunk:
                flush()
        flush()
    except pa.ArrowInvalid as e:
        raise SchemaError(f"{inp.uri}: cannot parse ({' '.join(str(e).split())[:200]})") from e
    stats["rows"] = row - first
    return stats


# --- step 2: merge (dedup within a partition = dedup globally, since a uid has one partition) ----


def plan_merge(ctx: PlanContext) -> list[int]:
    return list(range(ctx.storage.read_json(PLAN)["partitions"]))


def run_merge(ctx: ShardContext) -> dict:
    config: IngestConfig = ctx.config
    tables = read_pieces(ctx.storage, map_files(ctx.storage, MAP), ctx.shard)
    if tables:
        frame = pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
        before = frame.height
        frame = frame.sort(["source_file", "source_row"]).unique(subset=["uid"], keep="first", maintain_order=True)
        table = frame.to_arrow()
    else:
        before, table = 0, schema.empty(schema.INGEST)
    table = schema.conform(table, schema.INGEST, f"{MERGE}/{ctx.name}", keep_extra=True)
    pq.write_table(
        table, ctx.output_path(f"{MERGE}/{ctx.name}.parquet"), row_group_size=config.shard_size, compression="zstd"
    )
    return {"rows": table.num_rows, "duplicates_dropped": before - table.num_rows}


# --- step 3: cut into work shards --------------------------------------------------------------


def shard_slices(counts: list[int], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """For each shard, the (partition, start, stop) row ranges it takes, laying partitions end to end."""
    shards: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = shard_size
    for p, n in enumerate(counts):
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append((p, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_size
    if current:
        shards.append(current)
    return shards


def plan_shards(ctx: PlanContext) -> list[int]:
    partitions = ctx.storage.read_json(PLAN)["partitions"]
    counts = []
    for p in range(partitions):
        marker = ctx.storage.read_json(layout.marker(MERGE, p))
        counts.append(int(marker["stats"]["rows"]))
    return list(range(len(shard_slices(counts, ctx.config.shard_size))))


def run_shard(ctx: ShardContext) -> dict:
    config: IngestConfig = ctx.config
    partitions = ctx.storage.read_json(PLAN)["partitions"]
    counts = [int(ctx.storage.read_json(layout.marker(MERGE, p))["stats"]["rows"]) for p in range(partitions)]
    pieces = []
    for p, start, stop in shard_slices(counts, config.shard_size)[ctx.shard]:
        first, last = start // config.shard_size, (stop - 1) // config.shard_size
        with ctx.storage.open_seekable(f"{MERGE}/{shard_name(p)}.parquet") as f:
            groups = pq.ParquetFile(f).read_row_groups(list(range(first, last + 1)))
        pieces.append(groups.slice(start - first * config.shard_size, stop - start))
    table = pa.concat_tables(pieces, promote_options="permissive") if pieces else schema.empty(schema.INGEST)
    ctx.write_table(layout.ingest_parquet(ctx.shard), table)
    refused = sum(1 for s in table["status"].to_pylist() if s is not None)
    return {"rows": table.num_rows, "to_fetch": table.num_rows - refused, "refused": refused}


def map_reads(config: IngestConfig) -> Reads:
    return Reads(files=(PLAN,), external=config.blocklist_url_sha256)


MAP_STAGE = Stage(name=MAP, plan=plan_map, run_shard=run_map, config_key="ingest", reads=map_reads)
MERGE_STAGE = Stage(
    name=MERGE,
    plan=plan_merge,
    run_shard=run_merge,
    config_key="ingest",
    reads=lambda config: Reads(every=(MAP,)),
)
STAGE = Stage(
    name="ingest",
    plan=plan_shards,
    run_shard=run_shard,
    config_key="ingest",
    reads=lambda config: Reads(every=(MERGE,)),
)
STAGES = (MAP_STAGE, MERGE_STAGE, STAGE)
