"""Routing statistics during training, from the forwards the trainer runs anyway."""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import numpy as np
import torch

from llm.inspection.measure import global_budget, layer_kind
from llm.inspection.report import MERGE, over_time_quantity, summary_line
from llm.inspection.statistics import RoutingTally
from llm.monitor import Callback
from llm.routing import registry

log = logging.getLogger("llm")


class RoutingStatsCallback(Callback):
    """Per-layer routing statistics every `log.routing_every` steps, from the training forwards.

    Forward hooks on the routed FFNs read each layer's `stats` right after its forward, but
    only during the steps that will be logged and only in training mode: validation
    forwards (which the trainer runs before the callbacks on eval steps) never mix in, and
    all micro-batches of a step with gradient accumulation count. The counts of all ranks
    are summed before logging. Logged as scalars `routing/layer{l}/{field}` (l = block index),
    a wandb table and bar chart, and one console line.
    """

    SCALARS = ("k", "k_share", "active_mean", "active_gap", "no_expert", "active_p50", "active_p90", "load_min",
               "load_max", "load_cv",
               "dropped", "entropy", "max_weight")

    def __init__(self, every: int):
        self.every = every
        self._tally: Optional[RoutingTally] = None
        self._armed = False
        self._handles: list = []
        self._K: Optional[float] = None

    def on_train_start(self, trainer) -> None:
        model = trainer.model
        ffns = model.routed_ffns()
        if not ffns:
            return
        cfg = trainer.cfg
        self._K = global_budget(cfg)
        self._kind = layer_kind(cfg)
        self._budgeted = registry.get(cfg.model.routing.router).budget is not None
        self._layers = sorted(model.route_index)
        for j, ffn in enumerate(ffns):
            self._handles.append(ffn.register_forward_hook(self._hook(j)))
        self._arm(trainer.step + 1)

    def _hook(self, j: int):
        def hook(module, args, output):
            if self._armed and module.training:
                self._tally.add(j, module.stats)
        return hook

    def _arm(self, next_step: int) -> None:
        self._armed = next_step % self.every == 0
        self._tally = RoutingTally(self._layers) if self._armed else None

    def on_step(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        if not self._handles:
            return
        if step % self.every == 0 and self._tally is not None:
            self._tally.all_reduce(getattr(trainer, "device", torch.device("cpu")))
            rows = self._tally.rows(self._K)
            trainer.log(step, self.scalars(rows))
            if hasattr(trainer, "monitor"):
                trainer.monitor.message(f"step {step}: routing {summary_line(self._kind, rows)}")
            self._log_tables(step, self._kind, self._budgeted, rows)
        self._arm(step + 1)

    def on_train_end(self, trainer, summary: dict[str, Any]) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @classmethod
    def scalars(cls, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = {}
        for r in rows:
            for key in cls.SCALARS:
                if r[key] is not None:
                    out[f"routing/layer{r['layer']}/{key}"] = float(r[key])
        for key in ("active_mean", "load_cv", "entropy"):
            vals = [r[key] for r in rows if r[key] is not None]
            if vals:
                out[f"routing/{key}"] = float(np.mean(vals))  # mean over layers
        return out

    @staticmethod
    def _log_tables(step: int, kind: str, budgeted: bool, rows: list[dict[str, Any]]) -> None:
        """A per-layer wandb.Table and bar chart, when this process has a wandb run (rank 0)."""
        wandb = sys.modules.get("wandb")  # imported by the Monitor only when wandb logging is on
        if wandb is None or wandb.run is None:
            return
        merge = kind == MERGE
        cols = ["layer", "entropy", "max_weight"] if merge else \
            ["layer", "k", "k_share", "active_mean", "active_gap", "no_expert", "active_p90", "load_cv", "dropped",
             "entropy"]
        table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
        per_expert = wandb.Table(columns=["layer", "expert", "merge_weight" if merge else "load"], data=[
            [r["layer"], e, v] for r in rows for e, v in enumerate((r["merge_weights"] if merge else r["load"]) or [])])
        y, title = over_time_quantity(kind, budgeted)
        wandb.run.log({
            "routing/layers": table,
            "routing/experts": per_expert,
            "routing/per_layer": wandb.plot.bar(table, "layer", y, title=f"{title} per layer (step {step})"),
        }, step=step)
