"""What each router hands to the export: the FFN entry of `config.ffn_layers` in the
exported modeling code (`modeling_routed.py`) and the weights under the block's prefix.

One function per router, found through `ROUTER_EXPORTS`; the keys of the entries are
what `modeling_routed.FFNS` reads. Inference-time constants that live outside the weights
in training (LapSum's k_l from the model's `ExpertBudget`, τ from its router buffer) are
baked into the entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from llm.config import ModelConfig


class ExportError(ValueError):
    """A checkpoint or output directory the export refuses, phrased as one line."""


@dataclass
class LayerExport:
    spec: dict  # the block's entry in config.ffn_layers
    tensors: dict[str, torch.Tensor]  # weights, named relative to the block's FFN


def _params(ffn: nn.Module) -> dict[str, torch.Tensor]:
    """The FFN's parameters under their own names (buffers such as τ are baked into the spec)."""
    return {name: p.detach() for name, p in ffn.named_parameters()}


def _experts_spec(cfg: ModelConfig) -> dict:
    r = cfg.routing
    return {"n_experts": r.n_experts, "d_expert": r.d_expert or cfg.d_ff}


def dense_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float]) -> LayerExport:
    return LayerExport({"ffn": "dense", "d_ff": cfg.d_ff}, _params(ffn))


def topk_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float]) -> LayerExport:
    """Top-k renormalises its k weights; Switch (top-1) keeps the router probability."""
    top_k = ffn.router.top_k
    return LayerExport({"ffn": "topk", **_experts_spec(cfg), "top_k": top_k, "renormalize": top_k > 1},
                       _params(ffn))


def lapsum_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float]) -> LayerExport:
    router = ffn.router
    spec = {"ffn": "lapsum", **_experts_spec(cfg), "k": k, "alpha": router.alpha,
            "tau": float(router.tau), "expansion_cap": router.expansion_cap}
    return LayerExport(spec, _params(ffn))


def smear_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float]) -> LayerExport:
    if ffn.first_segment != "prior":
        raise ExportError(f"model.routing.first_segment={ffn.first_segment!r} routes segment 0 on its own future "
                          f"and cannot decode incrementally: only first_segment=prior can be exported")
    spec = {"ffn": "smear", **_experts_spec(cfg), "segment_len": ffn.segment_len,
            "norm_eps": ffn.router.norm.eps, "reset_at_eos": ffn.reset_at_eos, "eos_id": ffn.eos_id}
    return LayerExport(spec, _params(ffn))


RouterExport = Callable[[nn.Module, ModelConfig, Optional[float]], LayerExport]
ROUTER_EXPORTS: dict[str, RouterExport] = {
    "dense": dense_export,
    "switch": topk_export,
    "topk": topk_export,
    "lapsum": lapsum_export,
    "smear": smear_export,
}


def check_exportable(cfg: ModelConfig) -> None:
    """One-line refusals for models whose routing cannot be served one sequence at a time."""
    r = cfg.routing
    if r.router not in ROUTER_EXPORTS:
        raise ExportError(f"model.routing.router={r.router!r} cannot be exported: expected one of "
                          f"{', '.join(ROUTER_EXPORTS)} (DeepSpeed's own MoE layer drops tokens by capacity)")
    if r.router != "dense" and r.capacity_factor is not None:
        raise ExportError(f"model.routing.capacity_factor={r.capacity_factor}: capacity-limited routing depends on "
                          f"the other tokens of the batch and cannot be served; only dropless (null) checkpoints "
                          f"can be exported")


def export_layers(model: nn.Module, cfg: ModelConfig) -> list[LayerExport]:
    """Every block's FFN as a `LayerExport`, routed blocks by their router, others dense."""
    check_exportable(cfg)
    ks = model.budget().tolist() if model.budget is not None else None
    out = []
    for i, block in enumerate(model.blocks):
        j = model.route_index.get(i)
        export = ROUTER_EXPORTS[cfg.routing.router] if j is not None else dense_export
        out.append(export(block.ffn, cfg, ks[j] if ks is not None and j is not None else None))
    return out
