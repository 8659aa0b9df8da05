"""The routed FFN layer: router + dispatcher + experts (docs/routing.md, docs/lapsum.md).

`MoELayer(cfg, router)` fills a block's FFN slot for every router that returns a `Routing`
(`llm.routing.topk`, `llm.routing.lapsum_router`, plug-ins):
`layer(x [B, T, d], ctx) -> (y [B, T, d], aux_loss [])`. The router is called as
`router(x [B·T, d], k, ctx) -> Routing` (ctx: the block's `FFNContext`, with the token ids). A router with a budget (LapSum)
takes its k_l from `ctx.k` (the model's `ExpertBudget`); called without one it uses k_mean.

After every forward, `layer.stats` describes that call, as detached tensors on the
layer's device (nothing is read back to the host until a logger asks):

    k               []      the layer's budget: k_l for LapSum, top_k (1 for switch) otherwise
    tau             []      routers with a `tau` buffer (LapSum): the truncation threshold in use
    active_mean     []      experts computed per token, mean over tokens
    active_per_token [B, T] experts computed per token (int16)
    active_hist     [m + 1] number of tokens that computed 0, 1, ..., m experts
                            (m = slots per token: top_k, or LapSum's min(E, ceil(c·k_max)))
    load            [E]     fraction of the computed token-slots that went to each expert
    dropped_frac    []      fraction of routed token-slots dropped by capacity (0 when dropless)
    router_entropy  []      mean over tokens of the entropy (nats) of the router distribution
                            (softmax(r); LapSum: p / k_l)
    lb_loss, z_loss []      the unweighted load-balancing and z-losses (aux_loss weighs them)

The stats are computed on first access from references kept by the forward, so a step
that nobody logs costs nothing extra.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from llm.config import ModelConfig
from llm.initialization import output_std
from llm.routing.dispatch import Dispatcher, DispatchInfo
from llm.routing.experts import Experts


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
        self._last: Optional[tuple[dict[str, Tensor], DispatchInfo, int, int]] = None

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
        self._last = ({name: getattr(routing, name).detach() for name in ("k", "probs", "lb_loss", "z_loss")},
                      info, B, T)
        return y, routing.aux_loss

    @property
    def stats(self) -> dict[str, Tensor]:
        """Routing statistics of the last forward (see the module docstring)."""
        if self._last is None:
            return {}
        routing, info, B, T = self._last
        with torch.no_grad():
            active = info.kept.sum(-1)  # [N]
            probs = routing["probs"]
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
            computed = info.counts.sum().clamp(min=1)
            stats = {
                "k": routing["k"],
                "active_mean": active.float().mean(),
                "active_per_token": active.to(torch.int16).view(B, T),
                "active_hist": torch.bincount(active, minlength=info.kept.shape[1] + 1),
                "load": info.counts.float() / computed,
                "dropped_frac": 1.0 - info.counts.sum().float() / info.routed.clamp(min=1).float(),
                "router_entropy": entropy,
                "lb_loss": routing["lb_loss"],
                "z_loss": routing["z_loss"],
            }
            if isinstance(getattr(self.router, "tau", None), Tensor):
                stats["tau"] = self.router.tau.detach().clone()
        return stats
