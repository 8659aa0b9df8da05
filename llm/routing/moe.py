"""The routed FFN layer: router + dispatcher + experts (docs/routing.md, docs/lapsum.md).

`MoELayer(cfg, router)` fills a block's FFN slot for every router that returns a `Routing`
(`llm.routing.topk`, `llm.routing.lapsum_router`, plug-ins):
`layer(x [B, T, d], ctx) -> (y [B, T, d], aux_loss [])`. The router is called as
`router(x [B·T, d], k, ctx) -> Routing` (ctx: the block's `FFNContext`, with the token ids). A router with a budget (LapSum)
takes its k_l from `ctx.k` (the model's `ExpertBudget`); called without one it uses k_mean.

After every forward, `layer.stats` is a `RoutingStats` of that call (llm/routing/stats.py):
counts `tokens`, `active_hist`, `computed`, `routed`, `decisions` (= tokens) and `entropy`
(of the router distribution: softmax(r); LapSum: p / k_l), state `k` (k_l for LapSum, top_k
otherwise) and `tau` for routers with a `tau` buffer (LapSum). They are computed on first
access from references kept by the forward, so a step that nobody logs costs nothing extra.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from llm.config import ModelConfig
from llm.initialization import output_std
from llm.routing.dispatch import Dispatcher, DispatchInfo
from llm.routing.experts import Experts
from llm.routing.stats import RoutingStats, distribution_counts, slot_counts


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, router: nn.Module, k_default: Optional[float] = None):
        super().__init__()
        r = cfg.routing
        self.router = router
        self.experts = Experts(r.n_experts, cfg.d_model, r.d_expert or cfg.d_ff, cfg.init_std, output_std(cfg))
        self.dispatcher = Dispatcher(r.n_experts, r.capacity_factor)
        # The budget a router with one (LapSum) uses when the model passes none; others ignore k.
        self.register_buffer("k_default", None if k_default is None else torch.tensor(k_default, dtype=torch.float64),
                             persistent=False)
        self._last: Optional[tuple[Tensor, Tensor, DispatchInfo]] = None

    @property
    def n_experts(self) -> int:
        return self.experts.n_global

    def shard(self, ep, merge_mode: str = "auto") -> None:
        """Expert parallelism (docs/expert-parallel.md#exchange): keep this rank's experts and
        exchange tokens by all-to-all. `merge_mode` is for layers that merge experts."""
        from llm.parallel.expert import AllToAllExchange, shard_store

        shard_store(self.experts, ep)
        self.dispatcher.exchange = AllToAllExchange(ep, self.experts.n_global)

    def forward(self, x: Tensor, ctx=None) -> tuple[Tensor, Tensor]:
        B, T, d = x.shape
        k = ctx.k if ctx is not None and ctx.k is not None else self.k_default
        routing = self.router(x.reshape(B * T, d), k, ctx)
        y, info = self.dispatcher(x, routing, self.experts)
        # Detached views (no copies): the stats never hold on to the autograd graph.
        self._last = (routing.k.detach(), routing.probs.detach(), info)
        return y, routing.aux_loss

    @property
    def stats(self) -> RoutingStats:
        """Routing statistics of the last forward (see the module docstring)."""
        if self._last is None:
            return RoutingStats()
        k, probs, info = self._last
        with torch.no_grad():
            counts = {**slot_counts(info.kept.sum(-1), info.kept.shape[1], info.counts, info.routed),
                      **distribution_counts(probs)}
        state = {"k": k}
        if isinstance(getattr(self.router, "tau", None), Tensor):
            state["tau"] = self.router.tau.detach().clone()
        return RoutingStats(counts, state)
