"""What a routed layer's last forward did, as raw counts (docs/routing.md#statistics).

Every routed layer's `stats` property returns a `RoutingStats`. `counts` holds sums only,
so any number of forwards and ranks combine by adding them (`llm.inspection.statistics`
adds, all-reduces once and divides once); `state` holds values that are not sums and of
which the last one seen stands. The keys a layer may report, all optional:

    counts
      tokens         []      tokens the layer saw
      active_hist    [m + 1] tokens that computed 0, 1, ..., m experts (m: slots per token)
      computed       [E]     token-slots each expert computed
      routed         [E]     token-slots the router sent each expert, before capacity
      decisions      []      routing distributions summed below (one per token, or per segment)
      entropy        []      Σ entropy (nats) of those distributions
      merge_weights  [E]     Σ weight of each expert (layers that merge experts)
      max_weight     []      Σ largest weight
      top1           [E]     distributions whose largest weight is each expert
      segments       []      segments routed by the router (SMEAR)
      prior_segments []      segments routed by the prior (SMEAR)
    state
      k              []      the layer's budget k_l (top_k for fixed-k routers)
      tau            []      the truncation threshold in use (LapSum)
      prior          [E]     the prior merge weights (SMEAR)

Tensors are detached and stay on the layer's device: reading them costs no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    counts: dict[str, Tensor] = field(default_factory=dict)  # additive sums
    state: dict[str, Tensor] = field(default_factory=dict)  # last value stands


def distribution_counts(probs: Tensor, counted: Optional[Tensor] = None) -> dict[str, Tensor]:
    """`decisions` and Σ `entropy` of routing distributions probs [..., E] (each sums to 1),
    over those where `counted` [...] (bool) is set, or over all of them."""
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [...]
    if counted is None:
        return {"decisions": torch.full((), entropy.numel(), device=probs.device),
                "entropy": entropy.sum(dtype=torch.float64)}
    return {"decisions": counted.sum(), "entropy": (entropy.double() * counted).sum()}


def bincount(index: Tensor, n: int, weights: Optional[Tensor] = None) -> Tensor:
    """torch.bincount into n bins, without the host sync CUDA's bincount spends on sizing its output."""
    index = index.reshape(-1).long()
    weights = torch.ones_like(index) if weights is None else weights.reshape(-1)
    return weights.new_zeros(n).scatter_add_(0, index, weights)


def slot_counts(active: Tensor, m: int, computed: Tensor, routed: Tensor) -> dict[str, Tensor]:
    """Counts of one call's token-slots: active [N] experts computed per token (at most m),
    computed [E] and routed [E] slots per expert, after and before capacity."""
    return {"tokens": torch.full((), active.numel(), device=active.device),  # a fill, not a copy from the host
            "active_hist": bincount(active, m + 1),
            "computed": computed, "routed": routed}
