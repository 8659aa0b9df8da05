"""The routed layer in a full model: causality (docs/routing.md#causality), batch invariance, the
budget (docs/lapsum.md#budget), overfitting one batch, stats, configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.config import ConfigError, load_config
from llm.model import build_model
from llm.routing.moe import MoELayer
from tests.causality import assert_causal
from tests.models import tiny_model

VOCAB, T = 64, 16
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(router: str, seed: int = 0, **routing) -> torch.nn.Module:
    routing = {"n_experts": 8, "d_expert": 32, **routing}
    model = tiny_model(router, seed, vocab_size=VOCAB, n_layers=3, n_heads=2, **routing)
    # A sharper router than the init, so routing really differs between tokens.
    for ffn in model.routed_ffns():
        torch.nn.init.normal_(ffn.router.gate.weight, std=0.3)
    return model


def _ids(batch=3, seq=T, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


ROUTERS = [("switch", {}), ("topk", {"k": 2}), ("lapsum", {"k_mean": 1.5}),
           ("lapsum", {"k_mean": 1.5, "tau_control": "fixed", "keep_top1": False, "budget": "fixed"})]


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("router,extra", ROUTERS)
def test_causal(router, extra, capacity_factor):
    model = tiny(router, capacity_factor=capacity_factor, **extra)
    ids = _ids()
    assert_causal(model, ids, positions=[0, 1, T // 2, T - 2, T - 1], vocab_size=VOCAB)
    if capacity_factor is not None:  # the capacity really dropped slots in these runs
        assert any(f.stats.counts["computed"].sum() < f.stats.counts["routed"].sum() for f in model.routed_ffns())


@pytest.mark.parametrize("router,extra", ROUTERS[:3])
def test_batch_invariance_dropless(router, extra):
    """A sequence's logits do not depend on the other sequences of the batch."""
    model = tiny(router, **extra).eval()
    ids = _ids(batch=4)
    others = _ids(batch=4, seed=1)
    with torch.no_grad():
        full = model(ids).logits
        for b in range(4):
            alone = model(ids[b:b + 1]).logits[0]
            torch.testing.assert_close(alone, full[b], rtol=0, atol=1e-5)
        mixed = model(torch.cat([others[:2], ids[1:2], others[2:]])).logits[2]
    torch.testing.assert_close(mixed, full[1], rtol=0, atol=1e-5)


def _train(model, steps, lr, ids, check=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
        if check is not None:
            check(model)
    return losses


def test_budget_sums_to_K_exactly_and_moves():
    model = tiny("lapsum", k_mean=1.5, budget="learned")
    K = 1.5 * 3

    def check(m):
        ks = m.budget().detach()
        assert abs(float(ks.sum()) - K) <= 1e-9
        assert bool((ks >= 1).all())

    check(model)
    torch.testing.assert_close(model.budget(), torch.full((3,), 1.5, dtype=torch.float64))
    _train(model, 8, 1e-2, _ids(batch=4, seq=T + 1), check)
    ks = model.budget().detach()
    assert (ks - 1.5).abs().max() > 1e-3, f"k_l did not move from uniform: {ks.tolist()}"
    with torch.no_grad():
        model(_ids())
    layer_ks = [float(f.stats.state["k"]) for f in model.routed_ffns()]  # each layer ran with its own k_l
    assert layer_ks == pytest.approx(ks.tolist(), abs=1e-12)


@pytest.mark.parametrize("router,extra", [("topk", {"k": 2}), ("lapsum", {"k_mean": 1.5})])
def test_overfits_one_batch(router, extra):
    model = tiny(router, **extra)
    losses = _train(model, 50, 5e-3, _ids(batch=4, seq=T + 1, seed=3))
    assert losses[0] > 3.5  # ≈ ln 64 at init
    assert min(losses[-5:]) < 0.5, f"{router}: loss {losses[0]:.2f} -> {losses[-1]:.2f}"


def naive_slot_counts(routing, B: int, T: int, capacity) -> tuple[list, list, list]:
    """Active experts per token, computed and routed slots per expert, by a loop over the
    tokens in position order: an expert computes a slot while it is under capacity."""
    computed, routed, active = [0] * 8, [0] * 8, [0] * (B * T)
    for t in range(T):
        for b in range(B):
            i = b * T + t
            for j, e in enumerate(routing.experts[i].tolist()):
                if routing.valid is None or routing.valid[i, j]:
                    routed[e] += 1
                    if capacity is None or computed[e] < capacity:
                        computed[e] += 1
                        active[i] += 1
    return active, computed, routed


def test_stats_are_the_counts_of_a_loop_over_tokens():
    ids = _ids()
    B, N = ids.shape[0], ids.numel()
    for router, extra in ROUTERS[:3]:
        for capacity_factor in (None, 0.5):
            model = tiny(router, capacity_factor=capacity_factor, **extra)
            layer = model.routed_ffns()[0]
            assert isinstance(layer, MoELayer)
            seen = []
            layer.router.register_forward_hook(lambda m, args, out: seen.append(out))
            model(ids)
            routing = seen[0]
            k = float(routing.k.detach())
            capacity = None if capacity_factor is None else math.ceil(capacity_factor * N * k / 8)
            active, computed, routed = naive_slot_counts(routing, B, T, capacity)
            s = layer.stats
            c = s.counts
            assert int(c["tokens"]) == int(c["decisions"]) == N
            m = routing.experts.shape[1]
            assert c["active_hist"].tolist() == torch.bincount(torch.tensor(active), minlength=m + 1).tolist()
            assert c["computed"].tolist() == computed and c["routed"].tolist() == routed
            probs = routing.probs.detach().double()
            assert float(c["entropy"]) == pytest.approx(float(-(probs * probs.log()).nan_to_num().sum()), rel=1e-6)
            assert float(s.state["k"]) == k
            if capacity_factor is None:
                assert computed == routed
                if router != "lapsum":
                    assert sum(active) == N * k
            else:
                assert sum(computed) < sum(routed)
            assert ("tau" in s.state) == (router == "lapsum")
            assert all(not v.requires_grad for v in (*c.values(), *s.state.values()))


@pytest.mark.parametrize("overrides,match", [
    (["model.routing.lapsum.k_mean=0.5"], "k_mean=0.5: expected >= 1"),
    (["model.routing.lapsum.k_mean=2.0"], "allows k_l up to 5"),  # learned: 1 + (2 − 1)·4 = 5 >= E = 4
    (["model.routing.lapsum.k_mean=4.0", "model.routing.lapsum.budget=fixed"], "expected < n_experts=4"),
])
def test_infeasible_budget_rejected_at_config_time(overrides, match):
    base = ["model.n_layers=4", "model.routing.router=lapsum", "model.routing.n_experts=4"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, base + overrides)
    load_config(None, base + ["model.routing.lapsum.k_mean=1.5", "model.routing.lapsum.budget=fixed"])  # feasible


ROUTED_CONFIGS = ["tiny-switch", "tiny-topk", "tiny-lapsum", "tiny-lapsum-fixed",
                  "gpt-125m-topk2", "gpt-125m-lapsum"]


@pytest.mark.parametrize("name", ROUTED_CONFIGS)
def test_configs(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m = cfg.model
    r = m.routing
    expert = 3 * m.d_model * (r.d_expert or m.d_ff)
    with torch.device("meta"):
        model = build_model(m)
    total = model.num_params(exclude_embedding=False)
    active_experts = {"switch": 1, "topk": getattr(r.options, "k", 0), "lapsum": getattr(r.options, "k_mean", 0)}[r.router]
    active = total - len(m.routed_layers()) * (r.n_experts - active_experts) * expert
    if name.startswith("tiny"):
        dense = load_config(CONFIGS / "tiny-dense.yaml").model
        assert (m.d_model, m.n_layers, m.vocab_size) == (dense.d_model, dense.n_layers, dense.vocab_size)
        assert r.n_experts == 8
    else:
        assert 90e6 < active < 150e6, f"{name}: {active / 1e6:.0f}M active parameters"
        assert (r.n_experts, m.n_layers, m.d_model, m.max_seq_len) == (32, 12, 768, 1024)
