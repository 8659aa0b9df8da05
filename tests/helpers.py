"""What the tests that run the project share: the CLI in subprocesses and in process, ports,
a tiny corpus and run config, the bundled evaluation sample, and small checkpoints for `llm eval`.

Test files import from here, never from each other.
"""
from __future__ import annotations

import ast
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import yaml

from llm.checkpoint import write_model_files
from llm.config import Config, DataConfig, ModelConfig, ParallelConfig
from llm.data.bpe import SPM_OPTIONS
from llm.model import build_model
from llm.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "eval" / "sample"  # the bundled lm-eval task sample
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# ---------------------------------------------------------------------------- subprocesses and ports


def env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout's `llm`, CPU DeepSpeed, offline, no
    launcher variables (the child starts its own process group), no user eval data directory."""
    e = dict(os.environ)
    # One thread per process: tiny models gain nothing from more, and threads spin badly on a busy machine.
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                 str(Path.home() / ".cache" / "torch_extensions")),
             PYTHONPATH=str(REPO))
    for key in (*LAUNCHER_VARIABLES, "LLM_EVAL_DATA"):
        e.pop(key, None)
    return e


def run(*args: str, cwd: Path, launcher: tuple[str, ...] = (sys.executable, "-m", "llm"),
        timeout: int = 300) -> subprocess.CompletedProcess:
    """`llm ARGS` (or another launcher's) to completion, output captured."""
    return subprocess.run([*launcher, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """`llm ARGS` in the background, for tests that signal or kill it mid-way."""
    return subprocess.Popen([sys.executable, "-m", "llm", *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


def cli_status(*args: str) -> int:
    """`llm ARGS` in process: its exit status, whether returned or raised (some commands exit from inside)."""
    from llm.cli import main

    try:
        return main(list(args))
    except SystemExit as exit:
        return exit.code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- tiny training runs

TINY: dict[str, Any] = {
    "model": {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "max_seq_len": 64},
    "data": {"seq_len": 32, "num_proc": 1, "val_fraction": 0.05},
    "train": {"max_steps": 12, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
              "eval_batches": 2, "save_every": 6, "keep_checkpoints": 2},
    "log": {"wandb": "disabled", "every": 1},
}


def make_corpus(path: Path, n_docs: int = 120, seed: int = 0) -> None:
    """Sentences from a small grammar: learnable structure, so the loss falls within a few steps."""
    rng = random.Random(seed)
    nouns = ["cat", "dog", "bird", "fish", "queen", "king", "rabbit", "turtle", "garden", "river"]
    verbs = ["sees", "likes", "follows", "paints", "visits", "finds"]
    adjectives = ["small", "red", "quiet", "old", "bright", "curious"]
    with path.open("w") as f:
        for i in range(n_docs):
            sentences = [f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} "
                         f"the {rng.choice(nouns)}." for _ in range(rng.randint(20, 40))]
            f.write(json.dumps({"text": f"Story {i}. " + " ".join(sentences)}) + "\n")


def write_tiny_run(root: Path, n_docs: int = 120, routing: dict | None = None, **train: Any) -> Path:
    """root/corpus.jsonl and root/tiny.yaml: the TINY run on it (data cached under root/cache),
    with `routing` as model.routing and `train` overriding train.*; returns the config's path."""
    make_corpus(root / "corpus.jsonl", n_docs=n_docs)
    cfg = json.loads(json.dumps(TINY))
    if routing is not None:
        cfg["model"]["routing"] = routing
    cfg["data"].update(corpus=[str(root / "corpus.jsonl")], cache_dir=str(root / "cache"))
    cfg["train"].update(train)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root / "tiny.yaml"


def strict_json_lines(path: Path) -> list[dict]:
    """Each line parsed as standard JSON: Python's NaN/Infinity extensions are refused."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


# ---------------------------------------------------------------------------- evaluation sample and checkpoints

SAMPLE_VOCAB = 512  # the tokenizer trained on the evaluation sample
MAX_LEN = 64
EVAL_ROUTERS = {
    "dense": dict(router="dense"),
    "topk": dict(router="topk", n_experts=4, k=2),
    "lapsum": dict(router="lapsum", n_experts=4, k_mean=1.5),
    "smear": dict(router="smear", n_experts=4, segment_len=16),
}


def sample_texts() -> list[str]:
    rows = [json.loads(line) for line in (SAMPLE / "lambada_openai" / "lambada_test.jsonl").open()]
    texts = [r["text"] for r in rows]
    rows = [json.loads(line) for line in (SAMPLE / "hellaswag" / "hellaswag_val.jsonl").open()]
    texts += [r["ctx"] + " " + " ".join(r["endings"]) for r in rows]
    return texts


def train_sample_tokenizer(out: Path) -> Path:
    """A SAMPLE_VOCAB-token sentencepiece model of the evaluation sample's text (the `tokenizer_path` fixture)."""
    lines = [line for text in sample_texts() for line in text.split("\n") if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tok"),
                                   vocab_size=SAMPLE_VOCAB, minloglevel=2, **{**SPM_OPTIONS, "num_threads": 1})
    return out / "tok.model"


def model_config(router: str, vocab: int = SAMPLE_VOCAB, **model) -> ModelConfig:
    from tests.models import tiny_config

    return tiny_config(vocab_size=vocab, d_model=64, d_ff=128, max_seq_len=MAX_LEN, init_std=0.1,
                       **EVAL_ROUTERS[router], **model)


def write_checkpoint(path: Path, tokenizer_path: Path, router: str = "dense", vocab: int = SAMPLE_VOCAB,
                     ep_size: int = 1) -> Path:
    """A checkpoint as training writes it (model.pt holds every expert, whatever ep_size trained it)."""
    cfg = Config(name="tiny-eval", model=model_config(router, vocab=vocab), data=DataConfig(seq_len=MAX_LEN),
                 parallel=ParallelConfig(ep_size=ep_size))
    torch.manual_seed(0)
    write_model_files(path, build_model(cfg.model).state_dict(), cfg.validate(), tokenizer_path,
                      {"step": 42, "ep_size": ep_size, "world_size": ep_size})
    return path


# ---------------------------------------------------------------------------- exported models

# What an exported modeling_routed.py may import: it loads where only torch and transformers are installed.
EXPORT_IMPORTS = {"__future__", "math", "typing", "torch", "transformers"}


def imported_modules(source: str) -> set[str]:
    """The top-level packages a Python source imports; a relative import counts as its dots ("." or "..")."""
    tree = ast.parse(source)
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] if node.level == 0 else "." * node.level
              for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return roots
