"""Which checkpoint to use: a checkpoint verified against its manifest, the newest good one
of a run (naming the damaged ones skipped), a path resolved, and what `train.resume` asks for."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from llm.checkpoint.layout import (CHECKPOINTS, ENGINE, MANIFEST, WEIGHTS, CheckpointError, checkpoint_name,
                                   first_line, is_checkpoint_dir, read_trainer_state, step_dirs, weights_file)
from llm.config import Config, ConfigError, load_saved_config

log = logging.getLogger("llm")


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
        return f"trainer.json is not readable ({first_line(err)})"
    try:
        load_saved_config(ckpt / "config.yaml")
    except ConfigError as err:
        return f"config.yaml is not readable ({first_line(err)})"
    return None


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
