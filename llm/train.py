"""The training loop: one DeepSpeed engine, one token stream, callbacks for everything else.

    step s (0-based) reads loader.batch(s, micro, grad_accum) on each rank, for micro in
    0..grad_accum-1: forward, loss = CE + aux (routing losses, already weighted),
    engine.backward, engine.step (DeepSpeed accumulates, all-reduces, clips, and updates
    at the last micro-step). Then log / validate / call callbacks / checkpoint.

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
from typing import Any, Optional, Sequence

import numpy as np
import torch

from llm import checkpoint, parallel
from llm.config import Config, save_config
from llm.monitor import Callback, Monitor, peak_flops
from llm.parallel.finite import NonFiniteGradient, refuse_nonfinite_updates
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
    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.run_dir = cfg.out_dir
        self.started = time.monotonic()  # train.time_limit counts from here
        t = cfg.train
        resume_from = self._choose_checkpoint()

        parallel.init_distributed()
        self.rank, self.world = parallel.rank(), parallel.world_size()
        parallel.init_expert_parallel(cfg.parallel.ep_size, cfg.model.routing.n_experts)  # layout errors: now
        self.device = parallel.device()
        self.data_dir = _ensure_data(cfg)
        self.tokenizer_path = self.data_dir / "tokenizer.model"
        # The loaders check every shard against the manifest: damaged data fails before the model is built.
        from llm.data import TokenLoader

        dp_rank, dp_world = parallel.dp_rank_world()
        self.loader = TokenLoader(self.data_dir, "train", cfg.data.seq_len, t.micro_batch_size,
                                  dp_rank, dp_world, t.seed)
        self.val_set = TokenLoader(self.data_dir, "val", cfg.data.seq_len, t.micro_batch_size,
                                   dp_rank, dp_world, t.seed).val_batches(t.eval_batches)
        self.tokens_per_step = t.micro_batch_size * cfg.data.seq_len * t.grad_accum * dp_world
        _warn_repeats(t.max_steps * self.tokens_per_step, len(self.loader.tokens))

        if resume_from is not None:
            checkpoint.check_resumable(cfg, resume_from, self.world)
        if parallel.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None:
                moved = checkpoint.set_aside(self.run_dir, time.strftime("%Y%m%d-%H%M%S"))
                if moved is not None:
                    log.info("starting fresh: earlier checkpoints moved to %s", moved)
            save_config(cfg, self.run_dir / "config.yaml")
        parallel.barrier()

        torch.manual_seed(t.seed)  # the same seed on every rank: identical initial weights
        from llm.model import build_model, flops_per_token

        self.model = parallel.apply_expert_parallel(build_model(cfg.model), cfg)  # this rank's experts
        self.engine = parallel.build_engine(self.model, cfg)
        self.model = self.engine.module  # the plain model, as the engine holds it (device, dtype)
        refuse_nonfinite_updates(self.engine)

        self.step, self.tokens = 0, 0
        self.last_checkpoint: Optional[Path] = None
        if resume_from is not None:
            restore = checkpoint.restore_weights if t.resume_weights_only else checkpoint.restore
            state = restore(self.engine, resume_from)
            parallel.follow_schedule(self.engine, t)
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.last_checkpoint = resume_from

        self.monitor = Monitor(
            cfg, self.run_dir, start_step=self.step, fresh=resume_from is None,
            flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
            peak_flops=peak_flops(cfg, self.device, parallel.use_bf16(cfg)), world=self.world,
            enabled=parallel.is_main())
        n_params = self.model.num_params(exclude_embedding=False)
        self.monitor.message(
            f"{cfg.name}: {n_params / 1e6:.2f}M parameters ({self.model.num_params() / 1e6:.2f}M non-embedding), "
            f"{self.world} rank(s) on {self.device.type}, {'bf16' if parallel.use_bf16(cfg) else 'fp32'}, "
            f"{self.tokens_per_step:,} tokens/step, run dir {self.run_dir}"
            + (f", resuming from {resume_from} at step {self.step}" if resume_from is not None else ""))

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

    # ------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        start = self.step
        losses: list[float] = []
        last: dict[str, Any] = {}
        val_loss: Optional[float] = None
        seconds, ok = 0.0, False
        stopped: Optional[str] = None
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            if start >= t.max_steps:
                self.monitor.message(f"already at step {start} (train.max_steps={t.max_steps}); nothing to do")
            with GracefulStop(t.stop_signals, t.time_limit, self.started) as stop:
                while self.step < t.max_steps and stopped is None:
                    t0 = time.perf_counter()
                    last = self._train_step()
                    dt = time.perf_counter() - t0
                    stop.timed_step(dt)
                    seconds += dt
                    self.monitor.count(self.tokens_per_step, dt)
                    step, final = self.step, self.step == t.max_steps
                    losses.append(last["loss"])
                    if step % cfg.log.every == 0 or final:
                        last.update(self.monitor.speed())
                        self.log(step, last)
                    self.monitor.show(step, last)
                    if step % t.eval_every == 0 or final:
                        val_loss = self.evaluate()
                        self.log(step, {"val_loss": val_loss})
                        self.monitor.message(f"step {step}: val_loss {val_loss:.4f}")
                    for cb in self.callbacks:
                        cb.on_step(self, step, last)
                    stopped = None if final else self._agree_to_stop(stop)
                    if step % t.save_every == 0 or final or stopped:
                        t0 = time.perf_counter()
                        self.save()
                        stop.timed_save(time.perf_counter() - t0)
            if stopped:
                self.monitor.message(f"stopped at step {self.step}/{t.max_steps} ({stopped}); saved "
                                     f"{self.last_checkpoint}; run the same command to continue")
            summary = self._summary(start, losses, last, val_loss, seconds)
            summary["stopped"] = stopped
            for cb in self.callbacks:
                cb.on_train_end(self, summary)
            ok = True
            return summary
        finally:
            self.monitor.close(ok)

    def _agree_to_stop(self, stop: GracefulStop) -> Optional[str]:
        """Stop after this step if any rank got a stop signal or nears train.time_limit (collective)."""
        reason = stop.reason()
        if self.world > 1:
            anyone = parallel.all_reduce_mean(torch.tensor(float(reason is not None), device=self.device))
            if anyone.item() > 0 and reason is None:
                reason = "stop requested on another rank"
        return reason

    def _summary(self, start: int, losses: list[float], last: dict[str, Any], val_loss: Optional[float],
                 seconds: float) -> dict[str, Any]:
        """What `train()` returns; tokens/s counts training steps only (not validation or saving)."""
        tokens_per_s = (self.step - start) * self.tokens_per_step / seconds if seconds else None
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "start_step": start,
            "losses": losses,  # train loss (CE + aux) of steps start+1 .. step
            "loss": last.get("loss"),
            "ce": last.get("ce"),
            "val_loss": val_loss,
            "tokens_per_s": tokens_per_s,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "run_dir": str(self.run_dir),
        }
        if tokens_per_s and self.monitor.peak:
            summary["mfu"] = self.monitor.flops_per_token * tokens_per_s / self.monitor.peak
        return summary

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its scalars (averaged over ranks)."""
        t, engine = self.cfg.train, self.engine
        torch.manual_seed(_step_seed(t.seed, self.step, self.rank))  # dropout etc.: a function of the step
        ce_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            inputs, targets = self.loader.batch(self.step, micro, t.grad_accum)  # [B, T] each
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            out = engine(inputs, targets=targets, loss_chunk=t.loss_chunk)
            ce = out.ce
            engine.backward(ce + out.aux_loss)  # DeepSpeed divides by grad_accum
            ce_sum += ce.detach()
            aux_sum += out.aux_loss.detach().float()
            if micro < t.grad_accum - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        # Check the loss before the update, so a NaN never reaches the weights.
        ce, aux = (parallel.all_reduce_mean(torch.stack([ce_sum, aux_sum])) / t.grad_accum).tolist()
        if not math.isfinite(ce + aux):
            raise TrainingError(f"loss is {ce + aux} at step {self.step + 1} (ce {ce}, aux {aux}); "
                                f"{self._last_good()}")
        lr = engine.get_lr()[0]
        try:
            engine.step()
        except NonFiniteGradient:  # raised before the update: the weights are still those of the last step
            raise TrainingError(f"gradient is not finite at step {self.step + 1} (loss {ce + aux:.4f}), "
                                f"the update was not applied; {self._last_good()}") from None
        grad_norm = engine.get_global_grad_norm()  # before clipping; None when clipping is off
        if grad_norm is not None and not math.isfinite(grad_norm):  # DeepSpeed skipped the update itself
            raise TrainingError(f"gradient norm is {grad_norm} at step {self.step + 1} (loss {ce + aux:.4f}), "
                                f"the update was not applied; {self._last_good()}")
        end_step(self.model)  # per-step routing state (LapSum's τ) learns from this step's batches
        self.step += 1
        self.tokens += self.tokens_per_step
        metrics = {"loss": ce + aux, "ce": ce, "aux": aux, "lr": lr, "tokens": self.tokens}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint saved yet"
        return f"last good checkpoint: {self.last_checkpoint}"

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over train.eval_batches fixed batches, averaged over ranks."""
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for inputs, targets in self.val_set:
            total += self.engine(inputs.to(self.device), targets=targets.to(self.device),
                                 loss_chunk=self.cfg.train.loss_chunk).ce
        self.engine.train()
        return (parallel.all_reduce_mean(total) / max(1, len(self.val_set))).item()

    def save(self) -> Path:
        """Checkpoint the current step (collective); refuses weights that are not finite."""
        if not self._weights_finite():
            raise TrainingError(f"weights are not finite at step {self.step}, not saving them; {self._last_good()}")
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "world_size": self.world,
            "dp_world": parallel.dp_rank_world()[1],
            "ep_size": self.cfg.parallel.ep_size,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "grad_accum": self.cfg.train.grad_accum,
            "seq_len": self.cfg.data.seq_len,
            "data_dir": str(self.data_dir),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.last_checkpoint = checkpoint.save(self.engine, self.cfg, self.run_dir, self.step,
                                               self.tokenizer_path, state)
        return self.last_checkpoint

    def _weights_finite(self) -> bool:
        """Every rank's weights (its expert slice included) are finite; collective."""
        bad = torch.stack([~torch.isfinite(p).all() for p in self.model.parameters()]).any().float()
        return parallel.all_reduce_mean(bad.to(self.device)).item() == 0

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record scalars (metrics.jsonl, wandb); callable on every rank, only rank 0 writes."""
        self.monitor.log(step, metrics)


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
