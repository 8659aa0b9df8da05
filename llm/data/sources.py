"""Where documents come from: `data.corpus` resolved into sources, each cut into units of work.

A *unit* is the smallest piece `prepare` tokenizes on its own: one local file, or one shard
of a hub dataset's stream. Units are numbered in corpus order, and their number depends only
on the corpus (never on `data.num_proc` or `--shard`), so any split of the work over
processes and machines writes the same token files.

Local files are read directly, line by line (jsonl), row group by row group (parquet) or
whole (txt: one document per file); nothing is copied into an intermediate format.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from llm.config import DataConfig
from llm.data.errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSIONS = (".gz",)
HUB_PREFIX = "hf:"
PARQUET_BATCH_ROWS = 1024
READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip reports a damaged stream as any of these


@dataclass
class Source:
    """One entry of `data.corpus`, resolved: local files of known formats, or a hub dataset."""

    spec: str
    files: list[Path]  # empty for hub datasets

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HUB_PREFIX)

    @property
    def hub_name(self) -> tuple[str, str | None]:
        name, _, config = self.spec[len(HUB_PREFIX):].partition(":")
        return name, config or None


@dataclass(frozen=True)
class Unit:
    """One piece of work: a local file, or shard `part` of `parts` of a hub source's stream."""

    index: int  # position in the corpus, names the token files
    source: int  # index into data.corpus
    path: str  # the local file, or the hub spec
    part: int = 0
    parts: int = 1

    @property
    def name(self) -> str:
        if self.path.startswith(HUB_PREFIX):
            return f"{self.path} (stream shard {self.part} of {self.parts})"
        return self.path


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
            format_of(f)
        sources.append(Source(spec, files))
    return sources


def plan_units(data: DataConfig, sources: list[Source]) -> list[Unit]:
    """Every unit of the corpus, in corpus order (opens each hub stream to count its shards)."""
    units: list[Unit] = []
    for s, source in enumerate(sources):
        if source.is_hub:
            parts = open_stream(data, source.spec).num_shards
            units += [Unit(len(units) + j, s, source.spec, j, parts) for j in range(parts)]
        else:
            units += [Unit(len(units) + j, s, str(f)) for j, f in enumerate(source.files)]
    return units


def format_of(path: Path) -> str:
    """json, text or parquet, from the extension (a compression suffix is ignored)."""
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    ext = os.path.splitext(name)[1]
    if ext not in FORMATS:
        supported = ", ".join(f"{e}[.gz]" for e in FORMATS)
        raise DataError(f"{path}: unsupported extension {ext or '(none)'!r}; expected one of {supported}")
    return FORMATS[ext]


def read_texts(data: DataConfig, unit: Unit) -> Iterator[str]:
    """The unit's documents in order; a missing or null text is yielded as ''."""
    if unit.path.startswith(HUB_PREFIX):
        return _hub_texts(data, unit)
    path = Path(unit.path)
    reader = {"json": _json_texts, "text": _txt_text, "parquet": _parquet_texts}[format_of(path)]
    return reader(path, data.text_field)


# ---------------------------------------------------------------------------- local files

def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: Path, line: int, offset: int) -> str:
    """Strict UTF-8 of `raw` (line `line`, at byte `offset` of the file), else a one-line error."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line += raw.count(b"\n", 0, err.start)
        where = "uncompressed byte" if path.name.lower().endswith(".gz") else "byte"
        raise DataError(f"{path}: line {line} ({where} {offset + err.start}) is not UTF-8 "
                        f"({err.reason}: {raw[err.start:err.end]!r})") from None


def _json_texts(path: Path, field: str) -> Iterator[str]:
    offset = 0
    try:
        with _open(path) as f:
            for n, raw in enumerate(f, 1):
                line = _decode(raw, path, n, offset)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {n} is not JSON ({err.msg} at column {err.colno})") from None
                yield _field(row, field, f"{path}: line {n}")
    except READ_ERRORS as err:
        raise DataError(f"{path}: could not read ({one_line(err)})") from None


def _txt_text(path: Path, field: str) -> Iterator[str]:
    try:
        with _open(path) as f:
            raw = f.read()
    except READ_ERRORS as err:
        raise DataError(f"{path}: could not read ({one_line(err)})") from None
    yield _decode(raw, path, 1, 0)


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if field not in names:
            raise DataError(f"{path}: no field {field!r} (found: {', '.join(names) or 'none'}); set data.text_field")
        kind = table.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: field {field!r} holds {kind}, expected strings")
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                yield text or ""
    except (pa.ArrowException, *READ_ERRORS) as err:
        raise DataError(f"{path}: could not read as parquet ({one_line(err)})") from None


def _field(row: object, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with field {field!r}")
    if field not in row:
        raise DataError(f"{where}: no field {field!r} (found: {', '.join(row) or 'none'}); set data.text_field")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} holds {type(text).__name__}, expected a string")
    return text or ""


# ---------------------------------------------------------------------------- hub

def open_stream(data: DataConfig, spec: str):
    """The hub dataset `spec` as a `datasets.IterableDataset` (nothing is downloaded up front)."""
    import datasets

    name, config = Source(spec, []).hub_name
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, config, split=data.hub_split, streaming=True)
    except Exception as err:  # offline, missing dataset/config/split: all reported the same way
        offline = " (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"data.corpus entry {spec!r}: could not open split {data.hub_split!r} of the hub "
                        f"dataset{offline}: {one_line(err)}") from None


def _hub_texts(data: DataConfig, unit: Unit) -> Iterator[str]:
    stream = open_stream(data, unit.path).shard(num_shards=unit.parts, index=unit.part)
    try:
        for row in stream:
            yield _field(row, data.text_field, unit.path)
    except DataError:
        raise
    except Exception as err:  # the network or the remote files failing half-way
        raise DataError(f"{unit.name}: stream failed ({one_line(err)})") from None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 300 else text[:297] + "..."
