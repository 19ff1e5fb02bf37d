"""Evaluation datasets as stored bytes (ground floor): what `clipline eval` scores and what the filter's
decontamination keeps out of training sets, read the same way by both.

Layouts (local or s3://):

- **CLIP_benchmark's webdataset layout**: ``classnames.txt``,
  ``zeroshot_classification_templates.txt`` (optional), ``dataset_type.txt``
  (``retrieval`` for caption sets; classification otherwise) and
  ``test/*.tar`` whose samples hold an image (``.webp``, ``.png``, ``.jpg``,
  ``.jpeg``) and a ``.cls`` label (classification) or ``.txt`` captions, one a
  line (retrieval). ``train/*.tar`` beside it, when present, is the linear
  probe's training split.
- **ImageNet-style class folders** (``root/CLASS/*.JPEG``): 1,000 WordNet-id
  folders (``n01440764``...) are ImageNet-1k, named with OpenAI's class names
  and its 80 prompt templates (from the CLIP release, as CLIP_benchmark ships
  them: ``eval/data/``); any other folder names its classes in a
  ``classnames.txt`` (one a line, in sorted folder order) or by its folder names.
- **COCO / Flickr30k retrieval**: a Karpathy-split JSON (``images[].filename``,
  ``filepath``, ``split``, ``sentences[].raw``) and the image folder; the
  ``test`` split, 5 captions an image.

A dataset is named by a spec: ``clip_benchmark:PATH``, ``folders:PATH``,
``karpathy:JSON:IMAGES``, each optionally ``NAME=`` first, or a suite entry
(a dict with ``kind``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import ClipError

DATA = Path(__file__).resolve().parents[1] / "eval" / "data"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
WNID = re.compile(r"n\d{8}")
KINDS = ("clip_benchmark", "folders", "karpathy")


class EvalDataError(ClipError):
    """An evaluation dataset is missing or malformed."""


@dataclass
class RawSet:
    """An evaluation dataset's images as bytes, with its labels or captions."""

    name: str
    count: int
    read: Callable[[int], bytes]  # image i's stored bytes
    labels: np.ndarray | None = None
    classnames: tuple[str, ...] = ()
    captions: list[list[str]] | None = None
    templates: tuple[str, ...] | None = None  # the dataset's own prompt templates ("a photo of a {}.")
    split: np.ndarray | None = None  # "train"/"test" per image, when the layout has a train split
    identity: str = ""  # changes when the stored dataset does (the feature cache's key)
    meta: dict = field(default_factory=dict)


def imagenet_classnames() -> tuple[str, ...]:
    return tuple((DATA / "imagenet1k_classnames.txt").read_text().splitlines())


def imagenet_templates() -> tuple[str, ...]:
    return tuple(t.replace("{c}", "{}") for t in (DATA / "imagenet1k_templates.txt").read_text().splitlines())


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _text(store, rel: str) -> str | None:
    return store.read_bytes(rel).decode("utf-8") if store.exists(rel) else None


def _samples(store, tars: list[str]):
    """(key, {ext: bytes}) of every sample of the tars, in order: the loader's own tar reading and grouping by
    key (pipeline/formats.py), extensions lower-cased."""
    from pipeline.formats import group_samples, iter_tar_members

    for rel in tars:
        with store.open_read(rel) as f:
            for key, members in group_samples(iter_tar_members(f)):
                yield key, {ext.lower(): data for ext, data in members.items()}


def clip_benchmark_wds(location: str, name: str | None = None, split: str = "test") -> RawSet:
    """A dataset in CLIP_benchmark's webdataset layout; `split` test (and train, for the linear probe)."""
    from pipeline.storage import open_storage

    store = open_storage(location)
    name = name or location.rstrip("/").rsplit("/", 1)[-1].removeprefix("wds_")
    kind = (_text(store, "dataset_type.txt") or "classification").strip().lower()
    tars = sorted(store.list(split, suffix=".tar"))
    if not tars:
        raise EvalDataError(f"{location}: no {split}/*.tar (CLIP_benchmark's webdataset layout)")
    classnames: tuple[str, ...] = ()
    templates = None
    if kind != "retrieval":
        text = _text(store, "classnames.txt")
        if text is None:
            raise EvalDataError(f"{location}: classnames.txt is missing (a classification set needs it)")
        classnames = tuple(line.strip() for line in text.splitlines() if line.strip())
        found = _text(store, "zeroshot_classification_templates.txt")
        if found:
            templates = tuple(t.strip().replace("{c}", "{}") for t in found.splitlines() if t.strip())
    images, labels, captions = [], [], []
    for key, members in _samples(store, tars):
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            continue
        if kind == "retrieval":
            captions.append([c for c in members.get("txt", b"").decode("utf-8").splitlines() if c.strip()])
        else:
            if "cls" not in members:
                raise EvalDataError(f"{location}: sample {key} has no .cls label")
            label = int(members["cls"].decode().strip())
            if not 0 <= label < len(classnames):
                raise EvalDataError(
                    f"{location}: sample {key} has class {label}, outside classnames.txt's {len(classnames)}"
                )
            labels.append(label)
        images.append(image)
    identity = _digest("clip_benchmark", location, split, [(t, store.version(t)) for t in tars])
    return RawSet(name, len(images), images.__getitem__, np.array(labels, dtype=np.int64) if labels else None,
                  classnames, captions if kind == "retrieval" else None, templates, identity=identity,
                  meta={"layout": "clip_benchmark", "location": location})  # fmt: skip


def with_train_split(test: RawSet, location: str) -> RawSet:
    """The test set plus CLIP_benchmark's train/ tars when the layout has them: the linear probe's splits."""
    from pipeline.storage import open_storage

    if test.labels is None or not open_storage(location).list("train", suffix=".tar"):
        return test
    train = clip_benchmark_wds(location, test.name, split="train")
    n = train.count
    return RawSet(test.name, n + test.count, lambda i: train.read(i) if i < n else test.read(i - n),
                  np.concatenate([train.labels, test.labels]), test.classnames, None, test.templates,
                  np.array(["train"] * n + ["test"] * test.count), _digest(train.identity, test.identity),
                  test.meta)  # fmt: skip


def _versions(store, files: list[str]) -> list:
    """What identifies the stored files: size and mtime of local ones; on s3:// their names (a request per
    object would cost more than the features it saves)."""
    if store.url().startswith("s3://"):
        return files
    return [(f, store.version(f)) for f in files]


def class_folders(root: str | Path, name: str | None = None) -> RawSet:
    """ImageNet-style class folders (local or s3://): ImageNet-1k's names and templates for its 1,000 WordNet-id
    folders; else the names of classnames.txt, or of the folders."""
    from pipeline.storage import open_storage

    store = open_storage(str(root))
    listing = store.list() if "://" in str(root) or Path(root).is_dir() else []
    by_folder: dict[str, list[str]] = {}
    for rel in listing:
        folder, _, file = rel.partition("/")
        if file and "/" not in file:
            by_folder.setdefault(folder, [])
            if file.rpartition(".")[2].lower() in IMAGE_EXTS:
                by_folder[folder].append(rel)
    if "://" not in str(root) and Path(root).is_dir():  # empty class folders count as classes too
        for p in Path(root).iterdir():
            if p.is_dir():
                by_folder.setdefault(p.name, [])
    folders = sorted(by_folder)
    if not folders:
        raise EvalDataError(f"{root}: no class folders")
    templates = None
    names_file = _text(store, "classnames.txt")
    if len(folders) == 1000 and all(WNID.fullmatch(f) for f in folders):
        classnames, templates, name = imagenet_classnames(), imagenet_templates(), name or "imagenet1k"
    elif names_file is not None:
        classnames = tuple(x.strip() for x in names_file.splitlines() if x.strip())
        if len(classnames) != len(folders):
            raise EvalDataError(f"{root}: classnames.txt names {len(classnames)} classes, there are {len(folders)}")
    else:
        classnames = tuple(f.replace("_", " ") for f in folders)
    files = [rel for folder in folders for rel in sorted(by_folder[folder])]
    labels = [label for label, folder in enumerate(folders) for _ in by_folder[folder]]
    identity = _digest("folders", store.url(), _versions(store, files))
    return RawSet(name or str(root).rstrip("/").rsplit("/", 1)[-1], len(files), lambda i: store.read_bytes(files[i]),
                  np.array(labels, dtype=np.int64), classnames, None, templates, identity=identity,
                  meta={"layout": "folders"})  # fmt: skip


def karpathy(json_path: str | Path, images: str | Path, name: str | None = None, split: str = "test") -> RawSet:
    """COCO / Flickr30k retrieval (local or s3://): a Karpathy-split JSON and its image folder (the `split` images
    and their captions)."""
    from pipeline.storage import open_storage, split_location

    meta_store, meta_rel = split_location(str(json_path))
    if not meta_store.exists(meta_rel):
        raise EvalDataError(f"{json_path}: no such Karpathy-split JSON")
    data = json.loads(meta_store.read_bytes(meta_rel))
    store = open_storage(str(images))
    files, captions = [], []
    for entry in data.get("images", []):
        if entry.get("split") != split:
            continue
        files.append("/".join(p for p in (entry.get("filepath", ""), entry["filename"]) if p))
        captions.append([s["raw"].strip() for s in entry.get("sentences", [])])
    if not files:
        raise EvalDataError(f"{json_path}: no images in the '{split}' split")
    present = set(store.list())  # one listing, not a request an image
    missing = [f for f in files if f not in present]
    if missing:
        raise EvalDataError(f"{json_path}: {len(missing)} images not found under {images}, e.g. {missing[0]}")
    identity = _digest("karpathy", meta_store.url(meta_rel), meta_store.version(meta_rel), _versions(store, files))
    stem = str(json_path).rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return RawSet(name or stem.removeprefix("dataset_"), len(files), lambda i: store.read_bytes(files[i]),
                  captions=captions, identity=identity, meta={"layout": "karpathy"})  # fmt: skip


def parse_spec(spec: str | dict) -> dict:
    """'[NAME=]KIND:PATH' (karpathy: 'KIND:JSON:IMAGES') or a suite entry, as a suite entry."""
    if isinstance(spec, dict):
        return spec
    name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    kind, _, path = rest.partition(":")
    if kind not in KINDS or not path:
        raise EvalDataError(f"dataset spec {spec!r}: expected [NAME=]{{{'|'.join(KINDS)}}}:PATH")
    entry = {"kind": kind, "name": name or None}
    if kind == "karpathy":
        json_path, _, images = path.partition(":")
        entry.update(json=json_path, images=images)
    else:
        entry["path"] = path
    return entry


def read_spec(spec: str | dict) -> RawSet:
    """The dataset a spec names (see the module docstring)."""
    entry = parse_spec(spec)
    kind, name = entry.get("kind"), entry.get("name")
    if kind == "clip_benchmark":
        return with_train_split(clip_benchmark_wds(entry["path"], name), entry["path"])
    if kind == "folders":
        return class_folders(entry["path"], name)
    if kind == "karpathy":
        return karpathy(entry["json"], entry["images"], name, entry.get("split", "test"))
    raise EvalDataError(f"dataset {name!r}: unknown kind {kind!r} ({', '.join(KINDS)})")


def write_clip_benchmark_wds(root: str | Path, splits: dict[str, list[tuple[bytes, str, int | list[str]]]],
                             classnames: tuple[str, ...] = (), templates: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Write a dataset in CLIP_benchmark's webdataset layout: per split, samples (image bytes, extension, class
    index or captions) into SPLIT/0.tar with nshards.txt; classnames.txt and templates ("{}" written as "{c}");
    dataset_type.txt says retrieval when the samples carry captions."""
    from pipeline.formats import TarWriter

    root = Path(root)
    retrieval = any(isinstance(s[2], list) for samples in splits.values() for s in samples)
    for split, samples in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with TarWriter(root / split / "0.tar") as tar:
            for i, (image, ext, target) in enumerate(samples):
                label = "\n".join(target) if isinstance(target, list) else str(target)
                tar.add(f"s{i:07d}", {ext: image, "txt" if retrieval else "cls": label.encode()})
        (root / split / "nshards.txt").write_text("1\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates)
                                                                     + "\n")  # fmt: skip
    return root
