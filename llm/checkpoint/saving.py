"""Writing a checkpoint: staged in `step_N.tmp`, listed in its manifest, renamed into place;
old checkpoints pruned, and what an interrupted save or prune left behind cleaned up."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llm.checkpoint.layout import (CHECKPOINTS, ENGINE, LATEST, MANIFEST, TRASH, checkpoint_name, staging_dir,
                                   step_dirs, step_of)
from llm.checkpoint.selection import list_checkpoints
from llm.checkpoint.weights import write_model_files
from llm.config import Config


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); raised on every rank.
    Nothing was published: the previous checkpoints and `latest` are as they were."""


def save(engine, cfg: Config, run_dir: str | Path, step: int, tokenizer_path: str | Path,
         trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` of a run and publish it. Call on EVERY rank.

    1. rank 0 empties `step_N.tmp/`;
    2. every rank writes its part of DeepSpeed's state (module, optimizer shards, LR
       schedule) into `step_N.tmp/engine/`;
    3. every rank joins in gathering the full state dict; rank 0 writes model.safetensors,
       config.yaml, tokenizer.model, trainer.json;
    4. rank 0 writes the manifest, renames `step_N.tmp` to `step_N`, points `latest` at it
       and prunes all but the newest `train.keep_checkpoints`.
    The ranks agree after each phase whether every one of them succeeded, so a write that
    fails on any rank (OSError) raises `SaveFailed` on all of them instead of leaving the
    others waiting in the next collective; the staging directory is then removed.
    """
    from llm.parallel import full_state_dict, is_main

    stage = staging_dir(run_dir, step)
    try:
        _on_every_rank(lambda: _clear(stage) if is_main() else None)
        _on_every_rank(lambda: engine.save_checkpoint(str(stage / ENGINE), tag=checkpoint_name(step)))
        state = full_state_dict(engine.module)
        _on_every_rank(lambda: write_model_files(stage, state, cfg, tokenizer_path, trainer_state) if is_main()
                       else None)
        _on_every_rank(lambda: (write_manifest(stage), publish(run_dir, step, cfg.train.keep_checkpoints))
                       if is_main() else None)
    except SaveFailed:
        if is_main():
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def _clear(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)


def _on_every_rank(phase) -> None:
    """Run one phase of a save on this rank, then learn whether it failed on any rank (a
    collective: it is also the barrier between phases). A failure to write (`_write_failure`)
    becomes `SaveFailed`; any other error
    is re-raised as is on its rank, and the other ranks raise `SaveFailed` instead of waiting."""
    import torch
    import torch.distributed as dist

    error = None
    try:
        phase()
    except Exception as e:  # noqa: BLE001 - every rank must hear of it before anyone raises
        error = e
    failed = torch.tensor([error is not None], dtype=torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from llm.parallel import device

        failed = failed.to(device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        reason = _write_failure(error)
        if reason is None:
            raise error
        raise SaveFailed(reason) from error
    if failed.item():
        raise SaveFailed("another rank could not write its part")


# torch.save reports a failed write (disk full, file too large) as a RuntimeError of its C++
# zip writer, without the OSError: these are its words for it.
_TORCH_WRITE_FAILURES = ("file write failed", "iostream error", "inline_container.cc")


def _write_failure(error: BaseException) -> str | None:
    """Why writing failed, if `error` (or an error it was raised while handling) is a failed
    write; None for any other error."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, OSError):
            return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    for e in chain:
        if isinstance(e, RuntimeError) and any(words in str(e) for words in _TORCH_WRITE_FAILURES):
            return f"torch.save could not write ({str(e).splitlines()[0]}): is the disk full?"
    return None


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


def set_aside(run_dir: str | Path, stamp: str) -> Path | None:
    """Move a run's checkpoints to `checkpoints.<stamp>/` (a fresh start never deletes them)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return None
    target = root.with_name(f"{CHECKPOINTS}.{stamp}")
    os.replace(root, target)
    return target


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
