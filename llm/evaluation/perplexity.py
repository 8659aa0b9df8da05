"""Held-out perplexity of local text files (`llm eval --text FILE`).

Each file is one document, scored the way lm-eval's `wikitext` task scores one: the model's
`loglikelihood_rolling` (the whole token sequence, the first token conditioned on EOS,
disjoint windows of `model.max_seq_len`), then lm-eval's own aggregations over words
(`re.split(r"\\s+")` pieces, as lm-eval counts them) and UTF-8 bytes. Bits per byte does not
depend on the tokenizer, so it compares models whose vocabularies differ; token perplexity
does not depend on how words are counted, so it compares models that share a tokenizer.

Results take lm-eval's layout (one entry per file under `results`, metric keys `NAME,none`),
so they sit in the same results files and tables as lm-eval tasks.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from lm_eval.api.instance import Instance
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")


class TextError(ValueError):
    """A text file that cannot be scored, phrased as one line."""


@dataclass
class TextDocument:
    name: str  # the path as the user gave it: the results key
    text: str


@dataclass
class TextScore:
    """The log-likelihood of one document and the units it is divided by."""

    loglikelihood: float  # natural log, summed over every token
    tokens: int
    words: int
    bytes: int

    def metrics(self) -> dict[str, float]:
        return {
            "word_perplexity": weighted_perplexity([(self.loglikelihood, self.words)]),
            "byte_perplexity": weighted_perplexity([(self.loglikelihood, self.bytes)]),
            "bits_per_byte": bits_per_byte([(self.loglikelihood, self.bytes)]),
            "token_perplexity": weighted_perplexity([(self.loglikelihood, self.tokens)]),
        }


def read_text(path: str | Path) -> TextDocument:
    """The file as one document; a missing, empty or non-UTF-8 file is a TextError."""
    file = Path(path)
    if not file.is_file():
        raise TextError(f"--text {path}: no such file")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"--text {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    if not text.strip():
        raise TextError(f"--text {path}: the file is empty; expected text to score")
    return TextDocument(str(path), text)


def score(lm: Any, documents: Sequence[TextDocument]) -> list[TextScore]:
    """Score documents with an lm-eval LM (our `LLMEvalModel`), through its loglikelihood_rolling."""
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d.text,), idx=i)
                for i, d in enumerate(documents)]
    totals = lm.loglikelihood_rolling(requests)
    return [TextScore(loglikelihood=total, tokens=len(lm.tok_encode(d.text)), words=len(re.split(r"\s+", d.text)),
                      bytes=len(d.text.encode("utf-8")))
            for d, total in zip(documents, totals)]


def add_results(results: dict[str, Any], documents: Sequence[TextDocument], scores: Sequence[TextScore]) -> None:
    """Put each document's metrics into lm-eval's results dict, as if it were a task of its own, and
    its raw counts (log-likelihood, tokens, words, bytes) under `text`."""
    for doc, s in zip(documents, scores):
        results.setdefault("results", {})[doc.name] = {"alias": doc.name,
                                                        **{f"{m},none": v for m, v in s.metrics().items()}}
        results.setdefault("text", {})[doc.name] = asdict(s)
        results.setdefault("versions", {})[doc.name] = "text"
        results.setdefault("n-shot", {})[doc.name] = 0
        results.setdefault("higher_is_better", {})[doc.name] = {m: False for m in METRICS}
