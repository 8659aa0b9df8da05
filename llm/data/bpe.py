"""The data directory's tokenizer: a sentencepiece BPE trained once on a bounded sample of the
corpus (deterministic, so machines that race to it write the same bytes), or `data.tokenizer`
checked and copied."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import sentencepiece as spm

from llm.config import Config
from llm.data.errors import DataError
from llm.data.sources import one_line
from llm.data.tokenizer import Tokenizer
from llm.data.workers import UnitJob, documents, file_sha256, held_out, parallel

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


def ensure_tokenizer(cfg: Config, jobs: list[UnitJob], path: Path) -> str:
    """Train (or copy data.tokenizer) into `path` unless it is there; return the file's sha256."""
    given = _check_given_tokenizer(cfg)
    if given is None:
        _train_tokenizer(cfg, jobs, path)
    elif not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(given.path, tmp)
        _publish_once(tmp, path)
    return file_sha256(path)


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


def _train_tokenizer(cfg: Config, jobs: list[UnitJob], path: Path) -> None:
    """BPE on up to tokenizer_sample_chars of training text, an equal share from the head of each unit."""
    if path.is_file():
        return  # trained by an earlier or a parallel prepare of the same directory
    t0 = time.time()
    share = max(1, cfg.data.tokenizer_sample_chars // len(jobs))
    sample = functools.partial(_sample_lines, chars=share)
    lines = [line for part in parallel(sample, jobs, cfg.data.num_proc, ordered=True) for line in part]
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
    for i, text in documents(job):
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
