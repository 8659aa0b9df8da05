"""The global LapSum expert budget shared by all routed layers (docs/lapsum.md#budget)."""
from __future__ import annotations

import torch
from torch import nn



class ExpertBudget(nn.Module):
    """k_l = 1 + softmax(η)_l · (K − L): every k_l ≥ 1 and Σ_l k_l = K at every step.

    A hard reparameterisation rather than a penalty, so the constraint can never be
    violated by the optimiser. `fixed` mode (SoftMoE* in the paper) keeps η = 0, i.e.
    k_l = k̄ for every layer.
    """

    def __init__(self, k_mean: float, learned: bool, n_layers: int):
        super().__init__()
        self.n_layers = n_layers
        self.total = k_mean * n_layers  # K
        eta = torch.zeros(n_layers)
        if learned:
            self.eta = nn.Parameter(eta)
        else:
            self.register_buffer("eta", eta)

    def forward(self) -> torch.Tensor:
        # float64 so that Σ k_l equals K to ~1e-15 even when η is held in bf16.
        share = torch.softmax(self.eta.double(), dim=0)  # [L]
        return 1.0 + share * (self.total - self.n_layers)
