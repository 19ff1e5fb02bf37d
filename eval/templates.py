"""Prompt templates for zero-shot classification, versioned: a change is a new version, never a silent edit.

eval.json records the version used, so two results are comparable only when it matches.
The generic set follows the CLIP paper's ensemble style (a short selection of its ImageNet templates).
"""

from __future__ import annotations

VERSION = "clipline-templates/1"

GENERIC = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "{}",
)

FASHION = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a product photo of a {}.",
    "{}",
)

SYNTHETIC = (
    "a {}",
    "a photo of a {}",
    "an image of a {}",
    "illustration of a {}",
    "{}",
)

BY_DATASET = {"fashion-mnist": FASHION, "heldout": SYNTHETIC}


def templates_for(dataset: str) -> tuple[str, ...]:
    return BY_DATASET.get(dataset, GENERIC)
