"""Routed FFN layers (docs/routing.md): routers turn hidden states into expert weights;
one expert store (`Experts`) and one dispatcher serve every router."""
from __future__ import annotations

from torch import nn

from llm.config import ModelConfig
from llm.routing import registry
from llm.routing.budget import ExpertBudget
from llm.routing.dense import DenseFFN
from llm.routing.experts import Experts
from llm.routing.lapsum import soft_topk


def build_ffn(cfg: ModelConfig, routed: bool) -> nn.Module:
    """The FFN for one block: the configured router's layer, or dense in non-routed blocks."""
    return registry.get(cfg.routing.router).layer(cfg) if routed else DenseFFN(cfg)


__all__ = ["DenseFFN", "ExpertBudget", "Experts", "build_ffn", "registry", "soft_topk"]
