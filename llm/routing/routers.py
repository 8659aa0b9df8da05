"""Routers (docs/routing.md, docs/lapsum.md): hidden states → chosen experts, their weights, aux losses.

A router only decides; it moves no tokens. Every router returns a `Routing` that the
one dispatcher (`llm.routing.dispatch`) executes, so switch, top-k and LapSum differ
in this file only.

- `TopKRouter`: p = softmax(r); the k largest; renormalised to sum to 1 when k > 1.
  k = 1 is Switch: y = p_e E_e(x), not renormalised (otherwise the weight is always 1
  and the router would learn only from the aux loss).
- `LapSumRouter`: p = soft_topk(r, k_l, α) with Σ_e p_e = k_l (docs/lapsum.md#operator), truncated
  per token to the experts with p > τ, at most ceil(c·k_l) of them (docs/lapsum.md#truncation), weights
  not renormalised. The dense gradient of soft_topk still reaches dropped experts.

Router logits are computed in fp32 or wider whatever the model dtype and autocast. The
LapSum τ controller is described in docs/lapsum-budget.md. The gate parameter is
called `gate`: DeepSpeed treats any parameter whose name contains "expert" as an
expert parameter, and the router is not one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llm.routing.lapsum import soft_topk

# ceil(c·k_l) with k_l from a softmax in float64 (1.5 can come out as 1.5000000000000002):
# round down by this much first so that c·k_l = 3 keeps 3 experts, not 4.
_CEIL_SLACK = 1e-6


@dataclass
class Routing:
    """One routing decision for N tokens, m slots per token (m = k, or LapSum's cap bound)."""

    experts: Tensor  # [N, m] long: chosen expert per slot
    weights: Tensor  # [N, m] fp32: combine weight per slot, 0 where not valid
    valid: Optional[Tensor]  # [N, m] bool: slot is computed; None = every slot (top-k)
    probs: Tensor  # [N, E] fp32: the router distribution (rows sum to 1), for the LB loss and entropy
    k: Tensor  # [] the layer's budget (top_k, or LapSum's k_l)
    aux_loss: Tensor  # [] aux_loss_coef · lb_loss + z_loss_coef · z_loss
    lb_loss: Tensor  # [] Switch load-balancing loss, unweighted (1 under uniform routing)
    z_loss: Tensor  # [] router z-loss, unweighted


def router_logits(gate: nn.Linear, x: Tensor) -> Tensor:
    """r = W_g x in fp32, or wider if x is (float64): [N, d] → [N, E].

    Autocast is off here: under bf16 autocast F.linear would return bf16 logits, and
    LapSum's τ and the top-k order are decided on small logit differences.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), gate.weight.to(dtype))


def load_balancing_loss(probs: Tensor, experts: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Switch loss E · Σ_i f_i P_i (docs/routing.md#load-balancing).

    probs [N, E]: P_i is its mean over tokens; experts [N, m] with valid [N, m] (or None):
    f_i is the fraction of the routed token-slots that chose expert i (no gradient).
    """
    n_experts = probs.shape[-1]
    slots = torch.ones_like(experts, dtype=probs.dtype) if valid is None else valid.to(probs.dtype)
    f = probs.new_zeros(n_experts).scatter_add_(0, experts.reshape(-1), slots.reshape(-1))  # [E]
    f = f / slots.sum().clamp(min=1.0)
    return n_experts * (f.detach() * probs.mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of (logsumexp_j r_j)²."""
    return logits.logsumexp(-1).square().mean()


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

    def forward(self, x: Tensor, k: Optional[Tensor] = None) -> Routing:
        """x: [N, d]. `k` is ignored (top-k has a fixed budget)."""
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


class LapSumRouter(nn.Module):
    """LapSum soft top-k routing with truncation (docs/lapsum.md).

    `k_max` bounds every k_l this layer can be given (from the budget's mode), so the
    number of slots per token m = min(E, ceil(c·k_max)) is static; the per-token cap
    ceil(c·k_l) with the current k_l is applied as a validity mask inside those slots.

    τ lives in the buffer `tau` (checkpointed): the value every forward uses, and the only
    one inference needs. With `tau_control="ema"` each training forward, after routing
    with the current τ, measures the τ that would have kept round(N·k_l) slots on its own
    tokens (averaged over data-parallel ranks) and moves `tau` towards it by `tau_ema`;
    the first measurement replaces the initial τ. So the τ a batch uses depends only on
    earlier batches, and the layer's mean kept experts per token tracks k_l as the router
    and the budget drift (docs/lapsum-budget.md). `tau_updates` counts the measurements.
    `tau_control="fixed"` keeps the configured τ. Eval mode never changes τ.

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
        self.n_experts = n_experts
        self.alpha, self.expansion_cap = alpha, expansion_cap
        self.tau_control, self.tau_ema, self.keep_top1 = tau_control, tau_ema, keep_top1
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.max_slots = min(n_experts, math.ceil(expansion_cap * k_max - _CEIL_SLACK))
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("tau_updates", torch.tensor(0, dtype=torch.long))

    @property
    def slots(self) -> int:
        return self.max_slots

    def forward(self, x: Tensor, k: Tensor) -> Routing:
        """x: [N, d]; k: [] this layer's budget k_l (differentiable: ∂L/∂k reaches the budget)."""
        logits = router_logits(self.gate, x)  # [N, E]
        p = soft_topk(logits, k, self.alpha)  # [N, E], rows sum to k_l
        top_p, experts = p.topk(self.max_slots, dim=-1)  # [N, m], descending
        cap = torch.ceil(self.expansion_cap * k.detach() - _CEIL_SLACK)  # [] ceil(c·k_l)
        in_cap = torch.arange(self.max_slots, device=x.device) < cap  # [m]
        candidates = top_p.detach().masked_fill(~in_cap, -1.0)  # [N, m]: −1 is never kept
        if self.keep_top1:
            candidates[:, 0] = 2.0  # above any τ < 1
        valid = candidates > self.tau  # [N, m]
        if self.tau_control == "ema" and self.training:
            self._track_budget(candidates, k.detach())
        weights = top_p.masked_fill(~valid, 0.0)  # not renormalised: Σ weights ≤ k_l
        probs = p / k.to(p.dtype)  # [N, E], rows sum to 1: P_i = mean p_i / k_l (docs/lapsum.md#load-balancing)
        lb = load_balancing_loss(probs, experts, valid)
        z = z_loss(logits)
        return Routing(
            experts=experts, weights=weights, valid=valid, probs=probs, k=k,
            aux_loss=self.aux_loss_coef * lb + self.z_loss_coef * z, lb_loss=lb, z_loss=z,
        )

    @torch.no_grad()
    def _track_budget(self, candidates: Tensor, k: Tensor) -> None:
        """Move τ towards the threshold that keeps round(N·k_l) of this batch's candidates."""
        tau = budget_threshold(candidates, k).to(self.tau.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tau)
            tau /= dist.get_world_size()
        first = self.tau_updates == 0
        self.tau.copy_(torch.where(first, tau, torch.lerp(self.tau, tau, self.tau_ema)))
        self.tau_updates += 1


def budget_threshold(candidates: Tensor, k: Tensor) -> Tensor:
    """The τ ∈ [0, 1) at which `candidates > τ` keeps round(N·k) of the N·m candidates [N, m].

    τ is the largest candidate not kept (clamped at 0: never below every p). The index is
    computed on the device, so a GPU step does not wait for the host.
    """
    flat = candidates.flatten().sort(descending=True).values  # [N·m]
    target = torch.round(candidates.shape[0] * k.to(flat.dtype)).long().clamp(max=flat.numel() - 1)
    return flat.gather(0, target.reshape(1)).squeeze(0).clamp(min=0.0)
