"""The core of bench/dedup_quality.py on four real photos: the transforms, each method's clusters, exact pixels."""

import io

import numpy as np
import pytest
from PIL import Image

from bench.dedup_quality import clipline_matrix, clusters, corpus, exact_pixels, legacy_matrix, pdq_matrix, scores
from pipeline import images
from pipeline.dedup.index import colour_residual
from tests.conftest import REPO

PHOTOS = [Image.open(p).convert("RGB") for p in sorted((REPO / "tests/data/photos").glob("*.jpg"))]
TRANSFORMS = ("jpeg", "resize", "brightness", "caption", "logo", "png", "webp")


@pytest.fixture(scope="module")
def bench_corpus():
    data, origin, kind = corpus(PHOTOS, transforms=TRANSFORMS)
    processed = [images.process(d, images.ImagePolicy(image_size=256)) for d in data]
    decoded = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    return data, origin, kind, processed, decoded


def groups(origin: np.ndarray) -> list[list[int]]:
    return sorted(np.flatnonzero(origin == o).tolist() for o in np.unique(origin))


def test_the_dedup_stage_finds_every_copy_and_merges_no_two_photos(bench_corpus, tmp_path):
    _, origin, kind, processed, _ = bench_corpus
    assert len(kind) == 4 * (1 + len(TRANSFORMS))
    same = clipline_matrix(processed, tmp_path / "windows")  # the dedup stage itself, inline
    assert clusters(same) == groups(origin)  # exactly one cluster a photo, with all its copies
    report = scores(same, origin, kind)
    assert report["recall_min"] == 1.0 and report["false_pairs"] == 0
    whole = scores(clipline_matrix(processed, tmp_path / "whole", near_windows=1), origin, kind)
    assert whole["recall"]["logo"] < 1.0 and whole["false_pairs"] == 0  # the windows are what finds the logos


def test_window_zero_is_the_whole_image(bench_corpus):
    """Window 0 is the whole image: `phash` is its pHash."""
    _, _, _, processed, _ = bench_corpus
    for p in processed:
        assert len(p.window_sig) == len(images.WINDOWS) * images.WINDOW_BYTES
        assert int.from_bytes(p.window_sig[:8], "big", signed=True) == p.phash


def test_the_old_rule_misses_overlays_and_brightness_and_pdq_the_logo(bench_corpus):
    _, origin, kind, processed, decoded = bench_corpus
    ours = legacy_matrix(processed)
    recall = scores(ours, origin, kind)["recall"]
    assert recall["jpeg"] == recall["resize"] == recall["png"] == recall["webp"] == 1.0
    assert recall["logo"] < 1.0 and recall["brightness"] < 1.0  # what the windowed signature is for
    assert scores(ours, origin, kind)["false_pairs"] == 0
    pdq, quality = pdq_matrix(decoded)
    assert scores(pdq, origin, kind)["recall"]["png"] == 1.0 and (quality >= 50).all()


def test_exact_pixels_hold_across_formats_and_coefficients(bench_corpus):
    """At 256 px (border) the 640x426 originals decode at 1/2 scale: a copy with the same coefficients
    is exact, a PNG of the full-size pixels is not (it is found as near, above). At 256 px center_crop
    they decode at full scale, and the PNG and WebP copies are exact too."""
    data, origin, kind, processed, _ = bench_corpus
    assert exact_pixels(data, processed, origin, kind, images.ImagePolicy(image_size=256)) == {
        "jpeg_same_coefficients": {"equal": 4, "of": 4},
        "jpeg_vs_png_of_its_pixels": {"equal": 0, "of": 4, "full_scale": 0},
        "jpeg_vs_webp_of_its_pixels": {"equal": 0, "of": 4, "full_scale": 0},
    }
    policy = images.ImagePolicy(image_size=256, resize_mode="center_crop")
    full = [images.process(d, policy) for d in data]
    assert exact_pixels(data, full, origin, kind, policy) == {
        "jpeg_same_coefficients": {"equal": 4, "of": 4},
        "jpeg_vs_png_of_its_pixels": {"equal": 4, "of": 4, "full_scale": 4},
        "jpeg_vs_webp_of_its_pixels": {"equal": 4, "of": 4, "full_scale": 4},
    }


def test_colour_residual_fits_brightness_and_contrast_but_not_another_picture():
    rng = np.random.default_rng(0)
    a = rng.uniform(30, 220, (1, 16, 3))
    brighter = np.clip(a * 1.15 + 10, 0, 255)
    overlaid = a.copy()
    overlaid[0, :2] = 255  # two cells under a white logo
    other = rng.uniform(30, 220, (1, 16, 3))
    got = colour_residual(np.concatenate([brighter, overlaid, other]), np.concatenate([a, a, a]))
    assert got[0] < 1e-6 and got[1] < 1e-6 and got[2] > 20
