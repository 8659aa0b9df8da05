"""LapSum soft top-k (llm/routing/lapsum.py) against a naive bisection and finite differences."""
from __future__ import annotations

import math

import pytest
import torch

from llm.routing import lapsum
from llm.routing.lapsum import soft_topk

EXPERTS = (2, 3, 8, 32, 256)
ALPHAS = (1e-4, 0.1, 1.0, 1e4)


def laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0, 0.5 * torch.exp(x.clamp_max(0)), 1 - 0.5 * torch.exp(-x.clamp_min(0)))


def bisection(scores: torch.Tensor, k: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """p from Σ_i F((r_i − t)/α) = k solved for t by halving in float64."""
    r = scores.double()  # [..., E]
    k = torch.as_tensor(k, dtype=torch.float64).expand(r.shape[:-1]).unsqueeze(-1)  # [..., 1]
    lo = r.min(-1, keepdim=True).values - 60 * alpha
    hi = r.max(-1, keepdim=True).values + 60 * alpha
    for _ in range(80):  # from a width of at most ~1e6 down to float64 resolution
        mid = (lo + hi) / 2
        too_low = laplace_cdf((r - mid) / alpha).sum(-1, keepdim=True) > k
        lo, hi = torch.where(too_low, mid, lo), torch.where(too_low, hi, mid)
    return laplace_cdf((r - (lo + hi) / 2) / alpha)


PATHS = {"window": 10_000, "sorted": 0}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Run a test on both threshold searches: the top-m window and the full sort."""
    monkeypatch.setattr(lapsum, "_MAX_WINDOW", PATHS[request.param])
    return request.param


def budgets(n: int) -> list[float]:
    return sorted({1e-3, 0.5, 1.0, min(2.0, n - 0.5), 2.7 % n, n / 2, n - 1.0, n - 1e-3} - {0.0, float(n)})


def scores_with_ties(rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.randn(rows, n, generator=gen, dtype=torch.float64)  # [rows, E]
    if n > 2:
        scores[:, 1] = scores[:, 0]  # a tie in every row
        scores[: rows // 4] = scores[: rows // 4].round()  # many ties, integer gaps
    return scores


@pytest.mark.parametrize("n", EXPERTS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_bisection(monkeypatch, n, alpha):
    gen = torch.Generator().manual_seed(n)
    ks = budgets(n)
    rows = 4  # per budget
    scores = scores_with_ties(rows * len(ks), n, gen)  # [rows · budgets, E]
    k_rows = torch.tensor(ks, dtype=torch.float64).repeat_interleave(rows)  # [rows · budgets]
    expected = bisection(scores, k_rows, alpha)
    atol = 1e-12 + 2e-13 / alpha  # float64 rounding of s = r/α sets the floor
    for max_window in PATHS.values():  # both searches against one (slow) oracle
        monkeypatch.setattr(lapsum, "_MAX_WINDOW", max_window)
        torch.testing.assert_close(soft_topk(scores, k_rows, alpha), expected, atol=atol, rtol=0)
        for j, k in enumerate(ks):  # python-float k, one block of rows each
            block = slice(rows * j, rows * (j + 1))
            p = soft_topk(scores[block], k, alpha)
            torch.testing.assert_close(p, expected[block], atol=atol, rtol=0)
            k_sum = torch.full((rows,), k, dtype=torch.float64)
            torch.testing.assert_close(p.sum(-1), k_sum, atol=1e-12 * n, rtol=0)
            # float32: the same up to float32 rounding of s = r/α.
            p32 = soft_topk(scores[block].float(), k, alpha)
            assert p32.dtype == torch.float32 and torch.isfinite(p32).all()
            atol32 = 2e-6 + 3e-7 * scores[block].abs().max().item() / alpha
            torch.testing.assert_close(p32.double(), expected[block], atol=atol32, rtol=0)


@pytest.mark.parametrize(
    "n, k, alpha",
    [
        (2, 1.0, 1.0),
        (3, 0.5, 0.3),
        (8, 2.0, 1.0),
        (8, 1e-3, 1.0),  # k near 0
        (8, 8 - 1e-3, 1.0),  # k near E
        (8, 5.5, 0.7),  # past E/2: the flipped window
        (32, 3.5, 0.05),  # small alpha: nearly hard
        (32, 16.0, 1e4),  # large alpha: nearly uniform
        (256, 2.0, 1.0),
        (256, 200.0, 2.0),
    ],
)
def test_gradcheck(path, n, k, alpha):
    gen = torch.Generator().manual_seed(n)
    scores = scores_with_ties(2, n, gen).requires_grad_()  # [2, E]
    k_row = torch.full((2,), k, dtype=torch.float64)
    k_row[0] *= 0.9  # a different budget per row
    k_row.requires_grad_()
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_topk, (scores, k_row, a), fast_mode=n >= 32)
    # Scalar k and float alpha take other branches of the backward.
    k_scalar = torch.tensor(k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, kk: soft_topk(s, kk, alpha), (scores, k_scalar), fast_mode=n >= 32)


def test_gradcheck_leading_dims(path):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)  # [B, T, E]
    k = torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64, requires_grad=True)  # one per position
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_topk, (scores, k, a))
    p = soft_topk(scores, k, a)
    assert p.shape == scores.shape
    torch.testing.assert_close(p.sum(-1), k.detach().expand(2, 3))


@pytest.mark.parametrize("n", EXPERTS)
def test_properties(path, n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(64, n, generator=gen).requires_grad_()  # [rows, E]
    for k in budgets(n):
        p = soft_topk(scores, k, 1.0)
        assert ((p > 0) & (p < 1)).all()
        torch.testing.assert_close(p.sum(-1), torch.full((64,), k), atol=2e-6 * n, rtol=0)
        # Monotone in the score: sorting the scores sorts p.
        order = scores.detach().argsort(-1)
        assert (p.detach().gather(-1, order).diff(dim=-1) >= 0).all()
        # The budget is preserved under any perturbation: gradient rows sum to zero.
        (grad,) = torch.autograd.grad((p * torch.randn(64, n, generator=gen)).sum(), scores)
        torch.testing.assert_close(grad.sum(-1), torch.zeros(64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", EXPERTS)
def test_small_alpha_is_hard_topk(path, n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.stack([torch.randperm(n, generator=gen) for _ in range(8)]).float()  # gaps of 1  [8, E]
    for k in sorted({1, n // 2, n - 1}):
        p = soft_topk(scores, float(k), 1e-3)
        hard = torch.zeros_like(p).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
        torch.testing.assert_close(p, hard, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", EXPERTS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_extremes_are_finite(path, n, alpha):
    gen = torch.Generator().manual_seed(n)
    scores = (10 * torch.randn(8, n, generator=gen)).requires_grad_()  # [8, E]
    for k in (1e-3, n - 1e-3, n / 2):
        p = soft_topk(scores, k, alpha)
        (grad,) = torch.autograd.grad((p * torch.randn(8, n, generator=gen)).sum(), scores)
        assert torch.isfinite(p).all() and torch.isfinite(grad).all()
        assert ((p >= 0) & (p <= 1)).all()
        torch.testing.assert_close(p.sum(-1), torch.full((8,), k), atol=1e-5 * n, rtol=1e-6)


@pytest.mark.parametrize("n", [8, 64])
def test_fp32_exact_when_score_gaps_dwarf_alpha(path, n):
    """Scores ~N(0, 1e4) and α = 1e-4: |r/α| ~ 1e8, whose float32 ulp is ~8. Only the
    score at the threshold has a fractional p (k = 1.3 → p = 0.3 there), and it must be
    as accurate as float32 allows, not off by the ulp of r/α."""
    gen = torch.Generator().manual_seed(n)
    scores = 1e4 * torch.randn(64, n, generator=gen)  # [64, E]
    for k in (1.3, n - 2.6):
        p = soft_topk(scores, k, 1e-4)
        torch.testing.assert_close(p.double(), bisection(scores, k, 1e-4), atol=2e-6, rtol=0)


def test_hard_rows_keep_the_budget_gradient(path):
    """Every f = ½e^{−|u|} of a row underflows in float32 here (|u| ≳ 500), yet
    ∂L/∂k = ⟨softmax(−|u|), g⟩ is well defined: it must match float64."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.stack([torch.randperm(8, generator=gen) for _ in range(4)]).double()  # gaps of 1  [4, E]
    g = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        k = torch.tensor(2.0, dtype=dtype, requires_grad=True)  # integer: t midway, |u| ≈ 500
        r = scores.to(dtype).requires_grad_()
        (soft_topk(r, k, 1e-3) * g.to(dtype)).sum().backward()
        assert torch.isfinite(r.grad).all()
        grads.append(k.grad.double())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_is_fp32_accurate():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    router = torch.nn.Linear(32, 16, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x)  # bf16 under autocast  [64, 16]
        assert logits.dtype == torch.bfloat16
        p = soft_topk(logits, 2.0, 1.0)
        p_fp32 = soft_topk(logits.float(), 2.0, 1.0)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, p_fp32, atol=0, rtol=0)
    torch.testing.assert_close(p.double(), bisection(logits.double(), 2.0, 1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.full((64,), 2.0), atol=1e-6, rtol=0)
    p.square().sum().backward()
    assert router.weight.grad is not None and torch.isfinite(router.weight.grad).all()


def test_budget_tensor_gets_its_dtype_gradient():
    scores = torch.randn(16, 8, requires_grad=True)
    k = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)  # as ExpertBudget hands it over
    soft_topk(scores, k).pow(2).sum().backward()
    assert k.grad is not None and k.grad.dtype == torch.float64 and scores.grad.dtype == torch.float32


def test_no_grad():
    with torch.no_grad():
        p = soft_topk(torch.randn(4, 8, requires_grad=True), 2.0)
    assert not p.requires_grad


@pytest.mark.parametrize("rows_inner", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 32, 100, 256])
def test_top_values_matches_topk(n, rows_inner):
    """The CPU tournament that replaces torch.topk for the window, ties included, in both
    lane layouts (rows_inner is the one used under torch.compile)."""
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(64, n, generator=gen)  # [rows, E]
    scores[:16, -1] = scores[:16, 0]
    scores[16:32] = scores[16:32].round()
    scores[32:40] = 0.0
    for m in range(1, min(n, 16) + 1):
        torch.testing.assert_close(lapsum._top_values(scores, m, rows_inner), scores.topk(m, dim=-1).values.t(),
                                   atol=0, rtol=0)


def test_paths_agree():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(256, 128, generator=gen)
    for k in (0.7, 2.0, 6.0):
        windowed = soft_topk(scores, k, 0.5)
        sorted_path = lapsum._SoftTopK.apply(scores, k, 0.5, None, False)
        torch.testing.assert_close(windowed, sorted_path, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [0.0, -1.0, 8.0, 9.0, math.nan])
def test_rejects_bad_k(k):
    with pytest.raises(ValueError, match="0 < k < E"):
        soft_topk(torch.randn(4, 8), k)
    with pytest.raises(ValueError, match="0 < k < E"):
        soft_topk(torch.randn(4, 8), torch.tensor([2.0, 2.0, k, 2.0]))


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.nan])
def test_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha > 0"):
        soft_topk(torch.randn(4, 8), 2.0, alpha)
    with pytest.raises(ValueError, match="alpha > 0"):
        soft_topk(torch.randn(4, 8), 2.0, torch.tensor(alpha))


@pytest.mark.parametrize("k_max", [0.0, 8.0, math.nan])
def test_rejects_bad_k_max(k_max):
    with pytest.raises(ValueError, match="0 < k_max < E"):
        soft_topk(torch.randn(4, 8), torch.tensor(2.0), k_max=k_max)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not broadcast"):
        soft_topk(torch.randn(4, 8), torch.full((5,), 2.0))
    with pytest.raises(ValueError, match="0-dim"):
        soft_topk(torch.randn(4, 8), 2.0, torch.ones(4))


def compile_case(n: int, k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [16, n], a [] budget in float64 as `ExpertBudget` gives it, a tensor α and an
    upstream gradient, all leaves: the router's case under a compiled block."""
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(16, n, generator=gen).requires_grad_()
    alpha = torch.tensor(0.8, requires_grad=True)
    return scores, torch.tensor(k, dtype=torch.float64, requires_grad=True), alpha, torch.randn(16, n, generator=gen)


def assert_compiled_matches_eager(k_max: float | None, backend: str, n: int, k: float) -> None:
    """fullgraph=True fails at any graph break (a host read of k or α would be one). The
    eager call reads k and takes the window of k itself, the compiled one that of k_max."""
    torch._dynamo.reset()
    scores, k, alpha, g = compile_case(n, k)
    compiled = torch.compile(lambda s, kk, a: soft_topk(s, kk, a, k_max=k_max), backend=backend, fullgraph=True)
    results = []
    for fn in (compiled, soft_topk):
        p = fn(scores, k, alpha)
        results.append([p, *torch.autograd.grad((p * g).sum(), (scores, k, alpha))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_inductor_matches_eager_without_graph_break():
    # m = 3 window scores from 4 lanes of 4 columns: the tournament halves twice.
    assert_compiled_matches_eager(k_max=1.0, backend="inductor", n=16, k=0.9)


def test_full_sort_traces_without_graph_break():
    # Without k_max the window is the whole row, past 16 scores the full sort.
    assert_compiled_matches_eager(k_max=None, backend="aot_eager", n=17, k=2.5)


def test_compiled_asserts_k_within_the_window_of_k_max():
    """k = 2.6 > k_max = 2.0 would need a window of 6 scores, not 5: under compile the
    host does not read k, so an assert in the graph must stop it."""
    torch._dynamo.reset()
    scores, _, alpha, _ = compile_case(8, 1.0)
    compiled = torch.compile(lambda s, k: soft_topk(s, k, alpha, k_max=2.0), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"0 < k < 2.5 \(k_max = 2.0\)"):
        compiled(scores, torch.tensor(2.6))
