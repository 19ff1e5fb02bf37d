"""Checkpoints: saved atomically, loaded with ``weights_only`` (a tampered file is refused, never unpickled).

``RUN/checkpoints/step-{step:08d}.pt`` holds model, optimiser, scheduler and
scaler states, the step, and the data position of every consumer; the pointer
``RUN/checkpoints/latest.json`` is written after the file, so a crash between
the two leaves the previous checkpoint as the latest. Works on a local run
directory and on s3:// (whole-object upload, then the pointer).

Everything that takes a model loads it here (`resolve_checkpoint`, `load_model`):
evaluation, the filter's CLIP score, semantic dedup, the demo.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import tempfile
from pathlib import Path

import torch

from pipeline.errors import ClipError
from pipeline.storage import Storage

log = logging.getLogger(__name__)
DIR = "checkpoints"
LATEST = f"{DIR}/latest.json"


class CheckpointError(ClipError):
    """A checkpoint that cannot or must not be loaded."""


def save(storage: Storage, state: dict, step: int, keep: int = 3) -> str:
    """Write `state` as the checkpoint of `step` and point latest.json at it; keep the last `keep`."""
    rel = f"{DIR}/step-{step:08d}.pt"
    with tempfile.TemporaryDirectory(prefix="clipline-ckpt-") as tmp:
        local = Path(tmp) / "checkpoint.pt"
        torch.save(state, local)
        storage.put_file(local, rel)  # local: temp name + rename; s3: one whole-object upload
    storage.write_json(LATEST, {"checkpoint": rel, "step": step})
    for old in sorted(storage.list(DIR, suffix=".pt"))[:-keep]:
        if old != rel:
            storage.delete(old)
    return rel


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


def resolve_checkpoint(location: str) -> str:
    """A .pt file, or a run directory (its latest checkpoint)."""
    path = Path(location)
    if path.is_dir():
        pointer = path / LATEST
        if not pointer.exists():
            raise ClipError(f"{location}: a run directory without {LATEST}")
        return str(path / json.loads(pointer.read_text())["checkpoint"])
    return location


def load_model(checkpoint_path: str, device="cpu"):
    """(model, tokenizer) from a clipline checkpoint; the tokenizer is the run directory's tokenizer.json."""
    from training.model import CLIP, ModelConfig
    from training.tokenizer import Tokenizer

    state = load(checkpoint_path, map_location=str(device))
    path = Path(checkpoint_path)
    tokenizer_file = next(
        (p / "tokenizer.json" for p in (path.parent, path.parent.parent) if (p / "tokenizer.json").exists()), None
    )
    if tokenizer_file is None:
        raise ClipError(f"{checkpoint_path}: no tokenizer.json beside it or in its run directory")
    tokenizer = Tokenizer.load(tokenizer_file)
    config = ModelConfig(**state["model_config"])
    siglip = "logit_bias" in state["model"] and state["model"]["logit_bias"] is not None
    model = CLIP(config, eot_id=tokenizer.eot_id, siglip=siglip)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer
