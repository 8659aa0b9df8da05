"""Transformers modeling code for routed-FFN decoders exported by `llm export`.

This file is copied next to the weights of an exported model and loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. It imports only
torch and transformers, so a model can be used without the project that trained it.

The decoder: token embedding, pre-norm blocks (RMSNorm, causal attention with RoPE on
the two halves of each head, RMSNorm, FFN), final RMSNorm, LM head. The FFN of each
block is described by one entry of `config.ffn_layers`:

- `dense`: SwiGLU, y = W2 (silu(W1 x) ⊙ W3 x).
- `topk`: p = softmax(W_g x); the `top_k` largest p choose SwiGLU experts, weights
  renormalised to sum to 1 when `renormalize` (top-k) and left as p when not (Switch).
- `lapsum`: p = LapSum soft top-k of W_g x with Σ p = k (this layer's budget, fixed at
  export): p_e = F((r_e − t)/α) with F the Laplace CDF and t the threshold giving the sum
  k, found here by bisection in float64. A token keeps its largest p, at most
  ceil(expansion_cap · k) of them, and only those above `tau`; weights are not renormalised.
- `smear`: the sequence is cut into segments of `segment_len` tokens; segment j runs
  through one SwiGLU whose weights are the average of the experts' weights under routing
  weights computed from the mean hidden state of segment j − 1 (segment 0, and with
  `reset_at_eos` a segment after one containing `eos_id`, use softmax(prior)). The
  running sum and the merged expert of the current segment are kept in the cache, so
  decoding token by token gives the logits of a full forward pass.

The cache (`RoutedCache`) is a `DynamicCache` for keys/values plus that SMEAR state.
Batches must not be padded (every row is one sequence from position 0): an attention
mask with zeros is refused rather than silently mis-positioned.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output field holding the cache was renamed from past_key_values to cache in transformers 5.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# ceil(c·k) of a k that carries rounding error (1.5 can be 1.5000000000000002) must not gain a slot.
_CEIL_SLACK = 1e-6
_BISECTION_STEPS = 64


class RoutedConfig(PretrainedConfig):
    model_type = "llm_routed"

    def __init__(self, vocab_size: int = 8000, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, intermediate_size: int = 256, max_position_embeddings: int = 128,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5, initializer_range: float = 0.02,
                 ffn_layers: Optional[list] = None, tie_word_embeddings: bool = True, use_cache: bool = True,
                 **kwargs):
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.ffn_layers = ffn_layers if ffn_layers is not None else [{"ffn": "dense"}] * num_hidden_layers
        if len(self.ffn_layers) != num_hidden_layers:
            raise ValueError(f"ffn_layers has {len(self.ffn_layers)} entries for {num_hidden_layers} layers")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class RoutedCache(DynamicCache):
    """Keys/values per layer (DynamicCache) and the SMEAR state of each layer (`ffn_state`)."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.ffn_state = [{} for _ in range(n_layers)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32, scaled in the model's dtype: what the training code computes.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def rope_angles(head_dim: int, start: int, length: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim/2] of positions start..start+length−1 (angles in float64)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    positions = torch.arange(start, start + length, dtype=torch.float64, device=device)
    angles = torch.outer(positions, inv_freq)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) of each head of x [B, T, H, hd] by the position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: RoutedConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: Optional[RoutedCache], layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        if cache is not None:
            k, v = cache.update(k, v, layer)
        past = k.shape[2] - T
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sees the cached keys and its own prefix
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Weights stored input-major: w1, w3 [..., d, f], w2 [..., f, d]."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


class DenseFFN(nn.Module):
    def __init__(self, config: RoutedConfig, spec: dict):
        super().__init__()
        d, f = config.hidden_size, spec.get("d_ff", config.intermediate_size)
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x, input_ids, start, state) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """E SwiGLU experts: w1, w3 [E, d, f], w2 [E, f, d]."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))

    def combine(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ over slots of weight · expert(x): x [N, d], experts and weights [N, m] (weight 0 = skip)."""
        y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for e in range(self.w1.shape[0]):
            rows, slots = torch.nonzero((experts == e) & (weights != 0), as_tuple=True)
            if rows.numel():
                out = swiglu(x[rows], self.w1[e], self.w3[e], self.w2[e])
                y.index_add_(0, rows, out.to(y.dtype) * weights[rows, slots, None].to(y.dtype))
        return y.to(x.dtype)


class Gate(nn.Module):
    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.gate.weight.float())  # router logits in fp32  [N, E]


class TopKFFN(nn.Module):
    def __init__(self, config: RoutedConfig, spec: dict):
        super().__init__()
        self.top_k, self.renormalize = spec["top_k"], spec["renormalize"]
        self.router = Gate(config.hidden_size, spec["n_experts"])
        self.experts = Experts(spec["n_experts"], config.hidden_size, spec["d_expert"])

    def forward(self, x, input_ids, start, state) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return self.experts.combine(flat, experts, weights).view_as(x)


def laplace_soft_topk(scores: torch.Tensor, k: float, alpha: float) -> torch.Tensor:
    """p = F((r − t)/α) with Σ p = k per row of scores [N, E]; t by bisection in float64."""
    r = scores.double()
    n = r.shape[-1]
    margin = alpha * (math.log(n) + 50.0)  # past it every p is within e^−50/E of 0 or 1

    def weights(t: torch.Tensor) -> torch.Tensor:
        u = (r - t) / alpha
        half = 0.5 * torch.exp(-u.abs())
        return torch.where(u > 0, 1.0 - half, half)

    lo = r.amin(-1, keepdim=True) - margin  # Σ p ≈ E > k
    hi = r.amax(-1, keepdim=True) + margin  # Σ p ≈ 0 < k
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = weights(mid).sum(-1, keepdim=True) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return weights(0.5 * (lo + hi)).to(scores.dtype)


class LapSumFFN(nn.Module):
    def __init__(self, config: RoutedConfig, spec: dict):
        super().__init__()
        self.k, self.alpha, self.tau = spec["k"], spec["alpha"], spec["tau"]
        self.slots = min(spec["n_experts"], math.ceil(spec["expansion_cap"] * self.k - _CEIL_SLACK))
        self.router = Gate(config.hidden_size, spec["n_experts"])
        self.experts = Experts(spec["n_experts"], config.hidden_size, spec["d_expert"])

    def forward(self, x, input_ids, start, state) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        p = laplace_soft_topk(self.router(flat), self.k, self.alpha)
        weights, experts = p.topk(self.slots, dim=-1)
        weights = weights.masked_fill(weights <= self.tau, 0.0)
        return self.experts.combine(flat, experts, weights).view_as(x)


class SegmentRouter(nn.Module):
    def __init__(self, d_model: int, n_experts: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.proj = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(pooled.float(), self.norm.normalized_shape, self.norm.weight.float(),
                         self.norm.bias.float(), self.norm.eps)
        return torch.softmax(h @ self.proj.weight.float().t(), dim=-1)


class SmearFFN(nn.Module):
    def __init__(self, config: RoutedConfig, spec: dict):
        super().__init__()
        self.segment_len = spec["segment_len"]
        self.eos_id = spec["eos_id"] if spec["reset_at_eos"] else None
        self.router = SegmentRouter(config.hidden_size, spec["n_experts"], spec["norm_eps"])
        self.experts = Experts(spec["n_experts"], config.hidden_size, spec["d_expert"])
        self.prior = nn.Parameter(torch.zeros(spec["n_experts"]))

    def forward(self, x, input_ids, start, state) -> torch.Tensor:
        """Walk x [B, T, d] (positions start..) piece by piece, one piece per segment it touches."""
        if self.eos_id is not None and input_ids is None:
            raise ValueError("this SMEAR layer resets its routing at EOS and needs input_ids")
        state = {} if state is None else state
        if start and "merged" not in state:
            raise ValueError(f"SMEAR needs the cache of the {start} tokens before this call")
        T, S, out, i = x.shape[1], self.segment_len, [], 0
        while i < T:
            pos = start + i
            n = min(T - i, S - pos % S)
            if pos % S == 0:
                self._begin_segment(state, pos // S, x.shape[0])
            piece = x[:, i:i + n]
            out.append(swiglu(piece, *state["merged"]))
            state["sum"] = state["sum"] + piece.sum(1, dtype=torch.float32)
            if self.eos_id is not None:
                state["eos"] = state["eos"] | (input_ids[:, i:i + n] == self.eos_id).any(1)
            i += n
        return torch.cat(out, dim=1)

    def _begin_segment(self, state: dict, segment: int, batch: int) -> None:
        """Route a new segment from the state of the one before it, merge its expert, reset the sums."""
        prior = torch.softmax(self.prior.float(), dim=0)  # [E]
        if segment == 0:
            e = prior.expand(batch, -1)
        else:
            e = self.router(state["sum"] / self.segment_len)  # [B, E]
            if self.eos_id is not None:
                e = torch.where(state["eos"][:, None], prior, e)
        w = (self.experts.w1, self.experts.w3, self.experts.w2)
        state["merged"] = tuple((e.to(m.dtype) @ m.flatten(1)).view(batch, *m.shape[1:]) for m in w)
        state["sum"] = torch.zeros(batch, self.experts.w1.shape[1], device=e.device)
        state["eos"] = torch.zeros(batch, dtype=torch.bool, device=e.device)


FFNS = {"dense": DenseFFN, "topk": TopKFFN, "lapsum": LapSumFFN, "smear": SmearFFN}


class Block(nn.Module):
    def __init__(self, config: RoutedConfig, spec: dict):
        super().__init__()
        if spec["ffn"] not in FFNS:
            raise ValueError(f"unknown ffn {spec['ffn']!r}: expected one of {', '.join(FFNS)}")
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = FFNS[spec["ffn"]](config, spec)

    def forward(self, x, cos, sin, cache, layer, input_ids, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        state = cache.ffn_state[layer] if cache is not None else None
        return x + self.ffn(self.ffn_norm(x), input_ids, start, state)


class RoutedPreTrainedModel(PreTrainedModel):
    config_class = RoutedConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a plain DynamicCache: forward creates a RoutedCache,
        # whose SMEAR state a DynamicCache would lack.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Experts):
            for w in (module.w1, module.w3, module.w2):
                nn.init.normal_(w, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, SmearFFN):
            nn.init.zeros_(module.prior)


class RoutedForCausalLM(RoutedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: RoutedConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, spec) for spec in config.ffn_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[RoutedCache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = RoutedCache(self.config.num_hidden_layers)
        if cache is not None and not isinstance(cache, RoutedCache):
            raise ValueError(f"this model keeps routing state in a RoutedCache, got {type(cache).__name__}: "
                             "pass no cache (one is created) or the one a previous call returned")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: every row must be one unpadded sequence")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        start, T = (cache.get_seq_length() if cache is not None else 0), x.shape[1]
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rope_angles(head_dim, start, T, self.config.rope_theta, x.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, input_ids, start)
        x = self.norm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
