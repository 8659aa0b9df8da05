"""Per-block training options applied to the plain model: regional torch.compile and
activation checkpointing (`train.compile`, `train.activation_checkpointing`).

Both act on each transformer block separately. Compiling block by block keeps compile
time independent of depth (identical blocks share one compiled graph), and the blocks'
parameter names do not change, so checkpoints are the same with or without compile.
Routed FFNs have data-dependent shapes (dropless dispatch, LapSum truncation): dynamo
marks those sizes dynamic or breaks the graph there and runs that piece eagerly.

Checkpointing reruns a block's forward in backward with the RNG state of the first run
(dropout, expert dropout), so losses are bit-identical to not checkpointing:
- `full` keeps only each block's input;
- `selective` keeps the outputs of the matmuls and of attention, and recomputes the
  cheap elementwise ops (norms, RoPE, SwiGLU gate, router softmax) that hold most of the
  remaining activations.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llm.config import TrainConfig
from llm.model.transformer import BlockRunner, Transformer, call_block

_aten = torch.ops.aten
# Ops whose outputs `selective` keeps: the FLOP-heavy ones, cheap to store next to their cost.
_SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._grouped_mm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def apply_block_options(model: Transformer, t: TrainConfig, backend: str = "inductor") -> Transformer:
    """Compile and/or checkpoint every block of `model` as `t` asks; returns the model.
    `backend` is torch.compile's (e.g. "aot_eager": the same graphs without code generation)."""
    if t.compile:
        for block in model.blocks:
            block.compile(backend=backend)
    model.set_block_runner(block_runner(t.activation_checkpointing))
    return model


def block_runner(activation_checkpointing: str) -> BlockRunner:
    return {"none": call_block, "full": _checkpointed, "selective": _selectively_checkpointed}[
        activation_checkpointing]


def _checkpointed(block, *args):
    return checkpoint(call_block, block, *args, use_reentrant=False)


def _selectively_checkpointed(block, *args):
    return checkpoint(call_block, block, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmuls))


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
