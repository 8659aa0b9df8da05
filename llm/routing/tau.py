"""LapSum's τ controller: per-step slot histograms, summed over ranks, one update per step.

A LapSum layer computes the slots whose weight p exceeds τ (docs/lapsum.md#truncation).
To keep it at k_l experts per token, every training forward adds its candidate slots to
a histogram over fixed, log-spaced bins of p, and the number of slots it should have kept,
round(N·k_l), to a target count (`SlotHistogram.observe`). After the optimizer step,
`end_step(model)` sums the histograms of every layer over all ranks in one all-reduce
and sets each layer's τ to the threshold that would have kept the target on the whole
step's tokens (`threshold`), blended in by `tau_ema` (docs/lapsum-budget.md).

Why histograms and not a sort of the candidates:
- they are integer counts, so the sum over ranks is exact and equals the histogram of the
  global batch: a run on any number of data- or expert-parallel ranks sets exactly the
  τ of one process that saw all their tokens;
- several forwards per step (gradient accumulation, activation checkpointing's recompute)
  only add counts; τ changes once per step, so every micro-batch of step s and its
  recompute use the τ of steps < s, and a recompute (which counts its tokens again, as
  does every other micro-batch of the step) leaves the quantile where it was;
- nothing in the forward synchronises ranks or the host.
The price is resolution: τ is exact to within one bin, a relative 0.34 %, interpolated
inside the bin.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llm.routing.stats import bincount

_BINS = 4096  # from p = 1e-6 (a τ that low keeps every slot anyway) to 1


def edges_on(device: torch.device) -> Tensor:
    """Upper bin edges, fp32, ascending from 1e-6 to 1 (ratio 1.0034 between neighbours).

    Built where they are used (4096 numbers; a constant under torch.compile), not kept in a
    buffer: DeepSpeed's bf16 mode casts every floating buffer to bf16, which would merge
    neighbouring edges.
    """
    return torch.logspace(-6.0, 0.0, _BINS, dtype=torch.float64, device=device).float()


class SlotHistogram(nn.Module):
    """The candidate slots a layer saw since the last `end_step`, as counts per bin of p.

    counts[i] holds the slots with edges[i−1] < c ≤ edges[i] (bin 0: c ≤ 1e-6, including the
    −1 of slots past the expansion cap; bin _BINS: c > 1, the always-kept top-1 slots);
    target is Σ round(N·k_l) over the forwards. Both are int64 and not checkpointed: a
    step's counts never outlive the step.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("counts", torch.zeros(_BINS + 2, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def observe(self, candidates: Tensor, k: Tensor) -> None:
        """candidates [N, m]: each token's slot weights (−1 never kept, > 1 always kept); k: [] k_l."""
        bins = torch.bucketize(candidates.flatten().float(), edges_on(candidates.device))  # [N·m] in 0.._BINS
        self.counts[:-1] += bincount(bins, _BINS + 1)
        self.counts[-1] += torch.round(candidates.shape[0] * k.double()).long()

    def pending(self) -> Tensor:
        """The counts to sum over ranks: [bins..., target]."""
        return self.counts

    def reset(self) -> None:
        self.counts.zero_()


def threshold(stats: Tensor) -> Tensor:
    """The τ at which `c > τ` keeps `target` of the counted slots (stats = [counts..., target]).

    Found on the device: the bin where the count of slots above its edges crosses the
    target, then log-linear interpolation inside it (the bin's slots taken as spread
    evenly in log p). 0 when even every slot above 1e-6 is too few; 1 when the always-kept
    slots alone reach the target.
    """
    edges = edges_on(stats.device)
    counts, target = stats[:-1].double(), stats[-1].double()
    above = counts.flip(0).cumsum(0).flip(0)[1:]  # above[j] = slots with c > edges[j]  [_BINS]
    j = (above >= target).sum() - 1  # τ ∈ [edges[j], edges[j+1]); −1: below edges[0]
    inside = j.clamp(0, _BINS - 2)
    lo, hi = edges[inside].double(), edges[inside + 1].double()
    n = counts[inside + 1].clamp(min=1.0)  # slots in (lo, hi]
    need = target - above[inside + 1]  # of them, the ones to keep
    tau = lo * (hi / lo) ** (1.0 - (need / n).clamp(0.0, 1.0))
    tau = torch.where(j < 0, torch.zeros_like(tau), tau)
    return torch.where(j >= _BINS - 1, torch.ones_like(tau), tau)


def end_step(model: nn.Module, reduce: bool = True) -> None:
    """After an optimizer step: hand every module that tracks per-step routing statistics
    (a `step_statistics()` / `apply_step_statistics(summed)` pair) their sum over ranks.

    One all-reduce for all layers. Every rank must call it at the same point (the modules
    are the same on every rank). `reduce=False` is for a single process that stands in for
    all ranks (tests compare it with a multi-rank run).
    """
    owners = [m for m in model.modules() if hasattr(m, "apply_step_statistics")]
    pending = [(m, s) for m in owners if (s := m.step_statistics()) is not None]
    if not pending:
        return
    flat = torch.cat([s for _, s in pending])
    if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    for (module, s), part in zip(pending, flat.split([s.numel() for _, s in pending])):
        module.apply_step_statistics(part)
