"""Checkpoint every `train.save_every` steps, at the last step, and when the run stops early."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm import checkpoint, parallel
from llm.monitor import Callback

if TYPE_CHECKING:
    from llm.train import Trainer


class Checkpointer(Callback):
    """Saves in `on_step_end`, once the ranks have agreed on `trainer.stopping`, so a stop
    signal or the time limit always leaves a checkpoint of the step it stopped after.
    Sets `trainer.last_checkpoint`, and reports each save's duration to the time limit so
    that it keeps room for the final save."""

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        t = trainer.cfg.train
        if step % t.save_every and step != t.max_steps and not trainer.stopping:
            return
        started = time.perf_counter()
        trainer.last_checkpoint = save(trainer)
        trainer.graceful_stop.timed_save(time.perf_counter() - started)


def save(trainer: "Trainer") -> Path:
    """Checkpoint the trainer's current step (collective); refuses weights that are not finite."""
    if not weights_finite(trainer.model, trainer.device):
        trainer.fail(f"weights are not finite at step {trainer.step}, not saving them")
    # What resuming reads back (step, tokens) and checks (the topology the optimizer state was saved under).
    state = {"step": trainer.step, "tokens": trainer.tokens, "world_size": trainer.world,
             "ep_size": trainer.cfg.parallel.ep_size}
    try:
        return checkpoint.save(trainer.engine, trainer.cfg, trainer.run_dir, trainer.step, trainer.tokenizer_path,
                               state)
    except checkpoint.SaveFailed as err:
        # Training on without saving would lose everything after the last checkpoint: stop here.
        trainer.fail(f"could not save the checkpoint of step {trainer.step} ({err}); nothing was published")


def weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Every rank's weights (its expert slice included) are finite; collective."""
    bad = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).any().float()
    return parallel.all_reduce_mean(bad.to(device)).item() == 0
