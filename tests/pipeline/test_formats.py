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


@pytest.mark.parametrize("key", ["../evil", "a/b", ".hidden", ""])
def test_unsafe_keys_can_never_be_written(tmp_path, key):
    """FAULTS M4: a key with a path separator or a leading dot is refused."""
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
