"""The core of bench/dedup_quality.py on four real photos: the transforms, each method's clusters, exact pixels."""

import io

import numpy as np
import pytest
from PIL import Image

from bench.dedup_quality import (
    clipline_matrix,
    clusters,
    colour_residual,
    corpus,
    exact_pixels,
    pdq_matrix,
    scores,
    windows_matrix,
)
from pipeline import images
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


def test_the_windowed_signature_finds_every_copy_and_merges_no_two_photos(bench_corpus):
    _, origin, kind, _, decoded = bench_corpus
    assert len(kind) == 4 * (1 + len(TRANSFORMS))
    same = windows_matrix(decoded)
    assert clusters(same) == groups(origin)  # exactly one cluster a photo, with all its copies
    report = scores(same, origin, kind)
    assert report["recall_min"] == 1.0 and report["false_pairs"] == 0


def test_todays_rule_misses_overlays_and_brightness_and_pdq_the_logo(bench_corpus):
    _, origin, kind, processed, decoded = bench_corpus
    ours = clipline_matrix(processed, threshold=8, tolerance=1)
    recall = scores(ours, origin, kind)["recall"]
    assert recall["jpeg"] == recall["resize"] == recall["png"] == recall["webp"] == 1.0
    assert recall["logo"] < 1.0 and recall["brightness"] < 1.0  # what the windowed signature is for
    assert scores(ours, origin, kind)["false_pairs"] == 0
    pdq, quality = pdq_matrix(decoded)
    assert scores(pdq, origin, kind)["recall"]["png"] == 1.0 and (quality >= 50).all()


def test_exact_pixels_hold_across_formats(bench_corpus):
    _, origin, kind, processed, _ = bench_corpus
    assert exact_pixels(processed, origin, kind) == {
        "jpeg_vs_png_of_its_pixels": {"equal": 4, "of": 4},
        "jpeg_vs_webp_of_its_pixels": {"equal": 4, "of": 4},
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
