"""Checkpoint layout, atomic publication, and loading a model from a checkpoint alone.

    RUN_DIR/
      config.yaml                 resolved config of the run
      checkpoints/
        latest                    name of the newest complete checkpoint
        step_0000100/
          model.pt                full model state dict; expert weights indexed by
                                  GLOBAL expert (w1 [E, d, f], ...), whatever ep_size trained it
          config.yaml             resolved config (so the checkpoint alone rebuilds the model)
          tokenizer.model         the sentencepiece model
          trainer.json            step, data position, ep_size/world size at save time
          engine/                 DeepSpeed's own files (optimizer state, per rank) for exact resume

A checkpoint is written into `step_N.tmp` and renamed into place only when complete,
so a crash mid-write never destroys the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.config import Config, load_config

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class CheckpointError(ValueError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory meaning its latest checkpoint."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path}: neither a checkpoint directory (no model.pt) nor a run directory with {CHECKPOINTS}/{LATEST}")
    return latest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    ckpt = pointer.parent / pointer.read_text().strip()
    return ckpt if (ckpt / "model.pt").is_file() else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / "model.pt").is_file())


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where a checkpoint is written before `publish` makes it visible."""
    return Path(run_dir) / CHECKPOINTS / (checkpoint_name(step) + ".tmp")


def publish(run_dir: str | Path, step: int, keep: int) -> Path:
    """Rename the staged checkpoint into place, point `latest` at it, drop old ones.

    Call on one process after every process has finished writing into the staging dir.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_dir(run_dir, step), final)
    _atomic_write_text(root / LATEST, final.name)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_model_files(ckpt_dir: Path, state_dict: dict[str, torch.Tensor], cfg: Config,
                      tokenizer_path: str | Path, trainer_state: dict[str, Any]) -> None:
    """The parts of a checkpoint that rebuild the model on their own."""
    from llm.config import save_config

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, ckpt_dir / "model.pt")
    save_config(cfg, ckpt_dir / "config.yaml")
    shutil.copyfile(tokenizer_path, ckpt_dir / "tokenizer.model")
    (ckpt_dir / "trainer.json").write_text(json.dumps(trainer_state, indent=2))


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Any  # llm.data.Tokenizer
    config: Config
    path: Path
    step: int


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """Rebuild the model, tokenizer and config from a checkpoint (or a run's latest)."""
    from llm.data import Tokenizer
    from llm.model import build_model

    ckpt = resolve(path)
    cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg.model)
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / 'model.pt'} does not match {ckpt / 'config.yaml'}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.load(ckpt / "tokenizer.model")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{ckpt / 'tokenizer.model'} has {tokenizer.vocab_size} tokens, "
                              f"model.vocab_size is {cfg.model.vocab_size}")
    trainer = json.loads((ckpt / "trainer.json").read_text()) if (ckpt / "trainer.json").is_file() else {}
    return Loaded(model, tokenizer, cfg, ckpt, int(trainer.get("step", 0)))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
