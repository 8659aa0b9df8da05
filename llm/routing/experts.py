"""The one expert store every routed layer uses: E SwiGLU experts as stacked weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torch's grouped GEMM takes these; float64 (the tests' oracle precision) falls back to a loop.
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(dtype: torch.dtype) -> bool:
    """grouped_mm runs eagerly in these dtypes, but torch.compile's shape function for it
    (torch 2.13) admits bf16 only: compiled fp32/fp16 models take the per-expert loop."""
    if torch.compiler.is_compiling():
        return dtype == torch.bfloat16
    return dtype in _GROUPED_DTYPES


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y = W2 (silu(W1 x) ⊙ W3 x) with weights stored input-major: w1, w3 [d, f], w2 [f, d]."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def merge(weights: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """weights [G, E] @ flat [E, P] in at least fp32: merge weights rounded to bf16 would no
    longer sum to 1 (|Σe − 1| ~ 2e-3); the caller casts the merged experts back."""
    acc = torch.promote_types(flat.dtype, torch.float32)
    return weights.to(acc) @ flat.to(acc)


class Experts(nn.Module):
    """E SwiGLU experts: w1, w3 [E, d, f] and w2 [E, f, d].

    Parameter names contain "experts" because that is how DeepSpeed tells expert
    parameters (reduced within the expert-data-parallel group) from the rest.
    Under expert parallelism a rank holds the slice [first, first + E_local) of the
    global experts; `first` is kept so checkpoints can name experts globally.
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int, init_std: float, out_std: float):
        super().__init__()
        self.n_global = n_experts
        self.first = 0
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)

    @property
    def n_local(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run expert e on its contiguous slice of x.

        x: [M, d] rows sorted by local expert; counts: [E_local] rows per expert (sums to M).
        """
        if _grouped_mm_ok(x.dtype):
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(F.grouped_mm(x, self.w1, offs=offs)) * F.grouped_mm(x, self.w3, offs=offs)
            return F.grouped_mm(h, self.w2, offs=offs)
        chunks = x.split(counts.tolist())
        return torch.cat([swiglu(xe, self.w1[e], self.w3[e], self.w2[e]) for e, xe in enumerate(chunks)])

    def merged(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SMEAR merge: θ̄_g = Σ_e weights[g, e] θ_e for G routing groups (weights [G, E_local]).

        Returns w1, w3 [G, d, f] and w2 [G, f, d]: one matmul per weight matrix.
        """
        return tuple(
            merge(weights, w.flatten(1)).to(w.dtype).view(weights.shape[0], *w.shape[1:])
            for w in (self.w1, self.w3, self.w2))

    def gather_expert_state(self, state: dict[str, torch.Tensor], prefix: str, ep) -> None:
        """Under expert parallelism, replace this store's tensors in `state` by the global [E, ...] ones."""
        if self.n_local != self.n_global:
            from llm.parallel.expert import gather_rows

            for name in ("w1", "w3", "w2"):
                state[prefix + name] = gather_rows(getattr(self, name).detach(), ep)

    def slice_expert_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Cut the global [E, ...] tensors in `state` to this rank's experts."""
        if self.n_local != self.n_global:
            for name in ("w1", "w3", "w2"):
                key = prefix + name
                if key in state:
                    state[key] = state[key][self.first:self.first + self.n_local]
