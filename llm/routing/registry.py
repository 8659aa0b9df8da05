"""The router registry (docs/routing.md#router-contract): router name → `RouterSpec`.

A router is one module that calls `register(RouterSpec(...))` at import time. Everything
outside that module finds it here by the name in `model.routing.router`: the model builds
its FFN layers, counts its FLOPs and exports it through the spec. The built-in routers are
imported on the first lookup; a router from outside the package is imported by the
config's `imports:` list before the model is built.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from llm.config import ModelConfig

# Modules that register the built-in routers, imported on the first lookup.
BUILTIN_MODULES = ("llm.routing.dense", "llm.routing.topk", "llm.routing.lapsum_router",
                   "llm.routing.smear", "llm.routing.deepspeed_moe")


class ExportError(ValueError):
    """A checkpoint or output directory the export refuses, phrased as one line."""


@dataclass
class LayerExport:
    """One block's FFN in the exported model (`llm.export`)."""

    spec: dict  # the block's entry in config.ffn_layers of the exported modeling code
    tensors: dict[str, torch.Tensor]  # weights, named relative to the block's FFN


def export_parameters(ffn: nn.Module) -> dict[str, torch.Tensor]:
    """An FFN's parameters under their own names (buffers such as τ are baked into the spec)."""
    return {name: p.detach() for name, p in ffn.named_parameters()}


def experts_spec(cfg: "ModelConfig") -> dict:
    """The expert store's shape, as the exported modeling code reads it."""
    r = cfg.routing
    return {"n_experts": r.n_experts, "d_expert": r.d_expert or cfg.d_ff}


# (layer, model config, this layer's budget k_l or None) -> its export
RouterExport = Callable[[nn.Module, "ModelConfig", Optional[float]], LayerExport]


@dataclass(frozen=True)
class ExportCode:
    """A plug-in router's FFN in the exported modeling code (docs/routing.md#exported-ffn).

    The built-in FFNs live in `llm/export/modeling_routed.py`; a router from outside the
    package hands `llm export` the source of its own, which is appended to the copy of that
    file written next to the weights and registered in its `FFNS` under the router's name.
    """

    ffn: type  # built as ffn(config, spec), called as ffn(x [B, T, d], input_ids [B, T] or None, start, state)
    helpers: tuple[Callable, ...] = ()  # functions and classes `ffn` uses, appended before it in this order


@dataclass(frozen=True)
class RouterSpec:
    """What the rest of the code needs to know about one router.

    `options` is the router's own config section, read from `cfg.routing.options`.
    `layer(cfg)` builds the FFN of one routed block: a module with
    `forward(x [B, T, d], ctx) -> (y [B, T, d], aux_loss [])`, a `stats` property (a
    `RoutingStats`, docs/routing.md#statistics) and, when `routed`, `n_experts` and
    `shard(ep, merge_mode)` (docs/expert-parallel.md#sharding).
    `active_experts(cfg)` is the number of experts one token runs through, for the FLOP count
    (in experts' worth of FLOPs: work such as SMEAR's merge counts too).
    `export` turns a trained layer into the exported modeling code's entry; None means the
    router cannot be exported, and `export_refusal` says why in a few words. `export_code`
    is the FFN class of a plug-in whose entry names no built-in FFN of the exported code.
    """

    name: str
    layer: Callable[["ModelConfig"], nn.Module]
    active_experts: Callable[["ModelConfig"], float]
    options: Optional[type] = None  # dataclass (a `RouterOptions`) of model.routing.<name>; None = no options
    export: Optional[RouterExport] = None
    export_refusal: str = ""
    export_code: Optional[ExportCode] = None
    # The transformers class that holds this model natively ("llama", "mixtral"), or None when
    # only the exported modeling code reproduces it.
    native_architecture: Optional[Callable[["ModelConfig"], Optional[str]]] = None
    # The expert capacity factor in force (tokens then compete across the batch), or None when dropless.
    capacity: Callable[["ModelConfig"], Optional[float]] = lambda cfg: cfg.routing.capacity_factor
    # Why this configuration reads later tokens (evaluation refuses to decode it and warns), or None.
    future_leak: Callable[["ModelConfig"], Optional[str]] = lambda cfg: None
    selects_experts: bool = True  # each token runs a chosen few experts (False: SMEAR merges them)
    needs_process_group: bool = False  # the layer needs torch.distributed initialised, even in one process
    routed: bool = True  # False: the dense baseline, no routed layers at all
    # (cfg, routed layers) -> the model's global budget (an `ExpertBudget`), whose k_l the model
    # passes to each routed layer in `ctx.k`; None = no budget.
    budget: Optional[Callable[["ModelConfig", int], nn.Module]] = None


_REGISTRY: dict[str, RouterSpec] = {}
_builtins_loaded = False


def register(spec: RouterSpec) -> RouterSpec:
    """Add a router; a second router under a taken name is refused (re-importing a module is not)."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known.layer.__qualname__ != spec.layer.__qualname__:
        raise ValueError(f"router {spec.name!r} is already registered by {known.layer.__module__}")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Every registered router name, built-ins first."""
    _load_builtins()
    return tuple(_REGISTRY)


def get(name: str) -> RouterSpec:
    """The spec of router `name`; KeyError with the known names (and a close match) otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise KeyError(f"unknown router {name!r}{hint}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
