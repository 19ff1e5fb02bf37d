import gzip
import io
import tarfile

import pytest

from pipeline.formats import TarWriter, group_samples, iter_tar_members


def test_tar_members_are_grouped_by_key_with_fixed_metadata(tmp_path):
    path = tmp_path / "s.tar"
    with TarWriter(path) as tar:
        tar.add("abc", {"jpg": b"\xff\xd8\xff", "txt": b"a cat", "json": b"{}"})
        tar.add("def", {"jpg": b"\xff\xd8\xffx", "txt": b"a dog", "json": b"{}"})
    assert (tar.samples, tar.bytes) == (2, 3 + 5 + 2 + 4 + 5 + 2)
    with tarfile.open(path) as t:
        infos = t.getmembers()
    assert [i.name for i in infos] == ["abc.jpg", "abc.txt", "abc.json", "def.jpg", "def.txt", "def.json"]
    assert {(i.mtime, i.mode, i.uid, i.gid, i.uname) for i in infos} == {(0, 0o644, 0, 0, "")}
    with open(path, "rb") as f:
        samples = list(group_samples(iter_tar_members(f)))
    assert samples == [
        ("abc", {"jpg": b"\xff\xd8\xff", "txt": b"a cat", "json": b"{}"}),
        ("def", {"jpg": b"\xff\xd8\xffx", "txt": b"a dog", "json": b"{}"}),
    ]


def test_same_samples_give_the_same_bytes(tmp_path):
    for name in ("a.tar", "b.tar"):
        with TarWriter(tmp_path / name) as tar:
            tar.add("k1", {"txt": b"x"})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


@pytest.mark.parametrize(
    "key", ["../evil", "a/b", ".hidden", "", "0000000a.evil", "0000000b\\..\\..\\x", "a b", "a\nb", "k\x00", None]
)
def test_unsafe_keys_can_never_be_written(tmp_path, key):
    """M4: a key with a path separator, a dot (read back as another key and extension) or any odd character."""
    with TarWriter(tmp_path / "s.tar") as tar, pytest.raises(ValueError, match="unsafe sample key"):
        tar.add(key, {"txt": b"x"})


def test_reading_never_extracts_to_disk(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("../../outside.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    buf.seek(0)
    assert list(iter_tar_members(buf)) == [("../../outside.txt", b"bad")]
    assert not (tmp_path.parent.parent / "outside.txt").exists()


def _members_by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_reader_agrees_with_tarfile_on_every_format(fmt):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, payload in [
            ("a.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
            ("d" * 60 + "/" + "long" * 20 + ".txt", "caption é".encode()),  # > 100 chars: prefix, GNU L, pax path
            ("empty.json", b""),
            ("exactly.bin", b"x" * 1024),  # ends on a block boundary
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        folder = tarfile.TarInfo("a-dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        if fmt == tarfile.PAX_FORMAT:
            info = tarfile.TarInfo("ünïcode-ключ.txt")  # non-ASCII names go through a pax record
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    data = out.getvalue()
    assert list(iter_tar_members(io.BytesIO(data))) == _members_by_tarfile(data)
    assert len(list(iter_tar_members(io.BytesIO(data)))) == (5 if fmt == tarfile.PAX_FORMAT else 4)
    gz = gzip.compress(data)
    assert list(iter_tar_members(io.BytesIO(gz))) == _members_by_tarfile(data)


def test_the_tar_reader_refuses_cut_and_corrupt_tars(tmp_path):
    with TarWriter(tmp_path / "t.tar") as tar:
        for i in range(3):
            tar.add(f"{i:03d}", {"jpg": b"j" * 700, "txt": b"t"})
    data = (tmp_path / "t.tar").read_bytes()
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(iter_tar_members(io.BytesIO(data[: 512 + 300])))  # cut inside the first member
    got = list(iter_tar_members(io.BytesIO(data[: 512 * 3])))  # cut on a header boundary: what is whole
    assert got == [("000.jpg", b"j" * 700)]
    corrupt = bytearray(data)
    corrupt[0] ^= 0x01  # the first header's name changes, its checksum does not
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(corrupt))))
    with pytest.raises(tarfile.ReadError, match="empty"):
        list(iter_tar_members(io.BytesIO(b"")))


def pax_tar(record: bytes) -> bytes:
    """A tar whose only member carries a pax header holding `record` (whatever its length says)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a" * 120 + ".jpg")  # a long name: tarfile writes a pax 'path' record
        info.size = 3
        tar.addfile(info, io.BytesIO(b"jpg"))
    data = bytearray(buf.getvalue())
    at = data.index(b" path=")
    start = data.rindex(b"\0", 0, at) + 1  # the record's first length digit
    old = bytes(data[start : data.index(b"\n", at) + 1])
    assert len(record) <= len(old)
    data[start : start + len(old)] = record.ljust(len(old), b"\0")
    return bytes(data)


@pytest.mark.timeout(10)  # a record of length 0 used to loop forever
@pytest.mark.parametrize(
    "record, error",
    [
        (b"0 path=x\n", "length 0"),
        (b"00 path=x\n", "length 0"),
        (b"3 path=x\n", "length 3"),  # does not reach past its own digits
        (b"9999 path=x\n", "length 9999"),  # runs past the data
        (b"-5 path=x\n", "no length"),
        (b"path=x\n", "no length"),
        (b"12 path=xyz\0", "length 12"),  # no newline where the length says the record ends
    ],
)
def test_bad_pax_records_are_read_errors_not_hangs(record, error):
    with pytest.raises(tarfile.ReadError, match=error):
        list(iter_tar_members(io.BytesIO(pax_tar(record))))
    good = pax_tar(b"10 path=x\n")
    assert list(iter_tar_members(io.BytesIO(good))) == [("x", b"jpg")]


@pytest.mark.timeout(10)
def test_a_member_size_beyond_the_cap_is_refused_before_reading(tmp_path):
    with TarWriter(tmp_path / "t.tar") as tar:
        tar.add("000", {"jpg": b"j" * 700})
    head = bytearray((tmp_path / "t.tar").read_bytes()[:512])
    head[124:136] = b"\x80" + (1 << 40).to_bytes(11, "big")  # GNU base-256: a 1 TiB member
    head[148:156] = b" " * 8
    head[148:156] = f"{sum(head):06o}\0 ".encode()
    with pytest.raises(tarfile.ReadError, match="a tar member of 1099511627776 bytes"):
        list(iter_tar_members(io.BytesIO(bytes(head) + b"\0" * 4096)))


def test_short_reads_from_raw_streams_are_assembled(tmp_path):
    class Trickle(io.RawIOBase):  # returns at most 100 bytes a read, as a raw network stream may
        def __init__(self, data):
            self.data, self.at = data, 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), 100, len(self.data) - self.at)
            b[:n] = self.data[self.at : self.at + n]
            self.at += n
            return n

    with TarWriter(tmp_path / "t.tar") as tar:
        tar.add("000", {"jpg": b"j" * 1500, "txt": b"caption"})
    data = (tmp_path / "t.tar").read_bytes()
    assert list(iter_tar_members(Trickle(data))) == [("000.jpg", b"j" * 1500), ("000.txt", b"caption")]
