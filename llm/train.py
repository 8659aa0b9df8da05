"""The training loop: one DeepSpeed engine, one token stream, callbacks for everything else.

    step s (0-based) reads loader.batch(s, micro, grad_accum) on each rank, for micro in
    0..grad_accum-1: forward, loss = CE + aux (routing losses, already weighted),
    engine.backward, engine.step (DeepSpeed accumulates, all-reduces, clips, and updates
    at the last micro-step). Then log, call the callbacks' on_step (validation first),
    agree across ranks whether to stop, and call their on_step_end (the checkpointer last).

Exact resume: the data a step reads is a function of (seed, step), the RNG is reseeded
from (seed, step, rank) before every step, and DeepSpeed restores module, optimizer and
LR schedule, so a resumed run repeats the uninterrupted one's losses bit for bit on CPU.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, NoReturn, Optional, Sequence

import numpy as np
import torch

from llm import checkpoint, parallel
from llm.callbacks import Checkpointer, Validation
from llm.config import Config, TrainConfig, save_config
from llm.monitor import Callback, Monitor, peak_flops
from llm.parallel.finite import NonFiniteGradient
from llm.preemption import GracefulStop
from llm.routing.tau import end_step

log = logging.getLogger("llm")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); one line naming the step."""


def default_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks `llm train` runs: routing statistics and downstream evaluation."""
    from llm.inspection import RoutingStatsCallback

    callbacks: list[Callback] = [RoutingStatsCallback(cfg.log.routing_every)]
    if cfg.eval.every:
        from llm.evaluation import EvalCallback  # imports lm-eval: only runs that evaluate pay for it

        callbacks.append(EvalCallback(cfg.eval))
    return callbacks


def train(cfg: Config, callbacks: Optional[Sequence[Callback]] = None) -> dict[str, Any]:
    """Train `cfg` to train.max_steps (resuming per train.resume); returns a summary dict."""
    return Trainer(cfg, default_callbacks(cfg) if callbacks is None else callbacks).fit()


class Trainer:
    """Builds the run (distributed setup, data, run directory, engine, resumed state, monitor)
    and runs the loop; validation and checkpointing are callbacks (`llm.callbacks`).

    What callbacks may read: cfg, model, engine, device, rank, world, step, tokens, run_dir,
    tokenizer_path, val_set, monitor, graceful_stop (during `fit`), stopping; what they set:
    val_loss (the latest validation loss) and last_checkpoint (the latest good checkpoint).
    """

    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        self.run_dir = cfg.out_dir
        self.started = time.monotonic()  # train.time_limit counts from here
        resume_from = self._choose_checkpoint()
        self._init_distributed()
        self._load_data()
        if resume_from is not None:
            checkpoint.check_resumable(cfg, resume_from, self.world)
        self._prepare_run_dir(fresh=resume_from is None)
        self._build_engine()
        self._resume(resume_from)
        self._open_monitor(resume_from)
        self.callbacks = [Validation(), *callbacks, Checkpointer()]
        self.val_loss: Optional[float] = None
        self.stopping: Optional[str] = None  # why the run stops after the current step, agreed by all ranks
        self.graceful_stop: Optional[GracefulStop] = None

    def _choose_checkpoint(self) -> Optional[Path]:
        """Clean up after an interrupted save or prune and pick the checkpoint to resume.

        Before DeepSpeed starts, so that a run with nothing usable to resume fails in a
        second; every rank reads the same files and picks the same checkpoint.
        """
        main = int(os.environ.get("RANK", "0")) == 0
        if main:
            for name in checkpoint.remove_leftovers(self.run_dir):
                log.info("removed %s, left by an interrupted save or prune", name)
        return checkpoint.resume_checkpoint(self.cfg, log.warning if main else log.debug)

    def _init_distributed(self) -> None:
        parallel.init_distributed()
        self.rank, self.world = parallel.rank(), parallel.world_size()
        parallel.init_expert_parallel(self.cfg.parallel.ep_size, self.cfg.model.routing.n_experts)  # layout errors: now
        self.device = parallel.device()

    def _load_data(self) -> None:
        """The loaders check every shard against the manifest: damaged data fails before the model is built."""
        from llm.data import TokenLoader

        cfg, t = self.cfg, self.cfg.train
        self.data_dir = _ensure_data(cfg)
        self.tokenizer_path = self.data_dir / "tokenizer.model"
        dp_rank, dp_world = parallel.dp_rank_world()
        self.loader = TokenLoader(self.data_dir, "train", cfg.data.seq_len, t.micro_batch_size,
                                  dp_rank, dp_world, t.seed)
        self.val_set = TokenLoader(self.data_dir, "val", cfg.data.seq_len, t.micro_batch_size,
                                   dp_rank, dp_world, t.seed).val_batches(t.eval_batches)
        self.tokens_per_step = t.micro_batch_size * cfg.data.seq_len * t.grad_accum * dp_world
        _warn_repeats(t.max_steps * self.tokens_per_step, len(self.loader.tokens))

    def _prepare_run_dir(self, fresh: bool) -> None:
        """Rank 0 writes config.yaml; a fresh start moves earlier checkpoints aside, never deletes them."""
        if parallel.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                moved = checkpoint.set_aside(self.run_dir, time.strftime("%Y%m%d-%H%M%S"))
                if moved is not None:
                    log.info("starting fresh: earlier checkpoints moved to %s", moved)
            save_config(self.cfg, self.run_dir / "config.yaml")
        parallel.barrier()

    def _build_engine(self) -> None:
        from llm.model import build_model

        torch.manual_seed(self.cfg.train.seed)  # the same seed on every rank: identical initial weights
        self.model = parallel.apply_expert_parallel(build_model(self.cfg.model), self.cfg)  # this rank's experts
        self.engine = parallel.build_engine(self.model, self.cfg)
        self.model = self.engine.module  # the plain model, as the engine holds it (device, dtype)

    def _resume(self, resume_from: Optional[Path]) -> None:
        self.step, self.tokens = 0, 0
        self.last_checkpoint: Optional[Path] = resume_from
        if resume_from is None:
            return
        t = self.cfg.train
        restore = checkpoint.restore_weights if t.resume_weights_only else checkpoint.restore
        state = restore(self.engine, resume_from)
        parallel.follow_schedule(self.engine, t)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])

    def _open_monitor(self, resume_from: Optional[Path]) -> None:
        from llm.model import flops_per_token

        cfg, bf16 = self.cfg, parallel.use_bf16(self.cfg)
        self.monitor = Monitor(
            cfg, self.run_dir, start_step=self.step, fresh=resume_from is None,
            flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
            peak_flops=peak_flops(cfg, self.device, bf16), world=self.world, enabled=parallel.is_main())
        n_params = self.model.num_params(exclude_embedding=False)
        self.monitor.message(
            f"{cfg.name}: {n_params / 1e6:.2f}M parameters ({self.model.num_params() / 1e6:.2f}M non-embedding), "
            f"{self.world} rank(s) on {self.device.type}, {'bf16' if bf16 else 'fp32'}, "
            f"{self.tokens_per_step:,} tokens/step, run dir {self.run_dir}"
            + (f", resuming from {resume_from} at step {self.step}" if resume_from is not None else ""))

    # ------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        start = self.step
        losses: list[float] = []
        last: dict[str, Any] = {}
        seconds, ok = 0.0, False
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            if start >= t.max_steps:
                self.monitor.message(f"already at step {start} (train.max_steps={t.max_steps}); nothing to do")
            with GracefulStop(t.stop_signals, t.time_limit, self.started) as self.graceful_stop:
                while self.step < t.max_steps and self.stopping is None:
                    t0 = time.perf_counter()
                    last = self._train_step()
                    dt = time.perf_counter() - t0
                    self.graceful_stop.timed_step(dt)
                    seconds += dt
                    losses.append(last["loss"])
                    self._report(last, dt)
                    for cb in self.callbacks:
                        cb.on_step(self, self.step, last)
                    self.stopping = None if self.step == t.max_steps else self._agree_to_stop()
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step)
            if self.stopping:
                self.monitor.message(f"stopped at step {self.step}/{t.max_steps} ({self.stopping}); saved "
                                     f"{self.last_checkpoint}; run the same command to continue")
            summary = self._summary(start, losses, last, seconds)
            for cb in self.callbacks:
                cb.on_train_end(self, summary)
            ok = True
            return summary
        finally:
            self.monitor.close(ok)

    def _report(self, metrics: dict[str, Any], seconds: float) -> None:
        """Log the step's scalars (with the speed since the last log step) every log.every steps and at the end."""
        self.monitor.count(self.tokens_per_step, seconds)
        if self.step % self.cfg.log.every == 0 or self.step == self.cfg.train.max_steps:
            metrics.update(self.monitor.speed())
            self.log(self.step, metrics)
        self.monitor.show(self.step, metrics)

    def _agree_to_stop(self) -> Optional[str]:
        """Stop after this step if any rank got a stop signal or nears train.time_limit (collective)."""
        reason = self.graceful_stop.reason()
        if self.world > 1:
            anyone = parallel.all_reduce_mean(torch.tensor(float(reason is not None), device=self.device))
            if anyone.item() > 0 and reason is None:
                reason = "stop requested on another rank"
        return reason

    def _summary(self, start: int, losses: list[float], last: dict[str, Any], seconds: float) -> dict[str, Any]:
        """What `train()` returns; tokens/s counts training steps only (not validation or saving)."""
        tokens_per_s = (self.step - start) * self.tokens_per_step / seconds if seconds else None
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "start_step": start,
            "losses": losses,  # train loss (CE + aux) of steps start+1 .. step
            "loss": last.get("loss"),
            "ce": last.get("ce"),
            "val_loss": self.val_loss,
            "tokens_per_s": tokens_per_s,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "run_dir": str(self.run_dir),
            "stopped": self.stopping,
        }
        if tokens_per_s and self.monitor.peak:
            summary["mfu"] = self.monitor.flops_per_token * tokens_per_s / self.monitor.peak
        return summary

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its scalars (averaged over ranks)."""
        t = self.cfg.train
        torch.manual_seed(_step_seed(t.seed, self.step, self.rank))  # dropout etc.: a function of the step
        batches = (self.loader.batch(self.step, micro, t.grad_accum) for micro in range(t.grad_accum))
        try:
            metrics = optimizer_step(self.engine, batches, t)
        except StepRefused as refused:
            raise TrainingError(f"{refused.what} at step {self.step + 1} {refused.detail}; "
                                f"{self._last_good()}") from None
        self.step += 1
        self.tokens += self.tokens_per_step
        metrics["tokens"] = self.tokens
        return metrics

    def fail(self, problem: str) -> NoReturn:
        """Stop training with a TrainingError naming `problem` and the last good checkpoint."""
        raise TrainingError(f"{problem}; {self._last_good()}")

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint saved yet"
        return f"last good checkpoint: {self.last_checkpoint}"

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record scalars (metrics.jsonl, wandb); callable on every rank, only rank 0 writes."""
        self.monitor.log(step, metrics)


class StepRefused(RuntimeError):
    """The step's loss or gradient is not finite; no weight was changed."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"{what} {detail}")
        self.what, self.detail = what, detail


def optimizer_step(engine, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], t: TrainConfig) -> dict[str, float]:
    """One optimizer step of `engine` over the micro-batches `batches` ([B, T] inputs and targets
    each, t.grad_accum of them): the whole training step but for the data and the RNG.

    Returns the loss, its CE and aux parts (averaged over micro-batches and ranks), the LR
    used and the gradient norm before clipping (absent when clipping is off). Raises
    StepRefused, before any weight changes, when the loss or the gradient is not finite.
    """
    device = parallel.device()
    ce_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    for micro, (inputs, targets) in enumerate(batches):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        out = engine(inputs, targets=targets, loss_chunk=t.loss_chunk)
        engine.backward(out.ce + out.aux_loss)  # DeepSpeed divides by grad_accum
        ce_sum += out.ce.detach()
        aux_sum += out.aux_loss.detach().float()
        if micro < t.grad_accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    # Check the loss before the update, so a NaN never reaches the weights.
    ce, aux = (parallel.all_reduce_mean(torch.stack([ce_sum, aux_sum])) / t.grad_accum).tolist()
    if not math.isfinite(ce + aux):
        raise StepRefused(f"loss is {ce + aux}", f"(ce {ce}, aux {aux})")
    lr = engine.get_lr()[0]
    try:
        engine.step()
    except NonFiniteGradient:  # raised before the update: the weights are still those of the last step
        raise StepRefused("gradient is not finite", f"(loss {ce + aux:.4f}), the update was not applied") from None
    grad_norm = engine.get_global_grad_norm()  # before clipping; None when clipping is off
    if grad_norm is not None and not math.isfinite(grad_norm):  # DeepSpeed skipped the update itself
        raise StepRefused(f"gradient norm is {grad_norm}", f"(loss {ce + aux:.4f}), the update was not applied")
    end_step(engine.module)  # per-step routing state (LapSum's τ) learns from this step's batches
    metrics = {"loss": ce + aux, "ce": ce, "aux": aux, "lr": lr}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 64-bit seed per (seed, step, rank): no RNG state to save for exact resume."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def _ensure_data(cfg: Config) -> Path:
    """The data directory; a single process prepares it if needed, a multi-rank job refuses to.

    Tokenizing a large corpus on rank 0 while the other ranks wait in a collective ends in
    the collective's timeout, so under a launcher with several ranks every rank checks the
    filesystem on its own and stops at once, naming the `llm prepare` command to run first.
    """
    from llm.data import DataError, data_dir, is_prepared, prepare

    if is_prepared(cfg):
        return data_dir(cfg)
    if parallel.world_size() > 1:
        raise DataError(f"the data is not prepared ({data_dir(cfg)} is incomplete) and {parallel.world_size()} "
                        f"ranks do not tokenize: run `{_prepare_command()}` once before launching")
    return prepare(cfg)


def _prepare_command() -> str:
    """`llm prepare` with the arguments this `llm train` was given."""
    args = sys.argv[1:]
    rest = args[args.index("train") + 1:] if "train" in args else ["CONFIG", "[overrides]"]
    return shlex.join(["llm", "prepare", *rest])


def _warn_repeats(tokens_read: int, tokens_held: int) -> None:
    if tokens_read > tokens_held:
        log.warning("train.max_steps reads %s tokens, %.1f epochs of the %s training tokens: the data repeats",
                    f"{tokens_read:,}", tokens_read / tokens_held, f"{tokens_held:,}")
