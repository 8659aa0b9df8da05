"""Corpus → tokenizer + flat token files, once per corpus and tokenizer setting.

`prepare(cfg)` reads the documents named by `cfg.data.corpus`, trains a sentencepiece BPE
tokenizer (or takes `cfg.data.tokenizer`), holds out whole documents for validation and
writes, into `cfg.data.cache_dir/<fingerprint>/`:

    tokenizer.model   sentencepiece model, vocab = model.vocab_size
    train.bin         every training document's ids followed by EOS, concatenated (uint16/uint32)
    val.bin           the same for the held-out documents
    meta.json         dtype, token and document counts, vocab size, special ids, fingerprint, sources

The fingerprint hashes everything the files depend on (corpus files and their sizes and
mtimes, text field, tokenizer settings, validation fraction, document limit) and nothing
they do not (seq_len, batch sizes), so experiments that share data share the directory.
The directory is built under a temporary name and renamed into place when complete: a
directory with that name is always a finished one.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from llm.config import Config, DataConfig
from llm.data.errors import DataError
from llm.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the files written here change meaning
FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSIONS = (".gz",)
HUB_PREFIX = "hf:"
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


@dataclass
class Source:
    """One entry of `data.corpus`, resolved: local files of one format, or a hub dataset."""

    spec: str
    files: list[Path]  # empty for hub datasets

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HUB_PREFIX)


# ---------------------------------------------------------------------------- locating

def data_dir(cfg: Config) -> Path:
    """Where `prepare(cfg)` puts (or has put) its files; does not prepare anything."""
    return Path(cfg.data.cache_dir) / fingerprint(cfg)


def is_prepared(cfg: Config) -> bool:
    return _is_complete(data_dir(cfg))


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
        "format": FORMAT_VERSION,
        "corpus": corpus,
        "text_field": data.text_field,
        "max_documents": data.max_documents,
        "val_fraction": data.val_fraction,
        "tokenizer": tokenizer,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def resolve_corpus(data: DataConfig) -> list[Source]:
    """Expand globs; one-line errors for specs that match nothing or have no known format."""
    if not data.corpus:
        raise DataError("data.corpus is empty: expected at least one file, glob or hf:NAME")
    sources = []
    for spec in data.corpus:
        if spec.startswith(HUB_PREFIX):
            if not spec[len(HUB_PREFIX):].partition(":")[0]:
                raise DataError(f"data.corpus entry {spec!r}: expected hf:NAME or hf:NAME:CONFIG")
            sources.append(Source(spec, []))
            continue
        spec = os.path.expanduser(spec)
        if Path(spec).is_dir():
            raise DataError(f"data.corpus entry {spec!r} is a directory: use a glob such as {spec}/*.jsonl.gz")
        if glob.has_magic(spec):
            files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"data.corpus entry {spec!r}: no files match")
        else:
            if not Path(spec).is_file():
                raise DataError(f"data.corpus entry {spec!r}: file not found")
            files = [Path(spec)]
        for f in files:
            _format_of(f)
        sources.append(Source(spec, files))
    return sources


def _format_of(path: Path) -> str:
    """The datasets builder for a local file, from its extension (compression suffix ignored)."""
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    ext = os.path.splitext(name)[1]
    if ext not in FORMATS:
        supported = ", ".join(f"{e}[.gz]" for e in FORMATS)
        raise DataError(f"{path}: unsupported extension {ext or '(none)'!r}; expected one of {supported}")
    return FORMATS[ext]


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _is_complete(path: Path) -> bool:
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == path.name and all((path / f).is_file() for f in ("train.bin", "val.bin"))


def read_meta(path: str | Path) -> dict:
    """meta.json of a prepared data directory."""
    return json.loads((Path(path) / "meta.json").read_text())


# ---------------------------------------------------------------------------- preparing

def prepare(cfg: Config, force: bool = False) -> Path:
    """Build the data directory for `cfg` unless a finished one exists; return its path."""
    sources = resolve_corpus(cfg.data)
    out = Path(cfg.data.cache_dir) / fingerprint(cfg, sources)
    if _is_complete(out) and not force:
        log.info("data ready at %s (prepared before)", out)
        return out
    given = _check_given_tokenizer(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(out.parent.glob(f".{out.name}.tmp-*"))
    if leftovers:
        log.warning("unfinished builds of %s from earlier runs (delete them unless a prepare is running "
                    "now): %s", out, ", ".join(p.name for p in leftovers))
    build = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    build.mkdir()
    try:
        meta = _build(cfg, sources, given, build)
        meta["fingerprint"] = out.name
        (build / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(build, out, force)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info("data ready at %s: %d train / %d val tokens (%s) in %.1fs", out, meta["train_tokens"],
             meta["val_tokens"], meta["dtype"], meta["seconds"])
    return out


def _build(cfg: Config, sources: list[Source], given: Tokenizer | None, build: Path) -> dict:
    """Write tokenizer.model, train.bin and val.bin into `build`; return their description."""
    data = cfg.data
    t0 = time.time()
    docs = _read_documents(data, sources, build / "hf")
    n_docs = len(docs)
    if n_docs == 0:
        raise DataError(f"data.corpus {data.corpus}: no documents found (empty corpus)")
    if n_docs < 2:
        raise DataError(f"data.corpus {data.corpus}: only 1 document; need at least 2 to hold one out "
                        f"for validation (a .txt file is one document; jsonl/parquet hold one per row)")
    is_val = val_mask(n_docs, data.val_fraction)
    log.info("read %d documents (%d held out for validation) in %.1fs", n_docs, is_val.sum(), time.time() - t0)

    model_path = build / "tokenizer.model"
    if given is not None:
        shutil.copyfile(given.path, model_path)
    else:
        _train_tokenizer(docs, np.flatnonzero(~is_val), cfg, model_path)
    tok = Tokenizer.load(model_path)
    dtype = token_dtype(tok.vocab_size)

    ids = _tokenize(docs, model_path, tok.eos_id, dtype, data.num_proc, build / "hf")
    counts = _write_bins(ids, is_val, dtype, build)
    del docs, ids
    shutil.rmtree(build / "hf", ignore_errors=True)
    for split in ("train", "val"):
        if counts[f"{split}_tokens"] == 0:
            raise DataError(f"data.corpus {data.corpus}: every {split} document is empty")
    return {
        "format": FORMAT_VERSION,
        "corpus": list(data.corpus),
        "text_field": data.text_field,
        "sources": [str(f) for s in sources for f in (s.files or [s.spec])],
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "tokenizer": str(data.tokenizer) if given is not None else "trained",
        "val_fraction": data.val_fraction,
        "max_documents": data.max_documents,
        **counts,
        "seconds": round(time.time() - t0, 2),
    }


def _publish(build: Path, out: Path, force: bool) -> None:
    """Rename the finished build directory into place (atomic: readers never see half a directory)."""
    old = None
    if out.exists():
        if not force and _is_complete(out):
            return  # another process finished the same directory first
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(build, out)
    except OSError:
        if not _is_complete(out):  # not a concurrent twin finishing first
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def val_mask(n_docs: int, fraction: float) -> np.ndarray:
    """Which documents are held out: a fixed hash of the document index below `fraction`.

    Deterministic, independent of the text, and stable when documents are appended.
    At least one document is held out. Returns bool [n_docs].
    """
    x = np.arange(n_docs, dtype=np.uint64)
    with np.errstate(over="ignore"):  # splitmix64, wrapping uint64 arithmetic
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    mask = u < fraction
    if not mask.any():
        mask[np.argmin(u)] = True
    return mask


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


# ---------------------------------------------------------------------------- reading

@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' per-file progress bars while reading; ours counts files instead."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_documents(data: DataConfig, sources: list[Source], cache: Path) -> "datasets.Dataset":
    """All documents, in corpus order, as one dataset with a single string column `text`."""
    import datasets  # imported here: it takes ~1 s, and only preparing needs it

    parts: list[datasets.Dataset] = []
    n = 0
    limit = data.max_documents or None
    tasks = [(s, f) for s in sources for f in (s.files or [None])]
    with _quiet_datasets():
        for source, path in tqdm(tasks, desc="read", unit="file", disable=len(tasks) < 2):
            if limit is not None and n >= limit:
                break
            if path is None:
                ds = _read_hub(data, source.spec, cache, None if limit is None else limit - n)
            else:
                ds = _read_file(data, path, cache)
            if limit is not None and n + len(ds) > limit:
                ds = ds.select(range(limit - n))
            parts.append(ds)
            n += len(ds)
    if not parts:
        return datasets.Dataset.from_dict({"text": []})
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _read_file(data: DataConfig, path: Path, cache: Path) -> "datasets.Dataset":
    import datasets

    builder = _format_of(path)
    if path.stat().st_size == 0:
        return datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    kwargs = {"sample_by": "document"} if builder == "text" else {}  # one .txt file = one document
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(cache), **kwargs)
    except Exception as err:  # datasets wraps parse errors in several types
        raise DataError(f"{path}: could not read as {builder} ({_one_line(err)})") from err
    field = "text" if builder == "text" else data.text_field
    return _text_column(ds, field, str(path))


def _read_hub(data: DataConfig, spec: str, cache: Path, limit: int | None) -> "datasets.Dataset":
    import datasets

    name, _, config = spec[len(HUB_PREFIX):].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=data.hub_split, streaming=data.streaming)
    except Exception as err:  # network, missing dataset/config/split: all reported the same way
        raise DataError(f"data.corpus entry {spec!r}: could not load split {data.hub_split!r} "
                        f"({_one_line(err)})") from err
    if isinstance(ds, datasets.IterableDataset):
        if limit is not None:
            ds = ds.take(limit)
        columns = list(ds.features) if ds.features else list(next(iter(ds), {}))
        if columns and data.text_field not in columns:
            raise DataError(f"{spec}: no field {data.text_field!r} (found: {', '.join(columns)}); "
                            f"set data.text_field")
        ds = datasets.Dataset.from_generator(
            _stream_texts, gen_kwargs={"stream": ds, "field": data.text_field},
            features=datasets.Features({"text": datasets.Value("string")}), cache_dir=str(cache))
        return ds
    return _text_column(ds, data.text_field, spec)


def _stream_texts(stream: "datasets.IterableDataset", field: str) -> Iterator[dict]:
    for row in stream:
        yield {"text": row[field]}


def _text_column(ds: "datasets.Dataset", field: str, where: str) -> "datasets.Dataset":
    import datasets

    if field not in ds.column_names:
        raise DataError(f"{where}: no field {field!r} (found: {', '.join(ds.column_names) or 'none'}); "
                        f"set data.text_field")
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{where}: field {field!r} holds {feature}, expected strings")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if feature.dtype != "string":
        ds = ds.cast_column("text", datasets.Value("string"))
    return ds


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 300 else text[:297] + "..."


# ---------------------------------------------------------------------------- tokenizer

def _train_tokenizer(docs: "datasets.Dataset", train_idx: np.ndarray, cfg: Config, path: Path) -> None:
    """BPE on up to tokenizer_sample_chars of training text, from documents in a fixed random order."""
    budget = cfg.data.tokenizer_sample_chars
    order = np.random.default_rng(0).permutation(train_idx)
    used = 0

    def lines() -> Iterator[str]:
        nonlocal used
        for batch in docs.select(order).iter(batch_size=256):
            for text in batch["text"]:
                for line in (text or "").split("\n"):
                    for start in range(0, len(line), MAX_SENTENCE_CHARS):
                        piece = line[start:start + MAX_SENTENCE_CHARS][:budget - used]
                        if piece:
                            used += len(piece)
                            yield piece
                        if used >= budget:
                            return

    t0 = time.time()
    with open(path, "wb") as f:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=f, vocab_size=cfg.model.vocab_size,
                max_sentence_length=4 * MAX_SENTENCE_CHARS, input_sentence_size=0, minloglevel=2,
                **SPM_OPTIONS)
        except RuntimeError as err:
            message = _one_line(err).split("] ", 1)[-1]
            raise DataError(f"sentencepiece could not train model.vocab_size={cfg.model.vocab_size} on "
                            f"{used:,} characters: {message} (lower model.vocab_size or add text)") from None
    log.info("trained a %d-token BPE tokenizer on %s characters in %.1fs", cfg.model.vocab_size,
             f"{used:,}", time.time() - t0)


# ---------------------------------------------------------------------------- token files

class _Encode:
    """Map function for datasets: text → ids + [EOS]; empty documents → []. Picklable by path."""

    def __init__(self, model_path: Path, eos_id: int):
        self.model_path = str(model_path)
        self.eos_id = eos_id
        self._tok: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}

    def __call__(self, batch: dict) -> dict:
        if self._tok is None:
            self._tok = Tokenizer.load(self.model_path)
        texts = [t or "" for t in batch["text"]]
        ids = self._tok.encode_batch(texts)
        return {"ids": [x + [self.eos_id] if t else [] for t, x in zip(texts, ids)]}


def _tokenize(docs: "datasets.Dataset", model_path: Path, eos_id: int, dtype: type, num_proc: int,
              cache: Path) -> "datasets.Dataset":
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4 has only Sequence
    cache.mkdir(parents=True, exist_ok=True)
    return docs.map(
        _Encode(model_path, eos_id), batched=True, batch_size=256, remove_columns=["text"],
        features=datasets.Features({"ids": list_type(datasets.Value(np.dtype(dtype).name))}),
        num_proc=min(num_proc, len(docs)) if num_proc > 1 else None,
        cache_file_name=str(cache / "tokens.arrow"), new_fingerprint=f"tokens-{model_path.parent.name}",
        desc="tokenize")


def _write_bins(ids: "datasets.Dataset", is_val: np.ndarray, dtype: type, build: Path) -> dict:
    """Stream documents' ids (EOS already appended) into train.bin / val.bin in corpus order."""
    import pyarrow.compute as pc

    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    start = 0
    with open(build / "train.bin", "wb") as train, open(build / "val.bin", "wb") as val, \
            tqdm(total=len(ids), desc="write", unit="doc") as bar:
        for table in ids.with_format("arrow").iter(batch_size=4096):
            column = table.column("ids").combine_chunks()
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            mask = is_val[start:start + len(table)]
            for split, out, rows in (("train", train, ~mask), ("val", val, mask)):
                values = pc.list_flatten(column.filter(rows)).to_numpy(zero_copy_only=False)
                out.write(values.astype(dtype, copy=False).tobytes())
                counts[f"{split}_tokens"] += len(values)
                counts[f"{split}_documents"] += int(((lengths > 0) & rows).sum())
            start += len(table)
            bar.update(len(table))
    return counts
