"""The one place process groups and ranks are fetched from.

Everything else asks here instead of calling `torch.distributed` or DeepSpeed's group
registry directly, so that adding a parallelism (expert parallelism fills in its groups
from `deepspeed.utils.groups` below) changes one file.

All functions also work before (or without) distributed initialisation: a single
process is rank 0 of a world of 1.
"""
from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Global rank 0: the process that writes files, logs scalars and draws the progress bar."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor):
    """Average a tensor over all ranks, in place; returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def dp_rank_world() -> tuple[int, int]:
    """(rank, world) for splitting the token stream.

    Every rank reads different tokens, also under expert parallelism (experts are sharded,
    tokens are not), so the data-parallel world for the loader is the whole world.
    """
    return rank(), world_size()


# ---------------------------------------------------------------------------- expert parallelism
# Groups come from DeepSpeed's registry (`deepspeed.utils.groups`), the same ones its
# engine uses to reduce expert gradients. With ep_size = n and world W: the
# expert-parallel groups are consecutive ranks [0..n-1], [n..2n-1], ... (an all-to-all
# moves tokens inside one); the expert-data-parallel groups are the W/n ranks holding
# the same experts, {i, i+n, i+2n, ...} (expert gradients are all-reduced inside one).

_EP_SIZE = 1


def init_expert_parallel(ep_size: int, n_experts: int) -> None:
    """Check the layout and create DeepSpeed's expert(-data)-parallel groups for ep_size.

    Call on every rank after torch.distributed is initialised (before building the engine).
    An impossible layout raises a one-line ConfigError naming the numbers, on every rank.
    """
    from llm.config import ConfigError

    global _EP_SIZE
    world = world_size()
    if ep_size < 1 or world % ep_size:
        raise ConfigError(f"parallel.ep_size={ep_size} must divide the world size {world} "
                          f"(world = nodes x processes per node)")
    if n_experts % ep_size:
        raise ConfigError(f"parallel.ep_size={ep_size} must divide model.routing.n_experts={n_experts} "
                          f"(each rank holds n_experts / ep_size experts of every routed layer)")
    if ep_size > 1:
        from deepspeed.utils import groups as ds_groups

        if ep_group_name(ep_size) not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(ep_size)
    _EP_SIZE = ep_size


def ep_size() -> int:
    """Ranks per expert-parallel group (1 without expert parallelism)."""
    return _EP_SIZE


def ep_group_name(size: int | None = None) -> str:
    """DeepSpeed's name for the groups (and `param.group_name` of expert parameters)."""
    return f"ep_size_{_EP_SIZE if size is None else size}"


def ep_group():
    """This rank's expert-parallel process group (None without expert parallelism)."""
    if _EP_SIZE == 1:
        return None
    from deepspeed.utils import groups as ds_groups

    return ds_groups._get_expert_parallel_group(ep_group_name())


def ep_rank_world() -> tuple[int, int]:
    """(rank in the expert-parallel group, its size): this rank holds experts
    [rank · E/size, (rank + 1) · E/size) of every routed layer."""
    if _EP_SIZE == 1:
        return 0, 1
    return dist.get_rank(ep_group()), _EP_SIZE


def expert_dp_group():
    """The ranks holding the same experts as this one (expert gradients are reduced here)."""
    if _EP_SIZE == 1:
        return None
    from deepspeed.utils import groups as ds_groups

    return ds_groups._get_expert_data_parallel_group(ep_group_name())
