"""Routers against the formulas of docs/routing.md (Switch, top-k, LB loss, z-loss) and docs/lapsum.md#truncation
(LapSum truncation)."""
from __future__ import annotations

import math

import pytest
import torch

import llm.routing.lapsum_router as lapsum_router
from llm.model import build_model
from llm.routing.lapsum import soft_topk
from llm.routing.lapsum_router import LapSumRouter
from llm.routing.routers import load_balancing_loss, router_logits, z_loss
from llm.routing.tau import end_step
from llm.routing.topk import TopKRouter
from tests.models import tiny_config

D, E = 16, 8


def _topk(k, aux=0.01, z=0.001):
    torch.manual_seed(0)
    return TopKRouter(D, E, k, init_std=0.5, aux_loss_coef=aux, z_loss_coef=z)


def _lapsum(k_max=3.0, tau=0.05, cap=2.0, control="fixed", alpha=1.0, ema=0.1, keep_top1=False):
    torch.manual_seed(0)
    return LapSumRouter(D, E, k_max=k_max, alpha=alpha, tau=tau, expansion_cap=cap, tau_control=control,
                        tau_ema=ema, keep_top1=keep_top1, init_std=0.5, aux_loss_coef=0.01, z_loss_coef=0.001)


def test_switch_is_argmax_with_unnormalised_probability():
    router = _topk(1)
    x = torch.randn(32, D)
    out = router(x)
    p = torch.softmax(x @ router.gate.weight.T, -1)
    assert torch.equal(out.experts[:, 0], p.argmax(-1))
    torch.testing.assert_close(out.weights[:, 0], p.max(-1).values)
    assert out.valid is None and float(out.k) == 1.0


def test_topk_renormalises_the_chosen_weights():
    router = _topk(3)
    x = torch.randn(32, D)
    out = router(x)
    p = torch.softmax(x @ router.gate.weight.T, -1)
    top, idx = p.topk(3, -1)
    assert torch.equal(out.experts, idx)
    torch.testing.assert_close(out.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(32))


def test_load_balancing_loss_is_one_under_uniform_routing():
    router = _topk(2)
    torch.nn.init.zeros_(router.gate.weight)  # every token: p = 1/E
    out = router(torch.randn(64, D))
    torch.testing.assert_close(out.lb_loss, torch.tensor(1.0))
    # and for balanced hard assignments with non-uniform but balanced probabilities
    probs = torch.full((E, E), 0.5 / (E - 1)).fill_diagonal_(0.5)
    experts = torch.arange(E)[:, None]
    torch.testing.assert_close(load_balancing_loss(probs, experts, None), torch.tensor(1.0))


def test_load_balancing_loss_formula_and_gradient():
    torch.manual_seed(1)
    logits = torch.randn(40, E, requires_grad=True)
    probs = logits.softmax(-1)
    experts = probs.topk(2, -1).indices
    valid = torch.rand(40, 2) > 0.3
    f = torch.stack([((experts == i) & valid).sum() for i in range(E)]).double() / valid.sum()
    expected = E * (f * probs.double().mean(0)).sum()
    loss = load_balancing_loss(probs, experts, valid)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    loss.backward()  # f carries no gradient: d/dP_i = E f_i / N per token
    assert logits.grad.abs().sum() > 0


def test_z_loss_and_aux_loss_coefficients():
    router = _topk(2, aux=0.03, z=0.007)
    x = torch.randn(32, D)
    out = router(x)
    logits = x @ router.gate.weight.T
    expected_z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(out.z_loss, expected_z)
    torch.testing.assert_close(z_loss(logits), expected_z)
    torch.testing.assert_close(out.aux_loss, 0.03 * out.lb_loss + 0.007 * out.z_loss)


def test_router_logits_are_fp32_under_bf16():
    router = _topk(2).to(torch.bfloat16)
    out = router(torch.randn(8, D, dtype=torch.bfloat16))
    assert out.probs.dtype == torch.float32 and out.weights.dtype == torch.float32


@pytest.mark.parametrize("k", [1.0, 1.5, 2.7])
def test_lapsum_truncation(k):
    router = _lapsum(k_max=3.0, tau=0.05, cap=2.0)
    assert router.slots == 6  # min(E, ceil(2 · 3))
    x = torch.randn(64, D) * 2
    kt = torch.tensor(k, dtype=torch.float64)
    out = router(x, kt)
    p = soft_topk(x @ router.gate.weight.T, kt, 1.0)
    torch.testing.assert_close(p.sum(-1), torch.full((64,), k, dtype=torch.float32))
    cap = math.ceil(2.0 * k)
    # Kept: the largest p, only those > τ, at most ceil(c·k_l) per token.
    assert (out.valid.sum(-1) <= cap).all()
    kept_p = p.gather(-1, out.experts)
    assert (kept_p[out.valid] > 0.05).all()
    torch.testing.assert_close(out.weights, torch.where(out.valid, kept_p, torch.zeros(())))
    for n in range(64):  # every expert with p > τ is kept unless the cap is full
        above = int((p[n] > 0.05).sum())
        assert int(out.valid[n].sum()) == min(above, cap)
    # Not renormalised: weights are p itself, so they sum to at most k.
    assert (out.weights.sum(-1) <= k + 1e-5).all()
    assert (out.weights.sum(-1) < k - 1e-3).any()
    # LB loss uses P_i = mean p_i / k_l: probs rows sum to 1.
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(64))


def test_lapsum_cap_rounds_float64_budgets_as_exact():
    router = _lapsum(k_max=2.0, tau=0.0, cap=2.0)
    k = 1 + torch.softmax(torch.zeros(12, dtype=torch.float64), 0)[0] * 6.0  # 1.5 up to rounding
    out = router(torch.randn(32, D), k)
    assert int(out.valid.sum(-1).max()) == 3  # ceil(2 · 1.5), not 4


def test_lapsum_gradient_reaches_dropped_experts(monkeypatch):
    """Truncation zeroes weights, but ∂L/∂r is dense through the threshold (docs/lapsum.md#truncation)."""
    captured = {}
    original = lapsum_router.router_logits

    def spy(gate, x):
        logits = original(gate, x)
        logits.retain_grad()
        captured["logits"] = logits
        return logits

    monkeypatch.setattr(lapsum_router, "router_logits", spy)
    router = _lapsum(k_max=2.0, tau=0.1, cap=1.0)  # at most ceil(1.5) = 2 of 8 experts kept
    k = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    out = router(torch.randn(16, D), k)
    (out.weights * torch.randn(16, router.slots)).sum().backward()
    grad = captured["logits"].grad  # [N, E]
    kept_mask = torch.zeros(16, E, dtype=torch.bool).scatter_(1, out.experts, out.valid)
    dropped = ~kept_mask
    assert dropped.sum() >= 16 * 5
    assert (grad[dropped].abs() > 0).float().mean() > 0.9
    assert k.grad is not None and k.grad != 0


def _kept_per_token(router, x, k, tau):
    """Oracle: experts per token with p > tau (slot 0 always if keep_top1), at most ceil(c·k)."""
    p = soft_topk(router_logits(router.gate, x), k, router.alpha)  # [N, E]
    top = p.sort(-1, descending=True).values[:, :math.ceil(router.expansion_cap * float(k) - 1e-6)]
    kept = top > tau
    if router.keep_top1:
        kept[:, 0] = True
    return kept.sum(-1).double()


def _exact_tau(router, xs, k):
    """Oracle: sort every candidate slot of the step's batches and take the largest one not
    kept when exactly Σ round(N·k) are kept (the top-1 slot counts as kept with keep_top1)."""
    values, target = [], 0
    for x in xs:
        with torch.no_grad():
            p = soft_topk(router_logits(router.gate, x), k, router.alpha)
        top = p.sort(-1, descending=True).values[:, :math.ceil(router.expansion_cap * float(k) - 1e-6)]
        if router.keep_top1:
            top[:, 0] = 2.0
        values.append(top.flatten())
        target += round(x.shape[0] * float(k))
    return float(torch.cat(values).sort(descending=True).values[target])


@pytest.mark.parametrize("keep_top1", [False, True])
def test_lapsum_tau_controller_learns_from_past_steps_only(keep_top1):
    k = torch.tensor(1.5, dtype=torch.float64)
    steps = [[torch.randn(512, D) * s for s in pair] for pair in ((1.0, 2.0), (3.0, 3.0), (0.5, 1.0))]
    router = _lapsum(k_max=3.0, tau=0.01, cap=2.0, control="ema", ema=1.0, keep_top1=keep_top1)
    router.eval()
    router(steps[0][0], k)
    end_step(router)
    assert int(router.tau_updates) == 0 and float(router.tau) == pytest.approx(0.01)  # eval never counts
    router.train()
    measured = []
    for micro_batches in steps:
        tau_before = float(router.tau)
        for x in micro_batches:  # gradient accumulation: both micro-batches use the τ of earlier steps
            out = router(x, k)
            assert torch.equal(out.valid.sum(-1).double(), _kept_per_token(router, x, k, tau_before))
            assert float(router.tau) == tau_before
        end_step(router)
        measured.append(float(router.tau))
        # Within one histogram bin (a relative 0.34 %) of the exact quantile of the whole step.
        assert measured[-1] == pytest.approx(_exact_tau(router, micro_batches, k), rel=3.5e-3)
    assert int(router.tau_updates) == 3
    if keep_top1:
        assert bool((out.valid.sum(-1) >= 1).all())
    # Counts add up: one forward over the step's tokens sets exactly the same τ as two
    # micro-batches (or two ranks), and a recomputed forward (both counted twice) too.
    whole = _lapsum(k_max=3.0, tau=0.01, cap=2.0, control="ema", ema=1.0, keep_top1=keep_top1)
    whole.load_state_dict(router.state_dict())
    twice = _lapsum(k_max=3.0, tau=0.01, cap=2.0, control="ema", ema=1.0, keep_top1=keep_top1)
    twice.load_state_dict(router.state_dict())
    whole.train(), twice.train(), router.train()
    for x in steps[0]:
        router(x, k)
        twice(x, k), twice(x, k)
    whole(torch.cat(steps[0]), k)
    for r in (router, whole, twice):
        end_step(r)
    assert float(whole.tau) == float(router.tau) == float(twice.tau)
    # ema = 0.25: the first step's threshold replaces the initial τ, later ones are averaged in.
    smooth = _lapsum(k_max=3.0, tau=0.01, cap=2.0, control="ema", ema=0.25, keep_top1=keep_top1)
    smooth.train()
    expected = measured[0]
    for i, (micro_batches, q) in enumerate(zip(steps, measured)):
        for x in micro_batches:
            smooth(x, k)
        end_step(smooth)
        expected = q if i == 0 else 0.75 * expected + 0.25 * q
        assert float(smooth.tau) == pytest.approx(expected, rel=1e-6)
    # τ and its update count are checkpointed: a restored router continues identically.
    fresh = _lapsum(k_max=3.0, tau=0.01, cap=2.0, control="ema", ema=0.25, keep_top1=keep_top1)
    fresh.load_state_dict(smooth.state_dict())
    fresh.train()
    for r in (smooth, fresh):
        r(steps[0][0], k)
        end_step(r)
    assert float(fresh.tau) == float(smooth.tau)


def test_lapsum_fixed_tau_never_moves():
    router = _lapsum(k_max=3.0, tau=0.02, cap=2.0, control="fixed")
    router.train()
    router(torch.randn(256, D), torch.tensor(1.5, dtype=torch.float64))
    end_step(router)
    assert float(router.tau) == pytest.approx(0.02) and int(router.tau_updates) == 0


def test_router_logits_stay_fp32_under_bf16_autocast_and_float64_stays_float64():
    gate = torch.nn.Linear(D, E, bias=False)
    x = torch.randn(4, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router_logits(gate, x)
    assert r.dtype == torch.float32 and torch.allclose(r, x @ gate.weight.T, rtol=1e-6, atol=1e-6)
    r64 = router_logits(gate.double(), x.double())
    assert r64.dtype == torch.float64
    assert torch.allclose(r64, x.double() @ gate.weight.double().T, rtol=1e-14, atol=0)


def test_router_parameter_names_avoid_the_word_expert():
    """DeepSpeed treats any parameter named *expert* as an expert parameter."""
    for router in ("switch", "topk", "lapsum"):
        cfg = tiny_config(router, n_heads=2, max_seq_len=16, n_experts=4, d_expert=32)
        names = [n for n, _ in build_model(cfg).named_parameters()]
        assert any(".router.gate." in n for n in names)
        for name in names:
            if "expert" in name:
                assert ".experts.w" in name, name
