"""Corpus → tokenizer + sharded token files, in parallel, resumable, splittable over machines.

`prepare(cfg)` writes into `cfg.data.cache_dir/<fingerprint>/` (layout in `llm/data/store.py`):

1. the corpus is cut into units (one per local file or hub stream shard, `sources.py`);
2. a sentencepiece BPE tokenizer is trained once on a bounded sample (the first
   `tokenizer_sample_chars / units` characters of each unit's training documents), or
   `data.tokenizer` is copied (`bpe.py`); training is deterministic, so machines that race to
   it write the same bytes;
3. `data.num_proc` worker processes (`workers.py`) each stream one unit at a time — read,
   encode, append to its train/val shard — holding only one batch of documents; a unit's files
   are renamed into place and its record written only when it is complete;
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

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from llm.config import Config, DataConfig
from llm.data import store
from llm.data.bpe import MAX_SENTENCE_CHARS, SPM_OPTIONS, ensure_tokenizer
from llm.data.errors import DataError
from llm.data.sources import Source, Unit, plan_units, resolve_corpus
from llm.data.tokenizer import Tokenizer
from llm.data.workers import UnitJob, parallel, token_dtype, tokenize_unit

log = logging.getLogger(__name__)


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
    tokenizer_sha = ensure_tokenizer(cfg, jobs, out / "tokenizer.model")
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


def _tokenize_units(todo: list[UnitJob], num_proc: int) -> int:
    """Tokenize `todo` in up to num_proc processes, with a progress bar; return the tokens written."""
    tokens = 0
    with tqdm(total=len(todo), desc="tokenize", unit="unit", disable=not todo) as bar:
        for record in parallel(tokenize_unit, todo, num_proc):
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
