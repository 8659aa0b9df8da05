"""Switch (`router: switch`, k = 1) and top-k (`router: topk`) routing (docs/routing.md#top-k-and-switch).

p = softmax(r); the k largest; renormalised to sum to 1 when k > 1. k = 1 is Switch:
y = p_e E_e(x), not renormalised (otherwise the weight is always 1 and the router would
learn only from the aux loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from llm.config import ConfigError, ModelConfig, RouterOptions
from llm.routing.moe import MoELayer
from llm.routing.registry import LayerExport, RouterSpec, experts_spec, export_parameters, register
from llm.routing.routers import Routing, load_balancing_loss, router_logits, z_loss


@dataclass
class TopKConfig(RouterOptions):
    """model.routing.topk."""

    k: int = 2  # experts per token
    flat_names = {"top_k": "k"}

    def validate(self, model: ModelConfig, key: str) -> None:
        n_experts = model.routing.n_experts
        if not 1 <= self.k <= n_experts:
            raise ConfigError(f"{key}.k={self.k}: expected 1 <= k <= model.routing.n_experts={n_experts}")


class TopKRouter(nn.Module):
    """Switch (k = 1) and top-k (k > 1, renormalised) routing (docs/routing.md#top-k-and-switch)."""

    def __init__(self, d_model: int, n_experts: int, k: int, init_std: float,
                 aux_loss_coef: float, z_loss_coef: float):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"top-k routing needs 1 <= k <= n_experts={n_experts}, got k={k}")
        self.n_experts, self.top_k = n_experts, k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.register_buffer("k", torch.tensor(float(k), dtype=torch.float64), persistent=False)

    @property
    def slots(self) -> int:
        """Slots per token in the `Routing` this router returns."""
        return self.top_k

    def forward(self, x: Tensor, k: Optional[Tensor] = None, ctx=None) -> Routing:
        """x: [N, d]. `k` is ignored (top-k has a fixed budget), and so is the block's `ctx`."""
        logits = router_logits(self.gate, x)  # [N, E]
        probs = logits.softmax(-1)  # [N, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        lb = load_balancing_loss(probs, experts, None)
        z = z_loss(logits)
        return Routing(
            experts=experts, weights=weights, valid=None, probs=probs,
            k=self.k,
            aux_loss=self.aux_loss_coef * lb + self.z_loss_coef * z, lb_loss=lb, z_loss=z,
        )


def topk_layer(cfg: ModelConfig, k: int) -> MoELayer:
    r = cfg.routing
    return MoELayer(cfg, TopKRouter(cfg.d_model, r.n_experts, k, cfg.init_std, r.aux_loss_coef, r.z_loss_coef))


def topk_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float] = None) -> LayerExport:
    """Top-k renormalises its k weights; Switch (top-1) keeps the router probability."""
    top_k = ffn.router.top_k
    return LayerExport({"ffn": "topk", **experts_spec(cfg), "top_k": top_k, "renormalize": top_k > 1},
                       export_parameters(ffn))


register(RouterSpec(name="switch", layer=lambda cfg: topk_layer(cfg, 1), active_experts=lambda cfg: 1,
                    export=topk_export))
def mixtral_compatible(cfg: ModelConfig) -> Optional[str]:
    """Mixtral's router is softmax → top-k → renormalise, in every block, dropless."""
    r = cfg.routing
    return "mixtral" if r.options.k > 1 and r.every == 1 and r.capacity_factor is None else None


register(RouterSpec(name="topk", layer=lambda cfg: topk_layer(cfg, cfg.routing.options.k),
                    active_experts=lambda cfg: cfg.routing.options.k, options=TopKConfig, export=topk_export,
                    native_architecture=mixtral_compatible))
