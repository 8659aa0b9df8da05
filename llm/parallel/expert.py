"""Expert parallelism, applied to a built model (docs/expert-parallel.md with parallel.ep_size > 1).

Every rank builds the FULL model from the same seed (so initialisation is identical to
ep_size = 1), then `shard_experts(model)` keeps this rank's E/ep_size experts of every
routed layer, and each layer installs what it needs of the others' experts through its
own `shard(ep, merge_mode)` (the strategies it installs live here):

- `MoELayer` (top-k, Switch, LapSum, any router behind the dispatcher): the dispatcher's token exchange becomes an
  all-to-all over the expert-parallel group (`AllToAllExchange`). Dropless: the
  per-expert row counts are exchanged first, then the rows with variable splits.
  Capacity mode: every expert's rows are padded to the capacity, fixed splits.
- `SMEARLayer`: the merge θ̄ = Σ_e w_e θ_e needs every expert; it all-gathers the
  layer's expert weights or reduce-scatters partial merges, whichever moves fewer
  numbers (`ExpertParallelMerge`).
- DeepSpeed's MoE layer (`DeepSpeedMoE`): its expert list is cut to the local slice;
  its engine hands it the group.

Expert parameters are marked the way DeepSpeed's engine and ZeRO 1/2 expect
(`allreduce=False`, `group_name="ep_size_N"`), so their gradients are all-reduced only
within the expert-data-parallel group, and a parameter-less `deepspeed.moe.layer.MoE`
subclass is attached so that the engine switches its MoE code paths on (it only looks
for instances of that class).

Checkpoints name experts globally: `full_state_dict` gathers [E, ...] expert tensors on
every rank, `load_full_state_dict` slices them again, whatever ep_size wrote them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llm.config import ConfigError
from llm.parallel import groups
from llm.parallel.collectives import all_gather, all_gather_flat, all_to_all, reduce_scatter
from llm.routing.experts import Experts, merge

SMEAR_MERGE_MODES = ("auto", "gather", "reduce")


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in its expert-parallel group."""

    group: Optional[dist.ProcessGroup]
    size: int
    rank: int

    @property
    def group_name(self) -> str:
        return groups.ep_group_name(self.size)

    @classmethod
    def current(cls) -> "ExpertParallel":
        """From `llm.parallel.groups` (after `groups.init_expert_parallel`)."""
        rank, size = groups.ep_rank_world()
        return cls(groups.ep_group(), size, rank)


# ---------------------------------------------------------------------------- token exchange

class AllToAllExchange:
    """The dispatcher's `TokenExchange` over the expert-parallel group.

    Rows arrive sorted by global expert (counts [E] per expert). Rank j of the group owns
    experts [j·E_local, (j+1)·E_local), so the rows for rank j are one contiguous block.

    dispatch, dropless (capacity None): all-to-all the counts ([E] -> [ep, E_local]: rows
    each source sends for each local expert), read them on the host (one sync: the split
    sizes), all-to-all the rows with those variable splits, then reorder the received rows
    from (source, expert) to (expert, source) so each local expert's rows are contiguous.
    dispatch, capacity C: every expert's rows are padded to C slots, so the splits are fixed
    (E_local · C rows per rank) and no counts are exchanged; padding rows compute zeros.
    combine is the exact inverse. Gradients flow through both all-to-alls.
    """

    def __init__(self, ep: ExpertParallel, n_experts: int):
        self.ep = ep
        self.n_experts = n_experts
        self.n_local = n_experts // ep.size

    def dispatch(self, x_sorted: Tensor, counts: Tensor, capacity: Optional[Tensor] = None):
        if capacity is not None:
            return self._dispatch_fixed(x_sorted, counts, int(capacity))
        ep, El, group = self.ep.size, self.n_local, self.ep.group
        counts = counts.to(torch.long).contiguous()  # [E]
        recv = torch.empty_like(counts)  # [ep * E_local]: (source, local expert)
        dist.all_to_all_single(recv, counts, group=group)
        sizes = torch.cat([counts.view(ep, El).sum(1), recv.view(ep, El).sum(1)]).tolist()  # one host sync
        in_splits, out_splits = sizes[:ep], sizes[ep:]
        x_recv = all_to_all(x_sorted, out_splits, in_splits, group)  # [M', d] by (source, local expert)
        perm = None
        if El > 1 and ep > 1:
            block = torch.arange(ep * El, device=recv.device).repeat_interleave(recv, output_size=x_recv.shape[0])
            perm = torch.argsort((block % El) * ep + block // El, stable=True)  # (expert, source) order
            x_recv = x_recv.index_select(0, perm)
        local_counts = recv.view(ep, El).sum(0)  # [E_local]
        return x_recv, local_counts, ("variable", perm, in_splits, out_splits)

    def _dispatch_fixed(self, x_sorted: Tensor, counts: Tensor, capacity: int):
        ep, El, E, group = self.ep.size, self.n_local, self.n_experts, self.ep.group
        M, d = x_sorted.shape
        counts = counts.to(torch.long)
        starts = torch.cumsum(counts, 0) - counts  # [E]
        expert = torch.arange(E, device=counts.device).repeat_interleave(counts, output_size=M)  # [M]
        slot = expert * capacity + torch.arange(M, device=counts.device) - starts.index_select(0, expert)  # [M]
        padded = x_sorted.new_zeros(E * capacity, d).index_copy(0, slot, x_sorted)  # [E·C, d]
        split = [El * capacity] * ep
        x_recv = all_to_all(padded, split, split, group)  # [ep·E_local·C, d] by (source, expert, slot)
        x_local = x_recv.view(ep, El, capacity, d).transpose(0, 1).reshape(El * ep * capacity, d)
        local_counts = torch.full((El,), ep * capacity, dtype=torch.long, device=counts.device)
        return x_local, local_counts, ("fixed", slot, capacity)

    def combine(self, y_local: Tensor, handle) -> Tensor:
        ep, El, group = self.ep.size, self.n_local, self.ep.group
        if handle[0] == "fixed":
            _, slot, capacity = handle
            d = y_local.shape[-1]
            y = y_local.view(El, ep, capacity, d).transpose(0, 1).reshape(ep * El * capacity, d)
            split = [El * capacity] * ep
            return all_to_all(y, split, split, group).index_select(0, slot)
        _, perm, in_splits, out_splits = handle
        if perm is not None:
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            y_local = y_local.index_select(0, inverse)  # back to (source, expert) order
        return all_to_all(y_local, in_splits, out_splits, group)


# ---------------------------------------------------------------------------- SMEAR merge

class ExpertParallelMerge:
    """SMEAR's merge θ̄_g = Σ_e w[g, e] θ_e (w [G, E] over GLOBAL experts) with sharded experts.

    Two exact ways (docs/expert-parallel.md#smear-merge), both differentiable:
    - gather: all-gather the layer's expert weights (each rank receives the other
      (ep−1)·E/ep experts' 3·d·f numbers), merge locally. Backward reduce-scatters the
      weight gradients to their owners.
    - reduce: all-gather the routing weights of the group ([ep·G, E], small), merge every
      rank's groups over the local experts, reduce-scatter the partial merges (each rank
      receives (ep−1)·G merged experts of 3·d·f numbers). Needs G equal on all ranks.
    `auto` picks the one that moves fewer numbers: gather when E/ep ≤ G, i.e. E ≤ ep·G
    (docs/expert-parallel.md#smear-merge: E·3df vs B·T/S·3df, with B the expert-parallel group's batch: every rank
    needs its own merged experts). G is compared across the group first (a tiny
    all-gather), so every rank takes the same path; unequal G always gathers.
    """

    def __init__(self, experts: Experts, ep: ExpertParallel, mode: str = "auto"):
        if mode not in SMEAR_MERGE_MODES:
            raise ValueError(f"smear merge mode {mode!r}: expected one of {', '.join(SMEAR_MERGE_MODES)}")
        self.experts = experts
        self.ep = ep
        self.mode = mode
        self.last_path: Optional[str] = None  # "gather" | "reduce", for tests and logs

    def path(self, G: int) -> str:
        sizes = torch.tensor([G], dtype=torch.long, device=self.experts.w1.device)
        gathered = sizes.new_empty(self.ep.size)
        all_gather_flat(gathered, sizes, group=self.ep.group)
        all_g = gathered.tolist()
        equal = min(all_g) == max(all_g)
        if self.mode == "reduce":
            if not equal:
                raise RuntimeError(f"SMEAR reduce merge needs the same number of routing groups on every rank "
                                   f"of the expert-parallel group, got {all_g}")
            return "reduce"
        if self.mode == "gather" or not equal:
            return "gather"
        return "gather" if self.experts.n_local <= G else "reduce"

    def __call__(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ex, group = self.experts, self.ep.group
        params = (ex.w1, ex.w3, ex.w2)
        shapes = [p.shape[1:] for p in params]
        sizes = [math.prod(s) for s in shapes]
        G = weights.shape[0]
        self.last_path = self.path(G)
        if self.last_path == "gather":
            local = torch.cat([p.flatten(1) for p in params], dim=1)  # [E_local, P]
            full = all_gather(local, group)  # [E, P]
            merged = merge(weights, full)  # [G, P]
        else:
            w_all = all_gather(weights, group)  # [ep·G, E]
            partial = merge(w_all[:, ex.first:ex.first + ex.n_local],
                            torch.cat([p.flatten(1) for p in params], dim=1))  # [ep·G, P]
            merged = reduce_scatter(partial, group)  # [G, P]
        return tuple(m.to(ex.w1.dtype).view(G, *s) for m, s in zip(merged.split(sizes, dim=1), shapes))


# ---------------------------------------------------------------------------- sharding

@functools.cache
def _moe_flag_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelLayers(MoE):
        """No parameters, never called: DeepSpeed's engine turns on its MoE paths (expert
        gradient reduction within the expert-data-parallel group, expert param groups in
        ZeRO 1/2, per-rank optimizer files) only when the model contains an instance of
        `deepspeed.moe.layer.MoE`. Our routed layers are not, so this stands in for them.
        num_local_experts = 0: DeepSpeed's per-expert checkpoint files stay empty; expert
        weights are checkpointed by `full_state_dict` instead."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = 0
            self.expert_group_name = groups.ep_group_name(ep_size)
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (groups.init_expert_parallel)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelLayers only flags the model for DeepSpeed; it is not a layer")

    return ExpertParallelLayers


FLAG_NAME = "expert_parallel_layers"


def mark_expert_params(params: Iterable[nn.Parameter], ep_size: int) -> None:
    """What DeepSpeed's MoE sets on expert parameters (deepspeed.moe.utils.is_moe_param)."""
    for p in params:
        p.allreduce = False
        p.group_name = groups.ep_group_name(ep_size)


def _slice_param(p: nn.Parameter, first: int, n: int) -> nn.Parameter:
    return nn.Parameter(p.detach()[first:first + n].clone(), requires_grad=p.requires_grad)


def shard_store(store: Experts, ep: ExpertParallel) -> None:
    """Keep this rank's slice [first, first + E/ep) of an expert store, marked as expert parameters."""
    if store.n_local != store.n_global:
        raise RuntimeError("shard_experts: this expert store is already sharded")
    n_local = store.n_global // ep.size
    first = ep.rank * n_local
    for name in ("w1", "w3", "w2"):
        setattr(store, name, _slice_param(getattr(store, name), first, n_local))
    store.first = first
    mark_expert_params(store.parameters(), ep.size)


def routed_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that shard themselves (`RouterSpec`: every routed layer has `shard`)."""
    return [m for m in model.modules() if callable(getattr(m, "shard", None)) and hasattr(m, "n_experts")]


def shard_experts(model: nn.Module, ep: Optional[ExpertParallel] = None, smear_merge: str = "auto") -> nn.Module:
    """Keep this rank's experts of every routed layer and let each install its exchange / merge.

    Call on the full model built with the same seed on every rank, after
    `groups.init_expert_parallel`, before `deepspeed.initialize`. A no-op at ep_size 1.
    `smear_merge` (parallel.smear_merge) forces the path of layers that merge experts:
    auto | gather | reduce.
    """
    ep = ep or ExpertParallel.current()
    if ep.size == 1:
        return model
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"parallel.ep_size={ep.size} needs routed layers; the model has none")
    for layer in layers:
        if layer.n_experts % ep.size:
            raise ConfigError(f"parallel.ep_size={ep.size} must divide model.routing.n_experts={layer.n_experts}")
        layer.shard(ep, smear_merge)
    stray = [name for name, p in model.named_parameters()
             if "expert" in name and not hasattr(p, "allreduce")]
    if stray:
        raise RuntimeError(f"parameters named like experts but not sharded: {stray[:3]}")
    if not any(type(m).__name__ == "ExpertParallelLayers" for m in model.modules()):
        model.add_module(FLAG_NAME, _moe_flag_class()(layers[-1].n_experts, ep.size))
    return model


# ---------------------------------------------------------------------------- checkpoints

def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every expert tensor indexed by GLOBAL expert.

    A collective under expert parallelism: call on every rank (each gets the full dict;
    one of them writes it). Without expert parallelism it is `model.state_dict()`.
    Every module holding sharded experts (`Experts`, DeepSpeed's MoE layer) rewrites its
    own keys through `gather_expert_state`. The flag module has no state.
    """
    state = model.state_dict()
    ep = ExpertParallel.current()
    if ep.size == 1:
        return state
    for prefix, module in _expert_holders(model):
        module.gather_expert_state(state, prefix, ep)
    return state


def _expert_holders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}." if prefix else "", module) for prefix, module in model.named_modules()
            if callable(getattr(module, "gather_expert_state", None))]


def gather_rows(t: Tensor, ep: ExpertParallel) -> Tensor:
    """[n, ...] on every rank of the expert-parallel group -> [ep · n, ...] in rank order."""
    t = t.contiguous()
    out = t.new_empty((ep.size * t.shape[0], *t.shape[1:]))
    all_gather_flat(out, t, group=ep.group)
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], strict: bool = True):
    """Load a `full_state_dict` (global experts, any ep_size wrote it) into a model that
    may be sharded: each expert holder slices its tensors to this rank's experts first."""
    local = dict(state)
    for prefix, module in _expert_holders(model):
        module.slice_expert_state(local, prefix)
    return model.load_state_dict(local, strict=strict)


# ---------------------------------------------------------------------------- entry point

def apply_expert_parallel(model: nn.Module, cfg) -> nn.Module:
    """Shard `model` per `cfg.parallel` (a `Config`); creates the groups if not done yet.

    Every rank calls it on the full model built from the same seed, before `build_engine`.
    """
    if groups.ep_size() != cfg.parallel.ep_size:
        groups.init_expert_parallel(cfg.parallel.ep_size, cfg.model.routing.n_experts)
    return shard_experts(model, smear_merge=cfg.parallel.smear_merge)


# ---------------------------------------------------------------------------- gradient norm

def global_grad_norm(model: nn.Module) -> Tensor:
    """The 2-norm of the whole model's gradient, as if no parameter were sharded.

    Call after DeepSpeed's gradient reduction. Replicated parameters hold the same
    (reduced) gradient on every rank and count once; expert parameters hold different
    experts on the ranks of an expert-parallel group, so their squares are summed over it.
    """
    ep = ExpertParallel.current()
    if ep.size == 1:  # nothing sharded: torch's own total norm, as clip_grad_norm_ computes it
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    shared, experts = [], []
    for p in model.parameters():
        if p.grad is not None:
            (experts if getattr(p, "allreduce", True) is False else shared).append(p.grad.detach())
    zero = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    shared_sq = torch.nn.utils.get_total_norm(shared).float().square() if shared else zero
    expert_sq = torch.nn.utils.get_total_norm(experts).float().square() if experts else zero.clone()
    dist.all_reduce(expert_sq, group=ep.group)
    return (shared_sq + expert_sq).sqrt()


def fix_fp32_clipping(engine) -> None:
    """Clip with the true global norm in DeepSpeed's fp32 path without ZeRO.

    There DeepSpeed clips with `deepspeed.runtime.utils.clip_grad_norm_`, which takes
    each rank's local norm and AVERAGES it over the data-parallel group: right when every
    rank holds the same gradients, wrong under expert parallelism (each rank holds other
    experts), and it reports no norm (`get_global_grad_norm()` is None). ZeRO 1/2 and
    the bf16 optimizer compute the norm expert-aware themselves (tested against ep_size 1).
    """
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return

    def clip_fp32_gradients() -> None:
        norm = global_grad_norm(engine.module)
        torch.nn.utils.clip_grads_with_norm_(engine.module.parameters(), engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm.item()

    engine.clip_fp32_gradients = clip_fp32_gradients  # called by DeepSpeedEngine._take_model_step
