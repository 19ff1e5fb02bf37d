"""Caption tokenizers, both byte-level BPEs run by `tokenizers` (Rust, batched):

- ``clipline``: a BPE trained on the dataset's own captions (`Tokenizer.train`);
  captions are lower-cased and whitespace-collapsed.
- ``openai``: OpenAI CLIP's BPE (49,408 tokens), the tokenizer of every OpenAI
  and most OpenCLIP checkpoints (`Tokenizer.openai`). Its vocabulary is
  ``bpe_simple_vocab_16e6.txt.gz``, the file OpenAI released with CLIP (MIT) as
  shipped in the ``open-clip-torch`` wheel; it is read from this package, never
  downloaded. Captions are cleaned as OpenAI's tokenizer cleans them: ftfy,
  HTML entities unescaped twice, whitespace collapsed, lower-cased.

Byte-level, so no caption is ever out of vocabulary (any language, emoji,
stray bytes). Every sequence is ``<sot> tokens... <eot>`` padded with id 0 to
the context length; a caption that is too long is cut and still ends in
``<eot>``, so the text encoder can always pool at the EOT position. A caption's
own text never becomes a special token: "<|endoftext|>" typed in a caption is
ordinary text (OpenAI's tokenizer would end the caption there).
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
OPENAI_SOT, OPENAI_EOT = "<|startoftext|>", "<|endoftext|>"
OPENAI_VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
OPENAI_MERGES = 49152 - 256 - 2  # the released file holds more merges than CLIP's vocabulary uses
# OpenAI's pre-tokenisation: contractions, runs of letters, single digits, runs of other non-space characters
OPENAI_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _normalise(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def _openai_clean(text: str | None) -> str:
    """OpenAI CLIP's caption clean-up: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text or ""))).split()).lower()


def byte_chars() -> dict[int, str]:
    """The printable character byte-level BPEs (GPT-2, CLIP) stand in for each byte, in vocabulary order:
    printable Latin-1 bytes stand for themselves, the others take the code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in set(printable)]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@functools.lru_cache(maxsize=1)
def _openai_backend():
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    lines = gzip.decompress(OPENAI_VOCAB.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + OPENAI_MERGES]]
    alphabet = list(byte_chars().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [OPENAI_SOT, OPENAI_EOT]
    model = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, end_of_word_suffix="</w>", fuse_unk=False
    )
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(OPENAI_SPLIT), behavior="removed", invert=True),  # keep matches, drop spaces
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return backend  # <sot>/<eot> stay plain vocabulary entries: no caption text can turn into them


class Tokenizer:
    """Encode captions to fixed-length id tensors (batch, context_length)."""

    def __init__(self, backend, context_length: int = 32, kind: str = "clipline"):
        self.backend = backend
        self.context_length = context_length
        self.kind = kind
        if kind == "openai":
            self.pad_id, self.sot_id, self.eot_id = 0, backend.token_to_id(OPENAI_SOT), backend.token_to_id(OPENAI_EOT)
            self.clean = _openai_clean
        else:
            self.pad_id, self.sot_id, self.eot_id = (backend.token_to_id(t) for t in (PAD, SOT, EOT))
            self.clean = _normalise
        if self.pad_id != 0:
            raise AssertionError("<pad> must be id 0")

    @classmethod
    def openai(cls, context_length: int = 77) -> "Tokenizer":
        """OpenAI CLIP's tokenizer (OpenAI and OpenCLIP checkpoints with a 49,408-token vocabulary)."""
        return cls(_openai_backend(), context_length, kind="openai")

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
        """tokenizer.json: the `tokenizers` JSON plus a "clipline" entry; OpenAI's names its kind only."""
        if self.kind == "openai":
            return json.dumps({"clipline": {"kind": "openai", "context_length": self.context_length}}).encode()
        data = json.loads(self.backend.to_str())
        data["clipline"] = {"context_length": self.context_length}
        return json.dumps(data).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        data = json.loads(raw)
        own = data.pop("clipline", {})
        if own.get("kind") == "openai":
            return cls.openai(own.get("context_length", 77))
        return cls(Backend.from_str(json.dumps(data)), own.get("context_length", 32))

    def with_ids_swapped(self, a: int, b: int) -> "Tokenizer":
        """The same tokenizer with token ids `a` and `b` exchanged (export moves <eot> to the highest id)."""
        if self.kind == "openai":
            raise ValueError("OpenAI's vocabulary is fixed")
        data = json.loads(self.backend.to_str())
        swap = {a: b, b: a}
        data["model"]["vocab"] = {t: swap.get(i, i) for t, i in data["model"]["vocab"].items()}
        for token in data.get("added_tokens", []):
            token["id"] = swap.get(token["id"], token["id"])
        from tokenizers import Tokenizer as Backend

        return Tokenizer(Backend.from_str(json.dumps(data)), self.context_length)

    def hf_files(self) -> dict[str, bytes]:
        """vocab.json, merges.txt and tokenizer_config.json for transformers' CLIPTokenizer (OpenAI's BPE only)."""
        if self.kind != "openai":
            raise ValueError("only OpenAI's BPE has a transformers CLIPTokenizer")
        lines = gzip.decompress(OPENAI_VOCAB.read_bytes()).decode("utf-8").split("\n")
        merges = "\n".join(["#version: 0.2", *lines[1 : 1 + OPENAI_MERGES]]) + "\n"
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "bos_token": OPENAI_SOT,
            "eos_token": OPENAI_EOT,
            "unk_token": OPENAI_EOT,
            "pad_token": OPENAI_EOT,
        }
        return {
            "vocab.json": json.dumps(self.backend.get_vocab(), ensure_ascii=False).encode(),
            "merges.txt": merges.encode(),
            "tokenizer_config.json": json.dumps(config).encode(),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls.from_bytes(Path(path).read_bytes())

    def encode_ids(self, texts: Sequence[str | None]) -> np.ndarray:
        """(len(texts), context_length) int64 ids: <sot> ... <eot> <pad>..."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        encodings = self.backend.encode_batch([self.clean(t) for t in texts], add_special_tokens=False)
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
        ids = list(ids)
        ids = ids[: ids.index(self.eot_id)] if self.eot_id in ids else ids  # the padding after <eot> is id 0
        ids = [i for i in ids if i != self.sot_id]
        if self.kind != "openai":
            return self.backend.decode(ids).strip()
        chars = byte_chars()
        text = "".join(self.backend.id_to_token(i) for i in ids).replace("</w>", chars[ord(" ")])
        byte_of = {c: b for b, c in chars.items()}
        return bytes(byte_of[c] for c in text).decode("utf-8", errors="replace").strip()
