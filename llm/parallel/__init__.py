"""Parallelism applied to the plain model: DeepSpeed engine, process groups, state gathering."""
from llm.parallel.engine import (
    build_engine,
    device,
    ds_config,
    follow_schedule,
    full_state_dict,
    init_distributed,
    param_groups,
    use_bf16,
)
from llm.parallel.expert import apply_expert_parallel
from llm.parallel.groups import (
    all_reduce_mean,
    barrier,
    dp_rank_world,
    init_expert_parallel,
    is_main,
    rank,
    world_size,
)

__all__ = [
    "all_reduce_mean", "apply_expert_parallel", "barrier", "build_engine", "device",
    "dp_rank_world", "ds_config", "follow_schedule", "full_state_dict", "init_distributed",
    "init_expert_parallel", "is_main", "param_groups", "rank", "use_bf16", "world_size",
]
