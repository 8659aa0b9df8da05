"""Where training scalars go (console, metrics.jsonl, wandb), and the callback hooks.

Only global rank 0 writes anything; on other ranks a Monitor is silent. Side concerns
(per-layer routing statistics, downstream evaluation, ...) are `Callback`s: the trainer
calls them on every rank after every optimizer step and they log through
`trainer.log(step, metrics)`, so the training loop never changes for them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from tqdm import tqdm

from llm.config import Config, to_dict

if TYPE_CHECKING:
    from llm.train import Trainer

log = logging.getLogger("llm")

METRICS = "metrics.jsonl"
# Dense bf16 tensor-core peaks (no 2:4 sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


class Callback:
    """Hooks the trainer calls on EVERY rank (so a hook may run collectives). Override what you need.

    A hook that logs calls `trainer.log(step, {...})`; a hook that should run every n steps
    checks `step % n == 0` itself (e.g. n = cfg.log.routing_every or cfg.eval.every).
    `trainer.model` is the plain model (routed FFNs have their `stats` after each forward),
    `trainer.engine` the DeepSpeed engine, `trainer.cfg` the resolved Config.

    Per step the trainer calls every callback's `on_step`, then agrees across ranks whether
    to stop after this step (`trainer.stopping`: the reason, or None), then every callback's
    `on_step_end`: work that must follow that decision (saving a checkpoint) goes there.
    """

    def on_train_start(self, trainer: "Trainer") -> None:
        pass

    def on_step(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None:
        """After optimizer step `step` (1-based); `metrics` has loss, ce, aux, lr (and speed on log steps)."""

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        """After every `on_step` of step `step` and the ranks' decision `trainer.stopping`."""

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        pass


def peak_flops(cfg: Config, device: torch.device, bf16: bool) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: log.peak_tflops if set, else a guess for known GPUs, else None."""
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops * 1e12
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None  # CPU or an unknown GPU: MFU is not reported


class Monitor:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int, fresh: bool, flops_per_token: float,
                 peak_flops: Optional[float], world: int, enabled: bool):
        self.cfg = cfg
        self.run_dir = run_dir
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak = peak_flops * world if peak_flops else None  # the whole job's peak
        self._tokens = 0
        self._seconds = 0.0
        self._file = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._file = _open_metrics(run_dir / METRICS, start_step, fresh)
        self._wandb = _init_wandb(cfg, run_dir) if cfg.log.wandb != "disabled" else None
        if sys.stderr.isatty():
            self._bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, leave=True)

    def count(self, tokens: int, seconds: float) -> None:
        """Add one step's tokens (all ranks) and wall time to the running speed measurement."""
        self._tokens += tokens
        self._seconds += seconds

    def speed(self) -> dict[str, float]:
        """tokens/s (and MFU when a peak is known) since the previous call.

        MFU = flops_per_token · tokens/s / (peak FLOP/s per device · devices): the fraction
        of the hardware's peak that the model's own arithmetic uses (PaLM's definition,
        no credit for recomputation).
        """
        out = {"tokens_per_s": self._tokens / max(self._seconds, 1e-9)}
        if self.peak:
            out["mfu"] = self.flops_per_token * out["tokens_per_s"] / self.peak
        self._tokens, self._seconds = 0, 0.0
        return out

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record scalars for `step` in metrics.jsonl and wandb (rank 0 only; a no-op elsewhere)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def show(self, step: int, metrics: dict[str, Any]) -> None:
        """Advance the progress bar to `step`; on a log step also show the scalars."""
        if not self.enabled:
            return
        is_log_step = "tokens_per_s" in metrics
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if is_log_step:
                self._bar.set_postfix_str(_format(metrics), refresh=False)
        elif is_log_step:
            log.info("step %d/%d | %s", step, self.cfg.train.max_steps, _format(metrics))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self, ok: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if ok else 1)
        self._bar = self._file = self._wandb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _open_metrics(path: Path, start_step: int, fresh: bool):
    if path.exists():
        if fresh:  # an earlier run in this directory: keep its curve beside ours
            os.replace(path, path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
        else:  # resuming: drop what was logged after the checkpoint, it is about to be redone
            kept = [line for line in path.read_text().splitlines() if _step_of(line, path) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _step_of(line: str, path: Path) -> float:
    """The step of a metrics line; a torn or foreign line (a kill mid-write) counts as after
    every step, so resuming drops it."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        if line.strip():
            log.warning("warning: dropping an unreadable line of %s: %.60s", path, line)
        return math.inf


def _init_wandb(cfg: Config, run_dir: Path):
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    import wandb

    return wandb.init(project=cfg.log.project, name=cfg.log.run_name or cfg.name, dir=str(run_dir),
                      config=to_dict(cfg), mode=cfg.log.wandb,
                      settings=wandb.Settings(silent=True, console="off"))


def _plain(value: Any) -> Any:
    """A JSON value: tensors as numbers, and NaN/inf as the strings "NaN", "Infinity",
    "-Infinity" (bare NaN is not JSON; the strings are what JavaScript and pandas read back)."""
    value = value.item() if isinstance(value, torch.Tensor) else value
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _format(m: dict[str, Any]) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    if m.get("aux"):
        parts.append(f"aux {m['aux']:.4f}")
    parts.append(f"lr {m['lr']:.2e}")
    parts.append(f"{m['tokens_per_s'] / 1e3:.1f}k tok/s")
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    return " | ".join(parts)
