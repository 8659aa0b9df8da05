"""Refuse an optimizer update whose gradients are not finite, on every rank at once.

A finite loss can still give an infinite or NaN gradient (e.g. a gradient norm that
overflows float32 after a too-large learning rate). DeepSpeed clips with that norm and
applies the update, which writes NaN into every weight. The check sits in a step
pre-hook of the torch optimizer that DeepSpeed calls, so it sees exactly the gradients
about to be applied: the full gradients without ZeRO, this rank's fp32 partition under
ZeRO 1/2 or the bf16 master weights. Every rank calls that step together, so the ranks
agree through one all-reduce and all of them stop before any weight changes.
"""
from __future__ import annotations

import torch


class NonFiniteGradient(RuntimeError):
    """Raised from inside `optimizer.step()`, before the update."""


def refuse_nonfinite_updates(engine) -> None:
    """Register the check on the torch optimizer inside `engine` (call once, on every rank)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO and bf16 wrap the client optimizer
    base.register_step_pre_hook(_check_gradients)


def _check_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    from llm.parallel.engine import device
    from llm.parallel.groups import all_reduce_mean

    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    bad = torch.zeros((), device=device())
    if grads:
        # The 2-norm is finite exactly when every element is, short of squares summing past fp32's
        # range (elements near 1e19, an update as useless). One fused pass: a per-tensor
        # isfinite().all() cost 10 % of a CPU training step.
        bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads, 2.0))).float().to(bad.device)
    if all_reduce_mean(bad).item() > 0:
        raise NonFiniteGradient("the gradient is not finite")
