"""Parallelism applied to the plain model: DeepSpeed engine, process groups, state gathering."""
from llm.parallel.engine import (
    build_engine,
    device,
    ds_config,
    full_state_dict,
    grad_norm,
    init_distributed,
    param_groups,
    use_bf16,
)
from llm.parallel.groups import all_reduce_mean, barrier, broadcast_from_main, dp_rank_world, is_main, rank, world_size

__all__ = ["all_reduce_mean", "barrier", "broadcast_from_main", "build_engine", "device", "dp_rank_world", "ds_config",
           "full_state_dict", "grad_norm", "init_distributed", "is_main", "param_groups", "rank", "use_bf16", "world_size"]
