"""What every router behind the dispatcher shares (docs/routing.md#router): the `Routing`
decision, fp32 router logits, the load-balancing and z-losses.

A router only decides; it moves no tokens. Every router returns a `Routing` that the
one dispatcher (`llm.routing.dispatch`) executes, so routers differ only in how they
produce it: `llm.routing.topk` (Switch, top-k), `llm.routing.lapsum_router` (LapSum).

Router logits are computed in fp32 or wider whatever the model dtype and autocast. The
gate parameter of a router is called `gate`: DeepSpeed treats any parameter whose name
contains "expert" as an expert parameter, and the router is not one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn



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
