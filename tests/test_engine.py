"""llm.parallel.engine: DeepSpeed config, optimizer groups and LR schedule (no process group needed)."""
from __future__ import annotations

import math

import pytest
import torch

from llm.config import Config, load_config
from llm.model import build_model
from llm.parallel.engine import ds_config, param_groups, warmup_cosine


def test_ds_config_comes_from_our_config():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=4", "train.grad_clip=0.5",
                             "parallel.zero_stage=1", "train.dtype=fp32"])
    ds = ds_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are passed as objects
    assert ds_config(load_config(None, ["train.dtype=bf16"]))["bf16"] == {"enabled": True}


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.vocab_size=50", "model.tie_embeddings=false"]).model
    model = build_model(cfg)
    model.blocks[0].attn_norm.weight.no_weight_decay = True  # already a vector; the flag is honoured too
    groups = {g["name"]: g for g in param_groups(model, Config().train)}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "embed.weight" in no_decay and "lm_head.weight" in decay  # untied output head is a matrix
    assert all(n.endswith("norm.weight") or n == "embed.weight" for n in no_decay)
    assert all(model.get_parameter(n).ndim == 2 for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_routed_model_groups_cover_every_parameter_once():
    cfg = load_config(None, ["model.routing.router=lapsum", "model.n_layers=2", "model.routing.n_experts=4",
                             "model.routing.lapsum.k_mean=1.5"]).model
    model = build_model(cfg)
    t = Config().train
    t.lr, t.budget_lr = 1e-3, 0.05
    groups = param_groups(model, t)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    budget = {g["name"]: g for g in groups}["budget"]
    # The budget logits have their own LR and are not shrunk towards uniform.
    assert [id(p) for p in budget["params"]] == [id(model.budget.eta)]
    assert budget["lr"] == 0.05 and budget["weight_decay"] == 0.0
    assert all("lr" not in g for g in groups if g["name"] != "budget")  # the optimizer default: train.lr


def test_warmup_cosine_schedule():
    t = Config().train
    t.max_steps, t.warmup_steps, t.min_lr_ratio = 100, 10, 0.1
    f = warmup_cosine(t)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    t.warmup_steps = 0
    assert warmup_cosine(t)(0) == 1.0


def test_warmup_stable_decay_schedule():
    from llm.parallel.engine import warmup_stable_decay

    t = Config().train
    t.max_steps, t.warmup_steps, t.min_lr_ratio, t.decay_fraction = 100, 10, 0.1, 0.2
    f = warmup_stable_decay(t)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert all(f(s) == 1.0 for s in range(10, 81))  # stable until the last 20 steps
    assert f(90) == pytest.approx(1 - 0.9 * 10 / 20)  # linear between (80, 1) and (100, 0.1)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    t.decay_fraction = 1.0  # no stable phase: decays right after warmup
    assert warmup_stable_decay(t)(55) == pytest.approx(1 - 0.9 * 45 / 90)
