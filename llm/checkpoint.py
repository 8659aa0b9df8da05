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

Saving (`save`) and resuming (`resume_checkpoint`, `restore`) are collective: every rank
calls them. `load_model` needs nothing but the checkpoint directory.
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
ENGINE = "engine"


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


# ---------------------------------------------------------------------------- saving and resuming

def save(engine, cfg: Config, run_dir: str | Path, step: int, tokenizer_path: str | Path,
         trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` of a run and publish it. Call on EVERY rank.

    1. rank 0 empties `step_N.tmp/`;
    2. every rank writes its part of DeepSpeed's state (module, optimizer shards, LR
       schedule) into `step_N.tmp/engine/`, and joins in gathering the full state dict;
    3. rank 0 writes model.pt, config.yaml, tokenizer.model, trainer.json;
    4. barrier, then rank 0 renames `step_N.tmp` to `step_N`, points `latest` at it and
       prunes all but the newest `train.keep_checkpoints`.
    """
    from llm.parallel import barrier, full_state_dict, is_main

    stage = staging_dir(run_dir, step)
    if is_main():
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(stage / ENGINE), tag=checkpoint_name(step))
    state = full_state_dict(engine.module)
    if is_main():
        write_model_files(stage, state, cfg, tokenizer_path, trainer_state)
    barrier()
    if is_main():
        publish(run_dir, step, cfg.train.keep_checkpoints)
    barrier()
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint `train.resume` asks for: auto = the run's latest (or None), none = None, else a path."""
    mode = cfg.train.resume
    if mode == "none":
        return None
    ckpt = latest_checkpoint(cfg.out_dir) if mode == "auto" else resolve(mode)
    if ckpt is not None and not (ckpt / ENGINE).is_dir():
        raise CheckpointError(f"{ckpt} has no {ENGINE}/ (optimizer state): it can be evaluated but not resumed; "
                              f"set train.resume=none to start over")
    return ckpt


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "trainer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return json.loads(path.read_text())


def check_resumable(cfg: Config, ckpt: Path, world_size: int) -> dict[str, Any]:
    """One-line errors for resuming `ckpt` under a config it cannot continue; returns trainer.json."""
    from llm.config import to_dict

    state = read_trainer_state(ckpt)
    saved = _flatten(to_dict(load_config(ckpt / "config.yaml").model), "model.")
    now = _flatten(to_dict(cfg)["model"], "model.")
    changed = [k for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and k != "model.attention"]  # the kernel may change
    if changed:
        k = changed[0]
        raise CheckpointError(f"cannot resume {ckpt}: {k}={now.get(k)!r} but the checkpoint has {saved.get(k)!r}"
                              + (f" (and {len(changed) - 1} more model keys)" if len(changed) > 1 else ""))
    if not cfg.train.resume_weights_only:
        check_optimizer_topology(cfg, ckpt, state, world_size)
    return state


def check_optimizer_topology(cfg: Config, ckpt: Path, state: dict[str, Any], world_size: int) -> None:
    """What restores across topologies: model weights always (model.pt names experts
    globally); DeepSpeed's optimizer state only onto the same ZeRO stage and ep_size, and
    under ZeRO 1/2 also the same world size (it is partitioned over the ranks)."""
    saved_zero = load_config(ckpt / "config.yaml").parallel.zero_stage
    saved = (state.get("world_size"), state.get("ep_size", 1), saved_zero)
    now = (world_size, cfg.parallel.ep_size, cfg.parallel.zero_stage)
    same = saved[1:] == now[1:] and (now[2] == 0 or saved[0] == now[0])
    if not same:
        raise CheckpointError(
            f"cannot resume the optimizer state of {ckpt}: saved by world_size={saved[0]} ep_size={saved[1]} "
            f"ZeRO-{saved[2]}, this run is world_size={now[0]} ep_size={now[1]} ZeRO-{now[2]} (optimizer state "
            f"needs the same ep_size and ZeRO stage, and under ZeRO 1/2 the same world size); "
            f"set train.resume_weights_only=true to continue from its weights with a fresh optimizer")


def restore(engine, ckpt: Path) -> dict[str, Any]:
    """Load DeepSpeed's state (module, optimizer, LR schedule) from `ckpt`; call on EVERY rank.

    Returns trainer.json (step, tokens, ...). Together with the data loader being a
    function of (seed, step) and the per-step RNG seeding in the trainer, this makes a
    resumed run continue exactly as an uninterrupted one.
    """
    state = read_trainer_state(ckpt)
    tag = checkpoint_name(int(state["step"]))
    path, _ = engine.load_checkpoint(str(ckpt / ENGINE), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{ckpt / ENGINE}: no DeepSpeed state with tag {tag}")
    from llm.parallel import groups

    if groups.ep_size() > 1:
        # DeepSpeed's module file holds rank 0's expert slice only (our experts are not its
        # MoE layers); take every rank's experts from model.pt, which names them globally.
        # The optimizer's master weights came from its own (per-rank) state: keep them.
        _load_model_pt(engine, ckpt, refresh_master=False)
    return state


def restore_weights(engine, ckpt: Path) -> dict[str, Any]:
    """`train.resume_weights_only`: model weights from model.pt (any world size / ep_size),
    the step and LR schedule from trainer.json, a fresh optimizer. Call on EVERY rank."""
    state = read_trainer_state(ckpt)
    _load_model_pt(engine, ckpt, refresh_master=True)
    step = int(state["step"])
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()  # the LR of step `step`, as an uninterrupted run would use
    engine.global_steps = step
    return state


def _load_model_pt(engine, ckpt: Path, refresh_master: bool) -> None:
    from llm.parallel.expert import load_full_state_dict

    full = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    load_full_state_dict(engine.module, full)  # slices expert tensors to this rank's experts
    if refresh_master and hasattr(engine.optimizer, "refresh_fp32_params"):  # ZeRO / bf16 master weights
        engine.optimizer.refresh_fp32_params()


def set_aside(run_dir: str | Path, stamp: str) -> Path | None:
    """Move a run's checkpoints to `checkpoints.<stamp>/` (a fresh start never deletes them)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return None
    target = root.with_name(f"{CHECKPOINTS}.{stamp}")
    os.replace(root, target)
    return target


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
