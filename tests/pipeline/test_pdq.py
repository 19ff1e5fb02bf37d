"""PDQ: equal to Meta's reference (pdqhash) on real photos, and hash lists at crawl and in the filter."""

import functools
import http.server
import io
import threading

import numpy as np
import pdqhash
import pytest
from PIL import Image

from pipeline import pdq
from pipeline.crawl import CrawlConfig, crawl_rows
from pipeline.errors import ClipError
from tests.conftest import REPO
from tests.pipeline.test_filter import run

PHOTOS = sorted((REPO / "tests/data/photos").glob("*.jpg"))


def reference(rgb: np.ndarray) -> tuple[str, int]:
    bits, quality = pdqhash.compute(np.ascontiguousarray(rgb))
    return f"{int(''.join(map(str, bits)), 2):064x}", quality


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.stem)
def test_hash_and_quality_equal_the_reference_on_real_photos(path):
    rgb = np.asarray(Image.open(path).convert("RGB"))
    for arr in (rgb, rgb[:301, :517], rgb[40:140, 7:120], np.asarray(Image.fromarray(rgb).resize((64, 64)))):
        assert pdq.pdq(np.ascontiguousarray(arr)) == reference(arr)


def box_passes_then_samples(grey: np.ndarray) -> np.ndarray:
    """The reference's blur and sampling as its hashing document states them, one axis at a time:
    two passes of a centred box of w = ceil(side / 128) (mean of in[o - (w - half) : o + half],
    clipped, half = (w + 2) // 2), then the 64 samples at the cell centres."""
    out = grey.astype(np.float64)
    for axis in (0, 1):
        a = np.moveaxis(out, axis, 0)
        n = len(a)
        w = (n + 127) // 128
        half = (w + 2) // 2
        for _ in range(2 if w > 1 else 0):
            total = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
            lo = np.maximum(np.arange(n) - (w - half), 0)
            hi = np.minimum(np.arange(n) + half, n)
            a = (total[hi] - total[lo]) / (hi - lo)[:, None]
        a = a[((np.arange(64) + 0.5) * n / 64).astype(np.int64)]
        out = np.moveaxis(a, 0, axis)
    return out


def test_the_banded_blur_and_sampling_equal_the_two_box_passes_at_every_size():
    rng = np.random.default_rng(7)
    sides = [64, 100, 127, 128, 129, 255, 256, 257, 300, 383, 384, 385, 511, 640, 1000, 1023, 1600, 2048, 3001]
    for rows, cols in zip(sides, rng.permutation(sides), strict=True):
        grey = rng.uniform(0, 255, (rows, cols)).astype(np.float32)
        np.testing.assert_allclose(pdq._sample(grey), box_passes_then_samples(grey), rtol=0, atol=2e-3)


def test_big_images_are_reduced_first_and_stay_well_within_the_match_distance():
    for path in PHOTOS:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((1600, 1066), Image.Resampling.BICUBIC))
        ours, quality = pdq.pdq(rgb)
        theirs, their_quality = reference(rgb)
        assert bin(int(ours, 16) ^ int(theirs, 16)).count("1") <= 16 and abs(quality - their_quality) <= 10
        assert pdq.pdq(rgb, exact_up_to=2000) == (theirs, their_quality)  # the unreduced path is exact


def test_copies_are_near_and_other_photos_far():
    hashes = {p.stem: pdq.pdq(np.asarray(Image.open(p).convert("RGB")))[0] for p in PHOTOS}
    words = pdq.unpack(list(hashes.values()))
    d = pdq.distances(words, words)
    assert (d[~np.eye(len(d), dtype=bool)] > 80).all()  # distinct photos: far apart
    img = Image.open(PHOTOS[0]).convert("RGB")
    small = Image.open(io.BytesIO(jpeg(img.resize((img.width // 2, img.height // 2)), 60))).convert("RGB")
    assert pdq.distances(pdq.unpack([pdq.pdq(np.asarray(small))[0]]), words[:1])[0, 0] <= 16


def test_hash_lists_parse_distances_and_refuse_bad_lines(tmp_path):
    (tmp_path / "a.pdq").write_text("# comment\n" + "f" * 64 + "\n" + "0" * 64 + ",12\n")
    (tmp_path / "b.pdq").write_text("A" * 64 + " 40\n")
    lists = pdq.HashList.load([str(tmp_path / "a.pdq"), str(tmp_path / "b.pdq")])
    assert lists.limit.tolist() == [31, 12, 40] and lists.names == ("a.pdq", "b.pdq")
    near_zero = f"{(1 << 12) - 1:064x}"  # 12 bits from the zero entry
    far = f"{(1 << 13) - 1:064x}"
    near_a = "a" * 63 + "0"  # 2 bits from b's entry
    got = lists.match([near_zero, far, near_a, None, near_zero], [100, 100, 100, None, 10])
    assert got == ["a.pdq", None, "b.pdq", None, None]  # quality 10: too flat to match
    (tmp_path / "bad.pdq").write_text("xyz\n")
    with pytest.raises(ClipError, match=r"bad.pdq:1: a PDQ hash is 64 hex digits"):
        pdq.HashList.load([str(tmp_path / "bad.pdq")])
    (tmp_path / "bad2.pdq").write_text("f" * 64 + " 300\n")
    with pytest.raises(ClipError, match=r"bad2.pdq:1: the distance must be 0-256"):
        pdq.HashList.load([str(tmp_path / "bad2.pdq")])


@pytest.fixture
def photo_site(tmp_path):
    """A loopback site serving a planted photo, its resized re-encoded copy and two other photos."""
    img = Image.open(PHOTOS[0]).convert("RGB")
    files = {
        "planted.jpg": jpeg(img),
        "copy.jpg": jpeg(img.resize((img.width * 3 // 5, img.height * 3 // 5)), 55),
        "other1.jpg": PHOTOS[1].read_bytes(),
        "other2.jpg": PHOTOS[2].read_bytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.1.9", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.1.9:{server.server_port}", img
    server.shutdown()


def test_a_listed_pdq_blocks_the_resized_copy_at_crawl_and_in_the_filter(photo_site):
    root, base, planted = photo_site
    listed, _ = pdq.pdq(np.asarray(planted))  # what a hash list holds: the hash of the original image
    (root / "abuse.pdq").write_text(f"{listed}\n")
    config = CrawlConfig(image_size=128, allow_networks=("127.0.1.0/24",), dns=False, robots_txt=False,
                         blocklist_image_pdq=(str(root / "abuse.pdq"),))  # fmt: skip
    urls = [f"{base}/{name}" for name in ("planted.jpg", "copy.jpg", "other1.jpg", "other2.jpg")]
    outcomes = [o for o, _ in crawl_rows(urls, config)]
    assert [o.status for o in outcomes] == ["blocked", "blocked", "success", "success"]
    assert outcomes[1].error_message == "image PDQ matches an entry of blocklist abuse.pdq"
    assert outcomes[1].image is None and outcomes[1].pdq is not None  # never stored, only its hash
    # Without the list the copy is crawled; the filter blocks it retroactively from the crawl's hash.
    free = [o for o, _ in crawl_rows(urls, CrawlConfig(**{**config.__dict__, "blocklist_image_pdq": ()}))]
    assert [o.status for o in free] == ["success"] * 4
    unhashed = [
        o for o, _ in crawl_rows(urls[:1], CrawlConfig(**{**config.__dict__, "blocklist_image_pdq": (), "pdq": False}))
    ]
    assert unhashed[0].status == "success" and unhashed[0].pdq is None  # crawl.pdq: false saves ~0.5 ms an image
    listed_anyway = CrawlConfig(**{**config.__dict__, "pdq": False})  # a list to match needs the hash
    assert [o.status for o, _ in crawl_rows(urls[:1], listed_anyway)] == ["blocked"]
    rows = [{"uid": f"u{i}", "caption": f"caption {i}", "pdq": o.pdq, "pdq_quality": o.pdq_quality}
            for i, o in enumerate(free)]  # fmt: skip
    reasons, table = run(rows, blocklist_image_pdq=(str(root / "abuse.pdq"),))
    assert reasons == {"caption 0": "blocked_image", "caption 1": "blocked_image", "caption 2": None, "caption 3": None}
