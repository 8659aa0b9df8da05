"""Checkpoint layout, atomic publication, and loading a model from a checkpoint alone.

    RUN_DIR/
      config.yaml                 resolved config of the run
      checkpoints/
        latest                    name of the newest complete checkpoint
        step_0000100/
          model.safetensors       full model state dict; expert weights indexed by
                                  GLOBAL expert (w1 [E, d, f], ...), whatever ep_size trained it
                                  (checkpoints from before safetensors hold model.pt instead)
          config.yaml             resolved config (so the checkpoint alone rebuilds the model)
          tokenizer.model         the sentencepiece model
          trainer.json            step, data position, ep_size/world size at save time
          engine/                 DeepSpeed's own files (optimizer state, per rank) for exact resume
          manifest.json           every file above with its size, written last

A checkpoint is written into `step_N.tmp` and renamed into place only when complete,
so a crash mid-write never destroys the last good checkpoint. A checkpoint counts only
if it *verifies*: its manifest lists every file at its full size and trainer.json and
config.yaml read back. Resuming takes the newest checkpoint that verifies, whatever
`latest` says (`latest` is for people and scripts), and names every newer one it skipped.
Nothing here unpickles arbitrary objects: weights are safetensors, and DeepSpeed's files
are read with weights-only unpickling (`use_weights_only_loading`: tensors and a short list of DeepSpeed
types only).

Saving (`save`) and resuming (`resume_checkpoint`, `restore`) are collective: every rank
calls them. `load_model` needs nothing but the checkpoint directory.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llm.config import Config, ConfigError, load_saved_config

log = logging.getLogger("llm")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ENGINE = "engine"
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"  # torch.save'd state dict of checkpoints from before safetensors
MANIFEST = "manifest.json"
TRASH = ".trash"  # a directory being deleted: renamed first, so a kill never leaves half a checkpoint
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def weights_file(ckpt: str | Path) -> Path:
    """model.safetensors, or model.pt in a checkpoint written before safetensors."""
    ckpt = Path(ckpt)
    return ckpt / LEGACY_WEIGHTS if not (ckpt / WEIGHTS).is_file() and (ckpt / LEGACY_WEIGHTS).is_file() \
        else ckpt / WEIGHTS


def is_checkpoint_dir(path: str | Path) -> bool:
    path = Path(path)
    return STEP_DIR.fullmatch(path.name) is not None or any(
        (path / name).exists() for name in (WEIGHTS, LEGACY_WEIGHTS, "trainer.json", MANIFEST))


def resolve(path: str | Path, warn: Callable[[str], None] = log.warning) -> Path:
    """A checkpoint directory (which must verify), or a run directory meaning its newest good checkpoint."""
    path = Path(path)
    if is_checkpoint_dir(path):
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{path} is damaged: {problem}")
        return path
    ckpt = newest_good(path, warn)
    if ckpt is None:
        raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints "
                              f"under {CHECKPOINTS}/")
    return ckpt


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step_N` directory of a run, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run that verify, oldest first."""
    return [p for p in step_dirs(run_dir) if verify(p) is None]


def newest_good(run_dir: str | Path, warn: Callable[[str], None], required: bool = True) -> Path | None:
    """The newest checkpoint that verifies; `warn` names each newer one skipped and why.

    With checkpoints present but none usable: a CheckpointError if `required`, else None.
    """
    found = step_dirs(run_dir)
    skipped = []
    for ckpt in reversed(found):
        problem = verify(ckpt)
        if problem is None:
            for bad, why in skipped:
                warn(f"warning: skipping damaged checkpoint {bad} ({why}); using {ckpt.name}")
            return ckpt
        skipped.append((ckpt, problem))
    if found and required:
        listed = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS} ({listed}); nothing was "
                              f"changed; set train.resume=none to start over (they are then moved aside, not deleted)")
    return None


def verify(ckpt: str | Path) -> Optional[str]:
    """Why `ckpt` cannot be used, in a few words; None when it is complete and reads back.

    Sizes against the manifest catch truncated and missing files (a kill or a full disk
    while writing) without reading gigabytes of optimizer state.
    """
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is not readable"
        for name, size in sizes.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    elif not weights_file(ckpt).is_file():
        return f"no {WEIGHTS} and no {MANIFEST} (an unfinished or partly deleted checkpoint)"
    try:
        state = read_trainer_state(ckpt)
        int(state["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        return f"trainer.json is not readable ({_first_line(err)})"
    try:
        load_saved_config(ckpt / "config.yaml")
    except ConfigError as err:
        return f"config.yaml is not readable ({_first_line(err)})"
    return None


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where a checkpoint is written before `publish` makes it visible."""
    return Path(run_dir) / CHECKPOINTS / (checkpoint_name(step) + ".tmp")


def write_manifest(ckpt_dir: Path) -> None:
    """List every file of a finished checkpoint with its size; written last, so its presence means complete."""
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    _atomic_write_text(ckpt_dir / MANIFEST, json.dumps({"files": files}, indent=1))


def publish(run_dir: str | Path, step: int, keep: int) -> Path:
    """Rename the staged checkpoint into place, point `latest` at it, drop old ones.

    Call on one process after every process has finished writing into the staging dir.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    if final.exists():  # a damaged checkpoint of the same step, skipped when resuming
        remove_dir(final)
    os.replace(staging_dir(run_dir, step), final)
    _atomic_write_text(root / LATEST, final.name)
    prune(run_dir, keep)
    return final


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete every checkpoint older than the newest `keep` good ones (damaged newer ones stay
    until a save of their step replaces them)."""
    good = list_checkpoints(run_dir)
    if len(good) <= keep:
        return
    oldest_kept = step_of(good[-keep])
    for old in step_dirs(run_dir):
        if step_of(old) < oldest_kept:
            remove_dir(old)


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.fullmatch(ckpt.name).group(1))


def remove_dir(path: Path) -> None:
    """Rename, then delete: a kill in between leaves a `.trash` directory that
    `remove_leftovers` finishes, never a half-deleted checkpoint under its own name."""
    trash = path.with_name(path.name + TRASH)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(run_dir: str | Path) -> list[str]:
    """Delete what an interrupted save (`step_N.tmp`) or prune (`.trash`) left behind; returns their names."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    leftovers = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith((".tmp", TRASH)))
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in leftovers]


def write_model_files(ckpt_dir: Path, state_dict: dict[str, torch.Tensor], cfg: Config,
                      tokenizer_path: str | Path, trainer_state: dict[str, Any]) -> None:
    """The parts of a checkpoint that rebuild the model on their own."""
    from llm.config import save_config

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_weights(state_dict, ckpt_dir / WEIGHTS)
    save_config(cfg, ckpt_dir / "config.yaml")
    shutil.copyfile(tokenizer_path, ckpt_dir / "tokenizer.model")
    (ckpt_dir / "trainer.json").write_text(json.dumps(trainer_state, indent=2))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors stores each tensor once: a tied tensor (embedding = output head) is kept
    under its first name and the others are recorded as aliases in the metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in first and t.numel():
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint (safetensors, or a legacy model.pt read weights-only)."""
    path = weights_file(ckpt)
    try:
        if path.name == LEGACY_WEIGHTS:
            return migrate_state(torch.load(path, map_location="cpu", weights_only=True))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except Exception as err:  # truncated or foreign bytes: whatever the reader raises, the file is unusable
        raise CheckpointError(f"{path} is not readable: {_first_line(err)}") from None
    for name, target in aliases.items():
        state[name] = state[target]
    return migrate_state(state)


# Buffers that checkpoints of earlier versions hold under another name: old suffix -> (new suffix, conversion).
# LapSum's τ controller counted whether τ had been calibrated (a bool) before it counted its updates.
_RENAMED_STATE = {".router.tau_calibrated": (".router.tau_updates", lambda t: t.long())}


def migrate_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state dict of any earlier version under today's names (see `config.migrate_saved`)."""
    for old, (new, convert) in _RENAMED_STATE.items():
        for key in [k for k in state if k.endswith(old)]:
            state[key[:-len(old)] + new] = convert(state.pop(key))
    return state


# ---------------------------------------------------------------------------- saving and resuming

def save(engine, cfg: Config, run_dir: str | Path, step: int, tokenizer_path: str | Path,
         trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` of a run and publish it. Call on EVERY rank.

    1. rank 0 empties `step_N.tmp/`;
    2. every rank writes its part of DeepSpeed's state (module, optimizer shards, LR
       schedule) into `step_N.tmp/engine/`, and joins in gathering the full state dict;
    3. rank 0 writes model.safetensors, config.yaml, tokenizer.model, trainer.json;
    4. barrier, then rank 0 writes the manifest, renames `step_N.tmp` to `step_N`, points
       `latest` at it and prunes all but the newest `train.keep_checkpoints`.
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
        write_manifest(stage)
        publish(run_dir, step, cfg.train.keep_checkpoints)
    barrier()
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def resume_checkpoint(cfg: Config, warn: Callable[[str], None] = log.warning) -> Path | None:
    """The checkpoint `train.resume` asks for: auto = the run's newest good one (None when the
    run has no checkpoint at all), none = None, else a path (a checkpoint or a run directory)."""
    mode = cfg.train.resume
    if mode == "none":
        return None
    ckpt = newest_good(cfg.out_dir, warn) if mode == "auto" else resolve(mode, warn)
    if ckpt is not None and not cfg.train.resume_weights_only and not (ckpt / ENGINE / checkpoint_name(int(read_trainer_state(ckpt)["step"]))).is_dir():
        raise CheckpointError(f"{ckpt} has no {ENGINE}/ state (optimizer): it can be evaluated but not resumed; "
                              f"set train.resume_weights_only=true to continue from its weights, or "
                              f"train.resume=none to start over")
    return ckpt


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "trainer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return state


def check_resumable(cfg: Config, ckpt: Path, world_size: int) -> dict[str, Any]:
    """One-line errors for resuming `ckpt` under a config it cannot continue; returns trainer.json."""
    from llm.config import to_dict

    state = read_trainer_state(ckpt)
    saved = _flatten(to_dict(load_saved_config(ckpt / "config.yaml").model), "model.")
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
    saved_zero = load_saved_config(ckpt / "config.yaml").parallel.zero_stage
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
    use_weights_only_loading(engine)
    path, _ = engine.load_checkpoint(str(ckpt / ENGINE), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{ckpt / ENGINE}: no DeepSpeed state with tag {tag}")
    from llm.parallel import groups

    if groups.ep_size() > 1:
        # DeepSpeed's module file holds rank 0's expert slice only (our experts are not its
        # MoE layers); take every rank's experts from model.pt, which names them globally.
        # The optimizer's master weights came from its own (per-rank) state: keep them.
        _load_full_weights(engine, ckpt, refresh_master=False)
    return state


def restore_weights(engine, ckpt: Path) -> dict[str, Any]:
    """`train.resume_weights_only`: model weights from model.pt (any world size / ep_size),
    the step and LR schedule from trainer.json, a fresh optimizer. Call on EVERY rank."""
    state = read_trainer_state(ckpt)
    _load_full_weights(engine, ckpt, refresh_master=True)
    step = int(state["step"])
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()  # the LR of step `step`, as an uninterrupted run would use
    engine.global_steps = step
    return state


class CheckpointEngineChanged(RuntimeError):
    """The installed DeepSpeed no longer reads its files through the seam we secure."""


def use_weights_only_loading(engine) -> None:
    """Make `engine.load_checkpoint` read its files with weights-only unpickling.

    DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, so a
    crafted file under `engine/` would run code on resume. Every file DeepSpeed reads
    while resuming goes through `engine.checkpoint_engine.load`: this is the one place we
    touch a DeepSpeed internal, and it refuses to run on a DeepSpeed whose seam differs.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    safe_class = weights_only_engine_class()
    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is safe_class:
        return
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointEngineChanged(
            f"DeepSpeed's checkpoint engine is {type(current).__name__}, expected TorchCheckpointEngine: "
            f"resuming would load its files without weights-only unpickling")
    safe = safe_class.__new__(safe_class)
    safe.__dict__.update(current.__dict__)  # same save settings; only `load` differs
    engine.checkpoint_engine = safe


@functools.cache
def weights_only_engine_class() -> type:
    """Built on first use, so that reading a checkpoint's weights does not import DeepSpeed."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, reading with `torch.load(weights_only=True)`."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except FileNotFoundError:
                    raise CheckpointError(f"{path} not found") from None
                except Exception as err:  # a refused global, truncation, foreign bytes: never run it
                    raise CheckpointError(f"{path} cannot be loaded safely: {_first_line(err)}") from None

    return WeightsOnlyCheckpointEngine


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (ZeRO stage enum,
    loss scaler, partition addresses): plain data, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _load_full_weights(engine, ckpt: Path, refresh_master: bool) -> None:
    from llm.parallel.expert import load_full_state_dict

    full = load_weights(ckpt)
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
    cfg = load_saved_config(ckpt / "config.yaml")
    model = build_model(cfg.model)
    state = load_weights(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights_file(ckpt)} does not match {ckpt / 'config.yaml'}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.load(ckpt / "tokenizer.model")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{ckpt / 'tokenizer.model'} has {tokenizer.vocab_size} tokens, "
                              f"model.vocab_size is {cfg.model.vocab_size}")
    trainer = json.loads((ckpt / "trainer.json").read_text()) if (ckpt / "trainer.json").is_file() else {}
    return Loaded(model, tokenizer, cfg, ckpt, int(trainer.get("step", 0)))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
