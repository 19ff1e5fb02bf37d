import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.errors import SchemaError
from pipeline.web.corpus import FAULT_BEHAVIOURS, URL_LIST_FAULTS


def test_uid_is_first_32_hex_of_sha256_of_url_newline_caption():
    # sha256("http://example.com/a.jpg\na red circle"), computed outside clipline
    assert schema.compute_uid("http://example.com/a.jpg", "a red circle") == "9c649406d025192dce0e0dbf73774a6d"
    uids = schema.compute_uids(
        ["http://example.com/a.jpg", "http://example.com/a.jpg"], ["a red circle", "a red circle "]
    )
    assert uids.to_pylist()[0] == "9c649406d025192dce0e0dbf73774a6d"
    assert uids.to_pylist()[1] != uids.to_pylist()[0]  # the caption is part of the identity
    assert all(len(u) == 32 and set(u) <= set("0123456789abcdef") for u in uids.to_pylist())


def test_validate_names_the_file_and_the_missing_column():
    table = pa.table({"url": ["http://a/x.jpg"], "text": ["cap"]})
    with pytest.raises(SchemaError) as e:
        schema.validate(table, schema.INGEST, "ingest/00003.parquet")
    assert str(e.value) == "ingest/00003.parquet: missing column 'uid' (string); columns present: url, text"


def test_validate_names_a_mistyped_column():
    table = pa.table({"uid": ["a"], "url": ["u"], "caption": [3]})
    with pytest.raises(SchemaError, match=r"^in.parquet: column 'caption' has type int64, expected string$"):
        schema.validate(table, schema.INGEST, "in.parquet")


def test_conform_casts_orders_and_drops_or_keeps_extra_columns():
    table = pa.table({"extra": [1, 2], "caption": ["a", None], "url": ["u1", "u2"], "uid": ["x", "y"]})
    minimal = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string())])
    out = schema.conform(table, minimal, "t")
    assert out.to_pylist() == [{"uid": "x", "url": "u1", "caption": "a"}, {"uid": "y", "url": "u2", "caption": None}]
    kept = schema.conform(table, minimal, "t", keep_extra=True)
    assert kept.column_names == ["uid", "url", "caption", "extra"]

    crawl = pa.table(
        {f.name: pa.array([None], f.type) for f in schema.CRAWL}
        | {"width": pa.array([7], pa.int64()), "uid": ["u"], "url": ["x"], "status": ["success"]}
    )
    assert schema.conform(crawl, schema.CRAWL, "c").schema.field("width").type == pa.int32()


def test_conform_refuses_nulls_in_required_columns():
    table = pa.table(
        {
            "uid": ["a", None],
            "url": ["u", "v"],
            "caption": ["c", "d"],
            "status": [None, None],
            "source_file": [0, 0],
            "source_row": [0, 1],
        }
    )
    with pytest.raises(SchemaError, match=r"^t: column 'uid' has 1 null value\(s\)$"):
        schema.conform(table, schema.INGEST, "t")


def test_every_status_the_synthetic_web_expects_is_a_declared_status():
    expected = set(FAULT_BEHAVIOURS.values()) | {s for _, _, s in URL_LIST_FAULTS}
    assert expected <= set(schema.STATUS_KINDS)
    assert schema.is_transient("timeout") and schema.is_transient("server_error")
    assert not schema.is_transient("not_found") and not schema.is_transient("opted_out")
    assert not schema.is_transient(schema.SUCCESS)


def test_empty_tables_have_the_schema():
    for s in schema.SCHEMAS.values():
        t = schema.empty(s)
        assert t.num_rows == 0 and t.schema == s
