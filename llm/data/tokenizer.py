"""A thin wrapper around a sentencepiece model: the one tokenizer that prepare, eval and
generation share, so they agree on ids, EOS and decoding."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from llm.data.errors import DataError


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self.sp = processor
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer {path} not found")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as err:
            raise DataError(f"tokenizer {path}: not a sentencepiece model ({' '.join(str(err).split())})") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()  # -1 if the model defines none

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list, numpy array or tensor); BOS/EOS/pad are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or 'in memory'}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
