"""Data pipeline: corpus → sentencepiece tokenizer + sharded token files (`prepare`), and the
deterministic, resumable, data-parallel batch reader over them (`TokenLoader`)."""
from llm.data.errors import DataError
from llm.data.loader import TokenLoader
from llm.data.prepare import data_dir, is_prepared, prepare
from llm.data.store import read_manifest
from llm.data.tokenizer import Tokenizer

__all__ = ["DataError", "TokenLoader", "Tokenizer", "data_dir", "is_prepared", "prepare", "read_manifest"]
