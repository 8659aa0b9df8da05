"""`llm inspect` and the routing-statistics callback (llm/inspection/).

Every number the report gives is recomputed here from first principles on the same
batches: budgets from the checkpoint's η, active experts and loads from the captured
router inputs (LapSum by bisection, top-k capacity by counting), SMEAR merge weights
from the pooled segments.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import load_model, load_weights, write_model_files
from llm.cli import main
from llm.config import Config, DataConfig, ParallelConfig, TrainConfig
from llm.data import TokenLoader, data_dir, prepare
from llm.inspection import (
    RoutingStatsCallback,
    format_over_time,
    plot_active_histograms,
    plot_budget,
    plot_load_heatmap,
    plot_merge_weights,
    plot_over_time,
    run_checkpoints,
)
from llm.model import build_model
from tests.models import tiny_config

VOCAB, SEQ, BATCH, LAYERS, EXPERTS = 300, 32, 4, 3, 4
BATCHES = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A tiny prepared corpus; returns the `data` config section and the tokenizer path."""
    root = tmp_path_factory.mktemp("inspect-data")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "house", "green", "seven", "north"]
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(80, 200)))}) + "\n")
    section = {"corpus": [str(root / "corpus.jsonl")], "cache_dir": str(root / "cache"), "seq_len": SEQ,
               "val_fraction": 0.2, "num_proc": 1}
    out = prepare(make_cfg(section, "dense"))
    return {"section": section, "tokenizer": out / "tokenizer.model", "dir": out}


def make_cfg(data_section: dict, router: str, ep_size: int = 1, n_layers: int = LAYERS, **routing) -> Config:
    """A tiny model's run on the `data` fixture's corpus (`data_section`)."""
    routing = {"n_experts": EXPERTS, **routing} if router != "dense" else {}
    model = tiny_config(router, vocab_size=VOCAB, n_layers=n_layers, n_heads=2, max_seq_len=SEQ, **routing)
    return Config(name="tiny", model=model, data=DataConfig(**data_section),
                  train=TrainConfig(micro_batch_size=BATCH, eval_batches=BATCHES),
                  parallel=ParallelConfig(ep_size=ep_size)).validate()


def make_ckpt(path: Path, data: dict, router: str, step: int = 10, seed: int = 0, ep_size: int = 1,
              n_layers: int = LAYERS, **routing) -> Path:
    """A checkpoint with a non-uniform learned budget and sharp routers (random, untrained)."""
    cfg = make_cfg(data["section"], router, ep_size, n_layers, **routing)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        if model.budget is not None and isinstance(model.budget.eta, torch.nn.Parameter):
            model.budget.eta.normal_(0, 1.0)
        for ffn in model.routed_ffns():
            gate = ffn.router.proj if router == "smear" else ffn.router.gate
            gate.weight.normal_(0, 0.5)
    write_model_files(path, model.state_dict(), cfg, data["tokenizer"], {"step": step})
    return path


def make_run(run: Path, data: dict, router: str, steps: list[int], **routing) -> Path:
    for i, step in enumerate(steps):
        make_ckpt(run / "checkpoints" / f"step_{step:07d}", data, router, step=step, seed=i, **routing)
    (run / "checkpoints" / "latest").write_text(f"step_{steps[-1]:07d}")
    return run


def inspect_json(capsys, *args) -> dict:
    assert main(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def captured_inputs(ckpt: Path) -> tuple[torch.nn.Module, list[list[torch.Tensor]]]:
    """The model and, per routed layer, the hidden states its FFN received on the report's batches."""
    loaded = load_model(ckpt)
    loaded.model.requires_grad_(False)  # the recomputations below need no graph
    cfg = loaded.config
    loader = TokenLoader(data_dir(cfg), "val", cfg.data.seq_len, cfg.train.micro_batch_size)
    seen = [[] for _ in loaded.model.routed_ffns()]
    hooks = [ffn.register_forward_pre_hook(lambda m, args, j=j: seen[j].append(args[0].detach().clone()))
             for j, ffn in enumerate(loaded.model.routed_ffns())]
    with torch.no_grad():
        for inputs, _ in loader.val_batches(BATCHES):
            loaded.model(inputs)
    for h in hooks:
        h.remove()
    return loaded.model, seen


def routed_inputs(model: torch.nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states each routed FFN receives when `model` runs `inputs`."""
    seen = []
    hooks = [ffn.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for ffn in model.routed_ffns()]
    model(inputs)
    for h in hooks:
        h.remove()
    return seen


def soft_topk_bisect(r: torch.Tensor, k: float, alpha: float) -> torch.Tensor:
    """p = F((r − t)/α) with Σ p = k, t found by bisection (the Laplace CDF F), float64."""
    r = r.double()

    def total(t):
        u = (r - t[:, None]) / alpha
        return torch.where(u <= 0, 0.5 * u.clamp(max=0).exp(), 1 - 0.5 * (-u.clamp(min=0)).exp())

    lo = r.min(-1).values - 50 * alpha
    hi = r.max(-1).values + 50 * alpha
    for _ in range(200):
        mid = (lo + hi) / 2
        too_big = total(mid).sum(-1) > k  # threshold too low
        lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
    return total((lo + hi) / 2)


def quantile(counts: np.ndarray, q: float) -> int:
    return int(np.quantile(counts, q, method="inverted_cdf"))


# ---------------------------------------------------------------------------- LapSum

def test_lapsum_budget_and_active_experts_match_a_direct_count(data, tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", data, "lapsum", k_mean=1.5, tau=0.4, expansion_cap=2.0, keep_top1=False)
    report = inspect_json(capsys, ckpt, "--batches", BATCHES)
    layers = report["layers"]
    assert report["router"] == "lapsum" and report["step"] == 10 and report["checkpoint"] == str(ckpt)
    assert [r["layer"] for r in layers] == list(range(LAYERS))

    # Budget: k_l = 1 + softmax(η)_l (K − L), from the saved η.
    K = 1.5 * LAYERS
    eta = load_weights(ckpt)["budget.eta"].double()
    expected_k = 1 + torch.exp(eta) / torch.exp(eta).sum() * (K - LAYERS)
    assert report["K"] == pytest.approx(K)
    assert sum(r["k"] for r in layers) == pytest.approx(K, abs=1e-12)
    assert [r["k"] for r in layers] == pytest.approx(expected_k.tolist(), abs=1e-12)
    assert [r["k_share"] for r in layers] == pytest.approx((expected_k / K).tolist(), abs=1e-12)
    assert len(set(round(r["k"], 3) for r in layers)) == LAYERS  # really non-uniform

    # Active experts, loads, entropy: recomputed from the router inputs of the same batches.
    model, seen = captured_inputs(ckpt)
    for j, (ffn, xs, row) in enumerate(zip(model.routed_ffns(), seen, layers)):
        k = float(expected_k[j])
        active, load, entropy = [], np.zeros(EXPERTS), []
        for x in xs:
            logits = x.reshape(-1, x.shape[-1]) @ ffn.router.gate.weight.t()  # [N, E]
            p = soft_topk_bisect(logits, k, alpha=1.0)
            n_kept = torch.minimum((p > 0.4).sum(-1), torch.tensor(math.ceil(2.0 * k)))  # τ, then cap ceil(c·k_l)
            order = p.argsort(-1, descending=True)
            for i in range(len(p)):
                load[order[i, :n_kept[i]].numpy()] += 1
            active.append(n_kept.numpy())
            q = p / k
            entropy.append(-torch.special.xlogy(q, q).sum(-1).numpy())
        active = np.concatenate(active)
        assert row["tokens"] == len(active) == BATCHES * BATCH * SEQ
        assert sum(row["active_hist"]) == len(active)
        assert np.bincount(active, minlength=len(row["active_hist"])).tolist() == row["active_hist"]
        assert row["active_mean"] == pytest.approx(active.mean(), abs=1e-12)
        assert row["active_gap"] == pytest.approx(active.mean() - k, abs=1e-12)
        assert row["no_expert"] == pytest.approx((active == 0).mean(), abs=1e-12)
        assert row["active_p50"] == quantile(active, 0.5)
        assert row["active_p90"] == quantile(active, 0.9)
        assert row["load"] == pytest.approx((load / load.sum()).tolist(), abs=1e-12)
        assert row["load_min"] == pytest.approx(load.min() / load.sum())
        assert row["load_max"] == pytest.approx(load.max() / load.sum())
        assert row["load_cv"] == pytest.approx(load.std() / load.mean(), rel=1e-9)
        assert row["dropped"] == 0.0
        assert row["entropy"] == pytest.approx(np.concatenate(entropy).mean(), rel=1e-5)
        assert row["merge_weights"] is None
    # Not a degenerate test: tokens really differ in how many experts they use, some use none.
    assert any(len([c for c in r["active_hist"] if c]) > 1 for r in layers)
    assert any(r["no_expert"] > 0 for r in layers)


def test_table_output(data, tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", data, "lapsum", k_mean=1.5)
    assert main(["inspect", str(ckpt), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "K = 4.5" in out and "load_cv" in out and "p90" in out
    assert len([line for line in out.splitlines() if line.strip().split()[0].isdigit()]) == LAYERS


# ---------------------------------------------------------------------------- top-k with capacity

def test_topk_capacity_drops_and_loads_match_a_direct_count(data, tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", data, "topk", k=2, capacity_factor=0.6)
    report = inspect_json(capsys, ckpt, "--batches", BATCHES)
    assert report["K"] == 2 * LAYERS
    model, seen = captured_inputs(ckpt)
    for ffn, xs, row in zip(model.routed_ffns(), seen, report["layers"]):
        assert row["k"] == 2 and row["k_share"] == pytest.approx(1 / LAYERS)
        routed = dropped = 0
        kept = np.zeros(EXPERTS)
        for x in xs:
            logits = x.reshape(-1, x.shape[-1]) @ ffn.router.gate.weight.t()
            chosen = logits.softmax(-1).topk(2, dim=-1).indices  # [N, 2]
            counts = np.bincount(chosen.flatten().numpy(), minlength=EXPERTS)
            capacity = math.ceil(0.6 * len(chosen) * 2 / EXPERTS)
            kept += np.minimum(counts, capacity)
            routed += counts.sum()
            dropped += np.maximum(counts - capacity, 0).sum()
        assert dropped > 0
        assert row["dropped"] == pytest.approx(dropped / routed, abs=1e-12)
        assert row["load"] == pytest.approx((kept / kept.sum()).tolist(), abs=1e-12)
        assert row["active_mean"] == pytest.approx(kept.sum() / row["tokens"], abs=1e-12)
        assert len(row["active_hist"]) == 3  # 0, 1 or 2 experts per token


# ---------------------------------------------------------------------------- SMEAR

def test_smear_merge_weights_match_the_pooled_segments(data, tmp_path, capsys):
    S = 8
    ckpt = make_ckpt(tmp_path / "ckpt", data, "smear", segment_len=S, expert_dropout=0.0)
    report = inspect_json(capsys, ckpt, "--batches", BATCHES)
    assert report["K"] is None
    model, seen = captured_inputs(ckpt)
    for ffn, xs, row in zip(model.routed_ffns(), seen, report["layers"]):
        norm, proj = ffn.router.norm, ffn.router.proj
        e = []
        for x in xs:
            B, T, d = x.shape
            pooled = x[:, :T - S].reshape(B, T // S - 1, S, d).mean(2)  # segments that route a successor
            h = F.layer_norm(pooled, (d,), norm.weight, norm.bias, norm.eps)
            e.append((h @ proj.weight.t()).softmax(-1).reshape(-1, EXPERTS))
        e = torch.cat(e).double()
        assert row["segments"] == len(e) == BATCHES * BATCH * (SEQ // S - 1)
        assert row["merge_weights"] == pytest.approx(e.mean(0).tolist(), abs=1e-6)
        assert sum(row["merge_weights"]) == pytest.approx(1.0, abs=1e-6)
        assert row["entropy"] == pytest.approx(float(-(e * e.log()).sum(-1).mean()), rel=1e-5)
        assert row["max_weight"] == pytest.approx(float(e.max(-1).values.mean()), rel=1e-5)
        assert row["k"] is None and row["active_mean"] is None and row["load"] is None


# ---------------------------------------------------------------------------- plots

def test_plots_lapsum(data, tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", data, "lapsum", n_layers=5, k_mean=1.5)
    report = inspect_json(capsys, ckpt, "--batches", 2, "--plot", tmp_path / "plots")
    for name in ("budget", "active_experts", "load"):
        path = tmp_path / "plots" / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 5000
    assert len(plot_active_histograms(report).axes) == 5  # one panel per routed layer (grid cell 8 removed)
    budget = plot_budget(report).axes[0]
    assert len(budget.patches) == 2 * 5  # k_l and measured active experts per layer
    assert budget.lines[0].get_ydata()[0] == pytest.approx(1.5)  # the uniform k̄ line
    assert len(plot_load_heatmap(report).axes) == 2  # heatmap + colorbar


def test_plots_smear(data, tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", data, "smear", segment_len=8)
    report = inspect_json(capsys, ckpt, "--batches", 1, "--plot", tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["entropy.png", "merge_weights.png"]
    assert all(p.stat().st_size > 5000 for p in (tmp_path / "plots").iterdir())
    heat = plot_merge_weights(report)
    assert len(heat.axes) == 2 and heat.axes[0].images[0].get_array().shape == (LAYERS, EXPERTS)


# ---------------------------------------------------------------------------- over time

def test_over_time_follows_the_budget_across_checkpoints(data, tmp_path, capsys):
    run = make_run(tmp_path / "run", data, "lapsum", [100, 200, 300], k_mean=1.5)
    out = inspect_json(capsys, run, "--over-time", "--batches", "1", "--plot", tmp_path / "plots")
    reports = out["checkpoints"]
    assert [r["step"] for r in reports] == [100, 200, 300]
    for i, rep in enumerate(reports):
        eta = load_weights(rep["checkpoint"])["budget.eta"].double()
        k = 1 + eta.softmax(0) * (out["K"] - LAYERS)
        assert [r["k"] for r in rep["layers"]] == pytest.approx(k.tolist(), abs=1e-12)
    assert (tmp_path / "plots" / "over_time.png").stat().st_size > 5000
    assert (tmp_path / "plots" / "budget.png").is_file()  # the latest checkpoint's figures too
    lines = plot_over_time(reports).axes[0].lines
    assert len(lines) == LAYERS + 1  # one per layer + the uniform k̄
    assert list(lines[0].get_xdata()) == [100, 200, 300]
    assert format_over_time(reports).startswith("budget k_l per layer across 3 checkpoints")
    # One checkpoint of the run stands for the run.
    assert run_checkpoints(run / "checkpoints" / "step_0000200") == run_checkpoints(run)


# ---------------------------------------------------------------------------- refusals and layouts

def test_dense_checkpoint_is_refused(data, tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", data, "dense")
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dense" in err and "routed" in err and len(err.splitlines()) == 1
    assert main(["inspect", str(ckpt), "--batches", "0"]) == 2
    assert "--batches 0" in capsys.readouterr().err


def test_unprepared_data_names_the_directory_and_the_command(data, tmp_path, capsys):
    section = {**data["section"], "cache_dir": str(tmp_path / "empty-cache")}
    ckpt = make_ckpt(tmp_path / "ckpt", {**data, "section": section}, "lapsum")
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty-cache") in err and f"llm prepare {ckpt / 'config.yaml'}" in err


def test_any_ep_size_gives_the_same_report(data, tmp_path, capsys):
    """Checkpoints hold global experts whatever ep_size trained them."""
    one = inspect_json(capsys, make_ckpt(tmp_path / "ep1", data, "lapsum", ep_size=1), "--batches", 2)
    two = inspect_json(capsys, make_ckpt(tmp_path / "ep2", data, "lapsum", ep_size=2), "--batches", 2)
    assert one["layers"] == two["layers"]


# ---------------------------------------------------------------------------- during training

class FakeTrainer:
    """What the callback uses of the Trainer: model, cfg, step, device, log, monitor.message."""

    def __init__(self, cfg: Config, model: torch.nn.Module):
        self.cfg, self.model, self.step, self.device = cfg, model, 0, torch.device("cpu")
        self.logged: dict[int, dict] = {}
        self.messages: list[str] = []
        self.monitor = self

    def log(self, step, metrics):
        self.logged.setdefault(step, {}).update(metrics)

    def message(self, text):
        self.messages.append(text)


def test_callback_logs_training_forwards_only(data):
    cfg = make_cfg(data["section"], "lapsum", k_mean=1.5, tau=0.1)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    with torch.no_grad():  # sharp routers, so tokens differ in how many experts they use
        for ffn in model.routed_ffns():
            ffn.router.gate.weight.normal_(0, 0.5)
    trainer = FakeTrainer(cfg, model)
    callback = RoutingStatsCallback(every=2)
    callback.on_train_start(trainer)
    ids = torch.randint(0, VOCAB, (5, SEQ), generator=torch.Generator().manual_seed(0))
    micro_batches, val = [ids[0:2], ids[2:4]], ids[4:5]  # grad_accum = 2, and a validation batch
    for _ in range(3):
        for x in micro_batches:
            model(x).logits.sum().backward()
        trainer.step += 1
        model.eval()  # the trainer validates between the step and the callbacks on eval steps
        with torch.no_grad():
            model(val)
        model.train()
        callback.on_step(trainer, trainer.step, {})
    callback.on_train_end(trainer, {})
    assert not callback._handles  # hooks removed at the end
    assert sorted(trainer.logged) == [2]
    scalars = trainer.logged[2]
    assert len(trainer.messages) == 1 and trainer.messages[0].startswith("step 2: routing k=[")
    assert "active=" in trainer.messages[0] and "cv=" in trainer.messages[0]

    # Expected: both micro-batches of step 2, not the validation batch (no optimizer, so
    # the weights of step 2 are still the model's).
    per_batch = []
    with torch.no_grad():
        for x in micro_batches:
            valid = [ffn.router(ffn_in.reshape(-1, ffn_in.shape[-1]), k).valid
                     for ffn, ffn_in, k in zip(model.routed_ffns(), routed_inputs(model, x), model.budget())]
            per_batch.append([v.sum(-1).numpy() for v in valid])  # dropless: every valid slot is computed
    k = model.budget().tolist()
    for j in range(LAYERS):
        active = np.concatenate([b[j] for b in per_batch]).astype(int)
        assert scalars[f"routing/layer{j}/k"] == pytest.approx(k[j])
        assert scalars[f"routing/layer{j}/active_mean"] == pytest.approx(active.mean(), abs=1e-12)
        assert scalars[f"routing/layer{j}/active_p90"] == quantile(active, 0.9)
        assert f"routing/layer{j}/load_cv" in scalars and f"routing/layer{j}/entropy" in scalars
        assert len(set(active.tolist())) > 1  # not degenerate
    assert scalars["routing/active_mean"] == pytest.approx(
        np.mean([scalars[f"routing/layer{j}/active_mean"] for j in range(LAYERS)]))
