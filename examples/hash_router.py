"""Hash Layers (Roller et al., 2021, "Hash Layers For Large Sparse Models") as a router plug-in.

Each token id goes to one fixed expert, chosen by a hash of the id: no learned gate, no
load-balancing loss, and causal by construction (a token's expert depends on that token
alone). The layer is the shared `MoELayer` (one dispatcher, one expert store), so expert
parallelism, statistics and inspection come with it; only the router is new.

Listed in a config's `imports:` (configs/tiny-hash.yaml), this module registers the router
`hash` when it is imported; `llm eval`, `llm inspect` and `llm export` import it again from
the checkpoint's config. `HashFFN` is the layer of the exported model: `llm export` appends
its source, and that of `hashed_expert`, to the exported modeling code
(docs/routing.md#exported-ffn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from llm.config import ModelConfig, RouterOptions
from llm.routing.moe import MoELayer
from llm.routing.registry import ExportCode, LayerExport, RouterSpec, experts_spec, export_parameters, register
from llm.routing.routers import Routing, load_balancing_loss

if TYPE_CHECKING:  # HashFFN runs inside the exported modeling code, which defines these names
    from llm.export.modeling_routed import Experts, RoutedConfig


@dataclass
class HashConfig(RouterOptions):
    """model.routing.hash."""

    seed: int = 0  # mixed into the hash: another seed, another fixed token → expert map


def hashed_expert(input_ids: torch.Tensor, n_experts: int, seed: int) -> torch.Tensor:
    """The expert of every token id (same shape as input_ids), in [0, n_experts)."""
    golden = 2654435761  # Knuth's multiplicative hash: consecutive ids land on unrelated experts
    return ((input_ids.long() + seed) * golden % 2 ** 32) % n_experts


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


class HashFFN(nn.Module):
    """The hash layer of the exported model: each token runs through the expert of its own id,
    with weight 1. A decoding step passes only the new tokens' ids, which is all it needs."""

    def __init__(self, config: RoutedConfig, spec: dict):
        super().__init__()
        self.seed = spec["seed"]
        self.experts = Experts(spec["n_experts"], config.hidden_size, spec["d_expert"])

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor], start: int,
                state: Optional[dict]) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("hash routing needs input_ids (the token ids choose the experts), not inputs_embeds")
        flat = x.reshape(-1, x.shape[-1])  # [N, d]
        experts = hashed_expert(input_ids.reshape(-1, 1), self.experts.w1.shape[0], self.seed)  # [N, 1]
        weights = torch.ones(experts.shape, device=x.device)  # [N, 1]
        return self.experts.combine(flat, experts, weights).view_as(x)


def hash_export(ffn: MoELayer, cfg: ModelConfig, k: Optional[float] = None) -> LayerExport:
    return LayerExport({"ffn": "hash", **experts_spec(cfg), "seed": ffn.router.seed}, export_parameters(ffn))


register(RouterSpec(
    name="hash", layer=hash_layer, active_experts=lambda cfg: 1, options=HashConfig,
    export=hash_export, export_code=ExportCode(ffn=HashFFN, helpers=(hashed_expert,))))
