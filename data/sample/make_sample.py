"""Rebuild the bundled sample from the shared corpus (see README.md in this folder).

    python data/sample/make_sample.py /path/to/corpus

Deterministic: same input files, same selection, byte-identical gzip output (mtime 0).
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

WIKI_SHARD = "enwiki/enwiki-00.jsonl.gz"
WIKI_MIN_CHARS = 1_000  # skip stubs and disambiguation pages
WIKI_TOTAL_CHARS = 6_000_000
BOOK = "gutenberg/carroll-alice.txt"


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def wiki_rows(corpus: Path) -> list[dict]:
    rows, total = [], 0
    with gzip.open(corpus / WIKI_SHARD, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if len(doc["text"]) < WIKI_MIN_CHARS:
                continue
            rows.append({"id": str(doc["id"]), "title": doc["title"], "text": doc["text"]})
            total += len(doc["text"])
            if total >= WIKI_TOTAL_CHARS:
                break
    return rows


def book_rows(corpus: Path) -> list[dict]:
    text = (corpus / BOOK).read_text(encoding="utf-8")
    # Chapter headings are "CHAPTER I. Title", except the last ("CHAPTER XII", indented, title below).
    parts = re.split(r"\n(?=[ \t]*CHAPTER [IVXLC]+\b)", text)  # parts[0] is the book's title line
    rows = []
    for i, chapter in enumerate(parts[1:], start=1):
        chapter = chapter.strip()
        title = " ".join(chapter.split("\n\n", 1)[0].split())
        rows.append({"id": f"carroll-alice-{i:02d}", "title": title, "text": chapter + "\n"})
    return rows


def main() -> None:
    corpus = Path(sys.argv[1])
    out = Path(__file__).resolve().parent
    write_jsonl_gz(out / "enwiki-sample.jsonl.gz", wiki_rows(corpus))
    write_jsonl_gz(out / "alice-chapters.jsonl.gz", book_rows(corpus))


if __name__ == "__main__":
    main()
