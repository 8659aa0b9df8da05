"""The LapSum budget in training (llm/routing/budget.py, the τ controller of
llm/routing/tau.py): a real `llm train` keeps every layer on its budget k_l on
held-out batches, and a resumed run continues τ and η bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from llm.checkpoint import load_model
from llm.cli import main
from tests.helpers import make_corpus, ok, run, train_losses

STEPS = 40
LAPSUM = {
    "model": {"vocab_size": 320, "d_model": 64, "n_layers": 4, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
              "routing": {"router": "lapsum", "n_experts": 8, "d_expert": 64,
                          "lapsum": {"k_mean": 1.5, "budget": "learned"}}},
    "data": {"seq_len": 32, "num_proc": 1, "val_fraction": 0.05},
    "train": {"max_steps": STEPS, "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 4, "min_lr_ratio": 0.0,
              "eval_every": STEPS,
              "eval_batches": 4, "save_every": STEPS // 2, "keep_checkpoints": 2},
    "log": {"wandb": "disabled", "every": 1, "routing_every": 10},
}


@pytest.fixture(scope="module")
def lapsum_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    make_corpus(root / "corpus.jsonl")
    cfg = json.loads(json.dumps(LAPSUM))
    cfg["data"].update(corpus=[str(root / "corpus.jsonl")], cache_dir=str(root / "cache"))
    (root / "lapsum.yaml").write_text(yaml.safe_dump(cfg))
    ok(run("train", "lapsum.yaml", "train.out_dir=runs/straight", cwd=root))
    return root


@pytest.mark.slow
def test_every_layer_keeps_its_budget_on_held_out_batches(lapsum_run, capsys):
    run_dir = lapsum_run / "runs" / "straight"
    assert main(["inspect", str(run_dir), "--json"]) == 0  # validation batches, eval mode: τ frozen
    layers = json.loads(capsys.readouterr().out)["layers"]
    ks = [r["k"] for r in layers]
    assert sum(ks) == pytest.approx(1.5 * 4, abs=1e-9)
    assert max(ks) - min(ks) > 0.01  # η moved: the budgets are no longer uniform
    for r in layers:
        assert abs(r["active_mean"] - r["k"]) <= 0.1, (r["layer"], r["active_mean"], r["k"])
        assert r["active_gap"] == pytest.approx(r["active_mean"] - r["k"], abs=1e-12)
        assert r["no_expert"] == 0.0 and r["active_hist"][0] == 0  # keep_top1: no token skips a layer
    logged = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "routing/layer0/active_gap" in m]
    assert [m["step"] for m in logged] == [10, 20, 30, 40]
    assert all(m["routing/layer0/no_expert"] == 0.0 for m in logged)


@pytest.mark.slow
def test_resume_continues_tau_and_eta_exactly(lapsum_run):
    straight = lapsum_run / "runs" / "straight"
    half = straight / "checkpoints" / f"step_{STEPS // 2:07d}"
    ok(run("train", "lapsum.yaml", "train.out_dir=runs/resumed", f"train.resume={half}", cwd=lapsum_run))
    resumed, full = train_losses(lapsum_run / "runs" / "resumed"), train_losses(straight)
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed), [(s, resumed[s], full[s]) for s in resumed]
    a, b = (load_model(d).model.state_dict() for d in (straight, lapsum_run / "runs" / "resumed"))
    taus = [key for key in a if key.endswith("router.tau")]
    assert len(taus) == 4 and all(int(a[key.replace("tau", "tau_updates")]) == STEPS for key in taus)
    for key in taus + ["budget.eta"]:
        assert torch.equal(a[key], b[key]), key
    # τ really moved from its initial value, so the comparison above is not trivial.
    assert all(abs(float(a[key]) - 0.01) > 1e-4 for key in taus)
