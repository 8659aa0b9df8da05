"""A plain decoder-only transformer: RoPE, pre-norm RMSNorm, causal attention, SwiGLU.

The FFN of every block is a slot filled by `llm.routing.build_ffn`: a dense SwiGLU or
one of the routed layers. Every FFN is called as `ffn(x, ctx) -> (y, aux_loss)`.
This file knows nothing about DeepSpeed or distributed training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.initialization import output_std
from llm.model.loss import chunked_cross_entropy
from llm.routing import build_ffn, registry

try:  # optional: flash-attn 2, GPU only
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_func = None


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # [B, T, vocab]; None when forward got targets
    aux_loss: torch.Tensor  # scalar: routing losses, already weighted by their coefficients
    ce: Optional[torch.Tensor] = None  # scalar fp32 mean cross-entropy; set when forward got targets


@dataclass
class FFNContext:
    """What a block tells its FFN besides the hidden states."""

    input_ids: torch.Tensor  # [B, T] the tokens at these positions
    start_pos: int = 0  # position of input_ids[:, 0] in the sequence (> 0 while decoding)
    k: Optional[torch.Tensor] = None  # this layer's LapSum budget k_l (scalar tensor)
    state: Optional[dict] = None  # this layer's decoding state; None outside incremental decoding


@dataclass
class DecodeCache:
    """Keys/values and FFN state for incremental decoding, one entry per block."""

    n_layers: int
    pos: int = 0
    kv: list = field(default_factory=list)
    ffn: list = field(default_factory=list)

    def __post_init__(self):
        self.kv = [{} for _ in range(self.n_layers)]
        self.ffn = [{} for _ in range(self.n_layers)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 or wider: bf16 sums of squares lose too much precision, and a
        # float64 model must stay float64 (its tests compare against float64 oracles).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [T, hd/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hd/2], x[..., hd/2:]) of x [B, T, H, hd] by the position angles."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # never narrower than fp32
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, hd/2]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.use_flash = cfg.attention == "flash"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # [B, T, H, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if kv_cache is not None:
            if "k" in kv_cache:
                past = kv_cache["k"].shape[1]
                k = torch.cat([kv_cache["k"], k], dim=1)
                v = torch.cat([kv_cache["v"], v], dim=1)
            kv_cache["k"], kv_cache["v"] = k, v
        if self.use_flash and flash_attn_func is not None and x.is_cuda and x.dtype != torch.float32:
            # flash-attn aligns the causal mask to the bottom-right corner, which is what a cache needs.
            y = flash_attn_func(q, k, v, causal=True)
        else:
            y = self._sdpa(q, k, v, past)
        return self.proj(y.reshape(B, T, -1))

    @staticmethod
    def _sdpa(q, k, v, past: int) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        T, S = q.shape[2], k.shape[2]
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a cache: query i sees keys up to past + i
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x, cos, sin, ctx: FFNContext, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
        y, aux = self.ffn(self.ffn_norm(x), ctx)
        return x + y, aux


def call_block(block: "Block", x, cos, sin, ctx: FFNContext, kv_cache=None):
    return block(x, cos, sin, ctx, kv_cache)


# How the forward pass calls a block during training: `call_block`, or a wrapper with the
# same signature installed from outside the model (activation checkpointing).
BlockRunner = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()

        self.cfg = cfg
        routed = cfg.routed_layers()
        self.route_index = {layer: j for j, layer in enumerate(routed)}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, build_ffn(cfg, i in self.route_index)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # The global LapSum budget is one object shared by all routed layers (docs/lapsum.md#budget).
        make_budget = registry.get(cfg.routing.router).budget
        self.budget = make_budget(cfg, len(routed)) if make_budget is not None else None
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.block_runner: BlockRunner = call_block
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        # FFNs initialise themselves (routers have their own init); see `output_std`.
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=output_std(self.cfg))

    def forward(self, input_ids: torch.Tensor, cache: Optional[DecodeCache] = None,
                targets: Optional[torch.Tensor] = None, loss_chunk: int = 0) -> ModelOutput:
        """With targets [B, T], returns the cross-entropy instead of the logits, computed
        `loss_chunk` tokens at a time (0 = all at once) so the fp32 logits of the whole
        micro-batch never exist; inside forward, so the head's weights are wherever
        DeepSpeed has gathered them."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        ks = self.budget() if self.budget is not None else None  # [n_routed]
        x = self.embed(input_ids)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            j = self.route_index.get(i)
            ctx = FFNContext(
                input_ids=input_ids,
                start_pos=start,
                k=ks[j] if ks is not None and j is not None else None,
                state=cache.ffn[i] if cache is not None else None,
            )
            if cache is None:
                x, aux = self.block_runner(block, x, cos, sin, ctx)
            else:  # decoding mutates the caches: never through a recomputing runner
                x, aux = block(x, cos, sin, ctx, cache.kv[i])
            aux_total = aux_total + aux
        if cache is not None:
            cache.pos += T
        hidden = self.norm(x)
        if targets is not None:
            ce = chunked_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(), loss_chunk)
            return ModelOutput(logits=None, aux_loss=aux_total, ce=ce)
        return ModelOutput(logits=self.lm_head(hidden), aux_loss=aux_total)

    def set_block_runner(self, runner: BlockRunner) -> None:
        """Install how training forwards call each block (see `llm.parallel.blocks`)."""
        self.block_runner = runner

    def new_cache(self) -> DecodeCache:
        return DecodeCache(self.cfg.n_layers)

    def routed_ffns(self) -> list[nn.Module]:
        """The routed FFN modules, in layer order (what inspection tools read)."""
        return [self.blocks[i].ffn for i in sorted(self.route_index)]

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding parameters + causal attention.

    Active means what one token runs through, as its router counts it
    (`RouterSpec.active_experts`: k for top-k, k̄ for LapSum, one merged expert plus the
    merge for SMEAR). Attention scores and values add 6·L·d·T
    (forward 2·2·d·T/2 per layer for the causal half, times 3 for backward).
    """
    d, L, r = cfg.d_model, cfg.n_layers, cfg.routing
    attn_params = 4 * d * d
    dense_ffn = 3 * d * cfg.d_ff
    expert = 3 * d * (r.d_expert or cfg.d_ff)
    active_experts = registry.get(r.router).active_experts(cfg)
    n_routed = len(cfg.routed_layers())
    ffn = (L - n_routed) * dense_ffn + n_routed * (active_experts * expert + d * r.n_experts)
    lm_head = d * cfg.vocab_size
    return 6 * (L * attn_params + ffn + lm_head) + 6 * L * d * seq_len


def build_model(cfg: ModelConfig) -> Transformer:
    """Build the model on CPU in fp32. Needs no distributed setup."""
    return Transformer(cfg)
