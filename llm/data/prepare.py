"""Corpus → tokenizer + sharded token files, in parallel, resumable, splittable over machines.

`prepare(cfg)` writes into `cfg.data.cache_dir/<fingerprint>/` (layout in `llm/data/store.py`):

1. the corpus is cut into units (one per local file or hub stream shard, `sources.py`);
2. a sentencepiece BPE tokenizer is trained once on a bounded sample (the first
   `tokenizer_sample_chars / units` characters of each unit's training documents), or
   `data.tokenizer` is copied; training is deterministic, so machines that race to it write
   the same bytes;
3. `data.num_proc` worker processes each stream one unit at a time — read, encode, append to
   its train/val shard — holding only one batch of documents; a unit's files are renamed
   into place and its record written only when it is complete;
4. once every unit is recorded, manifest.json is written: the directory is complete.

A killed prepare loses only the units in flight; running it again redoes those and writes
byte-identical files. `shard=(i, n)` does units i, i+n, i+2n, ...: machines sharing the
directory each take a part, and the last one (or a plain prepare afterwards) writes the
manifest without re-tokenizing anything.

The fingerprint hashes everything the files depend on (corpus files and their sizes and
mtimes, text field, limits, tokenizer settings, validation fraction) and nothing they do
not (seq_len, batch sizes, num_proc), so experiments that share data share the directory.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from llm.config import Config, DataConfig
from llm.data import store
from llm.data.errors import DataError
from llm.data.sources import Source, Unit, one_line, plan_units, read_texts, resolve_corpus
from llm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Fixed ids so that every tokenizer this project trains agrees on them.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
SPM_OPTIONS = {
    "model_type": "bpe",
    "byte_fallback": True,  # any UTF-8 text encodes without <unk>
    "normalization_rule_name": "identity",  # decode(encode(text)) == text
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "character_coverage": 0.9995,
    "num_threads": 4,  # fixed, not data.num_proc: the trained model differs with the thread count
    **SPECIAL_IDS,
}
MAX_SENTENCE_CHARS = 16_384  # training lines are cut to this; sentencepiece drops longer ones
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


# ---------------------------------------------------------------------------- locating

def data_dir(cfg: Config) -> Path:
    """Where `prepare(cfg)` puts (or has put) its files; does not prepare anything."""
    return Path(cfg.data.cache_dir) / fingerprint(cfg)


def is_prepared(cfg: Config) -> bool:
    return store.is_complete(data_dir(cfg))


def fingerprint(cfg: Config, sources: list[Source] | None = None) -> str:
    """16 hex digits of a hash of everything the prepared files depend on."""
    data = cfg.data
    tokenizer: dict = {"vocab_size": cfg.model.vocab_size}
    if data.tokenizer:
        path = Path(data.tokenizer)
        if not path.is_file():
            raise DataError(f"data.tokenizer={data.tokenizer}: file not found")
        tokenizer["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        tokenizer.update(SPM_OPTIONS, sample_chars=data.tokenizer_sample_chars, max_line=MAX_SENTENCE_CHARS)
    corpus = []
    for source in sources if sources is not None else resolve_corpus(data):
        if source.is_hub:
            corpus.append({"hub": source.spec, "split": data.hub_split})
        else:
            corpus.append({"spec": source.spec, "files": [_file_stamp(f) for f in source.files]})
    key = {
        "format": store.FORMAT_VERSION,
        "corpus": corpus,
        "text_field": data.text_field,
        "max_documents": data.max_documents,
        "max_tokens": data.max_tokens,
        "weights": data.weights,
        "val_fraction": data.val_fraction,
        "tokenizer": tokenizer,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) as (I, N)."""
    index, sep, count = text.partition("/")
    if sep and index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise DataError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 .. 3/4")


# ---------------------------------------------------------------------------- preparing

def prepare(cfg: Config, shard: tuple[int, int] = (0, 1)) -> Path:
    """Finish the data directory for `cfg` (part `shard` = (i, n) of its units); return its path."""
    t0 = time.time()
    sources = resolve_corpus(cfg.data)
    out = Path(cfg.data.cache_dir) / fingerprint(cfg, sources)
    if store.is_complete(out):
        log.info("data ready at %s (prepared before)", out)
        return out
    jobs = _jobs(cfg.data, plan_units(cfg.data, sources), out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_sha = _ensure_tokenizer(cfg, jobs, out / "tokenizer.model")
    index, count = shard
    finished = {j.unit.index for j in jobs if _unit_record(out, j.unit.index, tokenizer_sha) is not None}
    if finished:
        log.info("%d of %d units already tokenized (resuming)", len(finished), len(jobs))
    tokens = _tokenize_units([j for j in jobs if j.unit.index % count == index and j.unit.index not in finished],
                             cfg.data.num_proc)
    records = [_unit_record(out, j.unit.index, tokenizer_sha) for j in jobs]
    seconds = time.time() - t0
    if any(r is None for r in records):
        log.info("part %d/%d done in %.1fs (%s tokens); %d of %d units still to do by other parts, then "
                 "`llm prepare` without --shard completes %s", index, count, seconds, f"{tokens:,}",
                 sum(r is None for r in records), len(jobs), out)
        return out
    manifest = _manifest(cfg, sources, jobs, records, out)
    store.write_json(out / store.MANIFEST, manifest)
    for leftover in out.glob("*/*.tmp-*"):  # from killed runs; every unit is recorded now
        leftover.unlink(missing_ok=True)
    log.info("data ready at %s: %s train / %s val tokens (%s) in %.1fs", out, f"{manifest['train_tokens']:,}",
             f"{manifest['val_tokens']:,}", manifest["dtype"], seconds)
    return out


def _ensure_tokenizer(cfg: Config, jobs: list[UnitJob], path: Path) -> str:
    """Train (or copy data.tokenizer) into `path` unless it is there; return the file's sha256."""
    given = _check_given_tokenizer(cfg)
    if given is None:
        _train_tokenizer(cfg, jobs, path)
    elif not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(given.path, tmp)
        _publish_once(tmp, path)
    return _file_sha256(path)


def _tokenize_units(todo: list[UnitJob], num_proc: int) -> int:
    """Tokenize `todo` in up to num_proc processes, with a progress bar; return the tokens written."""
    tokens = 0
    with tqdm(total=len(todo), desc="tokenize", unit="unit", disable=not todo) as bar:
        for record in _parallel(_tokenize_unit, todo, num_proc):
            tokens += record["train"]["tokens"] + record["val"]["tokens"]
            bar.update()
            bar.set_postfix_str(f"{tokens:,} tokens")
    return tokens


def _jobs(data: DataConfig, units: list[Unit], out: Path) -> list[UnitJob]:
    """One job per unit, with its share of its source's document cap and token budget."""
    n_sources = len(data.corpus)
    weights = data.weights or [1.0] * n_sources
    token_budget = [int(data.max_tokens * w / sum(weights)) for w in weights] if data.max_tokens else None
    per_source = [[u for u in units if u.source == s] for s in range(n_sources)]
    jobs = []
    for s, members in enumerate(per_source):
        for j, unit in enumerate(members):
            jobs.append(UnitJob(
                data, unit, out,
                max_documents=_share(data.max_documents, len(members), j) if data.max_documents else None,
                max_tokens=_share(token_budget[s], len(members), j) if token_budget else None))
    return jobs


def _share(total: int, parts: int, j: int) -> int:
    """Part j of `total` split as evenly as integers allow."""
    return total // parts + (j < total % parts)


def _parallel(fn: Callable[[T], R], jobs: list[T], num_proc: int, ordered: bool = False) -> Iterator[R]:
    """fn over jobs in up to num_proc processes (in this one when a single process is enough)."""
    workers = min(num_proc, len(jobs))
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # fork, as datasets.map did before: workers inherit the loaded modules instead of re-importing torch
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, jobs)


def _unit_record(directory: Path, unit: int, tokenizer_sha: str) -> Optional[dict]:
    """The record of a finished unit whose files are intact and were written with this directory's
    tokenizer; else None (the unit is to be redone)."""
    path = store.unit_record_path(directory, unit)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("tokenizer_sha256") != tokenizer_sha:
        return None
    for split in store.SPLITS:
        shard = directory / record[split]["file"]
        if not shard.is_file() or shard.stat().st_size != record[split]["bytes"]:
            return None
    return record


def _manifest(cfg: Config, sources: list[Source], jobs: list[UnitJob], records: list[dict], out: Path) -> dict:
    data = cfg.data
    totals = {f"{split}_{what}": sum(r[split][what] for r in records)
              for split in store.SPLITS for what in ("tokens", "documents")}
    n_docs = totals["train_documents"] + totals["val_documents"]
    if n_docs == 0:
        raise DataError(f"data.corpus {data.corpus}: no documents found (empty corpus)")
    if n_docs < 2:
        raise DataError(f"data.corpus {data.corpus}: only 1 document; need at least 2 to hold one out "
                        f"for validation (a .txt file is one document; jsonl/parquet hold one per row)")
    if totals["train_tokens"] == 0:
        raise DataError(f"data.corpus {data.corpus}: every train document is empty")
    per_source = []
    for s, source in enumerate(sources):
        mine = [r for j, r in zip(jobs, records) if j.unit.source == s]
        per_source.append({"spec": source.spec, "units": len(mine),
                           "tokens": sum(r[split]["tokens"] for r in mine for split in store.SPLITS)})
        budget = sum(j.max_tokens or 0 for j in jobs if j.unit.source == s)
        if budget and per_source[-1]["tokens"] < budget:
            log.warning("%s gave %s tokens, less than its budget of %s: the mixture is off its weights",
                        source.spec, f"{per_source[-1]['tokens']:,}", f"{budget:,}")
    tok = Tokenizer.load(out / "tokenizer.model")
    return {
        "format": store.FORMAT_VERSION,
        "fingerprint": out.name,
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "tokenizer": str(data.tokenizer) if data.tokenizer else "trained",
        "tokenizer_sha256": records[0]["tokenizer_sha256"],
        "corpus": list(data.corpus),
        "text_field": data.text_field,
        "val_fraction": data.val_fraction,
        "max_documents": data.max_documents,
        "max_tokens": data.max_tokens,
        "weights": data.weights,
        "sources": per_source,
        **totals,
        "shards": {split: [{"unit": r["unit"], **r[split]} for r in records] for split in store.SPLITS},
    }


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


def _check_given_tokenizer(cfg: Config) -> Tokenizer | None:
    if not cfg.data.tokenizer:
        return None
    tok = Tokenizer.load(cfg.data.tokenizer)
    if tok.vocab_size != cfg.model.vocab_size:
        raise DataError(f"data.tokenizer={cfg.data.tokenizer} has {tok.vocab_size} tokens but "
                        f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size}")
    if tok.eos_id < 0:
        raise DataError(f"data.tokenizer={cfg.data.tokenizer} defines no EOS token (needed between documents)")
    return tok


def _publish_once(tmp: Path, dst: Path) -> None:
    """Move `tmp` to `dst` unless another process (or machine) published `dst` first: the first one wins."""
    try:
        os.link(tmp, dst)  # atomic, and fails if dst exists
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- documents

def _documents(job: UnitJob) -> Iterator[tuple[int, str]]:
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


# ---------------------------------------------------------------------------- tokenizer

def _train_tokenizer(cfg: Config, jobs: list[UnitJob], path: Path) -> None:
    """BPE on up to tokenizer_sample_chars of training text, an equal share from the head of each unit."""
    if path.is_file():
        return  # trained by an earlier or a parallel prepare of the same directory
    t0 = time.time()
    share = max(1, cfg.data.tokenizer_sample_chars // len(jobs))
    sample = functools.partial(_sample_lines, chars=share)
    lines = [line for part in _parallel(sample, jobs, cfg.data.num_proc, ordered=True) for line in part]
    if not lines:
        raise DataError(f"data.corpus {cfg.data.corpus}: no documents found to train the tokenizer on (an empty "
                        f"corpus, or only 1 document, which is held out for validation; need at least 2)")
    used = sum(map(len, lines))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=f, vocab_size=cfg.model.vocab_size,
                max_sentence_length=4 * MAX_SENTENCE_CHARS, input_sentence_size=0, minloglevel=2,
                **SPM_OPTIONS)
        except RuntimeError as err:
            tmp.unlink()
            message = one_line(err).split("] ", 1)[-1]
            raise DataError(f"sentencepiece could not train model.vocab_size={cfg.model.vocab_size} on "
                            f"{used:,} characters: {message} (lower model.vocab_size or add text)") from None
    _publish_once(tmp, path)
    log.info("trained a %d-token BPE tokenizer on %s characters in %.1fs", cfg.model.vocab_size,
             f"{used:,}", time.time() - t0)


def _sample_lines(job: UnitJob, chars: int) -> list[str]:
    """Lines (cut to MAX_SENTENCE_CHARS) from the unit's first training documents, `chars` in all."""
    lines: list[str] = []
    for i, text in _documents(job):
        if held_out(job.unit.index, i, job.data.val_fraction):
            continue
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                piece = line[start:start + MAX_SENTENCE_CHARS][:chars]
                lines.append(piece)
                chars -= len(piece)
                if chars <= 0:
                    return lines
    return lines


# ---------------------------------------------------------------------------- token files

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
    return Tokenizer.load(path), _file_sha256(path)


def _encoded(job: UnitJob, tok: Tokenizer) -> Iterator[tuple[int, list[int]]]:
    """(index in unit, ids + [EOS]) of the unit's documents, encoded a batch at a time."""
    for batch in _batches(_documents(job), ENCODE_BATCH_DOCS):
        encoded = tok.sp.encode([text for _, text in batch], num_threads=1)  # one worker, one core
        for (i, _), ids in zip(batch, encoded):
            ids.append(tok.eos_id)
            yield i, ids


def _tokenize_unit(job: UnitJob) -> dict:
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
