"""llm.data: prepare (sources, tokenizer, split, fingerprint, errors) and TokenLoader."""
from __future__ import annotations

import gzip
import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.config import Config
from llm.data import DataError, TokenLoader, Tokenizer, data_dir, is_prepared, prepare, read_meta
from llm.data.prepare import resolve_corpus

prepare_module = importlib.import_module("llm.data.prepare")  # `llm.data.prepare` is the function

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Pseudo-English documents, each unique (it starts with its index)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "ja", "ke",
                 "li", "mo", "nu", "pa", "re", "so", "tu", "ve", "wa", "xi", "yo", "ze", "the", "and"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            sentences.append(sentence.capitalize() + rng.choice([".", ".", "!", "?", f" in {rng.randint(1, 2024)}."]))
        docs.append(f"Document {i}. " + " ".join(sentences[:3]) + "\n\n" + " ".join(sentences[3:]))
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def make_cfg(tmp_path: Path, corpus: list, vocab: int = VOCAB, **data) -> Config:
    cfg = Config(name="test")
    cfg.model.vocab_size = vocab
    cfg.data.corpus = [str(c) for c in corpus]
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.num_proc = 1
    cfg.data.val_fraction = 0.1
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def documents_in(path: Path, meta: dict, tok: Tokenizer) -> list[str]:
    """Split a token file at EOS and decode each document; every document must end in EOS."""
    ids = np.fromfile(path, dtype=meta["dtype"])
    assert len(ids) and ids[-1] == meta["eos_id"]
    ends = np.flatnonzero(ids == meta["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e]) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(60)
    write_jsonl(root / "part-0.jsonl.gz", [{"id": i, "text": t} for i, t in enumerate(docs[:30])])
    write_jsonl(root / "part-1.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs[30:], 30)])
    return root, docs


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Config, Path]:
    root, _ = corpus
    cfg = make_cfg(tmp_path_factory.mktemp("prepared"), [root / "part-*.jsonl*"])
    return cfg, prepare(cfg)


# ---------------------------------------------------------------------------- prepare

def test_prepare_writes_every_document_once_with_eos(prepared, corpus):
    cfg, path = prepared
    docs = corpus[1]
    meta = read_meta(path)
    assert path == data_dir(cfg) and is_prepared(cfg)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["eos_id"] == 2
    tok = Tokenizer.load(path / "tokenizer.model")
    train = documents_in(path / "train.bin", meta, tok)
    val = documents_in(path / "val.bin", meta, tok)
    assert len(train) == meta["train_documents"] and len(val) == meta["val_documents"] >= 1
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept
    assert meta["train_tokens"] == len(np.fromfile(path / "train.bin", dtype=np.uint16))


def test_tokenizer_round_trip(prepared):
    tok = Tokenizer.load(prepared[1] / "tokenizer.model")
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 0, 1, 2, 3)
    for text in ["Document 7. Kalo mine ruti in 1999.", "naïve café — 日本語 🙂\n\n\tdouble  space  "]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids)) == text
    assert tok.encode_batch(["ka lo", "mi"]) == [tok.encode("ka lo"), tok.encode("mi")]


def test_txt_parquet_and_multiple_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(12, seed=1)
    (tmp_path / "a.txt").write_text(docs[0])
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(docs[1])
    pq.write_table(pa.table({"body": docs[2:], "n": list(range(10))}), tmp_path / "c.parquet")
    cfg = make_cfg(tmp_path, [tmp_path / "*.txt*", tmp_path / "c.parquet"], text_field="body", val_fraction=0.2)
    path = prepare(cfg)
    meta = read_meta(path)
    tok = Tokenizer.load(path / "tokenizer.model")
    got = documents_in(path / "train.bin", meta, tok) + documents_in(path / "val.bin", meta, tok)
    assert sorted(got) == sorted(docs)  # one .txt file is one document
    assert meta["sources"] == [str(tmp_path / n) for n in ("a.txt", "b.txt.gz", "c.parquet")]


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_spec_with_document_limit(tmp_path, corpus, streaming, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # keep ~/.cache clean
    root, docs = corpus  # a local folder stands in for a hub dataset: load_dataset takes both
    cfg = make_cfg(tmp_path, [f"hf:{root}"], streaming=streaming, max_documents=40)
    meta = read_meta(prepare(cfg))
    assert meta["train_documents"] + meta["val_documents"] == 40
    cfg.data.text_field = "body"
    with pytest.raises(DataError, match=f"hf:{root}: no field 'body' \\(found: id, text\\)"):
        prepare(cfg)


def test_prepare_is_reused_unless_forced(tmp_path, corpus):
    cfg = make_cfg(tmp_path, [corpus[0] / "part-1.jsonl"])
    assert not is_prepared(cfg)
    path = prepare(cfg)
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert prepare(cfg) == path and (path / "meta.json").stat().st_mtime_ns == stamp
    assert prepare(cfg, force=True) == path and (path / "meta.json").stat().st_mtime_ns != stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers


def test_num_proc_and_given_tokenizer_reproduce_the_same_files(prepared, tmp_path):
    cfg, path = prepared
    again = make_cfg(tmp_path, cfg.data.corpus, num_proc=2)
    again_path = prepare(again)
    given = make_cfg(tmp_path / "given", cfg.data.corpus, tokenizer=str(path / "tokenizer.model"))
    given_path = prepare(given)
    for other in (again_path, given_path):
        for name in ("tokenizer.model", "train.bin", "val.bin"):
            assert (other / name).read_bytes() == (path / name).read_bytes(), (other, name)
    assert read_meta(given_path)["tokenizer"] == str(path / "tokenizer.model")


def test_interrupted_prepare_is_not_mistaken_for_finished(tmp_path, corpus, monkeypatch):
    cfg = make_cfg(tmp_path, [corpus[0] / "part-1.jsonl"])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write_bins", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not is_prepared(cfg)
    assert list(Path(cfg.data.cache_dir).iterdir()) == []
    data_dir(cfg).mkdir()  # a directory without meta.json, e.g. copied half-way
    assert not is_prepared(cfg)


def test_fingerprint_tracks_inputs_only(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(5)])
    cfg = make_cfg(tmp_path, [path])
    base = data_dir(cfg)
    same = make_cfg(tmp_path, [path], seq_len=64)
    same.name, same.train.micro_batch_size, same.data.num_proc = "other", 3, 2
    assert data_dir(same) == base
    for key, value in [("val_fraction", 0.5), ("text_field", "body"), ("max_documents", 3),
                       ("tokenizer_sample_chars", 1000)]:
        assert data_dir(make_cfg(tmp_path, [path], **{key: value})) != base, key
    assert data_dir(make_cfg(tmp_path, [path], vocab=VOCAB + 1)) != base
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert data_dir(cfg) != base


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name, content, field, expected", [
    ("missing.jsonl", None, "text", "file not found"),
    ("nothing-*.jsonl", None, "text", "no files match"),
    ("docs.csv", "text\nhello\n", "text", "unsupported extension '.csv'"),
    ("docs.jsonl", '{"id": 1, "body": "hello"}\n', "text", "no field 'text' (found: id, body)"),
    ("docs.jsonl", "", "text", "no documents"),
    ("docs.jsonl", '{"text": "hello there"}\n', "text", "only 1 document"),
])
def test_clear_errors(tmp_path, name, content, field, expected):
    if content is not None:
        (tmp_path / name).write_text(content)
    cfg = make_cfg(tmp_path, [tmp_path / name], text_field=field)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        prepare(cfg)
    assert "\n" not in str(err.value) and name.split("*")[0] in str(err.value)  # one line naming the file


def test_errors_for_tokenizer_settings(tmp_path, prepared):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(3)])
    model = prepared[1] / "tokenizer.model"
    with pytest.raises(DataError, match=f"has {VOCAB} tokens but model.vocab_size=512"):
        prepare(make_cfg(tmp_path, [path], vocab=512, tokenizer=str(model)))
    with pytest.raises(DataError, match="data.tokenizer=.*not found"):
        prepare(make_cfg(tmp_path, [path], tokenizer=str(tmp_path / "none.model")))
    with pytest.raises(DataError, match="could not train model.vocab_size=5000"):
        prepare(make_cfg(tmp_path, [path], vocab=5000))
    assert list(Path(tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------- loader

def token_file(tmp_path: Path, n: int) -> Path:
    """Token i is i: a window's tokens tell where it came from."""
    path = tmp_path / "train.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    return path


def test_batches_are_shifted_windows(tmp_path):
    seq = 8
    loader = TokenLoader(token_file(tmp_path, 1001), seq_len=seq, micro_batch_size=4, seed=0)
    assert loader.n_sequences == 125
    x, y = loader.batch(3)
    assert x.shape == y.shape == (4, seq) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.all(x[:, 0] % seq == 0)


def test_one_epoch_reads_every_window_once_then_reshuffles(tmp_path):
    loader = TokenLoader(token_file(tmp_path, 20 * 8 + 1), seq_len=8, micro_batch_size=4, seed=0)
    first = [int(s) for step in range(5) for s in loader.batch(step)[0][:, 0]]
    second = [int(s) for step in range(5, 10) for s in loader.batch(step)[0][:, 0]]
    assert sorted(first) == sorted(second) == list(range(0, 160, 8))
    assert first != second


def test_deterministic_and_resumable(tmp_path):
    path = token_file(tmp_path, 4001)
    run = TokenLoader(path, 16, 4, seed=7)
    seen = [run.batch(step, m, grad_accum=2) for step in range(12) for m in range(2)]  # crosses an epoch
    fresh = TokenLoader(path, 16, 4, seed=7)
    for step in (11, 0, 5):
        for m in range(2):
            assert all(torch.equal(a, b) for a, b in zip(fresh.batch(step, m, 2), seen[2 * step + m]))
    assert not torch.equal(TokenLoader(path, 16, 4, seed=8).batch(0)[0], fresh.batch(0)[0])


@pytest.mark.parametrize("world, micro, accum", [(2, 3, 1), (3, 2, 1), (1, 3, 2), (2, 1, 3)])
def test_global_batch_is_independent_of_how_it_is_split(tmp_path, world, micro, accum):
    path = token_file(tmp_path, 40 * 8 + 1)  # 40 windows: steps of 6 cross epochs
    single = TokenLoader(path, 8, micro * world * accum, seed=3)
    ranks = [TokenLoader(path, 8, micro, dp_rank=r, dp_world=world, seed=3) for r in range(world)]
    for step in range(9):
        whole = single.batch(step)
        parts = [rank.batch(step, m, accum) for m in range(accum) for rank in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_val_batches_are_fixed_sharded_and_spread(tmp_path):
    path = token_file(tmp_path, 100 * 8 + 1)
    single = TokenLoader(path, 8, 4, seed=0).val_batches(3)
    ranks = [TokenLoader(path, 8, 2, dp_rank=r, dp_world=2, seed=99).val_batches(3) for r in range(2)]
    assert len(single) == 3
    for j in range(3):
        assert torch.equal(torch.cat([ranks[0][j][0], ranks[1][j][0]]), single[j][0])
    starts = torch.cat([x[:, 0] for x, _ in single])
    assert starts.unique().numel() == 12 and starts.max() > 700  # covers the whole file
    assert len(TokenLoader(path, 8, 4).val_batches(50)) == 25  # as many as fit


def test_too_few_tokens_is_a_clear_error(tmp_path):
    path = token_file(tmp_path, 30)
    with pytest.raises(DataError, match="3 sequences of seq_len\\+1=9 tokens, fewer than the 4"):
        TokenLoader(path, 8, micro_batch_size=2, dp_world=2, dp_rank=1)
    with pytest.raises(DataError, match="fewer than the 4 that micro_batch_size × dp_world × grad_accum"):
        TokenLoader(path, 8, micro_batch_size=2).batch(0, grad_accum=2)
    with pytest.raises(DataError, match="not found"):
        TokenLoader(tmp_path / "missing.bin", 8, 2)


# ---------------------------------------------------------------------------- bundled sample

def test_bundled_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sources = resolve_corpus(Config().data)  # the default corpus is the bundled sample
    assert sum(len(s.files) for s in sources) >= 2
    cfg = make_cfg(tmp_path, Config().data.corpus, vocab=2000, val_fraction=0.02, num_proc=2)
    cfg.data.cache_dir = str(tmp_path / "cache")
    meta = read_meta(prepare(cfg))
    assert meta["train_documents"] > 200 and meta["val_documents"] >= 2
    assert meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 10_000
    loader = TokenLoader(data_dir(cfg) / "val.bin", 128, 16)
    tok = Tokenizer.load(data_dir(cfg) / "tokenizer.model")
    x, _ = loader.val_batches(1)[0]
    assert len(tok.decode(x[0]).split()) > 40  # real English words, not byte soup
