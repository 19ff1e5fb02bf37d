"""Caption tokenizer: a byte-level BPE trained with `tokenizers` on the dataset's own captions.

Byte-level, so no caption is ever out of vocabulary (any language, emoji,
stray bytes). Captions are lower-cased and whitespace-collapsed, as CLIP does.
Every sequence is ``<sot> tokens... <eot>`` padded with ``<pad>`` (id 0) to the
context length; a caption that is too long is cut and still ends in ``<eot>``,
so the text encoder can always pool at the EOT position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"


def _normalise(text: str | None) -> str:
    return " ".join((text or "").lower().split())


class Tokenizer:
    """Encode captions to fixed-length id tensors (batch, context_length)."""

    def __init__(self, backend, context_length: int = 32):
        self.backend = backend
        self.context_length = context_length
        self.pad_id = backend.token_to_id(PAD)
        self.sot_id = backend.token_to_id(SOT)
        self.eot_id = backend.token_to_id(EOT)
        if self.pad_id != 0:
            raise AssertionError("<pad> must be id 0")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @classmethod
    def train(cls, captions: Iterable[str | None], vocab_size: int = 4096, context_length: int = 32) -> "Tokenizer":
        """A BPE of `vocab_size` tokens learnt from `captions` (deterministic for the same captions)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, SOT, EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator((_normalise(c) for c in captions), trainer=trainer)
        return cls(backend, context_length)

    def to_bytes(self) -> bytes:
        data = json.loads(self.backend.to_str())
        data["clipline"] = {"context_length": self.context_length}
        return json.dumps(data).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        data = json.loads(raw)
        context_length = data.pop("clipline", {}).get("context_length", 32)
        return cls(Backend.from_str(json.dumps(data)), context_length)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls.from_bytes(Path(path).read_bytes())

    def encode_ids(self, texts: Sequence[str | None]) -> np.ndarray:
        """(len(texts), context_length) int64 ids: <sot> ... <eot> <pad>..."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        encodings = self.backend.encode_batch([_normalise(t) for t in texts], add_special_tokens=False)
        room = self.context_length - 2
        for i, enc in enumerate(encodings):
            ids = enc.ids[:room]
            out[i, 0] = self.sot_id
            out[i, 1 : 1 + len(ids)] = ids
            out[i, 1 + len(ids)] = self.eot_id
        return out

    def __call__(self, texts: Sequence[str | None]) -> torch.Tensor:
        return torch.from_numpy(self.encode_ids(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([i for i in ids if i not in (self.pad_id, self.sot_id, self.eot_id)]).strip()
