"""Differentiable collectives over one process group (the expert-parallel group).

Each forward collective has the adjoint collective as its backward, so gradients flow
through expert parallelism exactly as through the local code path:

    all_to_all (splits in -> out)   <->  all_to_all (splits out -> in)
    all_gather (concatenate)        <->  reduce_scatter (sum, keep own slice)

They work on gloo (CPU) and NCCL alike; `torch.distributed.nn.functional` has the
first, but its all-gather backward falls back to an all-to-all on non-NCCL backends.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only those.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(out_splits),
                               input_split_sizes=list(in_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # The gradient of each received row goes back to the rank that sent it.
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=list(ctx.in_splits),
                               input_split_sizes=list(ctx.out_splits), group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
               group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Send rows x[sum(in_splits[:j]) : ...] to rank j of `group`; receive out_splits[j] rows from it.

    x: [sum(in_splits), ...] -> [sum(out_splits), ...], rows grouped by source rank.
    """
    return _AllToAll.apply(x, tuple(int(s) for s in out_splits), tuple(int(s) for s in in_splits), group)


def _reduce_scatter_sum(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    reduce_scatter_flat(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


def _all_gather_cat(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    all_gather_flat(out, x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_cat(x, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank used every slice: the owner's gradient is the sum over ranks.
        return _reduce_scatter_sum(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_cat(grad, ctx.group), None


def all_gather(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate x from every rank of `group` along dim 0 (same shape on every rank).

    x: [n, ...] -> [world * n, ...]; backward sums the gradients of each slice onto its owner.
    """
    return _AllGather.apply(x, group)


def reduce_scatter(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum x over the ranks of `group` and keep this rank's slice of dim 0.

    x: [world * n, ...] -> [n, ...]; backward all-gathers the gradient.
    """
    return _ReduceScatter.apply(x, group)
