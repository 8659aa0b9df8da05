"""Init scales shared by the model and the routed layers (a leaf: imports only the config)."""
from __future__ import annotations

import math

from llm.config import ModelConfig


def output_std(cfg: ModelConfig) -> float:
    """Init std of residual-branch output projections: scaled by 1/sqrt(2L) so the
    residual stream's variance does not grow with depth (GPT-2's scaled init)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)
