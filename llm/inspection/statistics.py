"""Raw counts of routing decisions, summed over batches and ranks and divided once (`RoutingTally`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llm.routing.stats import RoutingStats

LAYER_FIELDS = ("layer", "k", "k_share", "active_mean", "active_gap", "no_expert", "active_p50", "active_p90",
                "active_hist", "tokens",
                "load", "load_min", "load_max", "load_cv", "dropped", "entropy", "tau",
                "merge_weights", "max_weight", "top1_fraction", "prior", "segments")


class LayerTally:
    """The sums of one routed layer's `RoutingStats` counts over any number of forwards,
    whatever keys the layer reports (float64, on the layer's device until `row`)."""

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}

    def add(self, stats: RoutingStats) -> None:
        for key, value in stats.counts.items():
            value = value.detach().double().reshape(-1)
            total = self.counts.get(key)
            if total is not None:  # histograms of different lengths line up at 0
                n = max(len(total), len(value))
                value = F.pad(value, (0, n - len(value))) + F.pad(total, (0, n - len(total)))
            self.counts[key] = value
        self.state.update(stats.state)

    def row(self, layer: int, K: Optional[float]) -> dict[str, Any]:
        """This layer's entry of the report: every field of LAYER_FIELDS, None where it does not apply."""
        c = {key: v.cpu().numpy() for key, v in self.counts.items()}
        s = {key: v.detach().double().cpu().numpy() for key, v in self.state.items()}
        return layer_row(layer, c, s, K)


def layer_row(layer: int, c: dict[str, np.ndarray], s: dict[str, np.ndarray], K: Optional[float]) -> dict[str, Any]:
    """Counts c and state s of one layer (`RoutingStats` keys, as arrays) turned into ratios:
    the one place where the report's and the training logger's numbers are divided."""
    r: dict[str, Any] = dict.fromkeys(LAYER_FIELDS)
    r["layer"] = layer
    r["k"] = float(s["k"]) if "k" in s else None
    r["k_share"] = r["k"] / K if r["k"] is not None and K else None
    r["tau"] = float(s["tau"]) if "tau" in s else None
    r["prior"] = s["prior"].tolist() if "prior" in s else None
    hist = c.get("active_hist")
    if hist is not None and hist.sum() > 0:
        tokens = hist.sum()
        r["active_mean"] = float((np.arange(len(hist)) * hist).sum() / tokens)
        r["active_gap"] = r["active_mean"] - r["k"] if r["k"] is not None else None  # LapSum: ≈ 0 is on budget
        r["no_expert"] = float(hist[0] / tokens)  # tokens the layer computed nothing for
        r["active_p50"], r["active_p90"] = _hist_quantile(hist, 1, 2), _hist_quantile(hist, 9, 10)
        r["active_hist"] = [int(n) for n in hist]
    if "tokens" in c:
        r["tokens"] = int(c["tokens"][0])
    computed = c.get("computed")
    if computed is not None and computed.sum() > 0:
        load = computed / computed.sum()
        r["load"] = load.tolist()
        r["load_min"], r["load_max"] = float(load.min()), float(load.max())
        r["load_cv"] = float(load.std() / load.mean())  # population std; 0 = perfectly even
    if computed is not None and "routed" in c:
        routed = c["routed"].sum()
        r["dropped"] = float(1.0 - computed.sum() / routed) if routed > 0 else 0.0
    decisions = float(c["decisions"][0]) if "decisions" in c else 0.0
    if decisions > 0:
        r["entropy"] = float(c["entropy"][0] / decisions)
        if "merge_weights" in c:
            r["merge_weights"] = (c["merge_weights"] / decisions).tolist()
            r["max_weight"] = float(c["max_weight"][0] / decisions)
            r["top1_fraction"] = (c["top1"] / decisions).tolist()
    if "segments" in c and c["segments"][0] > 0:
        r["segments"] = int(c["segments"][0])
    return r


def _hist_quantile(hist: np.ndarray, num: int, den: int) -> int:
    """Smallest a with (tokens computing ≤ a experts) ≥ num/den of all tokens (exact integer test)."""
    cdf = np.cumsum(hist)
    return int(np.argmax(cdf * den >= num * cdf[-1]))


class RoutingTally:
    """One LayerTally per routed layer, in layer order."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self.per_layer = [LayerTally() for _ in self.layers]

    def add(self, j: int, stats: RoutingStats) -> None:
        self.per_layer[j].add(stats)

    def all_reduce(self, device: torch.device) -> None:
        """Sum the counts of every rank (each saw its own tokens) in one collective; call on every rank."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        parts = [(t, key) for t in self.per_layer for key in sorted(t.counts)]
        flat = torch.cat([t.counts[key].to(device) for t, key in parts])
        dist.all_reduce(flat)
        for (t, key), summed in zip(parts, flat.split([t.counts[key].numel() for t, key in parts])):
            t.counts[key] = summed

    def rows(self, K: Optional[float]) -> list[dict[str, Any]]:
        return [t.row(layer, K) for layer, t in zip(self.layers, self.per_layer)]
