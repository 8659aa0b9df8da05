"""LapSum soft top-k routing (`router: lapsum`; docs/lapsum.md, docs/lapsum-budget.md).

p = soft_topk(r, k_l, α) with Σ_e p_e = k_l (docs/lapsum.md#operator), truncated per token
to the experts with p > τ, at most ceil(c·k_l) of them (docs/lapsum.md#truncation), weights
not renormalised. The dense gradient of soft_topk still reaches dropped experts. The
layer's budget k_l comes from the model's `ExpertBudget` (`RouterSpec.budget`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from llm.config import ConfigError, ModelConfig, RouterOptions, check_choice
from llm.routing.budget import ExpertBudget
from llm.routing.lapsum import soft_topk
from llm.routing.moe import MoELayer
from llm.routing.registry import LayerExport, RouterSpec, experts_spec, export_parameters, register
from llm.routing.routers import Routing, load_balancing_loss, router_logits, z_loss
from llm.routing.tau import SlotHistogram, threshold

# ceil(c·k_l) with k_l from a softmax in float64 (1.5 can come out as 1.5000000000000002):
# round down by this much first so that c·k_l = 3 keeps 3 experts, not 4.
_CEIL_SLACK = 1e-6


@dataclass
class LapSumConfig(RouterOptions):
    """model.routing.lapsum: soft top-k with a global per-layer budget (docs/lapsum.md)."""

    k_mean: float = 1.5  # k̄: global budget K = k_mean * routed layers
    budget: str = "learned"  # learned | fixed
    alpha: float = 1.0
    tau: float = 0.01  # truncation threshold on p (the initial one under tau_control: ema)
    tau_control: str = "ema"  # ema: τ tracks mean kept experts ≈ k_l from past batches | fixed
    tau_ema: float = 1.0  # weight of the newest batch's threshold in τ's moving average (1: that batch only)
    keep_top1: bool = True  # every token keeps its top expert, whatever τ
    expansion_cap: float = 2.0  # at most ceil(c * k_l) experts per token

    def validate(self, model: ModelConfig, key: str) -> None:
        check_choice(f"{key}.budget", self.budget, ("learned", "fixed"))
        if self.alpha <= 0:
            raise ConfigError(f"{key}.alpha={self.alpha}: expected > 0")
        if not 0 <= self.tau < 1:
            raise ConfigError(f"{key}.tau={self.tau}: expected 0 <= tau < 1")
        if self.expansion_cap < 1:
            raise ConfigError(f"{key}.expansion_cap={self.expansion_cap}: expected >= 1")
        check_choice(f"{key}.tau_control", self.tau_control, ("ema", "fixed"))
        if not 0 < self.tau_ema <= 1:
            raise ConfigError(f"{key}.tau_ema={self.tau_ema}: expected 0 < tau_ema <= 1")
        self._validate_budget(model, key)

    def _validate_budget(self, model: ModelConfig, key: str) -> None:
        """docs/lapsum.md#budget: k_l = 1 + softmax(η)_l (K − L) must stay in [1, E) for any η."""
        if self.k_mean < 1:
            raise ConfigError(f"{key}.k_mean={self.k_mean}: expected >= 1 (every layer keeps k_l >= 1)")
        n_routed, n_experts = len(model.routed_layers()), model.routing.n_experts
        worst = self.k_mean if self.budget == "fixed" else 1 + (self.k_mean - 1) * n_routed
        if worst >= n_experts:
            raise ConfigError(
                f"{key}.k_mean={self.k_mean} with {n_routed} routed layers allows k_l up to {worst:g}, "
                f"expected < n_experts={n_experts} (lower k_mean, add experts, or use budget: fixed)")


class LapSumRouter(nn.Module):
    """LapSum soft top-k routing with truncation (docs/lapsum.md).

    `k_max` bounds every k_l this layer can be given (from the budget's mode), so the
    number of slots per token m = min(E, ceil(c·k_max)) is static; the per-token cap
    ceil(c·k_l) with the current k_l is applied as a validity mask inside those slots.

    τ lives in the buffer `tau` (checkpointed): the value every forward uses, and the only
    one inference needs. With `tau_control="ema"` each training forward routes with the
    current τ and adds its candidate slots and its target round(N·k_l) to a histogram
    (`llm.routing.tau`); after the optimizer step, `tau.end_step(model)` sums the
    histograms over ranks and moves `tau` towards the threshold that would have kept the
    target on the whole step, by `tau_ema` (the first step's replaces the initial τ). So
    the τ of step s depends only on steps before s, and the layer's mean kept experts per
    token tracks k_l as the router and the budget drift (docs/lapsum-budget.md).
    `tau_updates` counts the updates. `tau_control="fixed"` keeps the configured τ. Eval
    mode never counts, and τ never changes outside `end_step`.

    With `keep_top1`, every token's highest-p expert is kept whatever τ, so no token
    skips the layer; τ then only decides the slots after the first.
    """

    def __init__(self, d_model: int, n_experts: int, k_max: float, alpha: float, tau: float,
                 expansion_cap: float, tau_control: str, tau_ema: float, keep_top1: bool,
                 init_std: float, aux_loss_coef: float, z_loss_coef: float):
        super().__init__()
        if not 1 <= k_max < n_experts:
            raise ValueError(f"LapSum routing needs 1 <= k_max < n_experts={n_experts}, got k_max={k_max}")
        if tau_control not in ("ema", "fixed"):
            raise ValueError(f"tau_control must be 'ema' or 'fixed', got {tau_control!r}")
        self.n_experts, self.k_max = n_experts, k_max
        self.alpha, self.expansion_cap = alpha, expansion_cap
        self.tau_control, self.tau_ema, self.keep_top1 = tau_control, tau_ema, keep_top1
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.max_slots = min(n_experts, math.ceil(expansion_cap * k_max - _CEIL_SLACK))
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("tau_updates", torch.tensor(0, dtype=torch.long))
        self.slot_histogram = SlotHistogram() if tau_control == "ema" else None

    @property
    def slots(self) -> int:
        return self.max_slots

    def forward(self, x: Tensor, k: Tensor, ctx=None) -> Routing:
        """x: [N, d]; k: [] this layer's budget k_l (differentiable: ∂L/∂k reaches the budget).
        The block's `ctx` is not needed."""
        logits = router_logits(self.gate, x)  # [N, E]
        p = soft_topk(logits, k, self.alpha, k_max=self.k_max)  # [N, E], rows sum to k_l
        top_p, experts = p.topk(self.max_slots, dim=-1)  # [N, m], descending
        cap = torch.ceil(self.expansion_cap * k.detach() - _CEIL_SLACK)  # [] ceil(c·k_l)
        in_cap = torch.arange(self.max_slots, device=x.device) < cap  # [m]
        candidates = top_p.detach().masked_fill(~in_cap, -1.0)  # [N, m]: −1 is never kept
        if self.keep_top1:
            candidates[:, 0] = 2.0  # above any τ < 1
        valid = candidates > self.tau  # [N, m]
        if self.slot_histogram is not None and self.training:
            self.slot_histogram.observe(candidates, k.detach())
        weights = top_p.masked_fill(~valid, 0.0)  # not renormalised: Σ weights ≤ k_l
        probs = p / k.to(p.dtype)  # [N, E], rows sum to 1: P_i = mean p_i / k_l (docs/lapsum.md#load-balancing)
        lb = load_balancing_loss(probs, experts, valid)
        z = z_loss(logits)
        return Routing(
            experts=experts, weights=weights, valid=valid, probs=probs, k=k,
            aux_loss=self.aux_loss_coef * lb + self.z_loss_coef * z, lb_loss=lb, z_loss=z,
        )

    def step_statistics(self) -> Optional[Tensor]:
        """This step's slot histogram (to be summed over ranks), or None when τ is fixed."""
        return self.slot_histogram.pending() if self.slot_histogram is not None else None

    @torch.no_grad()
    def apply_step_statistics(self, summed: Tensor) -> None:
        """Move τ towards the threshold that keeps the step's target (see the class docstring)."""
        target = threshold(summed).to(self.tau.dtype)
        first = self.tau_updates == 0
        seen = summed[-1] > 0  # a step without training forwards leaves τ alone
        self.tau.copy_(torch.where(seen, torch.where(first, target, torch.lerp(self.tau, target, self.tau_ema)),
                                   self.tau))
        self.tau_updates += seen.long()
        self.slot_histogram.reset()


def max_budget(cfg: ModelConfig) -> float:
    """The largest k_l the budget can give one layer: k̄ when fixed, 1 + (K − L) when learned."""
    o = cfg.routing.options
    n_routed = max(1, len(cfg.routed_layers()))
    return o.k_mean if o.budget == "fixed" else 1.0 + (o.k_mean - 1.0) * n_routed


def lapsum_layer(cfg: ModelConfig) -> MoELayer:
    r, o = cfg.routing, cfg.routing.options
    router = LapSumRouter(cfg.d_model, r.n_experts, k_max=max_budget(cfg), alpha=o.alpha, tau=o.tau,
                          expansion_cap=o.expansion_cap, tau_control=o.tau_control, tau_ema=o.tau_ema,
                          keep_top1=o.keep_top1, init_std=cfg.init_std, aux_loss_coef=r.aux_loss_coef,
                          z_loss_coef=r.z_loss_coef)
    return MoELayer(cfg, router, k_default=o.k_mean)


def lapsum_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float]) -> LayerExport:
    """k_l (from the model's budget) and τ (a router buffer) are baked into the entry."""
    router = ffn.router
    spec = {"ffn": "lapsum", **experts_spec(cfg), "k": k, "alpha": router.alpha,
            "tau": float(router.tau), "expansion_cap": router.expansion_cap}
    return LayerExport(spec, export_parameters(ffn))


register(RouterSpec(name="lapsum", layer=lapsum_layer, active_experts=lambda cfg: cfg.routing.options.k_mean,
                    options=LapSumConfig, export=lapsum_export,
                    budget=lambda cfg, n: ExpertBudget(cfg.routing.options.k_mean,
                                                       cfg.routing.options.budget == "learned", n)))
