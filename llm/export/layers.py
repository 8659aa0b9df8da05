"""What each block hands to the export: the FFN entry of `config.ffn_layers` in the
exported modeling code (`modeling_routed.py`) and the weights under the block's prefix.

Each router provides its piece (`RouterSpec.export`, next to the router); the keys of the
entries are what `modeling_routed.FFNS` reads. Inference-time constants that live outside
the weights in training (LapSum's k_l from the model's `ExpertBudget`, τ from its router
buffer) are baked into the entry there.
"""
from __future__ import annotations

from torch import nn

from llm.config import ModelConfig
from llm.routing import registry
from llm.routing.dense import dense_export
from llm.routing.registry import ExportError, LayerExport

__all__ = ["ExportError", "LayerExport", "check_exportable", "export_layers"]


def check_exportable(cfg: ModelConfig) -> None:
    """One-line refusals for models whose routing cannot be served one sequence at a time."""
    r = cfg.routing
    spec = registry.get(r.router)
    if spec.export is None:
        exportable = [name for name in registry.names() if registry.get(name).export is not None]
        raise ExportError(f"model.routing.router={r.router!r} cannot be exported: expected one of "
                          f"{', '.join(exportable)} ({spec.export_refusal or 'the router provides no export'})")
    if spec.routed and r.capacity_factor is not None:
        raise ExportError(f"model.routing.capacity_factor={r.capacity_factor}: capacity-limited routing depends on "
                          f"the other tokens of the batch and cannot be served; only dropless (null) checkpoints "
                          f"can be exported")


def export_layers(model: nn.Module, cfg: ModelConfig) -> list[LayerExport]:
    """Every block's FFN as a `LayerExport`, routed blocks by their router, others dense."""
    check_exportable(cfg)
    export = registry.get(cfg.routing.router).export
    ks = model.budget().tolist() if model.budget is not None else None
    out = []
    for i, block in enumerate(model.blocks):
        j = model.route_index.get(i)
        layer_export = export if j is not None else dense_export
        out.append(layer_export(block.ffn, cfg, ks[j] if ks is not None and j is not None else None))
    return out
