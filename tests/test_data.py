"""llm.data: prepare (sources, tokenizer, split, fingerprint, shards, resume, errors) and TokenLoader."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.config import Config, ConfigError
from llm.data import DataError, TokenLoader, Tokenizer, data_dir, is_prepared, prepare, read_manifest
from llm.data.prepare import parse_shard
from llm.data.sources import resolve_corpus
from llm.data.workers import held_out
from tests.helpers import REPO, start

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


def split_tokens(path: Path, split: str) -> np.ndarray:
    """The split's shards concatenated in manifest order."""
    meta = read_manifest(path)
    return np.concatenate([np.fromfile(path / s["file"], dtype=meta["dtype"]) for s in meta["shards"][split]])


def documents_in(path: Path, split: str, tok: Tokenizer) -> list[str]:
    """Split a split's tokens at EOS and decode each document; every document must end in EOS."""
    meta = read_manifest(path)
    ids = split_tokens(path, split)
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
    meta = read_manifest(path)
    assert path == data_dir(cfg) and is_prepared(cfg)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["eos_id"] == 2
    tok = Tokenizer.load(path / "tokenizer.model")
    train = documents_in(path, "train", tok)
    val = documents_in(path, "val", tok)
    assert len(train) == meta["train_documents"] and len(val) == meta["val_documents"] >= 1
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept
    assert val == [d for i, d in enumerate(docs) if held_out(i // 30, i % 30, 0.1)]
    assert meta["train_tokens"] == len(split_tokens(path, "train"))
    assert [s["file"] for s in meta["shards"]["train"]] == ["train/00000.bin", "train/00001.bin"]
    for shard in meta["shards"]["train"] + meta["shards"]["val"]:
        raw = (path / shard["file"]).read_bytes()
        assert len(raw) == shard["bytes"] == 2 * shard["tokens"]
        assert hashlib.sha256(raw).hexdigest() == shard["sha256"]


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
    pq.write_table(pa.table({"body": docs[2:], "n": list(range(10))}), tmp_path / "c.parquet", row_group_size=3)
    cfg = make_cfg(tmp_path, [tmp_path / "*.txt*", tmp_path / "c.parquet"], text_field="body", val_fraction=0.2)
    path = prepare(cfg)
    meta = read_manifest(path)
    tok = Tokenizer.load(path / "tokenizer.model")
    got = documents_in(path, "train", tok) + documents_in(path, "val", tok)
    assert sorted(got) == sorted(docs)  # one .txt file is one document
    units = [s["unit"] for s in meta["shards"]["train"]]
    assert units == [str(tmp_path / n) for n in ("a.txt", "b.txt.gz", "c.parquet")]


def test_hub_source_streams_into_shards(tmp_path, corpus, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # keep ~/.cache clean
    root, docs = corpus  # a local folder stands in for a hub dataset: load_dataset streams both the same way
    cfg = make_cfg(tmp_path, [f"hf:{root}"], max_documents=40)
    path = prepare(cfg)
    meta = read_manifest(path)
    assert meta["train_documents"] + meta["val_documents"] == 40
    assert [s["unit"] for s in meta["shards"]["train"]] == [f"hf:{root} (stream shard {i} of 2)" for i in range(2)]
    tok = Tokenizer.load(path / "tokenizer.model")
    got = documents_in(path, "train", tok) + documents_in(path, "val", tok)
    assert sorted(got) == sorted(docs[:20] + docs[30:50])  # the cap is shared evenly by the two stream shards
    assert not list(tmp_path.glob("hf/**/*.arrow"))  # streamed, not copied into Arrow first
    cfg.data.text_field = "body"
    with pytest.raises(DataError, match=f"hf:{root}: no field 'body' \\(found: id, text\\)"):
        prepare(cfg)


def test_hub_offline_is_one_line_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = make_cfg(tmp_path, ["hf:HuggingFaceFW/fineweb-edu:sample-10BT"])
    t0 = time.time()
    with pytest.raises(DataError, match="'hf:HuggingFaceFW/fineweb-edu:sample-10BT': could not open split 'train' "
                                        "of the hub dataset \\(offline") as err:
        prepare(cfg)
    assert "\n" not in str(err.value) and time.time() - t0 < 30


def test_prepare_is_reused(tmp_path, corpus):
    cfg = make_cfg(tmp_path, [corpus[0] / "part-1.jsonl"])
    assert not is_prepared(cfg)
    path = prepare(cfg)
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg) == path and (path / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert not list(path.glob("**/*.tmp-*"))  # no temporary leftovers


def test_num_proc_and_given_tokenizer_reproduce_the_same_files(prepared, tmp_path):
    cfg, path = prepared
    again = make_cfg(tmp_path, cfg.data.corpus, num_proc=2)
    again_path = prepare(again)
    given = make_cfg(tmp_path / "given", cfg.data.corpus, tokenizer=str(path / "tokenizer.model"))
    given_path = prepare(given)
    assert tree(again_path) == tree(path)
    shards = {k: v for k, v in tree(path).items() if k != "manifest.json"}
    assert {k: v for k, v in tree(given_path).items() if k != "manifest.json"} == shards
    assert read_manifest(given_path)["tokenizer"] == str(path / "tokenizer.model")


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name → bytes)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def many_units(tmp_path_factory) -> tuple[Path, Path]:
    """8 jsonl files, prepared once without interruption (the reference the tests compare with)."""
    root = tmp_path_factory.mktemp("units")
    docs = make_docs(8 * 500, seed=5)
    for i in range(8):
        write_jsonl(root / f"part-{i}.jsonl", [{"text": t} for t in docs[i * 500:(i + 1) * 500]])
    (root / "data.yaml").write_text(json.dumps({"model": {"vocab_size": VOCAB}, "data": {
        "corpus": [str(root / "part-*.jsonl")], "val_fraction": 0.1, "num_proc": 1, "cache_dir": "cache"}}))
    return root, prepare(make_cfg(root / "reference", [root / "part-*.jsonl"]))


def test_killed_prepare_resumes_to_identical_files(many_units, caplog):
    root, reference = many_units
    proc = start("prepare", "data.yaml", cwd=root)
    target = root / "cache" / reference.name
    deadline = time.time() + 120
    while not (target / "units" / "00002.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (target / "manifest.json").exists() and not is_prepared(make_cfg(root, [root / "part-*.jsonl"]))
    # Also a unit whose record survived but whose shard was cut short afterwards: it is redone.
    (target / "train" / "00001.bin").write_bytes((target / "train" / "00001.bin").read_bytes()[:100])
    with caplog.at_level(logging.INFO, logger="llm.data.prepare"):
        assert prepare(make_cfg(root, [root / "part-*.jsonl"])) == target
    assert "already tokenized (resuming)" in caplog.text
    assert tree(target) == tree(reference)


def test_shards_over_machines_complete_to_the_same_files(many_units, tmp_path):
    root, reference = many_units
    cfg = make_cfg(tmp_path, [root / "part-*.jsonl"])
    out = prepare(cfg, shard=(1, 3))
    assert not is_prepared(cfg)
    assert sorted(p.name for p in (out / "units").iterdir()) == ["00001.json", "00004.json", "00007.json"]
    prepare(cfg, shard=(0, 3))
    # A unit written with another tokenizer (a machine that trained its own) is redone.
    other = out / "units" / "00004.json"
    other.write_text(json.dumps({**json.loads(other.read_text()), "tokenizer_sha256": "0" * 64}))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    assert prepare(cfg) == out and is_prepared(cfg)  # completes part 2 of 3 itself
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir() if p.name in stamps}
    assert {k for k in stamps if kept[k] != stamps[k]} == {"00004.bin"}
    assert tree(out) == tree(reference)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/2", "-1/2"):
        with pytest.raises(DataError, match=f"--shard '{bad}': expected I/N with 0 <= I < N"):
            parse_shard(bad)


def test_token_budget_and_mixture_weights(many_units, tmp_path):
    root, reference = many_units
    files = sorted(root.glob("part-*.jsonl"))
    tok = Tokenizer.load(reference / "tokenizer.model")
    cfg = make_cfg(tmp_path, [files[0], root / "part-[12].jsonl"], tokenizer=str(tok.path), max_tokens=6000,
                   weights=[1.0, 2.0])
    meta = read_manifest(prepare(cfg))

    def budgeted(path: Path, budget: int) -> int:  # oracle: the file's documents one by one up to the budget
        used = 0
        for line in path.read_text().splitlines():
            if used >= budget:
                break
            used += len(tok.encode(json.loads(line)["text"])) + 1
        return used

    expected = [budgeted(f, 2000) for f in files[:3]]  # 6000 x 1/3 to the first entry, 6000 x 2/3 over two files
    got = [t["tokens"] + v["tokens"] for t, v in zip(meta["shards"]["train"], meta["shards"]["val"])]
    assert got == expected
    assert [s["tokens"] for s in meta["sources"]] == [expected[0], expected[1] + expected[2]]
    with pytest.raises(ConfigError, match="data.weights needs data.max_tokens"):
        make_cfg(tmp_path, files[:2], weights=[1.0, 1.0]).validate()
    with pytest.raises(ConfigError, match="one positive weight per data.corpus entry \\(2\\)"):
        make_cfg(tmp_path, files[:2], weights=[1.0], max_tokens=10).validate()


def test_fingerprint_tracks_inputs_only(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(5)])
    cfg = make_cfg(tmp_path, [path])
    base = data_dir(cfg)
    same = make_cfg(tmp_path, [path], seq_len=64)
    same.name, same.train.micro_batch_size, same.data.num_proc = "other", 3, 2
    assert data_dir(same) == base
    for key, value in [("val_fraction", 0.5), ("text_field", "body"), ("max_documents", 3),
                       ("tokenizer_sample_chars", 1000), ("max_tokens", 100)]:
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


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
     "line 2 (byte {at}) is not UTF-8 (invalid continuation byte"),
    ("bad.jsonl.gz", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "line 2 (uncompressed byte {at}) is not UTF-8"),
    ("bad.txt", b"first line\nsecond \xff line\n", "line 2 (byte {at}) is not UTF-8 (invalid start byte"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "line 2 is not JSON (Expecting value at column 10)"),
    ("bad.jsonl.gz", None, "could not read ("),
])
def test_unreadable_file_is_one_line_naming_file_and_place(tmp_path, corpus, name, content, expected):
    bad = tmp_path / name
    if content is None:  # a gzip file cut short, e.g. by an interrupted copy
        write_jsonl(tmp_path / "whole.jsonl.gz", [{"text": t} for t in make_docs(200)])
        bad.write_bytes((tmp_path / "whole.jsonl.gz").read_bytes()[:3000])
    elif name.endswith(".gz"):
        bad.write_bytes(gzip.compress(content))
    else:
        bad.write_bytes(content)
    at = next((content.index(byte) for byte in (b"\xe9", b"\xff") if content and byte in content), 0)
    cfg = make_cfg(tmp_path, [corpus[0] / "part-1.jsonl", bad], num_proc=2)  # read in a worker process
    with pytest.raises(DataError, match="^" + re.escape(f"{bad}: " + expected.format(at=at))) as err:
        prepare(cfg)
    assert "\n" not in str(err.value)


def test_errors_for_tokenizer_settings(tmp_path, prepared):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(3)])
    model = prepared[1] / "tokenizer.model"
    with pytest.raises(DataError, match=f"has {VOCAB} tokens but model.vocab_size=512"):
        prepare(make_cfg(tmp_path, [path], vocab=512, tokenizer=str(model)))
    with pytest.raises(DataError, match="data.tokenizer=.*not found"):
        prepare(make_cfg(tmp_path, [path], tokenizer=str(tmp_path / "none.model")))
    with pytest.raises(DataError, match="could not train model.vocab_size=5000"):
        prepare(make_cfg(tmp_path, [path], vocab=5000))
    assert not list(Path(tmp_path / "cache").glob("*/manifest.json"))


# ---------------------------------------------------------------------------- loader

def token_store(tmp_path: Path, n: int, cuts: tuple[int, ...] = ()) -> Path:
    """A data directory whose splits hold tokens 0..n-1, cut into shards at `cuts`.

    Token i is i: a window's tokens tell where it came from.
    """
    bounds = [0, *cuts, n]
    shards = []
    (tmp_path / "train").mkdir(parents=True)
    for j, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        name = f"train/{j:05d}.bin"
        np.arange(start, stop, dtype=np.uint16).tofile(tmp_path / name)
        shards.append({"file": name, "tokens": stop - start, "bytes": 2 * (stop - start)})
    manifest = {"format": 2, "dtype": "uint16", "shards": {"train": shards, "val": shards}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_batches_are_shifted_windows(tmp_path):
    seq = 8
    loader = TokenLoader(token_store(tmp_path, 1001), "train", seq_len=seq, micro_batch_size=4, seed=0)
    assert loader.n_sequences == 125
    x, y = loader.batch(3)
    assert x.shape == y.shape == (4, seq) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.all(x[:, 0] % seq == 0)


def test_one_epoch_reads_every_window_once_then_reshuffles(tmp_path):
    loader = TokenLoader(token_store(tmp_path, 20 * 8 + 1), "train", seq_len=8, micro_batch_size=4, seed=0)
    first = [int(s) for step in range(5) for s in loader.batch(step)[0][:, 0]]
    second = [int(s) for step in range(5, 10) for s in loader.batch(step)[0][:, 0]]
    assert sorted(first) == sorted(second) == list(range(0, 160, 8))
    assert first != second


def test_deterministic_and_resumable(tmp_path):
    path = token_store(tmp_path, 4001)
    run = TokenLoader(path, "train", 16, 4, seed=7)
    seen = [run.batch(step, m, grad_accum=2) for step in range(12) for m in range(2)]  # crosses an epoch
    fresh = TokenLoader(path, "train", 16, 4, seed=7)
    for step in (11, 0, 5):
        for m in range(2):
            assert all(torch.equal(a, b) for a, b in zip(fresh.batch(step, m, 2), seen[2 * step + m]))
    assert not torch.equal(TokenLoader(path, "train", 16, 4, seed=8).batch(0)[0], fresh.batch(0)[0])


@pytest.mark.parametrize("world, micro, accum", [(2, 3, 1), (3, 2, 1), (1, 3, 2), (2, 1, 3)])
def test_global_batch_is_independent_of_how_it_is_split(tmp_path, world, micro, accum):
    path = token_store(tmp_path, 40 * 8 + 1)  # 40 windows: steps of 6 cross epochs
    single = TokenLoader(path, "train", 8, micro * world * accum, seed=3)
    ranks = [TokenLoader(path, "train", 8, micro, dp_rank=r, dp_world=world, seed=3) for r in range(world)]
    for step in range(9):
        whole = single.batch(step)
        parts = [rank.batch(step, m, accum) for m in range(accum) for rank in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_val_batches_are_fixed_sharded_and_spread(tmp_path):
    path = token_store(tmp_path, 100 * 8 + 1)
    single = TokenLoader(path, "train", 8, 4, seed=0).val_batches(3)
    ranks = [TokenLoader(path, "train", 8, 2, dp_rank=r, dp_world=2, seed=99).val_batches(3) for r in range(2)]
    assert len(single) == 3
    for j in range(3):
        assert torch.equal(torch.cat([ranks[0][j][0], ranks[1][j][0]]), single[j][0])
    starts = torch.cat([x[:, 0] for x, _ in single])
    assert starts.unique().numel() == 12 and starts.max() > 700  # covers the whole file
    many = TokenLoader(path, "train", 8, 4).val_batches(50)  # 200 rows from 100 windows: each window twice
    starts = torch.cat([x[:, 0] for x, _ in many])
    assert len(many) == 50 and sorted(starts.tolist()) == sorted(list(range(0, 800, 8)) * 2)
    small = token_store(tmp_path / "small", 5 * 8 + 1)
    tiny = [TokenLoader(small, "train", 8, 4, r, 3).val_batches(2) for r in range(3)]
    assert all(len(t) == 2 and t[0][0].shape == (4, 8) for t in tiny)  # 5 windows serve 3 ranks x 4 rows


def test_shards_read_as_one_stream(tmp_path):
    whole = token_store(tmp_path / "whole", 1001)
    sharded = token_store(tmp_path / "sharded", 1001, cuts=(5, 300, 300, 301, 777))  # one shard is empty
    a, b = (TokenLoader(p, "train", 8, 4, seed=1) for p in (whole, sharded))
    for step in range(70):  # two epochs: every window, including those across shard boundaries
        x, y = b.batch(step)
        assert torch.equal(x, a.batch(step)[0]) and torch.equal(y, x + 1) and torch.all(x[:, 0] % 8 == 0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a.val_batches(4), b.val_batches(4)))


def test_missing_or_truncated_shard_is_named(tmp_path):
    path = token_store(tmp_path, 1001, cuts=(500,))
    shard = path / "train" / "00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"^{shard}: 1,000 bytes, but the manifest records 1,002 \\(501 tokens\\): "
                                        "truncated") as err:
        TokenLoader(path, "train", 8, 4)
    assert "\n" not in str(err.value)
    shard.unlink()
    with pytest.raises(DataError, match=f"^{shard}: missing"):
        TokenLoader(path, "train", 8, 4)
    with pytest.raises(DataError, match="manifest.json not found: .* is not a prepared data directory"):
        TokenLoader(tmp_path / "missing", "train", 8, 2)


def test_too_few_tokens_is_a_clear_error(tmp_path):
    path = token_store(tmp_path, 30)
    with pytest.raises(DataError, match="3 sequences of seq_len\\+1=9 tokens, fewer than the 4"):
        TokenLoader(path, "train", 8, micro_batch_size=2, dp_world=2, dp_rank=1).batch(0)
    with pytest.raises(DataError, match="fewer than the 4 that micro_batch_size × dp_world × grad_accum"):
        TokenLoader(path, "train", 8, micro_batch_size=2).batch(0, grad_accum=2)
    with pytest.raises(DataError, match="0 sequences of seq_len\\+1=33 tokens, fewer than the 1"):
        TokenLoader(path, "train", 32, micro_batch_size=2)


# ---------------------------------------------------------------------------- bundled sample

def test_bundled_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sources = resolve_corpus(Config().data)  # the default corpus is the bundled sample
    assert sum(len(s.files) for s in sources) >= 2
    cfg = make_cfg(tmp_path, Config().data.corpus, vocab=2000, val_fraction=0.02, num_proc=2)
    cfg.data.cache_dir = str(tmp_path / "cache")
    meta = read_manifest(prepare(cfg))
    assert meta["train_documents"] > 200 and meta["val_documents"] >= 2
    assert meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 3_000
    loader = TokenLoader(data_dir(cfg), "val", 128, 16)
    tok = Tokenizer.load(data_dir(cfg) / "tokenizer.model")
    x, _ = loader.val_batches(1)[0]
    assert len(tok.decode(x[0]).split()) > 40  # real English words, not byte soup
