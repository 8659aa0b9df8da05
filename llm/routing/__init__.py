"""Routed FFN layers (docs/routing.md): routers turn hidden states into expert weights;
one expert store (`Experts`) and one dispatcher serve every router."""
from __future__ import annotations

from torch import nn

from llm.config import ModelConfig
from llm.routing.budget import ExpertBudget
from llm.routing.dense import DenseFFN
from llm.routing.experts import Experts
from llm.routing.lapsum import soft_topk


def build_ffn(cfg: ModelConfig, routed: bool) -> nn.Module:
    """The FFN for one block: dense, or the configured routed layer."""
    router = cfg.routing.router
    if not routed or router == "dense":
        return DenseFFN(cfg)
    if router == "smear":
        from llm.routing.smear import SMEARLayer

        return SMEARLayer(cfg)
    if router == "deepspeed_topk":
        from llm.routing.deepspeed_moe import DeepSpeedMoE

        return DeepSpeedMoE(cfg)
    from llm.routing.moe import MoELayer

    return MoELayer(cfg)


__all__ = ["DenseFFN", "ExpertBudget", "Experts", "build_ffn", "soft_topk"]
