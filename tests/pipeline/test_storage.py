"""Storage against a local directory and the real S3 endpoint (moto's server over HTTP)."""

import hashlib
import os
import subprocess
import uuid

import polars as pl
import pyarrow as pa
import pytest

from pipeline.errors import StorageError
from pipeline.storage import LocalStorage, S3Storage, open_storage
from tests.conftest import BUCKET, S3FaultProxy, start_moto


def test_bytes_json_parquet_roundtrip_and_listing(store):
    store.write_bytes("a/b/one.bin", b"\x00\x01payload")
    store.write_json("a/meta.json", {"n": 3, "x": [1, 2]})
    table = pa.table({"uid": ["u1", "u2"], "width": pa.array([5, 6], pa.int32())})
    store.write_parquet("a/b/t.parquet", table)

    assert store.read_bytes("a/b/one.bin") == b"\x00\x01payload"
    assert store.size("a/b/one.bin") == 9
    assert store.read_json("a/meta.json") == {"n": 3, "x": [1, 2]}
    assert store.read_parquet("a/b/t.parquet").equals(table)
    assert store.read_parquet("a/b/t.parquet", columns=["uid"]).column_names == ["uid"]
    assert store.list() == ["a/b/one.bin", "a/b/t.parquet", "a/meta.json"]
    assert store.list("a/b", suffix=".parquet") == ["a/b/t.parquet"]
    assert store.list("nothing-here") == []
    assert store.exists("a/meta.json") and not store.exists("a/missing.json")

    store.delete("a/b/one.bin")
    assert not store.exists("a/b/one.bin")
    store.delete("a/b/one.bin")  # deleting what is gone is fine


def test_exception_mid_write_leaves_nothing_at_the_final_name(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("x/part.bin") as f:
            f.write(b"half of it")
            raise RuntimeError("boom")
    assert not store.exists("x/part.bin")
    assert store.list() == []  # no temporary either


def test_failed_overwrite_keeps_the_old_version_whole(store):
    store.write_bytes("shard.tar", b"version 1")
    with pytest.raises(RuntimeError):
        with store.writer("shard.tar") as f:
            f.write(b"version 2, cut short")
            raise RuntimeError("killed")
    assert store.read_bytes("shard.tar") == b"version 1"
    assert store.list() == ["shard.tar"]


def test_large_objects_stream_and_upload_whole(store, tmp_path):
    # 20 MiB: above boto3's 8 MiB multipart threshold on S3.
    data = os.urandom(1 << 20) * 20
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    store.put_file(local, "big/blob.bin")
    assert store.size("big/blob.bin") == len(data)
    digest = hashlib.sha256()
    with store.open_read("big/blob.bin") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    store.get_file("big/blob.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_moving_a_file_in_replaces_the_old_object_whole(store, tmp_path):
    store.write_bytes("out/part.bin", b"old")
    local = tmp_path / "part.bin"
    local.write_bytes(b"new bytes")
    store.move_file(local, "out/part.bin")
    assert store.read_bytes("out/part.bin") == b"new bytes"
    assert store.list("out") == ["out/part.bin"]  # no spool file left beside it
    with pytest.raises(StorageError, match="absent|other"):
        store.move_file(tmp_path / "absent.bin", "out/other.bin")
    assert not store.exists("out/other.bin")


def test_seekable_reader_reads_parquet_row_groups(store, tmp_path):
    import pyarrow.parquet as pq

    table = pa.table({"n": list(range(10_000))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1000)
    store.put_file(tmp_path / "t.parquet", "t.parquet")
    with store.open_seekable("t.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_groups([3, 7])["n"].to_pylist() == list(range(3000, 4000)) + list(range(7000, 8000))
        f.seek(-4, 2)
        assert f.read() == b"PAR1"


def test_missing_objects_and_bad_parquet_are_one_line_errors(store):
    with pytest.raises(StorageError, match=r"missing\.bin: not found$"):
        store.read_bytes("missing.bin")
    store.write_bytes("bad.parquet", b"not parquet at all")
    store.write_parquet("t.parquet", pa.table({"a": [1], "b": [2]}))
    for read in (store.read_parquet, store.read_frame):  # arrow, and polars
        with pytest.raises(StorageError, match=r"missing\.parquet: not found$"):
            read("missing.parquet")
        with pytest.raises(StorageError, match=r"bad\.parquet: not a readable parquet file"):
            read("bad.parquet")
        assert pl.DataFrame(read("t.parquet", columns=["b"])).to_dict(as_series=False) == {"b": [2]}
        with pytest.raises(StorageError, match=r"t\.parquet: no column c, d$"):
            read("t.parquet", columns=["a", "c", "d"])


def test_paths_that_escape_the_root_are_refused(store):
    with pytest.raises(StorageError, match=r"may not contain '\.' or '\.\.'"):
        store.write_bytes("../outside.bin", b"x")


def test_locations_are_parsed_and_bad_ones_refused(tmp_path):
    assert isinstance(open_storage(tmp_path), LocalStorage)
    s3 = open_storage("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Storage) and s3.url("a/b.tar") == "s3://bucket/some/prefix/a/b.tar"
    assert open_storage("s3://bucket").url("x") == "s3://bucket/x"
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="missing bucket name"):
        open_storage("s3:///x")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_committed_files_honour_the_umask(tmp_path, umask):
    store = LocalStorage(tmp_path / "out")
    local = tmp_path / "staged.bin"
    local.write_bytes(b"x")
    previous = os.umask(umask)
    try:
        store.write_bytes("a/written.bin", b"data")
        store.move_file(local, "a/moved.bin")
        with store.writer("a/streamed.bin") as f:
            f.write(b"data")
        beside = tmp_path / "out" / "a" / "by-open.bin"
        beside.write_bytes(b"x")  # what a plain open() gives under this umask
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out" / "a").iterdir()}
    assert modes == dict.fromkeys(["written.bin", "moved.bin", "streamed.bin", "by-open.bin"], 0o666 & ~umask)


def test_local_storage_child_and_hidden_temporaries(tmp_path):
    store = open_storage(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".tmp-abandoned").write_bytes(b"left by a killed writer")
    store.child("d").write_bytes("f.bin", b"1")
    assert store.list() == ["d/f.bin"]


def test_s3_missing_bucket_is_one_clear_error(s3):
    store = open_storage(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p")
    with pytest.raises(StorageError, match=r"bucket does not exist$"):
        store.write_bytes("x.bin", b"x")
    with pytest.raises(StorageError, match=r"bucket does not exist$"):
        store.exists("x.bin")


def test_s3_bad_credentials_are_one_clear_error_not_retried(s3, monkeypatch):
    # A second moto server with authentication on: every key is unknown to it.
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        store = open_storage(f"s3://{BUCKET}/creds")
        with pytest.raises(StorageError) as e:
            store.write_bytes("x.bin", b"x")
        assert "access denied by S3 (InvalidAccessKeyId)" in str(e.value)
        assert "\n" not in str(e.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_throttling_is_retried_with_backoff(s3, monkeypatch):
    """FAULTS T3: 503 SlowDown answers are retried (botocore's standard mode) and the write lands."""
    with S3FaultProxy(s3, throttle=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = open_storage(f"s3://{BUCKET}/throttled")
        store.write_bytes("x.bin", b"payload")
        assert proxy.throttled["PUT"] == 3 and proxy.seen["PUT"] == 4
        assert store.read_bytes("x.bin") == b"payload"
    with S3FaultProxy(s3, throttle=100) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("CLIPLINE_S3_MAX_ATTEMPTS", "3")
        with pytest.raises(
            StorageError, match=r"throttled/y\.bin: S3 error SlowDown: Please reduce your request rate\.$"
        ):
            open_storage(f"s3://{BUCKET}/throttled").write_bytes("y.bin", b"x")
        assert proxy.seen["PUT"] == 3  # bounded


def test_s3_objects_are_visible_to_plain_boto3(s3_store):
    import boto3

    s3_store.write_bytes("dir/file.txt", b"hello")
    key = s3_store.url("dir/file.txt").removeprefix(f"s3://{BUCKET}/")
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == b"hello"


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full test not run")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_leaves_nothing(tiny_disk):
    store = open_storage(tiny_disk)
    with pytest.raises(StorageError, match=r"big\.bin: no space left on device$"):
        store.write_bytes("big.bin", os.urandom(1 << 20))
    assert store.list() == []
    assert os.listdir(tiny_disk) == []
