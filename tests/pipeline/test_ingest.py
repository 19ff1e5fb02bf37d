import gzip
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, SchemaError
from pipeline.ingest import STAGES, IngestConfig, normalise_caption, normalise_url, shard_slices, url_sha256
from pipeline.runner import run_pipeline
from pipeline.stage import committed_shards
from pipeline.storage import open_storage


def ingest(out, executor="inline", **config) -> list[pa.Table]:
    store = open_storage(out)
    run = RunConfig(out=store.uri, ingest=IngestConfig(**config))
    run_pipeline(list(STAGES), store, run, executor=executor, progress=False)
    return [store.read_parquet(f"ingest/{s:05d}.parquet") for s in committed_shards(store, "ingest")]


def rows(n, start=0, host="example.com"):
    return [{"url": f"http://{host}/img/{i}.jpg", "caption": f"caption {i}"} for i in range(start, start + n)]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("HTTP://Example.COM:80/a.jpg#frag", ("http://example.com/a.jpg", None)),
        ("https://example.com:443", ("https://example.com/", None)),
        ("https://example.com:8443/x?b=2&a=1", ("https://example.com:8443/x?a=1&b=2", None)),
        ("  http://user:pw@example.com/a  ", ("http://example.com/a", None)),
        ("http://[2001:db8::1]:80/a", ("http://[2001:db8::1]/a", None)),
        ("ftp://example.com/a.jpg", ("ftp://example.com/a.jpg", "refused_scheme")),
        ("data:image/png;base64,AAAA", ("data:image/png;base64,AAAA", "refused_scheme")),
        ("http://", ("http://", "invalid_url")),
        ("example.com/a.jpg", ("example.com/a.jpg", "invalid_url")),
        ("http://example.com:99999/a", ("http://example.com:99999/a", "invalid_url")),
        (None, ("", "invalid_url")),
    ],
)
def test_normalise_url(raw, expected):
    assert normalise_url(raw) == expected


def test_query_order_is_kept_when_asked():
    assert normalise_url("http://a.com/x?b=2&a=1", sort_query=False) == ("http://a.com/x?b=2&a=1", None)


def test_normalise_caption():
    assert normalise_caption("  Cafe\u0301  \t\n au\x00 lait\u200b ", 100) == ("Café au lait", False)
    assert normalise_caption("\x1b[31mred\x1b[0m", 100) == ("[31mred [0m", False)
    assert normalise_caption(None, 10) == ("", False)
    assert normalise_caption("word " * 10, 12) == ("word word wo", True)


def test_shard_slices_cut_partitions_end_to_end():
    assert shard_slices([250, 30, 7], 100) == [[(0, 0, 100)], [(0, 100, 200)], [(0, 200, 250), (1, 0, 30), (2, 0, 7)]]
    assert shard_slices([0, 0], 10) == []
    assert shard_slices([10], 10) == [[(0, 0, 10)]]


def write_inputs(tmp_path, table: pa.Table) -> dict[str, str]:
    """The same rows as parquet, csv, tsv, jsonl, csv.gz and jsonl.zst."""
    paths = {}
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7)
    paths["parquet"] = str(tmp_path / "in.parquet")
    pacsv.write_csv(table, tmp_path / "in.csv")
    paths["csv"] = str(tmp_path / "in.csv")
    pacsv.write_csv(table, tmp_path / "in.tsv", pacsv.WriteOptions(delimiter="\t"))
    paths["tsv"] = str(tmp_path / "in.tsv")
    lines = "".join(json.dumps(r) + "\n" for r in table.to_pylist())
    (tmp_path / "in.jsonl").write_text(lines)
    paths["jsonl"] = str(tmp_path / "in.jsonl")
    (tmp_path / "in.csv.gz").write_bytes(gzip.compress((tmp_path / "in.csv").read_bytes()))
    paths["csv.gz"] = str(tmp_path / "in.csv.gz")
    with pa.CompressedOutputStream(str(tmp_path / "in.jsonl.zst"), "zstd") as f:
        f.write(lines.encode())
    paths["jsonl.zst"] = str(tmp_path / "in.jsonl.zst")
    return paths


def test_every_format_gives_the_same_work_shards(tmp_path):
    table = pa.Table.from_pylist(rows(23) + [{"url": "http://example.com/q?b=1&a=2", "caption": 'commas, "quotes"'}])
    results = {}
    for fmt, path in write_inputs(tmp_path, table).items():
        shards = ingest(tmp_path / f"out-{fmt.replace('.', '-')}", inputs=(path,), shard_size=10)
        results[fmt] = [t.select(["uid", "url", "caption", "status"]).to_pylist() for t in shards]
    first = results["parquet"]
    assert [len(s) for s in first] == [10, 10, 4]
    for fmt, shards in results.items():
        assert shards == first, fmt
    last = [r for s in first for r in s if "quotes" in r["caption"]][0]
    assert last["url"] == "http://example.com/q?a=2&b=1"
    assert last["uid"] == schema.compute_uid("http://example.com/q?a=2&b=1", 'commas, "quotes"')


def test_laion_column_names_and_carried_columns(tmp_path):
    table = pa.table(
        {
            "URL": ["http://a.com/1.jpg", "http://a.com/2.jpg"],
            "TEXT": ["one", "two"],
            "WIDTH": [10, 20],
            "NSFW": ["UNLIKELY", "NSFW"],
        }
    )
    pq.write_table(table, tmp_path / "laion.parquet")
    (shard,) = ingest(tmp_path / "out", inputs=(str(tmp_path / "laion.parquet"),), carry_columns=("WIDTH", "NSFW"))
    assert shard.column_names == ["uid", "url", "caption", "status", "source_file", "source_row", "WIDTH", "NSFW"]
    assert shard.select(["caption", "WIDTH", "NSFW"]).to_pylist() == [
        {"caption": "one", "WIDTH": 10, "NSFW": "UNLIKELY"},
        {"caption": "two", "WIDTH": 20, "NSFW": "NSFW"},
    ]


@pytest.mark.parametrize("carried", [("uid",), ("NSFW", "url"), ("caption",), ("status",), ("source_row",)])
def test_carried_columns_may_not_overwrite_clipline_columns(tmp_path, carried):
    table = pa.table({"URL": ["http://a.com/1.jpg"], "TEXT": ["one"], "NSFW": ["UNLIKELY"], "uid": ["../x"]})
    pq.write_table(table, tmp_path / "laion.parquet")
    with pytest.raises(ConfigError) as e:
        ingest(tmp_path / "out", inputs=(str(tmp_path / "laion.parquet"),), carry_columns=carried)
    clash = ", ".join(repr(c) for c in carried if c != "NSFW")
    assert str(e.value).startswith(f"ingest.carry_columns: {clash} would overwrite clipline's own column")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))  # before any work


def test_non_utf8_and_control_characters_are_rows_not_crashes(tmp_path):
    (tmp_path / "bad.csv").write_bytes(
        b"url,caption\nhttp://a.com/1.jpg,caf\xe9 latin-1\nhttp://a.com/2.jpg,ok\x07bell\n,no url\n"
    )
    (shard,) = ingest(tmp_path / "out", inputs=(str(tmp_path / "bad.csv"),))
    assert shard.select(["url", "caption", "status"]).to_pylist() == [
        {"url": "http://a.com/1.jpg", "caption": "caf\ufffd latin-1", "status": None},
        {"url": "http://a.com/2.jpg", "caption": "ok bell", "status": None},
        {"url": "", "caption": "no url", "status": "invalid_url"},
    ]


def test_missing_columns_are_a_clear_error_before_any_work(tmp_path):
    pq.write_table(pa.table({"link": ["http://a.com/x.jpg"], "caption": ["x"]}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    with pytest.raises(SchemaError) as e:
        ingest(out, inputs=(str(tmp_path / "in.parquet"),))
    assert str(e.value) == (
        f"{tmp_path / 'in.parquet'}: no url column (looked for url, URL, image_url, img_url; "
        "set ingest.url_column); columns present: link, caption"
    )
    assert not out.exists() or open_storage(out).list() == []
    with pytest.raises(SchemaError, match="no column 'WIDTH' to carry"):
        ingest(out, inputs=(str(tmp_path / "in.parquet"),), url_column="link", carry_columns=("WIDTH",))
    assert ingest(out, inputs=(str(tmp_path / "in.parquet"),), url_column="link")[0].num_rows == 1
    with pytest.raises(ConfigError, match="no input files found"):
        ingest(tmp_path / "o2", inputs=(str(tmp_path / "nothing-*.parquet"),))
    (tmp_path / "x.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(
        ConfigError, match=r"x\.xlsx: unknown input format \(expected \.parquet, \.csv, \.tsv or \.jsonl"
    ):
        ingest(tmp_path / "o3", inputs=(str(tmp_path / "x.xlsx"),))


def test_shard_sizes_do_not_depend_on_input_files(tmp_path):
    """No small last shard per file (img2dataset's problem): one file or three give the same shards."""
    all_rows = rows(287)
    pq.write_table(pa.Table.from_pylist(all_rows), tmp_path / "one.parquet")
    for i, (a, b) in enumerate([(0, 250), (250, 280), (280, 287)]):
        pq.write_table(pa.Table.from_pylist(all_rows[a:b]), tmp_path / f"part-{i}.parquet")
    one = ingest(tmp_path / "o1", inputs=(str(tmp_path / "one.parquet"),), shard_size=100)
    three = ingest(tmp_path / "o3", inputs=(str(tmp_path / "part-*.parquet"),), shard_size=100)
    assert [t.num_rows for t in one] == [t.num_rows for t in three] == [100, 100, 87]
    assert [t["uid"].to_pylist() for t in one] == [t["uid"].to_pylist() for t in three]


def test_duplicates_are_dropped_globally_and_counted(tmp_path):
    base = rows(120)
    dups = base[:30] + [
        {"url": r["url"].replace("http://example.com", "HTTP://EXAMPLE.com:80"), "caption": r["caption"]}
        for r in base[30:40]
    ]
    same_url_other_caption = [{"url": base[0]["url"], "caption": "another caption"}]
    pq.write_table(pa.Table.from_pylist(base), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(dups + same_url_other_caption), tmp_path / "b.parquet")
    out = tmp_path / "out"
    # Several partitions, so duplicates must meet across map chunks.
    shards = ingest(
        out, inputs=(str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")), shard_size=50, rows_per_partition=30
    )
    uids = [u for t in shards for u in t["uid"].to_pylist()]
    assert len(uids) == len(set(uids)) == 121
    store = open_storage(out)
    plan = store.read_json("ingest/_plan.json")
    assert plan["partitions"] == 6
    dropped = sum(
        store.read_json(f"ingest/_merge/_committed/{p:05d}.json")["stats"]["duplicates_dropped"]
        for p in range(plan["partitions"])
    )
    assert dropped == 40
    kept = {r["uid"]: r for t in shards for r in t.to_pylist()}
    first = kept[schema.compute_uid(base[5]["url"], base[5]["caption"])]
    assert (first["source_file"], first["source_row"]) == (0, 5)  # the first occurrence is kept


def test_many_row_groups_are_streamed_in_chunks(tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(500)), tmp_path / "big.parquet", row_group_size=40)
    chunked = ingest(tmp_path / "a", inputs=(str(tmp_path / "big.parquet"),), shard_size=200, rows_per_chunk=100)
    whole = ingest(tmp_path / "b", inputs=(str(tmp_path / "big.parquet"),), shard_size=200)
    assert len(open_storage(tmp_path / "a").read_json("ingest/_plan.json")["chunks"]) == 5
    assert [t.to_pylist() for t in chunked] == [t.to_pylist() for t in whole]
    rows_seen = sorted(r["source_row"] for t in chunked for r in t.to_pylist())
    assert rows_seen == list(range(500))


def test_a_big_text_file_is_partitioned_in_parts_of_bounded_size(tmp_path):
    # ~8 MB of CSV: several 4 MB read blocks, so the single map chunk flushes more than one part.
    big = [
        {"url": f"http://example.com/{'x' * 60}/{i}.jpg", "caption": f"caption {i} " + "y" * 40} for i in range(70_000)
    ]
    pacsv.write_csv(pa.Table.from_pylist(big), tmp_path / "big.csv")
    parts = ingest(tmp_path / "a", inputs=(str(tmp_path / "big.csv"),), shard_size=30_000, rows_per_chunk=20_000)
    whole = ingest(tmp_path / "b", inputs=(str(tmp_path / "big.csv"),), shard_size=30_000)
    pieces = open_storage(tmp_path / "a").list("ingest/_map", suffix=".arrow")  # one file per part
    assert len(open_storage(tmp_path / "a").read_json("ingest/_plan.json")["chunks"]) == 1
    assert len(pieces) >= 2
    assert [t.num_rows for t in parts] == [30_000, 30_000, 10_000]
    assert [t["uid"].to_pylist() for t in parts] == [t["uid"].to_pylist() for t in whole]


def test_blocklisted_url_hashes_are_refused_before_fetch(tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(5)), tmp_path / "in.parquet")
    (tmp_path / "block.txt").write_text(f"# takedowns\n{url_sha256('http://example.com/img/3.jpg').upper()}\n")
    (shard,) = ingest(
        tmp_path / "out", inputs=(str(tmp_path / "in.parquet"),), blocklist_url_sha256=(str(tmp_path / "block.txt"),)
    )
    assert shard["status"].to_pylist() == [None, None, None, "blocked", None]


def test_other_inputs_into_the_same_location_are_refused(tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(5)), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows(5, 5)), tmp_path / "b.parquet")
    ingest(tmp_path / "out", inputs=(str(tmp_path / "a.parquet"),))
    with pytest.raises(Exception, match="ingested from other input files|another ingest config"):
        ingest(tmp_path / "out", inputs=(str(tmp_path / "b.parquet"),))


def test_from_and_to_s3_on_ray(ray_local, s3_store, tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(45)), tmp_path / "in.parquet")
    s3_store.put_file(tmp_path / "in.parquet", "inputs/urls.parquet")
    out = open_storage(s3_store.url("work"))
    shards = ingest(out.uri, executor="ray", inputs=(s3_store.url("inputs/urls.parquet"),), shard_size=20)
    assert [t.num_rows for t in shards] == [20, 20, 5]
    shards_written = [n for n in out.list("ingest", suffix=".parquet") if "/_" not in n]
    assert shards_written == ["ingest/00000.parquet", "ingest/00001.parquet", "ingest/00002.parquet"]
