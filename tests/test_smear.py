"""SMEAR, segment-shifted (docs/smear.md): causality, an explicit per-segment oracle, decoding."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.config import ConfigError, ModelConfig, load_config
from llm.model import FFNContext, build_model
from llm.routing.dense import DenseFFN
from llm.routing.smear import SMEARLayer
from tests.causality import assert_causal, causal_leak
from tests.models import tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S = 8  # segment length of the small test models
VOCAB = 97
EOS = 2


def _cfg(**routing) -> ModelConfig:
    r = dict(router="smear", n_experts=4, segment_len=S, expert_dropout=0.1)
    r.update(routing)
    return tiny_config(vocab_size=VOCAB, d_ff=48, max_seq_len=64, **r)


def _sharpen(module: torch.nn.Module, seed: int = 0) -> None:
    """Give routers and priors weights large enough that routing is far from uniform, so a
    leak or a wrong shift would show up clearly (the N(0, 0.01) init routes almost uniformly)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, SMEARLayer):
            with torch.no_grad():
                p = layer.router.proj.weight
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
                layer.router.norm.weight.copy_(1 + 0.3 * torch.randn(p.shape[1], generator=gen, dtype=p.dtype))
                layer.router.norm.bias.copy_(0.3 * torch.randn(p.shape[1], generator=gen, dtype=p.dtype))
                layer.prior.copy_(torch.randn(layer.prior.shape, generator=gen, dtype=p.dtype))


def _model(seed: int = 0, **routing):
    torch.manual_seed(seed)
    model = build_model(_cfg(**routing))
    _sharpen(model, seed)
    return model


def _ids(B: int, T: int, seed: int = 0, eos_at=()) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
    for pos in eos_at:
        ids[:, pos] = EOS
    return ids


# ------------------------------------------------------------------------- causality (docs/routing.md#causality)

T_CAUSAL = 30  # 3 full segments and a partial one of 6 tokens
POSITIONS = [3, S - 1, S, 2 * S - 1, 2 * S, T_CAUSAL - 1]  # inside seg 0, both sides of boundaries, last


@pytest.mark.parametrize("routing", [
    {},
    {"recompute": True},
    {"reset_at_eos": True},
], ids=["prior", "recompute", "reset_at_eos"])
def test_causal(routing):
    model = _model(**routing)
    ids = _ids(2, T_CAUSAL, eos_at=(5, 12, 20))
    assert_causal(model, ids, POSITIONS, VOCAB)


def test_self_stopgrad_is_flagged_as_leaking():
    model = _model(first_segment="self_stopgrad")
    ids = _ids(2, T_CAUSAL)
    # Inside segment 0 the future of the segment moves its routing, hence the logits.
    assert causal_leak(model, ids, 3, VOCAB) > 1e-4
    with pytest.raises(AssertionError, match="changed by"):
        assert_causal(model, ids, POSITIONS, VOCAB)
    # Past segment 0 the tokens up to t fix everything t depends on: no leak there.
    assert causal_leak(model, ids, S, VOCAB) <= 1e-5


# ------------------------------------------------------------------------- the oracle

def _oracle(layer: SMEARLayer, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """docs/smear.md#causal-shift written out, one sequence and one segment at a time: build θ̄_j, run a plain FFN."""
    ex = layer.experts
    B, T, d = x.shape
    out = []
    for b in range(B):
        rows = []
        for lo in range(0, T, S):
            e, _ = _segment_weights(layer, x, ids, b, lo)
            w1 = sum(e[i] * ex.w1[i] for i in range(len(e)))
            w3 = sum(e[i] * ex.w3[i] for i in range(len(e)))
            w2 = sum(e[i] * ex.w2[i] for i in range(len(e)))
            seg = x[b, lo:lo + S]
            rows.append((F.silu(seg @ w1) * (seg @ w3)) @ w2)
        out.append(torch.cat(rows))
    return torch.stack(out)


def _segment_weights(layer: SMEARLayer, x: torch.Tensor, ids: torch.Tensor | None, b: int, lo: int):
    """The merge weights of the segment of sequence b starting at lo, and whether the router chose them."""
    router, d = layer.router, x.shape[-1]
    if lo == 0 or (ids is not None and layer.reset_at_eos and (ids[b, lo - S:lo] == layer.eos_id).any()):
        return torch.softmax(layer.prior, dim=0), False
    h = F.layer_norm(x[b, lo - S:lo].mean(0), (d,), router.norm.weight, router.norm.bias, router.norm.eps)
    return torch.softmax(router.proj.weight @ h, dim=0), True


def _layer(seed: int = 0, dtype=torch.float64, **routing) -> SMEARLayer:
    torch.manual_seed(seed)
    layer = SMEARLayer(_cfg(**routing)).to(dtype)
    _sharpen(layer, seed)
    return layer


def _grads(layer, x, y):
    params = [x, *layer.parameters()]
    return torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), params,
                               allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("T", [4 * S, 3 * S + 5, S - 3], ids=["full", "partial_last", "one_partial"])
@pytest.mark.parametrize("recompute", [False, True])
def test_matches_per_segment_oracle(T, recompute):
    layer = _layer(recompute=recompute).eval()
    x = torch.randn(3, T, 32, dtype=torch.float64, requires_grad=True)
    ctx = FFNContext(input_ids=_ids(3, T))
    y, aux = layer(x, ctx)
    ref = _oracle(layer, x)
    assert aux.item() == 0
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(_grads(layer, x, y), _grads(layer, x, ref)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_reset_at_eos_matches_oracle_and_cuts_routing():
    layer = _layer(reset_at_eos=True, eos_id=EOS).eval()
    T = 4 * S + 3
    ids = _ids(2, T, eos_at=(S + 2,))  # EOS in segment 1: segment 2 uses the prior
    ids[1, 3 * S - 1] = EOS  # sequence 1 also: EOS at the end of segment 2, so segment 3 uses the prior
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, FFNContext(input_ids=ids))
    torch.testing.assert_close(y, _oracle(layer, x, ids), rtol=1e-12, atol=1e-12)
    assert layer.stats.counts["prior_segments"].item() == 2 + 2 + 1  # segment 0 twice, then the resets
    # Effective: segment 2 no longer depends on segment 1's hidden states ...
    x2 = x.detach().clone()
    x2[:, S:2 * S] += torch.randn(2, S, 32, dtype=torch.float64)
    y2, _ = layer(x2, FFNContext(input_ids=ids))
    torch.testing.assert_close(y2[:, 2 * S:3 * S], y[:, 2 * S:3 * S], rtol=0, atol=0)
    # ... which it does without the reset.
    layer.reset_at_eos = False
    a, _ = layer(x.detach(), FFNContext(input_ids=ids))
    b, _ = layer(x2, FFNContext(input_ids=ids))
    assert (a[:, 2 * S:3 * S] - b[:, 2 * S:3 * S]).abs().max() > 1e-3


def test_one_expert_is_a_dense_ffn():
    layer = _layer(n_experts=1, dtype=torch.float32).train()  # expert dropout cannot drop the only expert
    dense = DenseFFN(_cfg(n_experts=1))
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1[0].t())
        dense.w3.weight.copy_(layer.experts.w3[0].t())
        dense.w2.weight.copy_(layer.experts.w2[0].t())
    x = torch.randn(2, 3 * S + 3, 32)
    y, _ = layer(x, FFNContext(input_ids=_ids(2, x.shape[1])))
    torch.testing.assert_close(y, dense(x)[0], rtol=1e-5, atol=1e-6)


def _held_bytes(forward) -> tuple[int, torch.Tensor]:
    """Bytes allocated by forward() and still alive when it returns, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), out


def test_recompute_gives_equal_outputs_grads_and_keeps_less():
    B, T, d, f = 2, 4 * S + 5, 32, 48
    outs = []
    for recompute in (False, True):
        layer = _layer(recompute=recompute, dtype=torch.float32).train()  # with expert dropout
        x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(0)
        held, (y, _) = _held_bytes(lambda: layer(x, FFNContext(input_ids=_ids(B, T))))
        outs.append((y, _grads(layer, x, y), held))
    (y0, g0, held0), (y1, g1, held1) = outs
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    merged_bytes = B * math.ceil(T / S) * 3 * d * f * 4
    assert held0 - held1 >= merged_bytes  # the merged experts are not kept for backward


# ------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("routing", [{}, {"reset_at_eos": True}], ids=["prior", "reset_at_eos"])
def test_incremental_decoding_matches_full_forward(routing):
    model = _model(**routing).eval()
    T = 5 * S + 3
    ids = _ids(2, T, eos_at=(S + 2, 3 * S - 1))
    with torch.no_grad():
        full = model(ids).logits
        layers = [m for m in model.modules() if isinstance(m, SMEARLayer)]
        merges = []
        for layer in layers:  # count merges: once per segment, never per token
            merge = layer.merge
            layer.merge = lambda w, merge=merge: merges.append(w.shape[0]) or merge(w)
        cache = model.new_cache()
        step = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(T)], dim=1)
        n_seg = math.ceil(T / S)
        assert merges == [2] * n_seg * len(layers)  # one merged expert per sequence at each segment start
        for chunks in ([3, 5, 1, 9, 8, 17], [S, 2 * S + 1, T - 3 * S - 1], [T]):
            cache = model.new_cache()
            cuts = torch.tensor(chunks).cumsum(0).tolist()
            parts = [model(ids[:, a:b], cache=cache).logits for a, b in zip([0, *cuts[:-1]], cuts)]
            torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=2e-5)
    torch.testing.assert_close(step, full, rtol=0, atol=2e-5)


def test_self_stopgrad_refuses_to_decode():
    model = _model(first_segment="self_stopgrad").eval()
    with pytest.raises(ValueError, match="self_stopgrad"):
        model(_ids(1, 4), cache=model.new_cache())


# ------------------------------------------------------------------------- interface

def test_stats_and_parameter_names():
    """The counts against a loop over the segments of the oracle's routing."""
    layer = _layer(reset_at_eos=True, eos_id=EOS).eval()
    E = layer.prior.numel()
    B, T = 3, 4 * S + 1
    ids = _ids(B, T, eos_at=(S + 2,))
    x = torch.randn(B, T, 32, dtype=torch.float64)
    with torch.no_grad():
        layer(x, FFNContext(input_ids=ids))
        routed = [e for b in range(B) for lo in range(0, T, S) for e, chosen in [_segment_weights(layer, x, ids, b, lo)]
                  if chosen]
    c, state = layer.stats.counts, layer.stats.state
    e = torch.stack(routed)  # [n, E]: the router's segments (segment 0 and the one after the EOS use the prior)
    assert c["segments"].item() == c["decisions"].item() == len(routed) == B * 3
    assert c["prior_segments"].item() == 2 * B
    torch.testing.assert_close(c["merge_weights"], e.sum(0), rtol=1e-12, atol=1e-12)
    assert c["max_weight"].item() == pytest.approx(e.max(-1).values.sum().item(), rel=1e-12)
    assert c["top1"].tolist() == [float((e.argmax(-1) == i).sum()) for i in range(E)]
    assert c["entropy"].item() == pytest.approx(-(e * e.log()).sum().item(), rel=1e-12)
    torch.testing.assert_close(state["prior"], torch.softmax(layer.prior, 0).detach())
    assert all(not v.requires_grad for v in (*c.values(), *state.values()))
    layer(torch.randn(B, S - 3, 32, dtype=torch.float64), FFNContext(input_ids=_ids(B, S - 3)))  # nothing routed
    c = layer.stats.counts
    assert c["segments"].item() == 0 and c["prior_segments"].item() == B
    assert c["entropy"].item() == 0 and c["merge_weights"].sum().item() == 0
    layer(torch.randn(B, T, 32, dtype=torch.float64), FFNContext(input_ids=_ids(B, T)))  # no EOS: no reset
    assert layer.stats.counts["segments"].item() == B * 4 and layer.stats.counts["prior_segments"].item() == B
    # DeepSpeed treats every parameter whose name contains "expert" as an expert parameter.
    names = [n for n, _ in layer.named_parameters()]
    assert {n for n in names if "expert" in n} == {"experts.w1", "experts.w2", "experts.w3"}
    assert {"prior", "router.norm.weight", "router.norm.bias", "router.proj.weight"} <= set(names)


def test_router_init_and_configs():
    layer = SMEARLayer(_cfg(n_experts=8))
    assert abs(layer.router.proj.weight.std().item() - 0.01) < 0.002
    torch.testing.assert_close(layer.prior, torch.zeros(8))
    for name in ("tiny-smear", "gpt-125m-smear"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.model.routing.router == "smear"
    with pytest.raises(ConfigError, match="eos_id"):
        load_config(CONFIGS / "tiny-smear.yaml", ["model.routing.smear.reset_at_eos=true", "model.routing.smear.eos_id=-1"])


@pytest.mark.parametrize("n_experts", [4, 16])
def test_merged_expert_matches_dense_scale_at_init(n_experts):
    """At init (near-uniform routing) the merged expert's output has a dense FFN's scale,
    not the ~E^-1.5 of an average of E dense-initialised experts."""
    torch.manual_seed(0)
    cfg = _cfg(n_experts=n_experts, expert_dropout=0.0)
    x = torch.randn(4, 4 * S, 32)
    ids = _ids(4, 4 * S)
    ratios = []
    for seed in range(4):
        torch.manual_seed(seed)
        smear, dense = SMEARLayer(cfg), DenseFFN(cfg)
        with torch.no_grad():
            y_smear = smear(x, FFNContext(input_ids=ids))[0]
            y_dense = dense(x)[0]
        ratios.append((y_smear.std() / y_dense.std()).item())
    mean = sum(ratios) / len(ratios)
    assert 0.75 < mean < 1.33, ratios


def test_bf16_merge_of_identical_experts_is_exact():
    """Merge weights stay fp32 under bf16: E equal experts merge back to that expert exactly
    (merge weights rounded to bf16 sum to 1 ± 2e-3, which would show here)."""
    from llm.routing.experts import Experts

    torch.manual_seed(0)
    experts = Experts(8, 16, 32, 0.02, 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for w in (experts.w1, experts.w3, experts.w2):
            w.copy_(w[:1].expand_as(w))
    weights = torch.softmax(torch.randn(64, 8), dim=-1)  # [G, E] fp32
    for merged, w in zip(experts.merged(weights), (experts.w1, experts.w3, experts.w2)):
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, w[:1].expand_as(merged))
