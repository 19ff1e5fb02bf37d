"""The streaming dataset: splits, seeded shuffles, exact resume, and the trainer faults R1-R5, R7."""

import io
import json
import pickle
import tarfile

import pytest
import torch

from pipeline.decode import decode_image
from pipeline.manifest import read_manifest
from tests.training.helpers import image_bytes, make_dataset, rewrite_manifest
from training.data import DataConfig, DataError, ManifestDataset, epoch_units, loader, next_worker


def batches(manifest, rank=0, world=1, epoch=0, state=None, **config):
    config = DataConfig(**{"batch_size": 1, "num_workers": 0, "image_size": 16, **config})
    return list(loader(ManifestDataset(read_manifest(str(manifest)), config, None, rank, world, epoch, state)))


def uids(bs):
    return [u for b in bs for u in b["uids"]]


def all_uids(manifest):
    m = read_manifest(str(manifest))
    return [u for s in m.shards for u in m.storage.read_parquet(s["parquet"])["uid"].to_pylist()]


def test_units_cover_every_sample_once_and_split_shards_when_few():
    for counts, consumers in (([5, 7, 3], 2), ([10], 4), ([1, 1], 8), ([4, 4, 4, 4], 3)):
        per = epoch_units(counts, consumers, epoch=0, seed=0, shuffle=True)
        covered = sorted((u.shard, i) for units in per for u in units for i in range(u.start, u.stop))
        assert covered == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
    assert sum(1 for units in epoch_units([10], 4, 0, 0, True) if units) == 4  # R3: one shard feeds 4 consumers
    assert epoch_units([5, 7, 3], 2, 0, 0, True) != epoch_units([5, 7, 3], 2, 1, 0, True)  # reshuffled per epoch


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2)])
def test_every_sample_exactly_once_per_epoch_across_ranks_and_workers(tmp_path, world, workers):
    manifest = make_dataset(tmp_path, [5, 7, 3])
    seen = [u for rank in range(world) for u in uids(batches(manifest, rank, world, num_workers=workers))]
    assert sorted(seen) == sorted(all_uids(manifest))


def test_fewer_shards_than_ranks_times_workers_does_not_hang(tmp_path):
    manifest = make_dataset(tmp_path, [10])
    seen = [u for rank in range(2) for u in uids(batches(manifest, rank, 2, num_workers=2))]
    assert sorted(seen) == sorted(all_uids(manifest))


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    manifest = make_dataset(tmp_path, [6, 6, 6])
    first = uids(batches(manifest))
    assert first == uids(batches(manifest)) and first != all_uids(manifest)
    assert first != uids(batches(manifest, epoch=1))
    assert first != uids(batches(manifest, seed=1))
    assert uids(batches(manifest, shuffle=False)) == all_uids(manifest)


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2), (1, 0)])
def test_resume_mid_epoch_continues_the_exact_sequence(tmp_path, world, workers):
    manifest = make_dataset(tmp_path, [5, 7, 3, 6])
    for rank in range(world):
        full = batches(manifest, rank, world, batch_size=2, num_workers=workers)
        for k in range(len(full) + 1):
            # what the trainer records after consuming k batches
            positions, following = {}, 0
            for b in full[:k]:
                positions[b["consumer"]] = b["position"]
                following = next_worker(b["consumer"], max(1, workers))
            state = {"positions": positions, "next_worker": following}
            resumed = batches(manifest, rank, world, state=state, batch_size=2, num_workers=workers)
            assert [b["uids"] for b in resumed] == [b["uids"] for b in full[k:]], (rank, k)
            assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, full[k:], strict=True))


def test_truncated_tar_corrupt_image_and_duplicate_keys_are_skipped_and_counted(tmp_path):
    first = "dup" + "0" * 29
    extra = {0: {first: {"jpg": image_bytes("red", 99), "txt": b"a red square"},
                 "bad" + "0" * 29: {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"broken"}}}  # fmt: skip
    manifest = make_dataset(tmp_path, [4, 6], extra_members=extra)
    # the same key again later in shard 0 (R2)
    with tarfile.open(tmp_path / "shards/00000.tar", "a") as tar:
        data = image_bytes("blue", 7)
        info = tarfile.TarInfo(f"{first}.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    # shard 1 cut in the middle of a member (R1); the manifest agrees with the cut file
    raw = (tmp_path / "shards/00001.tar").read_bytes()
    (tmp_path / "shards/00001.tar").write_bytes(raw[: len(raw) // 2 + 100])
    data = json.loads(manifest.read_text())
    data["shards"][0]["num_samples"] = 6  # the tar holds 4 + 2 extra samples
    manifest.write_text(json.dumps(data))
    rewrite_manifest(manifest)
    got = batches(manifest, shuffle=False)
    counts = {}
    for b in got:
        for k, v in b["counts"].items():
            counts[k] = counts.get(k, 0) + v
    seen = uids(got)
    assert seen[:5] == all_uids(manifest)[:4] + [first]  # shard 0, the first sample under the repeated key
    assert counts["corrupt_images"] == 1 and counts["duplicate_keys"] == 1 and counts["truncated_shards"] == 1
    assert 0 < len(seen) - 5 < 6  # shard 1 gave what it had before the cut


class Boom:
    def __reduce__(self):
        return (open, ("/tmp/clipline-unpickled-marker", "w"))


def test_members_that_would_unpickle_are_never_loaded(tmp_path):
    import os

    marker = "/tmp/clipline-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    payload = pickle.dumps(Boom())
    key = "evil" + "0" * 28
    extra = {0: {key: {"jpg": image_bytes("green", 3), "pyd": payload, "pkl": payload, "pth": payload,
                       "txt": b"a green square"}}}  # fmt: skip
    manifest = make_dataset(tmp_path, [2], extra_members=extra)
    data = json.loads(manifest.read_text())
    data["shards"][0]["num_samples"] = 3
    manifest.write_text(json.dumps(data))
    seen = uids(batches(manifest))
    assert key in seen and len(seen) == 3
    assert not os.path.exists(marker)


def test_missing_or_short_shard_is_a_clear_error_or_skipped_and_counted(tmp_path):
    manifest = make_dataset(tmp_path, [3, 3])
    (tmp_path / "shards/00001.tar").unlink()
    with pytest.raises(DataError, match="shards/00001.tar is listed in the manifest but missing"):
        batches(manifest, shuffle=False)
    got = batches(manifest, shuffle=False, on_bad_shard="skip")
    assert len(uids(got)) == 3 and sum(b["counts"].get("bad_shards", 0) for b in got) == 1
    raw = (tmp_path / "shards/00000.tar").read_bytes()
    (tmp_path / "shards/00000.tar").write_bytes(raw[:-1024])
    with pytest.raises(DataError, match="shards/00000.tar has .* bytes, the manifest says"):
        batches(manifest, shuffle=False)


def test_decode_is_draft_mode_sized_and_seeded(tmp_path):
    import numpy as np

    data = image_bytes("red", 1, size=200)
    a = decode_image(data, 32, np.random.default_rng(5))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, decode_image(data, 32, np.random.default_rng(5)))
    centre = decode_image(image_bytes("blue", 2, size=40, fmt="PNG"), 16, None)
    assert centre.shape == (3, 16, 16) and int(centre[2].float().mean()) > 150
