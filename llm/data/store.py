"""The prepared data directory: its layout, its manifest, and the check training starts with.

    DIR/tokenizer.model
    DIR/train/00007.bin    ids of unit 7's training documents, each followed by EOS (uint16/uint32)
    DIR/val/00007.bin      the same for its held-out documents
    DIR/units/00007.json   unit 7 is finished: its files' token counts, sizes and sha256
    DIR/manifest.json      written last, once every unit is finished: the directory is complete

A split is read as one stream: its shards concatenated in unit order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from llm.data.errors import DataError

FORMAT_VERSION = 2  # bump when the files written by prepare change meaning
SPLITS = ("train", "val")
MANIFEST = "manifest.json"


def shard_path(directory: Path, split: str, unit: int) -> Path:
    return directory / split / f"{unit:05d}.bin"


def unit_record_path(directory: Path, unit: int) -> Path:
    return directory / "units" / f"{unit:05d}.json"


def write_json(path: Path, obj: dict) -> None:
    """Write atomically: a reader (or a process killed half-way) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict:
    """manifest.json of a complete data directory; a one-line error when there is none."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: {directory} is not a prepared data directory "
                        f"(run `llm prepare` first)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({' '.join(str(err).split())}); run `llm prepare` again") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: format {manifest.get('format')}, this version reads {FORMAT_VERSION}; "
                        f"run `llm prepare` again")
    return manifest


def is_complete(directory: Path) -> bool:
    try:
        return read_manifest(directory).get("fingerprint") == directory.name
    except DataError:
        return False


def checked_shards(directory: str | Path, split: str) -> list[tuple[Path, int]]:
    """(path, tokens) of every non-empty shard of `split`, each file checked against the manifest.

    A missing shard, or one whose size is not what the manifest records (truncated, or
    rewritten since), is a one-line error naming the file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if split not in manifest["shards"]:
        raise DataError(f"{directory / MANIFEST}: no split {split!r} (found: {', '.join(manifest['shards'])})")
    shards = []
    for shard in manifest["shards"][split]:
        path = directory / shard["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: missing (listed in {directory / MANIFEST}); run `llm prepare` again") from None
        if size != shard["bytes"]:
            raise DataError(f"{path}: {size:,} bytes, but the manifest records {shard['bytes']:,} "
                            f"({shard['tokens']:,} tokens): truncated or changed; delete it and run "
                            f"`llm prepare` again")
        if shard["tokens"]:
            shards.append((path, shard["tokens"]))
    return shards
