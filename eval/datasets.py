"""Evaluation datasets: an image folder, the synthetic web's held-out split, Fashion-MNIST, manifest shards.

Each loader returns an ``EvalSet``: images (decoded lazily, centre-cropped to the
model's size, uint8), integer labels and class names where the set has classes,
and a list of captions per image where it has captions (several per image are
allowed for retrieval).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.evaldata import KINDS, EvalDataError  # noqa: F401 - EvalDataError is this module's error too

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")  # fmt: skip
# The system package's place, then where `make setup` unpacks the same .deb without root.
FASHION_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path(__file__).resolve().parents[1] / ".cache/datasets/usr/share/datasets/fashion-mnist",
)


@dataclass
class EvalSet:
    name: str
    count: int
    load_image: Callable[[int, int], torch.Tensor]  # (index, size) -> uint8 (3, size, size)
    labels: np.ndarray | None = None  # (count,) int
    classnames: tuple[str, ...] = ()
    captions: list[list[str]] | None = None  # per image, one or more
    split: np.ndarray | None = None  # per image "train"/"test" for the linear probe (None: split here)
    meta: dict = field(default_factory=dict)

    def images(self, indices, size: int) -> torch.Tensor:
        return torch.stack([self.load_image(int(i), size) for i in indices])


def _decode(data: bytes, size: int) -> torch.Tensor:
    from pipeline.decode import clip_preprocess

    return clip_preprocess(data, size)


def image_folder(root: str | Path, name: str | None = None) -> EvalSet:
    """root/CLASS_NAME/*.jpg|png (class names from folder names, '_' read as a space)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                files.append(f)
                labels.append(label)
    if not files:
        raise EvalDataError(f"{root}: no images in CLASS_NAME/ folders")
    return EvalSet(
        name or root.name,
        len(files),
        lambda i, size: _decode(files[i].read_bytes(), size),
        labels=np.array(labels),
        classnames=tuple(c.replace("_", " ") for c in classes),
    )


def heldout(root: str | Path) -> EvalSet:
    """The synthetic web's held-out split: labels.parquet (file, label, caption) beside the images."""
    import polars as pl

    root = Path(root)
    if not (root / "labels.parquet").exists():
        raise EvalDataError(f"{root}: no labels.parquet (expected the synthetic web's heldout/ directory)")
    table = pl.read_parquet(root / "labels.parquet").sort("file")
    classes = tuple(sorted(table["label"].unique().to_list()))
    index = {c: i for i, c in enumerate(classes)}
    files = [root / f for f in table["file"]]
    return EvalSet(
        "heldout",
        len(files),
        lambda i, size: _decode(files[i].read_bytes(), size),
        labels=np.array([index[c] for c in table["label"]]),
        classnames=classes,
        captions=[[c] for c in table["caption"]],
    )


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find_fashion_mnist() -> Path | None:
    return next((d for d in FASHION_DIRS if (d / "t10k-images-idx3-ubyte.gz").exists()), None)


def fashion_mnist(root: str | Path | None = None, max_train: int = 10_000, max_test: int = 10_000) -> EvalSet:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (idx files): test split for zero-shot; train+test for
    the linear probe. The first `max_train` / `max_test` images (the files' order is already mixed)."""
    root = Path(root) if root else find_fashion_mnist()
    if root is None or not (root / "t10k-images-idx3-ubyte.gz").exists():
        raise EvalDataError("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or `make setup`)")
    train_x = _idx(root / "train-images-idx3-ubyte.gz")[:max_train]
    train_y = _idx(root / "train-labels-idx1-ubyte.gz")[:max_train]
    test_x = _idx(root / "t10k-images-idx3-ubyte.gz")[:max_test]
    test_y = _idx(root / "t10k-labels-idx1-ubyte.gz")[:max_test]
    pixels = np.concatenate([train_x, test_x])

    def load(i: int, size: int) -> torch.Tensor:
        grey = torch.from_numpy(pixels[i].copy()).float()[None, None]  # (1, 1, 28, 28)
        up = torch.nn.functional.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
        return up[0].round().clamp(0, 255).to(torch.uint8).expand(3, size, size).contiguous()

    return EvalSet(
        "fashion-mnist",
        len(pixels),
        load,
        labels=np.concatenate([train_y, test_y]).astype(np.int64),
        classnames=FASHION_CLASSES,
        split=np.array(["train"] * len(train_x) + ["test"] * len(test_x)),
    )


def manifest_captions(location: str, max_samples: int = 5000) -> EvalSet:
    """Image-caption pairs from a clipline manifest's shards (for retrieval); captions grouped by image sha256."""
    from pipeline.formats import group_samples, image_member, iter_tar_members
    from pipeline.manifest import read_manifest

    manifest = read_manifest(location, allow_superseded=True)
    images, captions, by_hash = [], [], {}
    for shard in manifest.shards:
        rows = manifest.storage.read_parquet(shard["parquet"], columns=["key", "caption", "sha256"]).to_pylist()
        meta = {r["key"]: r for r in rows}
        with manifest.storage.open_read(shard["tar"]) as f:
            for key, members in group_samples(iter_tar_members(f)):
                image = image_member(members)
                if image is None or key not in meta:
                    continue
                h = meta[key]["sha256"] or key
                if h in by_hash:
                    captions[by_hash[h]].append(meta[key]["caption"] or "")
                    continue
                by_hash[h] = len(images)
                images.append(image)
                captions.append([meta[key]["caption"] or ""])
                if len(images) >= max_samples:
                    break
        if len(images) >= max_samples:
            break
    return EvalSet("manifest", len(images), lambda i, size: _decode(images[i], size), captions=captions)


def load(spec: str) -> EvalSet:
    """'name=PATH' or 'PATH': heldout, fashion-mnist, a manifest.json, an image folder, a CLIP_benchmark
    webdataset directory; or '[NAME=]clip_benchmark:PATH', 'folders:PATH', 'karpathy:JSON:IMAGES'."""
    from eval.benchmark import eval_set
    from pipeline.evaldata import read_spec

    head = spec.split(":", 1)[0].rpartition("=")[2]
    if head in KINDS:
        return eval_set(read_spec(spec))
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    if (
        "://" not in path
        and (Path(path) / "test").is_dir()
        and any((Path(path) / f).exists() for f in ("classnames.txt", "dataset_type.txt"))
    ):
        return eval_set(read_spec({"kind": "clip_benchmark", "path": path, "name": name or None}))
    if name == "fashion-mnist" or (not name and path == "fashion-mnist"):
        return fashion_mnist(None if path == "fashion-mnist" else path)
    if name == "heldout" or (Path(path) / "labels.parquet").exists():
        return heldout(path)
    if path.endswith(".json"):
        return manifest_captions(path)
    if not Path(path).is_dir():
        raise EvalDataError(f"eval dataset {spec!r}: no such directory or manifest")
    return image_folder(path, name or None)
