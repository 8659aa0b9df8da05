"""Raw counts of routing decisions, summed over batches and divided once (`RoutingTally`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

LAYER_FIELDS = ("layer", "k", "k_share", "active_mean", "active_gap", "no_expert", "active_p50", "active_p90",
                "active_hist", "tokens",
                "load", "load_min", "load_max", "load_cv", "dropped", "entropy", "tau",
                "merge_weights", "max_weight", "top1_fraction", "prior", "segments")

class LayerTally:
    """Raw sums for one routed layer over any number of forwards.

    Sparse layers (MoELayer.stats): tokens, the active-experts histogram (counts of tokens
    that computed 0, 1, ... experts), computed and routed token-slots per expert and in all,
    and Σ entropy · tokens. SMEAR layers (SMEARLayer.stats): routed segments and, weighted by
    them, Σ merge weights, Σ max weight, Σ top-1 indicator and Σ entropy.
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.tokens = 0.0
        self.hist = np.zeros(0)  # [m + 1]
        self.load = np.zeros(n_experts)  # computed token-slots per expert
        self.routed = 0.0  # token-slots the router asked for (before capacity)
        self.entropy = 0.0  # Σ entropy · (tokens | segments)
        self.has_active = self.has_entropy = False
        self.segments = 0.0
        self.weights = np.zeros(n_experts)  # Σ merge weights · segments
        self.max_weight = 0.0
        self.top1 = np.zeros(n_experts)
        self.k: Optional[float] = None  # last seen (constant within a step)
        self.tau: Optional[float] = None
        self.prior: Optional[np.ndarray] = None

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Fold in one forward's `layer.stats` (either layer type; missing fields are skipped)."""
        if not stats:
            return
        s = {k: v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, float)
             for k, v in stats.items()}
        if "k" in s:
            self.k = float(s["k"])
        if "tau" in s:
            self.tau = float(s["tau"])
        if "routed_segments" in s:  # SMEAR
            n = float(s["routed_segments"])
            self.prior = s["prior"]
            if n > 0:  # a forward that routed no segment reports NaNs
                self.segments += n
                self.weights += n * s["expert_weight"]
                self.max_weight += n * float(s["max_weight"])
                self.top1 += n * s["top1_fraction"]
                self.entropy += n * float(s["entropy"])
                self.has_entropy = True
            return
        if "active_hist" not in s:  # deepspeed_topk: only the load of routed slots, as fractions
            if "load" in s:
                self.load += s["load"]
            return
        hist = s["active_hist"]
        if len(hist) > len(self.hist):
            self.hist = np.pad(self.hist, (0, len(hist) - len(self.hist)))
        self.hist[:len(hist)] += hist
        n = float(s["active_per_token"].size)
        computed = float(s["active_per_token"].sum())  # token-slots the experts computed
        self.tokens += n
        self.has_active = True
        self.load += np.rint(s["load"] * computed)  # back to counts: load = counts / computed
        # computed = routed · (1 − dropped); routed = 0 is the only way to drop everything.
        dropped = float(s["dropped_frac"])
        self.routed += round(computed / (1.0 - dropped)) if dropped < 1.0 else 0.0
        self.entropy += n * float(s["router_entropy"])
        self.has_entropy = True

    def vector(self) -> np.ndarray:
        """All sums as one vector (for an all-reduce across ranks)."""
        return np.concatenate([[self.tokens, self.routed, self.entropy, self.segments, self.max_weight],
                               self.hist, self.load, self.weights, self.top1])

    def set_vector(self, v: np.ndarray) -> None:
        self.tokens, self.routed, self.entropy, self.segments, self.max_weight = v[:5].tolist()
        E, m = self.n_experts, len(self.hist)
        self.hist, rest = v[5:5 + m], v[5 + m:]
        self.load, self.weights, self.top1 = rest[:E], rest[E:2 * E], rest[2 * E:]

    def row(self, layer: int, K: Optional[float]) -> dict[str, Any]:
        """This layer's entry of the report (every field of LAYER_FIELDS; None where it does not apply)."""
        r: dict[str, Any] = dict.fromkeys(LAYER_FIELDS)
        r["layer"] = layer
        r["k"] = self.k
        r["k_share"] = self.k / K if self.k is not None and K else None
        r["tau"] = self.tau
        if self.has_active and self.tokens > 0:
            a = np.arange(len(self.hist))
            r["active_mean"] = float((a * self.hist).sum() / self.tokens)
            r["active_gap"] = r["active_mean"] - self.k if self.k is not None else None  # LapSum: ≈ 0 is on budget
            r["no_expert"] = float(self.hist[0] / self.tokens)  # tokens the layer computed nothing for
            r["active_p50"], r["active_p90"] = _hist_quantile(self.hist, 1, 2), _hist_quantile(self.hist, 9, 10)
            r["active_hist"] = [int(c) for c in self.hist]
            r["tokens"] = int(self.tokens)
        if self.load.sum() > 0:
            load = self.load / self.load.sum()
            r["load"] = load.tolist()
            r["load_min"], r["load_max"] = float(load.min()), float(load.max())
            r["load_cv"] = float(load.std() / load.mean())  # population std; 0 = perfectly even
        if self.has_active:
            r["dropped"] = float(1.0 - self.load.sum() / self.routed) if self.routed > 0 else 0.0
        if self.segments > 0:
            r["merge_weights"] = (self.weights / self.segments).tolist()
            r["max_weight"] = self.max_weight / self.segments
            r["top1_fraction"] = (self.top1 / self.segments).tolist()
            r["segments"] = int(self.segments)
        if self.prior is not None:
            r["prior"] = self.prior.tolist()
        if self.has_entropy:
            count = self.segments if self.prior is not None else self.tokens
            r["entropy"] = self.entropy / count if count > 0 else None
        return r


def _hist_quantile(hist: np.ndarray, num: int, den: int) -> int:
    """Smallest a with (tokens computing ≤ a experts) ≥ num/den of all tokens (exact integer test)."""
    cdf = np.cumsum(hist)
    return int(np.argmax(cdf * den >= num * cdf[-1]))


class RoutingTally:
    """One LayerTally per routed layer, in layer order."""

    def __init__(self, layers: Sequence[int], n_experts: int):
        self.layers = list(layers)
        self.per_layer = [LayerTally(n_experts) for _ in self.layers]

    def add(self, j: int, stats: dict[str, torch.Tensor]) -> None:
        self.per_layer[j].add(stats)

    def all_reduce(self, device: torch.device) -> None:
        """Sum the counts of every rank (each saw its own tokens); call on every rank."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        vectors = [t.vector() for t in self.per_layer]
        flat = torch.from_numpy(np.concatenate(vectors)).to(device)
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        start = 0
        for t, v in zip(self.per_layer, vectors):
            t.set_vector(flat[start:start + len(v)])
            start += len(v)

    def rows(self, K: Optional[float]) -> list[dict[str, Any]]:
        return [t.row(layer, K) for layer, t in zip(self.layers, self.per_layer)]
