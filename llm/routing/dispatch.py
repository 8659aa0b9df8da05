"""The one dispatcher (docs/routing.md#dispatcher): move token-slots to their experts and back.

Every router's `Routing` (chosen experts and weights, [N, m] slots per token) is run
the same way:

1. **Permute** (local, index work only): slots are listed in position-major order
   (all sequences' position 0, then position 1, ...), stably sorted by expert, so each
   expert's slots are contiguous and in position order. Slots a router marked invalid
   (LapSum truncation) go to a bucket past the last expert and are never computed.
2. **Capacity** (optional, `capacity_factor`): capacity = ceil(cf · tokens · k / E)
   slots per expert; an expert keeps the first `capacity` of its slots in position
   order and the rest skip it (residual only). Never by score or at random: whether
   token (b, t) is kept depends only on tokens at positions ≤ t, so capacity mode stays
   causal (docs/routing.md#causality). `capacity_factor=None` (the default) is dropless.
3. **Exchange** (`TokenExchange`): hands the expert-sorted rows to the ranks that hold
   the experts and brings the results back. `LocalExchange` (all experts on this rank)
   is the identity; expert parallelism plugs in an all-to-all here without touching
   routers or the permutation.
4. **Experts**: `Experts.forward` runs every expert on its contiguous slice (grouped GEMM).
5. **Combine**: y[token] = Σ_slots weight · expert output, one index_add over the rows.

Host syncs: none for dropless top-k (the slot count N·k is static). When slots can be
invalid or dropped (LapSum truncation, capacity) the number of computed rows is data
dependent and is read once per layer call to size the buffers, as other dropless MoE
implementations do; the alternative, padding to the bound, would multiply the FFN's
activation memory by m / (mean active experts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from llm.routing.routers import Routing


class TokenExchange(Protocol):
    """Moves expert-sorted rows to the ranks holding the experts and back.

    dispatch(x_sorted [M, d], counts [E_global], capacity) -> (x_local [M', d], local_counts [E_local], handle)
        x_sorted holds this rank's rows sorted by global expert id, counts[e] rows for
        expert e. x_local holds every row (from any rank) for this rank's experts,
        sorted by local expert, local_counts[e] rows for local expert e (rows may be
        padding, e.g. zeros, as long as combine drops them again).
        capacity: [] slots per expert in capacity mode (then counts <= capacity, so an
        implementation may use fixed-size splits), None when dropless.
    combine(y_local [M', d], handle) -> y_sorted [M, d]
        The inverse: expert outputs back to the rank and row each input came from.
    Both must be differentiable (the backward of dispatch is a combine and vice versa).
    """

    def dispatch(self, x_sorted: Tensor, counts: Tensor,
                 capacity: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Any]: ...

    def combine(self, y_local: Tensor, handle: Any) -> Tensor: ...


class LocalExchange:
    """All experts live on this rank: nothing moves."""

    def dispatch(self, x_sorted: Tensor, counts: Tensor,
                 capacity: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Any]:
        return x_sorted, counts, None

    def combine(self, y_local: Tensor, handle: Any) -> Tensor:
        return y_local


@dataclass
class DispatchInfo:
    """What happened to the slots of one call (detached; read by `MoELayer.stats`)."""

    kept: Tensor  # [N, m] bool: slot was computed (valid and within capacity)
    counts: Tensor  # [E] computed slots per expert
    routed: Tensor  # [E] slots the router asked each expert for (valid slots, before capacity)
    capacity: Optional[Tensor]  # [] slots per expert, None when dropless


class Dispatcher:
    """Runs a `Routing` through an expert store: permute, (capacity), exchange, experts, combine."""

    def __init__(self, n_experts: int, capacity_factor: Optional[float] = None,
                 exchange: Optional[TokenExchange] = None):
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor}: expected > 0, or None for dropless")
        self.n_experts = n_experts
        self.capacity_factor = capacity_factor
        self.exchange: TokenExchange = exchange if exchange is not None else LocalExchange()

    def __call__(self, x: Tensor, routing: Routing, experts) -> tuple[Tensor, DispatchInfo]:
        """x: [B, T, d] with routing over its B·T tokens in [B, T] order → y [B, T, d]."""
        B, T, d = x.shape
        N, m = routing.experts.shape
        if N != B * T:
            raise ValueError(f"routing covers {N} tokens, x has {B}x{T}")
        slot, counts, info = self.permute(routing, B, T)  # [M] slot ids sorted by expert, [E]
        token = torch.div(slot, m, rounding_mode="floor")  # [M] token (in [B, T] order) of each row
        x_sorted = x.reshape(N, d).index_select(0, token)  # [M, d]
        x_local, local_counts, handle = self.exchange.dispatch(x_sorted, counts, info.capacity)
        y_local = experts(x_local, local_counts)  # [M', d]
        y_sorted = self.exchange.combine(y_local, handle)  # [M, d]
        w = routing.weights.reshape(-1).index_select(0, slot)  # [M] fp32
        # Weight and sum in (at least) fp32, cast back once.
        acc = torch.promote_types(x.dtype, torch.float32)
        y = x.new_zeros(N, d, dtype=acc).index_add(0, token, y_sorted.to(acc) * w.to(acc)[:, None])
        return y.to(x.dtype).view(B, T, d), info

    @torch.no_grad()
    def permute(self, routing: Routing, B: int, T: int) -> tuple[Tensor, Tensor, DispatchInfo]:
        """The local permutation: which slots are computed, in expert-then-position order.

        Returns slot ids [M] into routing.experts.view(-1), the rows per expert [E], and the
        DispatchInfo. Index work only; no gradient flows through it.
        """
        E = self.n_experts
        N, m = routing.experts.shape
        device = routing.experts.device
        # Slot (b, t, j) has id (b·T + t)·m + j; list them position-major: t, then b, then j.
        order = torch.arange(N * m, device=device)
        if B > 1:
            order = order.view(B, T, m).transpose(0, 1).reshape(-1)  # [S]
        key = routing.experts.reshape(-1).index_select(0, order)  # [S] expert of each slot
        if routing.valid is not None:
            key = key.masked_fill(~routing.valid.reshape(-1).index_select(0, order), E)  # E = not computed
        key_sorted, perm = torch.sort(key, stable=True)  # [S]
        slot = order.index_select(0, perm)  # [S] slot ids, by expert, then position
        counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(
            0, key, torch.ones_like(key))[:E]  # [E] routed slots per expert
        routed = counts
        capacity = None
        if self.capacity_factor is not None:
            capacity = torch.ceil(self.capacity_factor * N * routing.k.detach().double() / E).long()
            starts = torch.cumsum(counts, 0) - counts  # [E]
            starts = torch.cat([starts, starts.new_full((1,), N * m)])  # [E + 1]
            rank = torch.arange(N * m, device=device) - starts.index_select(0, key_sorted)  # [S]
            keep = (key_sorted < E) & (rank < capacity)  # a prefix of each expert's run
            slot = slot[keep]  # [M] (data-dependent size: one host sync)
            counts = torch.minimum(counts, capacity)
        elif routing.valid is not None:
            slot = slot[key_sorted < E]  # [M] (data-dependent size: one host sync)
        kept = torch.zeros(N * m, dtype=torch.bool, device=device).index_fill_(0, slot, True).view(N, m)
        return slot, counts, DispatchInfo(kept=kept, counts=counts, routed=routed, capacity=capacity)
