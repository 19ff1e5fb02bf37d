import io
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.dedup_quality import restamped as bench_restamped
from pipeline.images import (
    INTERPOLATIONS,
    ImagePolicy,
    ImageRefused,
    colour_distance,
    process,
    resize,
    sniff_format,
    target_size,
)
from pipeline.web.corpus import encode, render
from tests.conftest import REPO

POLICY = ImagePolicy(image_size=64, resize_mode="center_crop", min_image_size=16, max_aspect_ratio=10)


def catalog_files(web_root):
    rows = pq.read_table(web_root / "catalog.parquet").to_pylist()
    return {r["behaviour"]: (web_root / "files" / r["file"]).read_bytes() for r in rows if r["file"]}


@pytest.mark.parametrize(
    "behaviour, status",
    [
        ("zero_bytes", "not_an_image"),
        ("random_bytes", "not_an_image"),
        ("html_as_jpeg", "not_an_image"),
        ("svg_as_jpeg", "not_an_image"),
        ("truncated_jpeg", "decode_error"),
        ("truncated_png", "decode_error"),
        ("png_bomb", "decompression_bomb"),
        ("jpeg_bomb", "decompression_bomb"),
        ("tiff", "format_not_allowed"),
        ("psd", "format_not_allowed"),
        ("eps", "format_not_allowed"),
        ("bmp", "format_not_allowed"),
        ("tiny_image", "image_too_small"),
        ("extreme_aspect", "bad_aspect_ratio"),
    ],
)
def test_bad_files_are_refused_with_their_status(web_root, behaviour, status):
    with pytest.raises(ImageRefused) as e:
        process(catalog_files(web_root)[behaviour], POLICY)
    assert e.value.status == status


def test_bomb_is_refused_from_the_header_without_allocating_pixels(web_root):
    import tracemalloc

    data = catalog_files(web_root)["png_bomb"]
    tracemalloc.start()
    with pytest.raises(ImageRefused):
        process(data, POLICY)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20  # 60000 x 60000 RGB would be 10.8 GB


@pytest.mark.parametrize(
    "behaviour", ["cmyk_jpeg", "png_16bit", "palette_alpha", "animated_gif", "animated_webp", "exif_rotated"]
)
def test_awkward_images_become_upright_rgb(web_root, behaviour):
    out = process(catalog_files(web_root)[behaviour], POLICY)
    img = Image.open(io.BytesIO(out.data))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    assert (out.original_width, out.original_height) == (160, 120)  # the base image, upright


def test_exif_rotation_is_applied_to_pixels():
    base = Image.new("RGB", (160, 120), (255, 255, 255))
    base.paste((255, 0, 0), (0, 0, 40, 120))  # red band on the left when upright
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; shown after a 90° clockwise turn
    buf = io.BytesIO()
    base.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = process(buf.getvalue(), ImagePolicy(resize_mode="no", encode_format="png"))
    arr = np.asarray(Image.open(io.BytesIO(out.data)))
    assert arr.shape == (120, 160, 3)
    assert arr[60, 10, 0] > 200 and arr[60, 10, 1] < 60  # left band is red again
    assert arr[60, 150].min() > 200


def test_16_bit_values_are_scaled_not_clipped():
    arr16 = np.full((40, 40), 32768, dtype=np.uint16)  # mid grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, "PNG")
    out = process(buf.getvalue(), ImagePolicy(resize_mode="no", encode_format="png"))
    assert abs(int(np.asarray(Image.open(io.BytesIO(out.data)))[0, 0, 0]) - 128) <= 1


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = process(buf.getvalue(), ImagePolicy(resize_mode="no", encode_format="png"))
    assert tuple(np.asarray(Image.open(io.BytesIO(out.data)))[5, 5]) == (255, 255, 255)


@pytest.mark.parametrize(
    "mode, size, expected",
    [
        ("no", (300, 200), (300, 200)),
        ("keep_ratio", (300, 200), (96, 64)),
        ("keep_ratio_largest", (300, 200), (64, 43)),
        ("center_crop", (300, 200), (64, 64)),
        ("border", (300, 200), (64, 64)),
        ("border", (40, 20), (64, 64)),
    ],
)
def test_resize_modes_follow_img2dataset(mode, size, expected):
    img = render([0, 0, 1], "red", "circle", "plain", size, "centre")
    out = process(encode(img, "png"), ImagePolicy(image_size=64, resize_mode=mode))
    assert (out.width, out.height) == expected
    assert (out.original_width, out.original_height) == size
    assert Image.open(io.BytesIO(out.data)).size == expected


def test_border_pads_with_black_and_only_if_bigger_keeps_small_images():
    img = render([0, 0, 2], "blue", "square", "plain", (300, 100), "centre")
    out = process(encode(img, "png"), ImagePolicy(image_size=90, resize_mode="border", encode_format="png"))
    arr = np.asarray(Image.open(io.BytesIO(out.data)))
    assert arr.shape == (90, 90, 3) and arr[0, 45].max() == 0 and arr[45, 45].max() > 0
    small = process(
        encode(img.resize((60, 20)), "png"),
        ImagePolicy(image_size=90, resize_mode="keep_ratio", resize_only_if_bigger=True),
    )
    assert (small.width, small.height) == (60, 20)


def test_large_jpeg_is_reduced_to_the_target():
    img = render([0, 0, 3], "green", "star", "striped", (2400, 1600), "centre")
    out = process(encode(img, "jpeg"), ImagePolicy(image_size=64, resize_mode="center_crop"))
    assert (out.width, out.height, out.original_width, out.original_height) == (64, 64, 2400, 1600)


@pytest.mark.parametrize("name", ["aitzgorri", "life", "picosdeeuropa", "sunset"])
def test_a_jpegs_exact_pixels_in_png_or_webp_have_its_pixel_hash(name):
    """exact_pixels does not depend on the format: a PNG/WebP holding exactly the pixels a JPEG
    decodes to is the same image, when the JPEG decodes at full scale (under twice the output:
    a 640x426 photo to 256 px center_crop is resized from 640 px, and reduced as the PNG is)."""
    data = (REPO / "tests/data/photos" / f"{name}.jpg").read_bytes()
    pixels = Image.open(io.BytesIO(data)).convert("RGB")
    policy = ImagePolicy(image_size=256, resize_mode="center_crop")
    jpeg = process(data, policy)
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        pixels.save(buf, fmt, **options)
        copy = process(buf.getvalue(), policy)
        assert (copy.pixel_hash, copy.phash, copy.colour_sig) == (jpeg.pixel_hash, jpeg.phash, jpeg.colour_sig)
        assert copy.window_sig == jpeg.window_sig
    requantised = process(encode(pixels, "jpeg", quality=95), policy)
    assert requantised.pixel_hash != jpeg.pixel_hash  # other pixels: not exact, only near


@pytest.mark.parametrize("name", ["aitzgorri", "life", "picosdeeuropa", "sunset"])
def test_a_dct_scaled_jpeg_is_exact_with_its_coefficients_and_near_its_png(name):
    """A JPEG over twice the output decodes DCT-scaled (a 640 px photo to 96 px: at 1/4), so its
    pixel hash is that of its scaled pixels: equal for every JPEG with the same coefficients (metadata
    added or stripped, as CDNs do), while a PNG of its full-size pixels is a near duplicate."""
    data = (REPO / "tests/data/photos" / f"{name}.jpg").read_bytes()
    policy = ImagePolicy(image_size=96, resize_mode="center_crop")
    jpeg = process(data, policy)
    restamped = process(bench_restamped(data, b"re-served by a CDN"), policy)
    assert (restamped.pixel_hash, restamped.window_sig, restamped.pdq) == (jpeg.pixel_hash, jpeg.window_sig, jpeg.pdq)
    assert restamped.data == jpeg.data  # the same output bytes too
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "PNG")
    png = process(buf.getvalue(), policy)
    assert png.pixel_hash != jpeg.pixel_hash
    # near: within a few bits (dedup.near_threshold is 10) and one colour step
    assert hamming(png.phash, jpeg.phash) <= 6 and colour_distance(png.colour_sig, jpeg.colour_sig) <= 1
    assert (png.width, png.height, png.original_width, png.original_height) == (96, 96, *jpeg_size(data))


def jpeg_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("interpolation", ["area", "cubic"])
@pytest.mark.parametrize("size", [(640, 426), (426, 640), (301, 299), (1000, 200), (97, 400)])
def test_center_crop_resamples_only_what_it_keeps(size, interpolation):
    """center_crop resizes only the region the crop keeps: the crop of the whole resize, within
    rounding (the filter's weights are taken at the region's fractional edges)."""
    img = Image.open(REPO / "tests/data/photos/life.jpg").convert("RGB").resize(size)
    policy = ImagePolicy(image_size=96, resize_mode="center_crop", downscale_interpolation=interpolation)
    w, h = target_size(*img.size, policy)
    whole = img.resize((w, h), INTERPOLATIONS[interpolation], reducing_gap=3.0)
    left, top = (w - 96) // 2, (h - 96) // 2
    expected = np.asarray(whole.crop((left, top, left + 96, top + 96)), dtype=int)
    got = resize(img, policy)
    assert got.size == (96, 96)
    assert np.abs(np.asarray(got, dtype=int) - expected).max() <= 2


def area_mean(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The exact area mean (OpenCV's INTER_AREA) of an (h, w, c) array shrunk to size (w, h): per axis,
    differences of the running sum at the output pixels' fractional edges."""
    out = pixels.astype(np.float64)
    for axis, n in ((0, size[1]), (1, size[0])):
        a = np.moveaxis(out, axis, 0)
        total = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
        edges = np.arange(n + 1) * len(a) / n
        at = np.minimum(np.floor(edges).astype(int), len(a) - 1)
        frac = (edges - at).reshape((-1,) + (1,) * (a.ndim - 1))
        integral = total[at] + frac * (total[at + 1] - total[at])
        out = np.moveaxis((integral[1:] - integral[:-1]) * n / len(a), 0, axis)
    return out


def test_interpolations_follow_img2dataset():
    """Shrinking follows img2dataset's default "area" (OpenCV's INTER_AREA) with Pillow's bilinear: half
    as far from the exact area mean as Pillow's BOX (whole pixels in or out), about as close as bicubic. Growing
    uses lanczos by default; both are settings with img2dataset's names."""
    img = Image.open(REPO / "tests/data/photos/sunset.jpg").convert("RGB")
    area = resize(img, ImagePolicy(image_size=256, resize_mode="keep_ratio"))
    assert area.size == (384, 256)
    exact = area_mean(np.asarray(img), area.size)

    def rms(out: Image.Image) -> float:
        return float(np.sqrt(np.mean((np.asarray(out, dtype=np.float64) - exact) ** 2)))

    box, cubic = (img.resize(area.size, f) for f in (Image.Resampling.BOX, Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(area), np.asarray(img.resize(area.size, Image.Resampling.BILINEAR)))
    assert rms(area) < 0.6 * rms(box) and rms(area) < 1.5 * rms(cubic)
    chosen = resize(img, ImagePolicy(image_size=256, resize_mode="keep_ratio", downscale_interpolation="cubic"))
    assert np.array_equal(np.asarray(chosen), np.asarray(cubic))
    small = Image.fromarray(np.asarray(img)[:64, :48])  # grown
    grown = resize(small, ImagePolicy(image_size=96, resize_mode="keep_ratio"))
    assert np.array_equal(np.asarray(grown), np.asarray(small.resize((96, 128), Image.Resampling.LANCZOS)))
    linear = resize(small, ImagePolicy(image_size=96, resize_mode="keep_ratio", upscale_interpolation="linear"))
    assert np.array_equal(np.asarray(linear), np.asarray(small.resize((96, 128), Image.Resampling.BILINEAR)))


def test_limits_from_the_policy():
    img = encode(render([0, 0, 4], "red", "cross", "plain", (200, 100), "centre"), "jpeg")
    with pytest.raises(ImageRefused, match=r"^200x100 is over 10000 pixels$") as e:
        process(img, ImagePolicy(max_image_area=10_000))
    assert e.value.status == "image_too_large"
    with pytest.raises(ImageRefused) as e:
        process(img, ImagePolicy(allowed_formats=("png",)))
    assert e.value.status == "format_not_allowed"
    with pytest.raises(ImageRefused) as e:
        process(img, ImagePolicy(max_image_pixels=19_999))
    assert e.value.status == "decompression_bomb"


def test_sniffing_uses_bytes_not_names():
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"GIF89a...") == "gif"
    assert sniff_format(b"<html>") is None and sniff_format(b"") is None


# --- dedup signatures -----------------------------------------------------------------------


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & (1 << 64) - 1).count("1")


def test_signatures_survive_re_encoding_and_resizing():
    img = render([0, 0, 5], "orange", "triangle", "dotted", (240, 180), "top left")
    png = process(encode(img, "png"), ImagePolicy())
    jpeg = process(encode(img, "jpeg", quality=50), ImagePolicy())
    small = process(encode(img.resize((192, 144)), "png"), ImagePolicy())
    webp_lossless = io.BytesIO()
    img.save(webp_lossless, "WEBP", lossless=True)
    lossless = process(webp_lossless.getvalue(), ImagePolicy())
    assert lossless.pixel_hash == png.pixel_hash  # same pixels, another encoding
    assert jpeg.pixel_hash != png.pixel_hash
    assert hamming(png.phash, jpeg.phash) <= 2 and hamming(png.phash, small.phash) <= 2
    assert colour_distance(png.colour_sig, jpeg.colour_sig) <= 1
    recoloured = process(
        encode(render([0, 0, 5], "blue", "triangle", "dotted", (240, 180), "top left"), "png"), ImagePolicy()
    )
    assert colour_distance(png.colour_sig, recoloured.colour_sig) >= 4  # pHash alone is blind to colour
    assert -(1 << 63) <= png.phash < 1 << 63 and len(png.colour_sig) == 48 and int(png.colour_sig, 16) >= 0


def test_planted_near_duplicates_are_separable_from_distinct_images(web_root):
    """What the dedup issue builds on: near-dups within (Hamming 8, colour 1) of their original, no distinct pair."""
    rows = pq.read_table(web_root / "catalog.parquet").to_pylist()
    sig = {}
    for r in rows:
        if r["file"] and r["image_id"] >= 0:
            out = process((web_root / "files" / r["file"]).read_bytes(), POLICY)
            sig[r["file"]] = (out.phash, out.colour_sig)
    originals = {r["image_id"]: sig[r["file"]] for r in rows if r["image_id"] >= 0 and r["dup_kind"] is None}
    for r in rows:
        if r["dup_kind"] == "near":
            (p, c), (po, co) = sig[r["file"]], originals[r["image_id"]]
            assert hamming(p, po) <= 8 and colour_distance(c, co) <= 1, r["file"]
    values = list(originals.values())
    close = [
        (i, j)
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if hamming(values[i][0], values[j][0]) <= 8 and colour_distance(values[i][1], values[j][1]) <= 1
    ]
    assert close == []


CRAWL_MEMORY = r"""
import functools, http.server, json, resource, sys, threading, time
from pipeline.crawl import CrawlConfig, crawl_rows

root, count = sys.argv[1], int(sys.argv[2])
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
handler.log_message = lambda *a: None
server = http.server.ThreadingHTTPServer(("127.0.1.9", 0), handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
urls = [f"http://127.0.1.9:{server.server_port}/big.png?copy={i}" for i in range(count)]
config = CrawlConfig(image_size=256, resize_mode="center_crop", threads=count, per_host_concurrency=count,
                     per_host_rps=0, allow_networks=("127.0.1.0/24",), dns=False, robots_txt=False)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() >> 20

before, peak, running = rss_mb(), [0], True
def sample():  # the current RSS every 5 ms: ru_maxrss would also count peaks from before the crawl
    while running:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
outcomes = crawl_rows(urls, config)
running = False
sampler.join()
print(json.dumps([[o.status for o, _ in outcomes], peak[0] - before]))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_crawl_task_over_small_files_of_huge_images_stays_in_bounded_memory(tmp_path):
    # A 6000x6000 RGBA PNG of a few hundred KB: 144 MB once decoded, and the old path held several copies
    # of it (481 MiB peak for one file); 8 threads fetching 8 of them at once must stay under 450 MB.
    y, x = np.mgrid[0:6000, 0:6000]
    pixels = np.stack([x % 256, y % 256, (x // 64) % 256, 128 + (y // 100) % 128], axis=-1).astype(np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "big.png", optimize=False)
    del pixels, x, y
    done = subprocess.run(
        [sys.executable, "-c", CRAWL_MEMORY, str(tmp_path), "8"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    statuses, grown_mb = json.loads(done.stdout.strip().splitlines()[-1])
    assert statuses == ["success"] * 8
    assert grown_mb < 450, f"peak RSS grew by {grown_mb} MB over the crawl"
