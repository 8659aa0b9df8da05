"""The work of `llm prepare` that runs in worker processes: a unit's documents streamed, split
into train and validation, encoded a batch at a time, and written to the unit's token shards,
its record last. Also the process pool that runs such jobs."""
from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np

from llm.config import DataConfig
from llm.data import store
from llm.data.sources import Unit, read_texts
from llm.data.tokenizer import Tokenizer

ENCODE_BATCH_DOCS = 256  # documents encoded at once by a worker: its memory is about this many documents

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs to tokenize one unit (picklable)."""

    data: DataConfig
    unit: Unit
    directory: Path
    max_documents: Optional[int]  # this unit's share of its source's caps; None = no cap
    max_tokens: Optional[int]


def parallel(fn: Callable[[T], R], jobs: list[T], num_proc: int, ordered: bool = False) -> Iterator[R]:
    """fn over jobs in up to num_proc processes (in this one when a single process is enough)."""
    workers = min(num_proc, len(jobs))
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # fork, as datasets.map did before: workers inherit the loaded modules instead of re-importing torch
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, jobs)


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def held_out(unit: int, doc: int, fraction: float) -> bool:
    """Whether document `doc` of unit `unit` is validation: a fixed hash of the pair below `fraction`.

    Independent of the text and of how units are spread over workers and machines. The
    first document of the corpus is always held out, so the validation split is never empty.
    """
    if unit == 0 and doc == 0:
        return True
    mask = (1 << 64) - 1
    x = ((unit << 32) + doc + 0x9E3779B97F4A7C15) & mask  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x >> 11) / float(1 << 53) < fraction


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def documents(job: UnitJob) -> Iterator[tuple[int, str]]:
    """(index in unit, text) of the unit's non-empty documents, up to its document cap."""
    for i, text in enumerate(read_texts(job.data, job.unit)):
        if job.max_documents is not None and i >= job.max_documents:
            return
        if text:
            yield i, text


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Appends token ids to a temporary file; `commit` renames it into place and describes it."""

    def __init__(self, directory: Path, split: str, unit: int, dtype: type):
        self.path = store.shard_path(directory, split, unit)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.dtype = dtype
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def write(self, ids: list[int]) -> None:
        raw = np.asarray(ids, dtype=self.dtype).tobytes()
        self.file.write(raw)
        self.sha.update(raw)
        self.tokens += len(ids)
        self.documents += 1

    def commit(self, directory: Path) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": str(self.path.relative_to(directory)), "tokens": self.tokens,
                "bytes": self.tokens * np.dtype(self.dtype).itemsize, "sha256": self.sha.hexdigest(),
                "documents": self.documents}


def _tokenizer(path: Path) -> tuple[Tokenizer, str]:
    """The tokenizer at `path` and the sha256 of its file, loaded once per process and file version."""
    st = path.stat()
    return _load_tokenizer(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: Path, mtime_ns: int, size: int) -> tuple[Tokenizer, str]:
    """`mtime_ns` and `size` only key the cache: a file replaced at the same path is loaded anew."""
    return Tokenizer.load(path), file_sha256(path)


def _encoded(job: UnitJob, tok: Tokenizer) -> Iterator[tuple[int, list[int]]]:
    """(index in unit, ids + [EOS]) of the unit's documents, encoded a batch at a time."""
    for batch in _batches(documents(job), ENCODE_BATCH_DOCS):
        encoded = tok.sp.encode([text for _, text in batch], num_threads=1)  # one worker, one core
        for (i, _), ids in zip(batch, encoded):
            ids.append(tok.eos_id)
            yield i, ids


def tokenize_unit(job: UnitJob) -> dict:
    """Tokenize one unit into its train and val shards; write its record last; return the record."""
    tok, tokenizer_sha = _tokenizer(job.directory / "tokenizer.model")
    writers = {split: _ShardWriter(job.directory, split, job.unit.index, token_dtype(tok.vocab_size))
               for split in store.SPLITS}
    left = job.max_tokens
    for i, ids in _encoded(job, tok):
        if left is not None and left <= 0:
            break  # the document that crossed the budget was the last one
        writers["val" if held_out(job.unit.index, i, job.data.val_fraction) else "train"].write(ids)
        if left is not None:
            left -= len(ids)
    record = {"unit": job.unit.name, "tokenizer_sha256": tokenizer_sha,
              **{split: w.commit(job.directory) for split, w in writers.items()}}
    store.write_json(store.unit_record_path(job.directory, job.unit.index), record)
    return record
