"""Checkpoints: saved atomically, loaded with ``weights_only`` (a tampered file is refused, never unpickled).

``RUN/checkpoints/step-{step:08d}.pt`` holds model, optimiser, scheduler and
scaler states, the step, and the data position of every consumer; the pointer
``RUN/checkpoints/latest.json`` is written after the file, so a crash between
the two leaves the previous checkpoint as the latest. Works on a local run
directory and on s3:// (whole-object upload, then the pointer).

Everything that takes a model loads it here (`resolve_checkpoint`, `load_model`):
evaluation, the filter's CLIP score, semantic dedup, fine-tuning, the demo.
Besides clipline's runs it reads public weights (training/pretrained.py):
OpenAI/OpenCLIP files and directories and Hugging Face CLIPModel directories,
local or on s3:// (fetched once per node into a cache keyed by content).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.errors import ClipError
from pipeline.storage import Storage

log = logging.getLogger(__name__)
DIR = "checkpoints"
LATEST = f"{DIR}/latest.json"


class CheckpointError(ClipError):
    """A checkpoint that cannot or must not be loaded."""


def save(storage: Storage, state: dict | bytes, step: int, keep: int = 3) -> str:
    """Write `state` (or its torch.save bytes) as the checkpoint of `step`, point latest.json at it, and keep
    the last `keep`. The pointer is written after the file: a crash in between leaves the previous one."""
    rel = f"{DIR}/step-{step:08d}.pt"
    with tempfile.TemporaryDirectory(prefix="clipline-ckpt-") as tmp:
        local = Path(tmp) / "checkpoint.pt"
        if isinstance(state, bytes):
            local.write_bytes(state)
        else:
            torch.save(state, local)
        storage.put_file(local, rel)  # local: temp name + rename; s3: one whole-object upload
    storage.write_json(LATEST, {"checkpoint": rel, "step": step})
    for old in sorted(storage.list(DIR, suffix=".pt"))[:-keep]:
        if old != rel:
            storage.delete(old)
    return rel


class BackgroundSaver:
    """Checkpoints written while training goes on: the state is serialised in the caller (a copy the next
    step cannot change), then written and uploaded by a thread. One write at a time: a new save waits
    for the previous one; `wait()` (end of training, or an error) lets the last one finish and
    raises what a write raised."""

    def __init__(self, storage: Storage, keep: int):
        self.storage, self.keep = storage, keep
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, state: dict, step: int) -> None:
        self.wait()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()

        def write() -> None:
            try:
                save(self.storage, data, step, self.keep)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self.error = e

        self.thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def latest(storage: Storage) -> str | None:
    """The relative path of the newest complete checkpoint, or None."""
    if not storage.exists(LATEST):
        return None
    rel = storage.read_json(LATEST)["checkpoint"]
    return rel if storage.exists(rel) else None


def load(source: Storage | str | Path, rel: str | None = None, map_location: str = "cpu") -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain containers only (R6)."""
    if isinstance(source, Storage):
        data, name = source.read_bytes(rel), source.url(rel)
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read checkpoint ({e.strerror})") from e
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name}: refused, it holds more than tensors and plain data ({first})") from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{name}: not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})") from e


# --- any checkpoint, anywhere ----------------------------------------------------------------------

# What a model directory can hold (a Hugging Face CLIPModel, an OpenCLIP export, clipline's tokenizer).
MODEL_FILES = (
    "config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin",
    "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "tokenizer.json",
)  # fmt: skip
SIDECARS = ("tokenizer.json", "open_clip_config.json")  # read beside a single weights file


def cache_root() -> Path:
    """Where remote checkpoints are kept on this node: $CLIPLINE_CACHE or ~/.cache/clipline."""
    return Path(os.environ.get("CLIPLINE_CACHE") or Path.home() / ".cache" / "clipline") / "checkpoints"


def _remote_objects(location: str) -> tuple[Storage, list[str], str]:
    """(storage, the objects to fetch, the one that names the model) for a remote checkpoint location."""
    from pipeline.storage import open_storage, split_location

    store = open_storage(location)
    if store.exists(LATEST):  # a run directory
        rel = store.read_json(LATEST)["checkpoint"]
        return store, [rel, "tokenizer.json", LATEST], rel
    if store.exists("config.json") or store.exists("open_clip_config.json"):  # a model directory
        return store, [n for n in MODEL_FILES if store.exists(n)], ""
    parent, name = split_location(location)  # one weights file, and what lies beside it
    if not parent.exists(name):
        raise CheckpointError(f"{location}: no such checkpoint (not a file, a run directory or a model directory)")
    return parent, [name] + [n for n in SIDECARS if n != name and parent.exists(n)], name


def fetch(location: str) -> str:
    """A local path for `location`: itself when local; for s3:// a copy in this node's cache.

    The cache is keyed by a hash of the objects' URLs, ETags and sizes, so every task on a node
    shares one download (a file lock serialises the first fetch) and a changed object is fetched anew.
    """
    if "://" not in location:
        return location
    store, objects, main = _remote_objects(location)
    key = hashlib.sha256(json.dumps([store.url(), [(o, store.version(o)) for o in objects]]).encode()).hexdigest()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key[:32]
    with open(root / f"{key[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            for rel in objects:
                local = target / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                store.get_file(rel, local.with_name(local.name + ".part"))
                local.with_name(local.name + ".part").replace(local)
            (target / ".complete").write_text(location)
            log.info("fetched %s into %s", location, target)
    return str(target / main) if main else str(target)


def resolve_checkpoint(location: str) -> str:
    """The local file (or model directory) a checkpoint location names: a run directory's latest .pt,
    a .pt/.bin/.safetensors file, an OpenCLIP or Hugging Face directory; s3:// is fetched into the cache."""
    path = Path(fetch(location))
    if path.is_dir():
        pointer = path / LATEST
        if pointer.exists():
            return str(path / json.loads(pointer.read_text())["checkpoint"])
        if (path / "config.json").exists() or (path / "open_clip_config.json").exists():
            return str(path)
        raise ClipError(f"{location}: a directory without {LATEST}, config.json or open_clip_config.json")
    if not path.exists():
        raise CheckpointError(f"{location}: no such checkpoint")
    return str(path)


def checkpoint_files(location: str) -> tuple[str, ...]:
    """The local files that define the model at `location` (for lineage: a change to any of them redoes the step)."""
    path = Path(resolve_checkpoint(location))
    if path.is_dir():
        return tuple(str(path / n) for n in MODEL_FILES if (path / n).exists())
    sidecars = (path.parent / n for n in SIDECARS)
    run_tokenizer = path.parent.parent / "tokenizer.json"
    return (str(path), *(str(p) for p in (*sidecars, run_tokenizer) if p.exists()))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_state(path: Path) -> dict:
    """The tensors of a weights file: safetensors, a TorchScript archive (OpenAI's releases; only its tensors
    are read, no code is run), or a torch pickle loaded with weights_only (an OpenCLIP run's `state_dict`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    state = load(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _tokenizer_for(where: Path, vocab_size: int, context_length: int, name: str):
    from training.tokenizer import Tokenizer

    own = where / "tokenizer.json"
    if own.exists() and "clipline" in json.loads(own.read_text()):
        return Tokenizer.load(own)
    if vocab_size == 49408:
        return Tokenizer.openai(context_length)
    raise ClipError(f"{name}: vocabulary of {vocab_size} tokens is not OpenAI's 49,408, and no clipline tokenizer.json")


def _load_pretrained(path: Path, state: dict | None = None):
    """(config, state dict, siglip, tokenizer) of an OpenAI/OpenCLIP file or directory or a Hugging Face directory."""
    from training import pretrained

    name = str(path)
    if path.is_dir() and (path / "config.json").exists():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()), None)
        if weights is None:
            raise CheckpointError(f"{name}: a Hugging Face directory without model.safetensors or pytorch_model.bin")
        state = pretrained.strip_prefixes(read_state(weights))
        config, ours = pretrained.from_hf(
            state, json.loads((path / "config.json").read_text()), name, _read_json(path / "preprocessor_config.json")
        )
        return config, ours, False, _tokenizer_for(path, config.vocab_size, config.context_length, name)
    if path.is_dir():
        weights = next(
            (path / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if (path / n).exists()),
            None,
        )
        if weights is None:
            raise CheckpointError(f"{name}: an OpenCLIP directory without open_clip_model.safetensors")
        path, state = weights, None
    if state is None:
        state = read_state(path)
    state = pretrained.strip_prefixes(state.get("state_dict", state))
    kind = pretrained.detect(state)
    if kind == "hf":
        raise CheckpointError(f"{name}: Hugging Face tensors need their config.json: give the model's directory")
    if kind == "clipline":
        raise CheckpointError(f"{name}: clipline tensors without their run: give the run directory or its .pt")
    cfg = _read_json(path.parent / "open_clip_config.json")
    config, ours, siglip = pretrained.from_openai(state, name, cfg.get("model_cfg", cfg) if cfg else None)
    if cfg and cfg.get("preprocess_cfg"):
        pre = cfg["preprocess_cfg"]
        config = replace(config, image_mean=tuple(pre.get("mean", config.image_mean)),
                         image_std=tuple(pre.get("std", config.image_std)))  # fmt: skip
    return config, ours, siglip, _tokenizer_for(path.parent, config.vocab_size, config.context_length, name)


def load_model(location: str, device="cpu"):
    """(model, tokenizer) from any checkpoint location (see `resolve_checkpoint`), in eval mode on `device`.

    A clipline checkpoint brings its run's tokenizer.json; public weights bring OpenAI's tokenizer
    (or the tokenizer.json clipline's export wrote beside them)."""
    from training.model import CLIP, ModelConfig
    from training.tokenizer import Tokenizer

    path = Path(resolve_checkpoint(location))
    state = None if path.is_dir() or path.suffix == ".safetensors" or _is_torchscript(path) else load(path)
    if isinstance(state, dict) and "model_config" in state:  # clipline's own
        tokenizer_file = next(
            (p / "tokenizer.json" for p in (path.parent, path.parent.parent) if (p / "tokenizer.json").exists()), None
        )
        if tokenizer_file is None:
            raise ClipError(f"{location}: no tokenizer.json beside it or in its run directory")
        tokenizer = Tokenizer.load(tokenizer_file)
        config = ModelConfig(**state["model_config"])
        ours = state["model"]
        siglip = "logit_bias" in ours and ours["logit_bias"] is not None
    else:
        config, ours, siglip, tokenizer = _load_pretrained(path, state)
    model = CLIP(config, eot_id=tokenizer.eot_id, siglip=siglip)
    model.load_state_dict(ours)
    return model.to(device).eval(), tokenizer
