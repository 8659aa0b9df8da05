"""The sentencepiece tokenizer as a transformers tokenizer with the same ids.

transformers converts the sentencepiece model into a `tokenizers` BPE with a Metaspace
pre-tokenizer that skips the word-boundary prefix ▁ when the text already begins with a
space; sentencepiece (add_dummy_prefix) always prepends it. The exported tokenizer.json
therefore prepends ▁ and maps spaces to ▁ in its normalizer instead, so that
`AutoTokenizer.from_pretrained(OUT)(text, add_special_tokens=False)` gives our ids for
every text (the tests compare them on leading, repeated and trailing whitespace,
newlines, digits and bytes outside the vocabulary).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from llm.data import Tokenizer

_SPACE = "\u2581"


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    ids = {"unk_token": tok.unk_id, "bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    return {name: tok.sp.id_to_piece(i) for name, i in ids.items() if i >= 0}


def special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {name: i for name, i in ids.items() if i >= 0}


def export_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `out`."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tok.path, Path(tmp) / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, **special_tokens(tok)}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        AutoTokenizer.from_pretrained(tmp).save_pretrained(out)
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": _SPACE},
        {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
    ]}
    spec["pre_tokenizer"] = None
    path.write_text(json.dumps(spec, ensure_ascii=False))
    # LlamaTokenizer rebuilds its own pre-tokenizer on load; the generic class takes tokenizer.json as written.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
