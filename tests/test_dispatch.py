"""The dispatcher against a naive per-token loop over experts (docs/routing.md#dispatcher), in float64."""
from __future__ import annotations

import math

import pytest
import torch

from llm.routing.dispatch import Dispatcher, LocalExchange
from llm.routing.experts import Experts, swiglu
from llm.routing.routers import Routing

B, T, D, F_, E = 3, 7, 8, 4, 5


def _experts(dtype=torch.float64):
    torch.manual_seed(0)
    return Experts(E, D, F_, init_std=0.5, out_std=0.5).to(dtype)


def _routing(m: int, with_valid: bool, k: float, seed: int = 1, dtype=torch.float64) -> Routing:
    gen = torch.Generator().manual_seed(seed)
    experts = torch.rand(B * T, E, generator=gen).argsort(-1)[:, :m]  # distinct experts per token
    weights = torch.rand(B * T, m, generator=gen).to(dtype).requires_grad_()
    valid = torch.rand(B * T, m, generator=gen) > 0.35 if with_valid else None
    zero = torch.zeros(())
    return Routing(experts=experts, weights=weights, valid=valid, probs=torch.zeros(B * T, E),
                   k=torch.tensor(k, dtype=torch.float64), aux_loss=zero, lb_loss=zero, z_loss=zero)


def naive(x, routing: Routing, experts: Experts, capacity=None):
    """Loop over positions t, then sequences b, then slots: an expert keeps a slot while it has room."""
    m = routing.experts.shape[1]
    ys = [[None] * T for _ in range(B)]
    used = [0] * E
    kept = torch.zeros(B * T, m, dtype=torch.bool)
    for t in range(T):
        for b in range(B):
            n = b * T + t
            y = torch.zeros(D, dtype=x.dtype)
            for j in range(m):
                e = int(routing.experts[n, j])
                if routing.valid is not None and not routing.valid[n, j]:
                    continue
                if capacity is not None and used[e] >= capacity:
                    continue
                used[e] += 1
                kept[n, j] = True
                y = y + routing.weights[n, j] * swiglu(x[b, t], experts.w1[e], experts.w3[e], experts.w2[e])
            ys[b][t] = y
    return torch.stack([torch.stack(row) for row in ys]), kept


def _grads(y, x, routing, experts, seed=5):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    params = [x, routing.weights, experts.w1, experts.w2, experts.w3]
    return torch.autograd.grad((y * g).sum(), params)


@pytest.mark.parametrize("m,with_valid", [(1, False), (2, False), (3, True)])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_dispatcher_matches_naive_loop(m, with_valid, capacity_factor):
    experts = _experts()
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    routing = _routing(m, with_valid, k=float(m))
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * B * T * m / E)
    y, info = Dispatcher(E, capacity_factor)(x, routing, experts)
    y_ref, kept_ref = naive(x, routing, experts, capacity)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(info.kept, kept_ref)
    assert int(info.counts.sum()) == int(kept_ref.sum())
    if capacity is not None:
        assert int(info.capacity) == capacity and int(info.counts.max()) <= capacity
        if capacity_factor == 0.5:
            assert not kept_ref.all()  # something really was dropped
    for g, g_ref in zip(_grads(y, x, routing, experts), _grads(y_ref, x, routing, experts)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_capacity_keeps_earlier_positions():
    """All tokens choose expert 0: exactly the first `capacity` slots in position-major order survive."""
    experts = _experts()
    x = torch.randn(B, T, D, dtype=torch.float64)
    routing = _routing(1, False, k=1.0)
    routing.experts.zero_()
    capacity_factor = 2.0  # capacity = ceil(2 · 21 / 5) = 9 = positions 0..2 of the 3 sequences
    _, info = Dispatcher(E, capacity_factor)(x, routing, experts)
    kept = info.kept.view(B, T)
    assert kept[:, :3].all() and not kept[:, 3:].any()


def test_grouped_gemm_path_matches_float64_loop():
    experts64 = _experts()
    experts32 = _experts(torch.float32)
    x = torch.randn(B, T, D, dtype=torch.float64)
    for capacity_factor in (None, 0.7):
        routing64 = _routing(2, True, k=2.0)
        routing32 = _routing(2, True, k=2.0, dtype=torch.float32)
        y64, _ = Dispatcher(E, capacity_factor)(x, routing64, experts64)
        y32, _ = Dispatcher(E, capacity_factor)(x.float(), routing32, experts32)
        torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-6)


def test_empty_experts_and_all_invalid_tokens():
    experts = _experts()
    x = torch.randn(B, T, D, dtype=torch.float64)
    routing = _routing(2, True, k=2.0)
    routing.experts.copy_(torch.tensor([3, 1]))  # experts 0, 2, 4 receive nothing
    routing.valid[:4] = False  # tokens with nothing computed: output 0 (residual only)
    y, info = Dispatcher(E)(x, routing, experts)
    y_ref, _ = naive(x, routing, experts)
    torch.testing.assert_close(y, y_ref)
    assert y.view(B * T, D)[:4].abs().max() == 0
    assert info.counts[[0, 2, 4]].sum() == 0


class _RecordingExchange(LocalExchange):
    """Checks what the dispatcher hands to the exchange: rows sorted by expert, counts per expert."""

    def __init__(self):
        self.calls = []

    def dispatch(self, x_sorted, counts, capacity=None):
        self.calls.append((x_sorted.detach().clone(), counts.clone()))
        return x_sorted, counts, "handle"

    def combine(self, y_local, handle):
        assert handle == "handle"
        return y_local


def test_exchange_hook_receives_expert_sorted_rows():
    experts = _experts()
    x = torch.randn(B, T, D, dtype=torch.float64)
    routing = _routing(2, False, k=2.0)
    exchange = _RecordingExchange()
    y, _ = Dispatcher(E, exchange=exchange)(x, routing, experts)
    (x_sorted, counts), = exchange.calls
    assert counts.shape == (E,) and int(counts.sum()) == x_sorted.shape[0] == B * T * 2
    # Rows of expert e are contiguous and are exactly the tokens that chose e, in position order.
    start = 0
    flat = x.view(B * T, D)
    for e in range(E):
        tokens = [n for n in sorted(range(B * T), key=lambda n: (n % T, n // T)) if e in routing.experts[n]]
        torch.testing.assert_close(x_sorted[start:start + int(counts[e])], flat[tokens])
        start += int(counts[e])
    torch.testing.assert_close(y, naive(x, routing, experts)[0])
