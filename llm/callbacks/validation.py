"""Validation loss every `train.eval_every` steps and at the last step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from llm import parallel
from llm.monitor import Callback

if TYPE_CHECKING:
    from llm.train import Trainer


class Validation(Callback):
    """Sets `trainer.val_loss`, logs `{step, val_loss}` and one console line."""

    def on_step(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None:
        t = trainer.cfg.train
        if step % t.eval_every and step != t.max_steps:
            return
        trainer.val_loss = validation_loss(trainer.engine, trainer.val_set, trainer.device, t.loss_chunk)
        trainer.log(step, {"val_loss": trainer.val_loss})
        trainer.monitor.message(f"step {step}: val_loss {trainer.val_loss:.4f}")


@torch.no_grad()
def validation_loss(engine, batches: list, device: torch.device, loss_chunk: int) -> float:
    """Mean cross-entropy over fixed (inputs, targets) batches, averaged over ranks (collective)."""
    engine.eval()
    total = torch.zeros((), device=device)
    for inputs, targets in batches:
        total += engine(inputs.to(device), targets=targets.to(device), loss_chunk=loss_chunk).ce
    engine.train()
    return (parallel.all_reduce_mean(total) / max(1, len(batches))).item()
