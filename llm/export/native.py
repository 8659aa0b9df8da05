"""Native transformers architectures, for the models one reproduces exactly.

- every FFN dense → `LlamaForCausalLM`;
- top-k with k > 1 (softmax, top-k, renormalise), dropless, in every block → `MixtralForCausalLM`.

Both use RoPE on the two halves of each head (transformers' `rotate_half`), as our model
does, so no permutation of the query/key rows is needed; the fused `qkv` weight splits by
rows into q, k, v. Expert weights are written in the per-expert layout of Mixtral
checkpoints on the Hub (`block_sparse_moe.experts.E.w1.weight`, output-major), which
transformers and serving engines read; ours are stored input-major and are transposed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llm.config import ModelConfig
from llm.export.layers import LayerExport
from llm.routing import registry


def native_architecture(cfg: ModelConfig) -> Optional[str]:
    """"llama", "mixtral", or None when only the exported modeling code reproduces the model."""
    native = registry.get(cfg.routing.router).native_architecture
    return native(cfg) if native is not None else None


def native_config(cfg: ModelConfig, arch: str) -> dict:
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # rope_theta for transformers 4 and serving engines, rope_parameters for transformers 5.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if arch == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
                "intermediate_size": cfg.d_ff, "attention_bias": False, "mlp_bias": False}
    r = cfg.routing
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **common,
            "intermediate_size": r.d_expert or cfg.d_ff, "num_local_experts": r.n_experts,
            "num_experts_per_tok": r.options.k, "sliding_window": None, "router_aux_loss_coef": r.aux_loss_coef,
            "output_router_logits": False}


def native_tensors(model: nn.Module, layers: list[LayerExport], arch: str) -> dict[str, torch.Tensor]:
    """Our state, renamed (and split/transposed) into the native architecture's names."""
    d = model.cfg.d_model
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, (block, layer) in enumerate(zip(model.blocks, layers)):
        pre = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(d)  # rows: q, k, v, each head-major
        out.update({
            pre + "input_layernorm.weight": block.attn_norm.weight,
            pre + "post_attention_layernorm.weight": block.ffn_norm.weight,
            pre + "self_attn.q_proj.weight": q, pre + "self_attn.k_proj.weight": k,
            pre + "self_attn.v_proj.weight": v, pre + "self_attn.o_proj.weight": block.attn.proj.weight,
        })
        out.update(_llama_mlp(layer, pre) if arch == "llama" else _mixtral_moe(layer, pre))
    return {name: t.detach().contiguous() for name, t in out.items()}


def _llama_mlp(layer: LayerExport, pre: str) -> dict[str, torch.Tensor]:
    t = layer.tensors
    return {pre + "mlp.gate_proj.weight": t["w1.weight"], pre + "mlp.up_proj.weight": t["w3.weight"],
            pre + "mlp.down_proj.weight": t["w2.weight"]}


def _mixtral_moe(layer: LayerExport, pre: str) -> dict[str, torch.Tensor]:
    t, moe = layer.tensors, pre + "block_sparse_moe."
    out = {moe + "gate.weight": t["router.gate.weight"]}
    for name in ("w1", "w3", "w2"):
        for e, w in enumerate(t[f"experts.{name}"]):  # [d, f] (w2: [f, d]) → output-major
            out[f"{moe}experts.{e}.{name}.weight"] = w.t()
    return out
