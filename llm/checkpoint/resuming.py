"""Resuming a run from a checkpoint: whether the config and topology allow it, then DeepSpeed's
state (exact resume) or the model weights alone with a fresh optimizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.checkpoint.layout import ENGINE, CheckpointError, checkpoint_name, read_trainer_state
from llm.checkpoint.weights import load_weights
from llm.checkpoint.weights_only import use_weights_only_loading
from llm.config import Config, load_saved_config, to_dict


def check_resumable(cfg: Config, ckpt: Path, world_size: int) -> dict[str, Any]:
    """One-line errors for resuming `ckpt` under a config it cannot continue; returns trainer.json."""
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


def _load_full_weights(engine, ckpt: Path, refresh_master: bool) -> None:
    from llm.parallel.expert import load_full_state_dict

    full = load_weights(ckpt)
    load_full_state_dict(engine.module, full)  # slices expert tensors to this rank's experts
    if refresh_master and hasattr(engine.optimizer, "refresh_fp32_params"):  # ZeRO / bf16 master weights
        engine.optimizer.refresh_fp32_params()


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
