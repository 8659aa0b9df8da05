"""SMEAR made causal: segment-shifted soft merging of experts (docs/smear.md).

Each sequence is cut into segments of S tokens. Segment j runs through ONE SwiGLU expert
whose parameters are the routing-weighted average of all E experts' parameters,
θ̄_j = Σ_i e_{j,i} θ_i, and its routing weights come from the mean hidden state of segment
j − 1 (`segment_shift`): the output at position t depends on tokens ≤ t only. Segment 0 has
no past and uses a learned prior e_0 = softmax(ρ).

    pooled_j = mean of x over segment j                      [B, nseg-1, d]  (fp32)
    e_{j+1}  = softmax(W · LayerNorm(pooled_j))              router, fp32, W ~ N(0, 0.01), no bias
    e_0      = softmax(ρ)                                     prior (first_segment: prior)
    θ̄_j     = Σ_i e_{j,i} θ_i                               one matmul per weight matrix for all B·nseg
    y_j      = W̄2_j (silu(W̄1_j x) ⊙ W̄3_j x)                 bmm over the segments

Options (`model.routing`):
- `first_segment: self_stopgrad` is Lory's choice, kept for comparison: segment 0 is routed
  on its own mean with a stop-gradient. Its forward pass sees the future of segment 0, so
  it fails the causality test (docs/routing.md#causality), and it cannot decode incrementally.
- `expert_dropout` p: in training each e_{j,i} is zeroed with probability p and the rest
  renormalised (at least one expert always survives).
- `recompute`: merge + apply run under non-reentrant activation checkpointing, so the
  B·nseg merged experts are not kept for backward but rebuilt there. They are B·T/S·3·d·f
  numbers, 3·d·f/S per token against ~3·f for the FFN's own activations: about d/S times
  more (3x at d = 768, S = 256). The checkpoint is selective (`_keep_bmm_outputs`): the bmm
  outputs stay saved, so backward redoes only the merge (E/S of the FFN's FLOPs), not the
  whole expert.
- Packed documents. Attention sees across document boundaries and, by default, so does
  routing: a segment is routed on the previous segment whatever documents they hold.
  `reset_at_eos: true` routes segment j with the prior instead when segment j − 1 contains
  the token `eos_id` (documents end with EOS in `llm prepare`'s stream). The decision uses
  tokens of segment j − 1 only, so it stays causal. A segment that itself contains an EOS
  still serves the start of the next document with the expert it was routed to.
- A last partial segment (T not a multiple of S) gets its merged expert as usual; no mean
  is taken over it (it would route a segment that does not exist).

Incremental decoding (`ctx.state` is a dict): the state holds the merged expert of the
segment being decoded, the fp32 running sum of its hidden states and whether it has seen
an EOS. A call may hold any number of tokens (one, or a chunked
prefill crossing segment boundaries); new merges happen only where a segment begins.

After every forward, `layer.stats` is a `RoutingStats` (llm/routing/stats.py), computed on
first access: over the segments routed by the router (not the prior), before expert
dropout, the counts `segments` (= `decisions`), Σ `entropy`, Σ `merge_weights` [E],
Σ `max_weight` and `top1` [E]; `prior_segments` (segment 0, EOS resets); state `prior`
softmax(ρ). A forward that routed no segment (T ≤ S, or a decoding step inside a segment)
counts zeros. The layer adds no auxiliary loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llm.config import ConfigError, ModelConfig, RouterOptions, check_choice, check_positive
from llm.initialization import output_std
from llm.routing.experts import Experts, swiglu
from llm.routing.registry import ExportError, LayerExport, RouterSpec, experts_spec, export_parameters, register
from llm.routing.stats import RoutingStats, bincount, distribution_counts

Merged = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # w1, w3 [G, d, f], w2 [G, f, d]


@dataclass
class SMEARConfig(RouterOptions):
    """model.routing.smear: SMEAR, segment-shifted (docs/smear.md)."""

    segment_len: int = 256
    expert_dropout: float = 0.1
    first_segment: str = "prior"  # prior (causal) | self_stopgrad (Lory, leaks)
    reset_at_eos: bool = False  # a segment after one that contains EOS is routed by the prior
    eos_id: int = 2  # EOS id for reset_at_eos; 2 is what `llm prepare`'s tokenizer uses
    recompute: bool = False  # recompute merged weights in backward instead of keeping them

    def validate(self, model: ModelConfig, key: str) -> None:
        check_positive(f"{key}.segment_len", self.segment_len)
        check_choice(f"{key}.first_segment", self.first_segment, ("prior", "self_stopgrad"))
        if not 0 <= self.expert_dropout < 1:
            raise ConfigError(f"{key}.expert_dropout={self.expert_dropout}: expected 0 <= p < 1")
        if self.reset_at_eos and self.eos_id < 0:
            raise ConfigError(f"{key}.eos_id={self.eos_id}: reset_at_eos needs the EOS token id (>= 0)")

    def validate_seq_len(self, seq_len: int, key: str) -> None:
        if self.segment_len >= seq_len:
            raise ConfigError(
                f"{key}.segment_len={self.segment_len} must be < data.seq_len={seq_len}: SMEAR routes each "
                f"segment with the previous one, so with one segment per sequence the router is never used")


class SegmentRouter(nn.Module):
    """SMEAR's router: LayerNorm of a pooled hidden state, bias-free linear, softmax, all fp32.

    Parameter names (`norm`, `proj`) avoid the word "expert": DeepSpeed would take them
    for expert parameters.
    """

    def __init__(self, d_model: int, n_experts: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.proj = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.01)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [..., d] (fp32) -> routing weights [..., E] (fp32, or fp64 for an fp64 model)."""
        with torch.autocast(pooled.device.type, enabled=False):
            h = F.layer_norm(_fp32(pooled), self.norm.normalized_shape, _fp32(self.norm.weight),
                             _fp32(self.norm.bias), self.norm.eps)
            return torch.softmax(h @ _fp32(self.proj.weight).t(), dim=-1)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32 (fp64 stays fp64, for the float64 tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def segment_shift(routed: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Weights per segment from the router's output per segment: segment j gets routed[:, j−1].

    routed [B, n, E] (router output on segments 0..n−1), first [B, E] (segment 0's weights)
    -> [B, n + 1, E]. A shift along the segment axis, never along the flattened tokens.
    """
    return torch.cat([first[:, None], routed], dim=1)


def expert_dropout(e: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each weight with probability p and renormalise; never drops every expert."""
    keep = torch.rand_like(e) >= p
    keep |= ~keep.any(dim=-1, keepdim=True)
    e = e * keep
    return e / e.sum(dim=-1, keepdim=True)


def segment_sums(x: torch.Tensor, S: int) -> torch.Tensor:
    """Per-segment sums (at least fp32) of x [B, T, ...] -> [B, ceil(T/S), ...]; the last may be partial."""
    B, T = x.shape[:2]
    n_full = T // S
    acc = torch.promote_types(x.dtype, torch.float32)
    sums = [x[:, :n_full * S].reshape(B, n_full, S, *x.shape[2:]).sum(2, dtype=acc)]
    if T > n_full * S:
        sums.append(x[:, n_full * S:].sum(1, dtype=acc)[:, None])
    return torch.cat(sums, dim=1)


def segment_groups(e: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Routing weights e [B, nseg, E] of T tokens as merge groups [B·nseg, E]: the full segments
    of every sequence first (sequence-major), then each sequence's partial last segment, so
    that `apply_segments` takes both sets of merged experts as contiguous slices."""
    n_full = T // S
    return torch.cat([e[:, :n_full].flatten(0, 1), e[:, n_full:].flatten(0, 1)])


def apply_segments(x: torch.Tensor, merged: Merged, S: int) -> torch.Tensor:
    """Run segment j of x [B, T, d] (T counted from a segment start) through merged expert j.

    merged: w1, w3 [B·ceil(T/S), d, f], w2 [..., f, d] in `segment_groups` order. Full segments
    go through one bmm per weight matrix, a partial last segment through one more: no padding.
    """
    B, T, d = x.shape
    n_full = T // S
    if T == n_full * S:
        return swiglu(x.reshape(B * n_full, S, d), *merged).view(B, T, d)
    if n_full == 0:
        return swiglu(x, *merged)
    # split, not two slices: its backward is one cat, where each slice's is a zero fill + copy.
    full, tail = zip(*(m.split([B * n_full, B]) for m in merged))
    y_full = swiglu(x[:, :n_full * S].reshape(B * n_full, S, d), *full).view(B, n_full * S, d)
    return torch.cat([y_full, swiglu(x[:, n_full * S:], *tail)], dim=1)


def last_segment(merged: Merged, B: int, T: int, S: int) -> Merged:
    """The merged expert of each sequence's last segment, [B, ...], from `segment_groups` order."""
    n_full = T // S
    if T > n_full * S:
        return tuple(m[B * n_full:] for m in merged)
    return tuple(m.view(B, n_full, *m.shape[1:])[:, -1] for m in merged)


def _keep_bmm_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: save what the segment bmms produce, recompute the rest
    (the merge matmuls and the elementwise SwiGLU gate)."""
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.bmm.default else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_bmm_outputs)


class SMEARLayer(nn.Module):
    """Causal SMEAR FFN for the decoder's FFN slot: `forward(x, ctx) -> (y, aux_loss = 0)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r, o = cfg.routing, cfg.routing.options
        self.segment_len = o.segment_len
        self.p_drop = o.expert_dropout
        self.first_segment = o.first_segment
        self.reset_at_eos = o.reset_at_eos
        self.eos_id = o.eos_id
        self.recompute = o.recompute
        # At init the router is near uniform and the merged expert is the mean of E random
        # experts, whose weights shrink by 1/√E (output by ~E^-1.5 through SwiGLU): drawing
        # the experts √E wider gives the merged expert a dense FFN's scale (docs/smear.md#init-scale).
        widen = r.n_experts ** 0.5
        self.experts = Experts(r.n_experts, cfg.d_model, r.d_expert or cfg.d_ff, cfg.init_std * widen,
                               output_std(cfg) * widen)
        self.router = SegmentRouter(cfg.d_model, r.n_experts, cfg.norm_eps)
        self.prior = nn.Parameter(torch.zeros(r.n_experts))  # ρ; uniform at init
        # θ̄_g = Σ_e w[g, e] θ_e for G routing groups, w [G, E] over the global experts: the one
        # place expert parallelism plugs in (`shard` installs the cross-rank merge).
        self.merge: Callable[[torch.Tensor], Merged] = self.experts.merged
        self._last: Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]] = None

    @property
    def n_experts(self) -> int:
        return self.experts.n_global

    def shard(self, ep, merge_mode: str = "auto") -> None:
        """Expert parallelism (docs/expert-parallel.md#smear-merge): keep this rank's experts and
        merge across ranks, by all-gather or reduce-scatter (`merge_mode`: auto | gather | reduce)."""
        from llm.parallel.expert import ExpertParallelMerge, shard_store

        shard_store(self.experts, ep)
        self.merge = ExpertParallelMerge(self.experts, ep, merge_mode)

    def _merge_apply(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Merge the expert of every segment of x [B, T, d] (weights [B, nseg, E]) and apply it."""
        S = self.segment_len
        return apply_segments(x, self.merge(segment_groups(weights, x.shape[1], S)), S)

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        S = self.segment_len
        state: Optional[dict] = ctx.state if ctx is not None else None
        start = ctx.start_pos if ctx is not None else 0
        if state is not None and self.first_segment == "self_stopgrad":
            raise ValueError("first_segment=self_stopgrad routes segment 0 on its own future; "
                             "it cannot decode incrementally")
        if start and (state is None or "sum" not in state):
            raise ValueError(f"SMEAR needs the decoding state of the tokens before start_pos={start}")
        eos = None
        if self.reset_at_eos:
            if ctx is None:
                raise ValueError("reset_at_eos needs ctx.input_ids")
            eos = ctx.input_ids == self.eos_id  # [B, T]

        # The head finishes a segment begun in an earlier decoding call (its expert is cached);
        # the rest starts at a segment boundary and holds n_new segments, the last maybe partial.
        offset = start % S
        n_head = min(T, S - offset) if offset else 0
        x_head, x_rest = x[:, :n_head], x[:, n_head:]
        n_new = -(-(T - n_head) // S)
        sums = segment_sums(x_rest, S)  # [B, n_new, d]
        seg_eos = segment_sums(eos[:, n_head:], S) > 0 if eos is not None else None  # [B, n_new]
        prior = torch.softmax(_fp32(self.prior), dim=0)  # [E]

        # Sum (and EOS flag) of the segment before the first new one, when there is one.
        prev_sum = prev_eos = None
        if start:
            prev_sum = state["sum"] + x_head.sum(1, dtype=state["sum"].dtype)  # [B, d]
            if eos is not None:
                prev_eos = state["eos"] | eos[:, :n_head].any(1)  # [B]

        e = weights = merged = None
        if n_new:
            e, from_router = self._route(sums, seg_eos, prev_sum, prev_eos, prior, T)  # [B, n_new, E]
            weights = expert_dropout(e, self.p_drop) if self.training and self.p_drop > 0 else e
        # Detached views for `stats`: e [B, n_new, E] and from_router [B, n_new] (None: no new segment).
        self._last = (None if e is None else e.detach(), from_router if n_new else None, prior.detach())

        y = []
        if n_head:
            y.append(swiglu(x_head, *state["merged"]))
        if n_new and state is None and self.recompute and torch.is_grad_enabled():
            # Nothing random runs inside, so the RNG state need not be replayed.
            y.append(checkpoint(self._merge_apply, x_rest, weights, use_reentrant=False,
                                context_fn=_selective_contexts, preserve_rng_state=False))
        elif n_new:
            merged = self.merge(segment_groups(weights, x_rest.shape[1], S))
            y.append(apply_segments(x_rest, merged, S))
        if state is not None:
            self._update_state(state, x_head, x_rest, sums, seg_eos, eos, weights, merged)
        return torch.cat(y, dim=1) if len(y) > 1 else y[0], x.new_zeros((), dtype=torch.float32)

    def _route(self, sums, seg_eos, prev_sum, prev_eos, prior, T: int):
        """Routing weights of the segments that begin in this call, each from the previous one.

        sums [B, n_new, d], seg_eos [B, n_new] or None: sums and EOS flags of the new segments;
        prev_sum [B, d], prev_eos [B]: those of the segment before them (None at segment 0).
        Returns e [B, n_new, E] and from_router [B, n_new] (False where the prior was used).
        """
        B, S = sums.shape[0], self.segment_len
        sources, src_eos = sums[:, :-1], None if seg_eos is None else seg_eos[:, :-1]
        if prev_sum is not None:
            sources = torch.cat([prev_sum[:, None], sources], dim=1)
            if seg_eos is not None:
                src_eos = torch.cat([prev_eos[:, None], src_eos], dim=1)
        routed = self.router(sources / S)  # [B, n_sources, E]; every source segment is complete
        from_router = torch.ones(routed.shape[:2], dtype=torch.bool, device=routed.device)
        if src_eos is not None:
            routed = torch.where(src_eos[..., None], prior, routed)
            from_router = ~src_eos
        if prev_sum is not None:
            return routed, from_router
        if self.first_segment == "prior":
            first, first_routed = prior.expand(B, -1), False
        else:  # Lory: segment 0 on its own mean, with a stop-gradient. Sees the future of segment 0.
            first, first_routed = self.router(sums[:, 0] / min(S, T)).detach(), True
        first_flag = torch.full((B, 1), first_routed, dtype=torch.bool, device=routed.device)
        return segment_shift(routed, first), torch.cat([first_flag, from_router], dim=1)

    @torch.no_grad()
    def _update_state(self, state, x_head, x_rest, sums, seg_eos, eos, weights, merged) -> None:
        """Keep what the next decoding call needs about the segment this call ended in."""
        B, n_new = sums.shape[:2]
        if n_new:
            state["sum"] = sums[:, -1].detach()
            last = last_segment(merged, B, x_rest.shape[1], self.segment_len)
            # A slice of a longer prefill's merge is copied, so the state does not keep all of it alive.
            state["merged"] = tuple(m.detach() if n_new == 1 else m.detach().clone() for m in last)
            if seg_eos is not None:
                state["eos"] = seg_eos[:, -1]
        else:
            state["sum"] = state["sum"] + x_head.sum(1, dtype=state["sum"].dtype)
            if eos is not None:
                state["eos"] = state["eos"] | eos.any(1)

    @property
    def stats(self) -> RoutingStats:
        """Routing statistics of the last forward (see the module docstring)."""
        if self._last is None:
            return RoutingStats()
        e, from_router, prior = self._last
        E = prior.numel()
        if e is None:
            e, from_router = prior.new_zeros(1, 0, E), prior.new_zeros(1, 0, dtype=torch.bool)
        with torch.no_grad():
            e = e.double()  # [B, n, E]
            m = from_router[..., None].double()  # [B, n, 1]: masks, not a selection, so no host sync
            counts = {**distribution_counts(e, from_router),
                      "segments": from_router.sum(),
                      "prior_segments": (~from_router).sum(),
                      "merge_weights": (e * m).sum((0, 1)),
                      "max_weight": (e.amax(-1, keepdim=True) * m).sum(),
                      "top1": bincount(e.argmax(-1), E, from_router.double())}
        return RoutingStats(counts, {"prior": prior})


def smear_export(ffn: nn.Module, cfg: ModelConfig, k: Optional[float] = None) -> LayerExport:
    if ffn.first_segment != "prior":
        raise ExportError(
            f"model.routing.smear.first_segment={ffn.first_segment!r} routes segment 0 on its own future "
            f"and cannot decode incrementally: only first_segment=prior can be exported")
    spec = {"ffn": "smear", **experts_spec(cfg), "segment_len": ffn.segment_len,
            "norm_eps": ffn.router.norm.eps, "reset_at_eos": ffn.reset_at_eos, "eos_id": ffn.eos_id}
    return LayerExport(spec, export_parameters(ffn))


def future_leak(cfg: ModelConfig) -> Optional[str]:
    if cfg.routing.options.first_segment == "self_stopgrad":
        return "SMEAR with first_segment=self_stopgrad (segment 0 is routed on its own future tokens)"
    return None


def active_experts(cfg: ModelConfig) -> float:
    """One merged expert per token, plus the merge: every segment of S tokens sums E experts'
    weights (forward and backward, like a matmul), E/S of an expert's FLOPs per token."""
    return 1 + cfg.routing.n_experts / cfg.routing.options.segment_len


register(RouterSpec(name="smear", layer=SMEARLayer, active_experts=active_experts, options=SMEARConfig,
                    export=smear_export, capacity=lambda cfg: None, future_leak=future_leak,
                    selects_experts=False))
