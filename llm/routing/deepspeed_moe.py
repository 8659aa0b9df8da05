"""DeepSpeed's own MoE layer as a baseline router (`router: deepspeed_topk`).

`deepspeed.moe.layer.MoE` (GShard-style top-k gate, fixed-capacity dispatch, all-to-all
under expert parallelism) with our SwiGLU experts, in the decoder's FFN slot:
`layer(x [B, T, d], ctx) -> (y, aux_loss_coef · l_aux)`.

Settings, and how they differ from our `topk` router:
- capacity dropping is on (DeepSpeed's MoE has no dropless top-1/top-2 path that stays
  causal); capacity = ceil(capacity_factor · tokens · k / E) (model.routing.deepspeed_topk), min_capacity 0 so that
  a single decoding token still gets a slot. Dropping depends on the other tokens of the
  micro-batch, so this baseline is not causal under capacity (docs/routing.md#capacity): use it for
  throughput and loss comparisons, not for the causality test.
- `use_rts=False`: overflow tokens are dropped deterministically, not at random (for k ≤ 2
  by position, first choices before second ones; for k > 2 by gate score), and
  `top2_2nd_expert_sampling=False`: the second expert is the second largest, not drawn
  with Gumbel noise (which DeepSpeed also does in eval mode, making logits random).
- DeepSpeed's gate renormalises the chosen weights for k ≥ 2 and not for k = 1, like ours.
- Only the load-balancing loss (DeepSpeed's l_aux), weighted by aux_loss_coef; no z-loss.

Expert parallelism: the layer is built with all E experts (same init on every rank,
like every other layer) and its `shard` keeps this rank's slice; DeepSpeed's engine then hands it the expert-parallel group through
`set_deepspeed_parallelism`, which needs torch.distributed initialised. A single
process without torch.distributed can still run it with all experts (evaluation,
generation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llm.config import ConfigError, ModelConfig, RouterOptions
from llm.initialization import output_std
from llm.routing.experts import swiglu
from llm.routing.registry import RouterSpec, register
from llm.routing.stats import RoutingStats, bincount, distribution_counts, slot_counts

# The expert weights' keys inside this layer's state dict: `<prefix><_EXPERTS><i>.<rest>`.
_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts."


@dataclass
class DeepSpeedTopKConfig(RouterOptions):
    """model.routing.deepspeed_topk."""

    k: int = 2  # experts per token
    capacity_factor: float = 1.25  # DeepSpeed's capacity: ceil(capacity_factor · tokens · k / E)
    flat_names = {"top_k": "k", "ds_capacity_factor": "capacity_factor"}

    def validate(self, model: ModelConfig, key: str) -> None:
        n_experts = model.routing.n_experts
        if not 1 <= self.k <= n_experts:
            raise ConfigError(f"{key}.k={self.k}: expected 1 <= k <= model.routing.n_experts={n_experts}")


class SwiGLUExpert(nn.Module):
    """One SwiGLU expert in the expert store's layout: w1, w3 [d, f], w2 [f, d]."""

    def __init__(self, d_model: int, d_expert: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(d_expert, d_model))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


def _deepspeed_moe_class():
    from deepspeed.moe.layer import MoE

    class _MoE(MoE):
        """DeepSpeed's MoE with a clear error when torch.distributed is missing, and an
        idempotent `set_deepspeed_parallelism` (sharding may already have set the group)."""

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "router deepspeed_topk: DeepSpeed's MoE layer needs torch.distributed initialised "
                    "(deepspeed.init_distributed(), which the trainer does) to create its expert-parallel groups")
            if self.deepspeed_moe.ep_group is None:
                super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    return _MoE


class DeepSpeedMoE(nn.Module):
    """`deepspeed.moe.layer.MoE` in the FFN slot: forward(x, ctx) -> (y, aux_loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r, o = cfg.routing, cfg.routing.options
        d_expert = r.d_expert or cfg.d_ff
        self.top_k = o.k
        self.aux_loss_coef = r.aux_loss_coef
        self.moe = _deepspeed_moe_class()(
            hidden_size=cfg.d_model, expert=SwiGLUExpert(cfg.d_model, d_expert), num_experts=r.n_experts,
            ep_size=1, k=o.k, capacity_factor=o.capacity_factor, eval_capacity_factor=o.capacity_factor,
            min_capacity=0, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        # DeepSpeed deep-copies one expert E times: give each its own draw, in expert order.
        for expert in self.moe.deepspeed_moe.experts.deepspeed_experts:
            expert.reset_parameters(cfg.init_std, output_std(cfg))
        nn.init.normal_(self.moe.deepspeed_moe.gate.wg.weight, std=cfg.init_std)
        self._last = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._keep_routes)

    @property
    def n_experts(self) -> int:
        return self.moe.num_experts

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, _ = self.moe(x)
        return y.to(x.dtype), self.aux_loss_coef * l_aux.float()

    def _keep_routes(self, gate: nn.Module, args: tuple, output: tuple) -> None:
        """Forward hook on DeepSpeed's gate, the one place that reads its output. With sparse
        routes (DeepSpeed 0.19.8) it is (l_aux, capacity, E, expert of each route [k, S] int32
        (−1: dropped by capacity), locations, weights, routed slots per expert [E]); without,
        (l_aux, combine weights, dispatch mask [S, E, capacity] bool, routed slots [E]).
        Kept for `stats`: the gate input args[0] [S, d], the routes or the mask, the routed slots."""
        routes = output[3] if len(output) == 7 else output[2]
        self._last = (args[0].detach(), routes.detach(), output[-1].detach())

    @property
    def stats(self) -> RoutingStats:
        """Routing statistics of the last forward, in the schema of `MoELayer.stats`."""
        if self._last is None:
            return RoutingStats()
        x, routes, routed = self._last
        with torch.no_grad():
            if routes.dim() == 3:  # the dispatch mask
                kept = routes.any(-1)  # [S, E]
                active, computed = kept.sum(-1), kept.sum(0)
            else:
                active = (routes >= 0).sum(0)  # [S]
                computed = bincount(routes + 1, self.n_experts + 1)[1:]  # [E]; bin 0: the dropped routes
            gate = self.moe.deepspeed_moe.gate.wg
            probs = torch.softmax(x.float() @ gate.weight.float().t(), dim=-1)  # [S, E], as the gate computes it
            counts = {**slot_counts(active, self.top_k, computed, routed.long()), **distribution_counts(probs)}
        return RoutingStats(counts, {"k": torch.tensor(float(self.top_k))})

    def shard(self, ep, merge_mode: str = "auto") -> None:
        """Keep this rank's experts; DeepSpeed's engine hands the layer its group later.
        `merge_mode` is for layers that merge experts; this one exchanges tokens."""
        from llm.parallel.expert import mark_expert_params

        moe = self.moe
        inner = moe.deepspeed_moe
        n_local = moe.num_experts // ep.size
        first = ep.rank * n_local
        store = inner.experts
        store.deepspeed_experts = nn.ModuleList(list(store.deepspeed_experts)[first:first + n_local])
        store.num_local_experts = n_local
        for obj in (moe, inner):
            obj.ep_size = ep.size
            obj.num_local_experts = n_local
        moe.expert_group_name = inner.ep_group_name = ep.group_name
        mark_expert_params(store.parameters(), ep.size)
        inner._set_ep_group(ep.group)

    def _sharded(self) -> bool:
        return self.moe.num_local_experts != self.moe.num_experts

    def gather_expert_state(self, state: dict[str, torch.Tensor], prefix: str, ep) -> None:
        """Under expert parallelism, rename local experts `<i>` to global ids, gathering every rank's."""
        if not self._sharded():
            return
        from llm.parallel.expert import gather_rows

        n_local, head = self.moe.num_local_experts, prefix + _EXPERTS
        for key in [k for k in state if k.startswith(head)]:
            local, rest = key[len(head):].split(".", 1)
            gathered = gather_rows(state.pop(key)[None], ep)  # [ep, ...]: local expert `local` of each rank
            for src in range(ep.size):
                state[f"{head}{src * n_local + int(local)}.{rest}"] = gathered[src]

    def slice_expert_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Keep this rank's experts of a global state, renamed to local ids."""
        if not self._sharded():
            return
        from llm.parallel import groups

        n_local, head = self.moe.num_local_experts, prefix + _EXPERTS
        first = groups.ep_rank_world()[0] * n_local
        for key in [k for k in state if k.startswith(head)]:
            index, rest = key[len(head):].split(".", 1)
            value = state.pop(key)
            if first <= int(index) < first + n_local:
                state[f"{head}{int(index) - first}.{rest}"] = value


register(RouterSpec(
    name="deepspeed_topk", layer=DeepSpeedMoE, active_experts=lambda cfg: cfg.routing.options.k,
    options=DeepSpeedTopKConfig, capacity=lambda cfg: cfg.routing.options.capacity_factor, needs_process_group=True,
    export_refusal="DeepSpeed's own MoE layer drops tokens by capacity"))
