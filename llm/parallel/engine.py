"""Everything DeepSpeed: process-group setup, the DeepSpeed config, the optimizer and
learning-rate schedule, and the engine that wraps the plain model.

The model (`llm.model`) knows nothing of this file; the trainer only calls
`init_distributed()` once and `build_engine(model, cfg)`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import socket
from typing import Any, Callable

import torch
from torch import nn

from llm.config import Config, TrainConfig

log = logging.getLogger(__name__)

# We support exactly two setups: CUDA (bf16, NCCL) and CPU (fp32, gloo). Naming the
# accelerator up front also keeps DeepSpeed from printing its detection warning.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed() -> None:
    """Join the process group (gloo on CPU, nccl on GPU); idempotent.

    Under torchrun or the deepspeed launcher the rendezvous comes from their environment.
    A plain `llm train` becomes rank 0 of a world of 1 on a free local port; without this
    DeepSpeed would go looking for MPI.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"incomplete launcher environment: {', '.join(missing)} not set")
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    printed = io.StringIO()  # DeepSpeed prints a line about its shm op on every start
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed(verbose=False)
    if printed.getvalue().strip():
        log.debug("%s", printed.getvalue().strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def use_bf16(cfg: Config) -> bool:
    """train.dtype=auto means bf16 on a GPU and fp32 on CPU (where bf16 matmuls are slow)."""
    if cfg.train.dtype == "auto":
        return device().type == "cuda"
    return cfg.train.dtype == "bf16"


def ds_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config, derived entirely from our Config (there is no separate JSON)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 2**31 - 1,  # our monitor prints; DeepSpeed's own step log stays off
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups, each with a `name`, expert parameters split into their own groups.

    Decoupled weight decay goes on matrices only: every parameter with >= 2 dimensions
    (linear weights, stacked expert weights, router matrices) except embedding tables.
    Vectors (norm gains, biases) are not decayed: shrinking them towards 0 has no
    regularising meaning. A module can exempt any other parameter by setting
    `param.no_weight_decay = True` (e.g. a router prior).

    The LapSum budget η gets a group of its own, `budget`, with peak LR `train.budget_lr`
    and no weight decay: its gradient is a small, noisy share of the CE gradient, and at
    the model's LR Adam moves it too little for the per-layer budgets to separate
    (docs/lapsum-budget.md).

    `split_params_into_different_moe_groups_for_optimizer` moves parameters that DeepSpeed
    marks as expert parameters (`param.allreduce == False`, set by expert parallelism)
    into groups of their own, because their gradients are reduced over a different
    process group.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from llm.routing import ExpertBudget

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    budget = {id(m.eta) for m in model.modules() if isinstance(m, ExpertBudget)}
    decay, no_decay, eta = [], [], []
    for param in model.parameters():  # each tied parameter once
        if not param.requires_grad:
            continue
        if id(param) in budget:
            eta.append(param)
            continue
        exempt = param.ndim < 2 or id(param) in embeddings or getattr(param, "no_weight_decay", False)
        (no_decay if exempt else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": t.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
              {"name": "budget", "params": eta, "weight_decay": 0.0, "lr": group_lr("budget", t)}]
    groups = split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])
    return [g for g in groups if g["params"]]


def adamw(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, t)`, fused: one kernel per group instead of a loop of
    small per-tensor ops (6× faster on CPU at 7M parameters, where that loop was 10 % of a
    training step). Same update rule; DeepSpeed's bf16 and ZeRO optimizers drive it as any
    torch optimizer."""
    return torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def group_lr(name: str, t: TrainConfig) -> float:
    """Peak LR of the parameter group `name`: train.budget_lr for the budget η, else train.lr."""
    return t.budget_lr if name == "budget" else t.lr


def warmup_cosine(t: TrainConfig) -> Callable[[int], float]:
    """LR multiplier of optimizer step s (0-based): linear warmup, then cosine to min_lr_ratio.

    A closure on purpose: LambdaLR checkpoints the attributes of callable objects but not
    of functions, so a resumed run follows its *current* config (a larger train.max_steps
    stretches the cosine) while the step count comes from the checkpoint.
    """
    warmup, total, floor = t.warmup_steps, t.max_steps, t.min_lr_ratio

    def multiplier(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def warmup_stable_decay(t: TrainConfig) -> Callable[[int], float]:
    """LR multiplier of step s for `train.lr_schedule: wsd`: the same linear warmup, then
    constant at 1 until the last `decay_fraction` of max_steps, then linear to min_lr_ratio.

    The stable phase is what lets a run be continued or branched off without restarting a
    schedule; only the short decay at the end depends on max_steps (a closure for the same
    reason as `warmup_cosine`).
    """
    warmup, total, floor = t.warmup_steps, t.max_steps, t.min_lr_ratio
    decay_start = max(warmup, total - round(t.decay_fraction * total))

    def multiplier(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = min(1.0, max(0, s - decay_start) / max(1, total - decay_start))
        return 1 - (1 - floor) * progress

    return multiplier


SCHEDULES = {"cosine": warmup_cosine, "wsd": warmup_stable_decay}


def follow_schedule(engine, t: TrainConfig) -> None:
    """After a resume, set the LR of the restored step from the *current* config.

    DeepSpeed restores the scheduler's step count and the base LR of the run that saved
    the checkpoint; train.lr, budget_lr, warmup_steps, min_lr_ratio and max_steps may
    differ now. With an unchanged config this reproduces the uninterrupted run's LR exactly.
    """
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [group_lr(g.get("name", ""), t) for g in scheduler.optimizer.param_groups]
    scheduler.last_epoch -= 1
    scheduler.step()


def build_engine(model: nn.Module, cfg: Config):
    """Compile/checkpoint its blocks as train.* asks, and wrap the model in a DeepSpeed
    engine with our AdamW and LR schedule.

    Gradient accumulation, clipping, bf16 master weights, ZeRO partitioning and the
    data-parallel gradient all-reduce all happen inside the engine; an update whose
    gradient is not finite is refused (`llm.parallel.finite`).
    """
    import deepspeed

    from llm.parallel.blocks import apply_block_options

    t = cfg.train
    apply_block_options(model, t)
    optimizer = adamw(model, t)
    for g in optimizer.param_groups:
        log.debug("param group %s: %d tensors, %d values, lr=%g, weight_decay=%g", g["name"], len(g["params"]),
                  sum(p.numel() for p in g["params"]), g["lr"], g["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[t.lr_schedule](t))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(cfg))
    from llm.parallel.expert import fix_fp32_clipping
    from llm.parallel.finite import refuse_nonfinite_updates
    from llm.parallel.groups import world_size

    fix_fp32_clipping(engine)  # fp32 without ZeRO: clip by the true global norm under expert parallelism
    refuse_nonfinite_updates(engine)
    if cfg.parallel.zero_stage == 0 and world_size() == 1:
        # Nothing to average over, yet DeepSpeed would still flatten every gradient into one
        # buffer, scale it by 1/1 and copy it back: 6 % of a CPU step of a tiny MoE.
        # (ZeRO keeps the flag: its gradient partitions are filled by that reduction.)
        engine.enable_backward_allreduce = False
    return engine


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete model state dict on CPU, as `model.pt` stores it. Call on EVERY rank.

    Under expert parallelism each rank holds a slice of the experts;
    `llm.parallel.expert.full_state_dict` gathers them into global expert order
    (w1 [E, d, f], ...), so a checkpoint does not depend on how it was trained.
    """
    from llm.parallel.expert import full_state_dict as gather_experts

    on_cpu: dict[tuple, torch.Tensor] = {}  # tied tensors (embed / lm_head) stay one tensor
    return {k: on_cpu.setdefault((v.data_ptr(), v.shape, v.dtype), v.detach().cpu())
            for k, v in gather_experts(model).items()}
