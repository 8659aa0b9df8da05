"""Tiny models for tests: one factory instead of one per test file."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llm.config import ModelConfig, RoutingConfig
from llm.model import build_model

_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"routing"}


def tiny_config(router: str = "dense", **keys: Any) -> ModelConfig:
    """A validated ModelConfig. Keys that are ModelConfig fields shape the model (the defaults are
    a 2-layer d=32 model); the others go to model.routing, shared or the router's own
    (`RoutingConfig.build`)."""
    shape = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 32}
    shape.update({k: v for k, v in keys.items() if k in _MODEL_KEYS})
    routing = {k: v for k, v in keys.items() if k not in _MODEL_KEYS}
    cfg = ModelConfig(**shape, routing=RoutingConfig.build(router, **routing))
    cfg.validate()
    return cfg


def tiny_model(router: str = "dense", seed: int = 0, **keys: Any) -> torch.nn.Module:
    """`build_model(tiny_config(...))` after seeding torch, so the same call gives the same weights."""
    cfg = tiny_config(router, **keys)
    torch.manual_seed(seed)
    return build_model(cfg)
