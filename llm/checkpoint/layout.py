"""Names and paths inside a run directory (`checkpoints/step_N/...`), and a checkpoint's trainer.json."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step_N` directory of a run, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.fullmatch(ckpt.name).group(1))


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where a checkpoint is written before `publish` makes it visible."""
    return Path(run_dir) / CHECKPOINTS / (checkpoint_name(step) + ".tmp")


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "trainer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return state


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type's name): errors here are reported in one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
