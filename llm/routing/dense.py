"""The dense SwiGLU FFN: the baseline and the FFN of non-routed blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.initialization import output_std
from llm.routing.registry import LayerExport, RouterSpec, export_parameters, register


class DenseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        nn.init.normal_(self.w1.weight, std=cfg.init_std)
        nn.init.normal_(self.w3.weight, std=cfg.init_std)
        nn.init.normal_(self.w2.weight, std=output_std(cfg))

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return y, x.new_zeros((), dtype=torch.float32)


def dense_export(ffn: nn.Module, cfg: ModelConfig, k=None) -> LayerExport:
    """The exported modeling code's dense SwiGLU: also every non-routed block of a routed model."""
    return LayerExport({"ffn": "dense", "d_ff": cfg.d_ff}, export_parameters(ffn))


register(RouterSpec(name="dense", layer=DenseFFN, active_experts=lambda cfg: 0, export=dense_export,
                    native_architecture=lambda cfg: "llama", capacity=lambda cfg: None, routed=False))
