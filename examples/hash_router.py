"""Hash Layers (Roller et al., 2021, "Hash Layers For Large Sparse Models") as a router plug-in.

Each token id goes to one fixed expert, chosen by a hash of the id: no learned gate, no
load-balancing loss, and causal by construction (a token's expert depends on that token
alone). The layer is the shared `MoELayer` (one dispatcher, one expert store), so expert
parallelism, statistics and inspection come with it; only the router is new.

Listed in a config's `imports:` (configs/tiny-hash.yaml), this module registers the router
`hash` when it is imported; `llm eval`, `llm inspect` and `llm export` import it again from
the checkpoint's config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from llm.config import ModelConfig, RouterOptions
from llm.routing.moe import MoELayer
from llm.routing.registry import RouterSpec, register
from llm.routing.routers import Routing, load_balancing_loss

# Knuth's multiplicative hash: consecutive ids land on unrelated experts.
_GOLDEN = 2654435761


@dataclass
class HashConfig(RouterOptions):
    """model.routing.hash."""

    seed: int = 0  # mixed into the hash: another seed, another fixed token → expert map


def hashed_expert(input_ids: Tensor, n_experts: int, seed: int) -> Tensor:
    """The expert of every token id (same shape as input_ids), in [0, n_experts)."""
    return ((input_ids.long() + seed) * _GOLDEN % 2 ** 32) % n_experts


class HashRouter(nn.Module):
    """One expert per token, by the hash of its id, with weight 1 (nothing to learn)."""

    def __init__(self, n_experts: int, seed: int):
        super().__init__()
        self.n_experts, self.seed = n_experts, seed
        self.register_buffer("k", torch.tensor(1.0, dtype=torch.float64), persistent=False)

    @property
    def slots(self) -> int:
        return 1

    def forward(self, x: Tensor, k: Optional[Tensor] = None, ctx=None) -> Routing:
        """x: [N, d]; the experts come from `ctx.input_ids` [B, T] (N = B·T), not from x."""
        if ctx is None:
            raise ValueError("the hash router needs the block's token ids (ctx.input_ids)")
        experts = hashed_expert(ctx.input_ids.reshape(-1, 1), self.n_experts, self.seed)  # [N, 1]
        weights = torch.ones(experts.shape, dtype=torch.float32, device=x.device)  # [N, 1]
        probs = torch.zeros(x.shape[0], self.n_experts, device=x.device).scatter_(1, experts, 1.0)  # [N, E]
        zero = x.new_zeros((), dtype=torch.float32)
        return Routing(experts=experts, weights=weights, valid=None, probs=probs, k=self.k, aux_loss=zero,
                       lb_loss=load_balancing_loss(probs, experts, None), z_loss=zero)


def hash_layer(cfg: ModelConfig) -> MoELayer:
    return MoELayer(cfg, HashRouter(cfg.routing.n_experts, cfg.routing.options.seed))


register(RouterSpec(
    name="hash", layer=hash_layer, active_experts=lambda cfg: 1, options=HashConfig,
    export_refusal="the exported modeling code's FFNs see hidden states, not the token ids a hash routes by"))
