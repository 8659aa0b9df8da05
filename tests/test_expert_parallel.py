"""Expert parallelism (llm/parallel/expert.py) on 2 CPU processes with gloo and real DeepSpeed engines.

One torchrun launch of tests/ep_worker.py measures everything that needs process groups
(exchange vs local dispatcher, SMEAR merge paths, ep_size 2 vs 1 training under each
router and ZeRO stage, checkpoint round trips) and hands the numbers back as JSON. Two
`llm train` runs go through scripts/launch.sh: the DeepSpeed launcher with a localhost
hostfile, and torchrun resuming its checkpoint under expert parallelism.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.checkpoint import load_weights
from llm.config import ConfigError, load_config
from llm.monitor import read_metrics
from llm.parallel import groups
from tests.helpers import REPO, env, free_port, ok, run, train_losses, val_losses, write_tiny_run
from tests.models import tiny_config

STEPS = 6
ROUTERS = ["topk", "lapsum", "smear", "deepspeed_topk", "hash"]


@pytest.fixture(scope="module")
def ep(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(REPO / "tests" / "ep_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 and out.is_file(), f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    results = json.loads(out.read_text())
    for name in ("exchange", "smear", "train", "reference"):
        assert "error" not in results[name], results[name]["error"]
    results["reference_file"] = str(out) + ".reference.pt"
    return results


# ---------------------------------------------------------------------------- layers

@pytest.mark.slow
@pytest.mark.parametrize("variant", ["topk", "switch_capacity", "topk_capacity", "lapsum"])
def test_exchange_matches_local_dispatcher(ep, variant):
    r = ep["exchange"][variant]
    assert r["y"] <= 1e-6 and r["grad_x"] <= 1e-6 and r["grad_router"] <= 1e-6, r
    assert r["grad_experts"] <= 1e-6, r  # sharded expert grads == local grads summed over ranks
    if variant == "lapsum":
        assert r["grad_k"] <= 1e-6, r


@pytest.mark.slow
def test_smear_merge_paths_match_local_merge(ep):
    r = ep["smear"]
    for variant in ("gather", "reduce", "reduce_recompute"):
        assert r[variant]["path"] == variant.split("_")[0]
        for key in ("y", "grad_x", "grad_experts", "grad_router"):
            assert r[variant][key] <= 1e-6, (variant, r[variant])
    # E/ep = 2 local experts: reduce-scatter for 1 routing group per rank, all-gather for 4;
    # ranks with different group counts always all-gather.
    assert r["auto_paths"] == {"G=1": "reduce", "G=4": "gather", "G uneven": "gather"}


# ---------------------------------------------------------------------------- training under DeepSpeed

def _same_run(run: dict, loss_tol: float, norm_rtol: float) -> None:
    a, b = run["ep1"], run["ep2"]
    assert a["losses"] == pytest.approx(b["losses"], abs=loss_tol), (a["losses"], b["losses"])
    assert None not in a["grad_norms"] and None not in b["grad_norms"]
    assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=norm_rtol), (a["grad_norms"], b["grad_norms"])


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_ep2_trains_like_ep1(ep, router):
    """Same seed, same global batch, 5 steps, clipping active (grad_clip 0.05 < norm): same
    losses and the same TRUE global gradient norm (DeepSpeed's own fp32 clipping averages
    per-rank norms instead, see `deepspeed_fp32_norms`)."""
    _same_run(ep["train"][f"{router}_zero0"], loss_tol=1e-5, norm_rtol=1e-5)
    # The first step's routing statistics, summed over both ranks' batches.
    from tests.ep_worker import B, T

    one, two = (ep["train"][f"{router}_zero0"][f"ep{n}"]["routing"] for n in (1, 2))
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys(), (a, b)
        assert all(a[key] == (b[key] if b[key] is None else pytest.approx(b[key], rel=1e-6)) for key in a), (a, b)
    count, per_sequence = ("segments", T // 4 - 1) if router == "smear" else ("tokens", T)  # smear: S = 4
    assert [r[count] for r in one] == [2 * B * per_sequence] * len(one)  # both ranks' batches


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "lapsum", "smear", "deepspeed_topk"])
def test_activation_checkpointing_under_ep2_is_bit_identical(ep, router):
    """Recomputing blocks in backward (their all-to-all exchange, expert dropout and routing
    included) changes no loss and no gradient norm, bit for bit, at ep_size 2."""
    run = ep["train"][f"{router}_zero0"]
    assert run["ep2_checkpointed"]["losses"] == run["ep2"]["losses"]
    assert run["ep2_checkpointed"]["grad_norms"] == run["ep2"]["grad_norms"]


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "lapsum", "smear", "hash"])
def test_expert_gradients_reduced_within_expert_data_parallel_group(ep, router):
    """After DeepSpeed's reduction (`allreduce=False` parameters: only within the
    expert-data-parallel group, divided by the whole data-parallel world) every rank's
    expert gradients equal the ep_size 1 gradients of the same experts."""
    r = ep["train"][f"{router}_zero0"]["reduced_grads"]
    assert r["expert"] <= 1e-6 * r["scale"] and r["shared"] <= 1e-6 * r["scale"], r


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_ep2_trains_like_ep1_under_zero(ep, zero):
    _same_run(ep["train"][f"topk_zero{zero}"], loss_tol=1e-5, norm_rtol=1e-5)


@pytest.mark.slow
def test_ep2_trains_like_ep1_in_bf16(ep):
    _same_run(ep["train"]["topk_zero0_bf16"], loss_tol=1e-4, norm_rtol=2e-3)  # bf16 rounding, other order


def _single_process_reference(steps: int) -> tuple[dict, list[float]]:
    """What ep_size 2 on 2 ranks must equal: one process, no DeepSpeed, the same AdamW groups
    (the budget η with its own LR), schedule and clipping, each step's loss the mean of the two
    ranks' losses, and the τ histograms of both ranks' batches summed without a collective."""
    import torch.nn.functional as F

    from llm.model import build_model
    from llm.parallel.engine import SCHEDULES, param_groups
    from llm.routing.tau import end_step
    from tests import ep_worker

    cfg = ep_worker.train_cfg(ep_worker.REFERENCE["router"], 1, 0,
                              **{k: v for k, v in ep_worker.REFERENCE.items() if k != "router"})
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[t.lr_schedule](t))
    losses = []
    for step in range(steps):
        total = 0.0
        for r in (0, 1):
            inputs, targets = ep_worker.batch(step, of_rank=r)
            out = model(inputs)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten()) + out.aux_loss
            (loss / 2).backward()
            total += loss.item() / 2
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        end_step(model, reduce=False)
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return model.state_dict(), losses


@pytest.mark.slow
def test_ep2_lapsum_matches_single_process_without_deepspeed(ep):
    """After 6 steps (η and τ have moved), ep_size 2 equals a plain single-process run on the
    global batch: per parameter group within a relative 1e-5, η within 1e-6 absolute, τ within
    one histogram bin (the ranks' slot weights differ from the reference's in the last bits)."""
    from tests import ep_worker

    saved = torch.load(ep["reference_file"], weights_only=True)
    ref, ref_losses = _single_process_reference(ep_worker.REFERENCE_STEPS)
    assert saved["losses"].tolist() == pytest.approx(ref_losses, rel=1e-5)
    state = saved["state"]
    assert set(state) == set(ref)
    eta = ref["budget.eta"]
    assert eta.abs().max() > 1e-3  # the budget learned something
    assert (state["budget.eta"] - eta).abs().max() <= 1e-6
    taus = [k for k in ref if k.endswith("router.tau")]
    assert taus and all(int(ref[k.replace("tau", "tau_updates")]) == ep_worker.REFERENCE_STEPS for k in taus)
    for k in taus:
        assert abs(float(ref[k]) - 0.05) > 1e-4  # the controller moved τ
        assert float(state[k]) == pytest.approx(float(ref[k]), rel=3.5e-3)
    groups_ = {"experts": [k for k in ref if ".experts." in k], "gates": [k for k in ref if "router.gate" in k],
               "other": [k for k in ref if ".experts." not in k and "router." not in k and k != "budget.eta"
                         and ref[k].is_floating_point()]}
    for name, keys in groups_.items():
        assert keys, name
        diff = torch.cat([(state[k].double() - ref[k].double()).flatten() for k in keys]).norm()
        scale = torch.cat([ref[k].double().flatten() for k in keys]).norm()
        assert diff <= 1e-5 * scale, (name, float(diff / scale))


@pytest.mark.slow
def test_lapsum_budget_invariant_on_every_rank(ep):
    for ep_size in ("ep1", "ep2"):
        budget = ep["train"]["lapsum_zero0"][ep_size]["budget"]
        assert budget["sum_err"] <= 1e-12 and budget["rank_disagreement"] == 0.0, budget
    assert ep["train"]["lapsum_zero0"]["ep2"]["budget"]["k_last"] != [1.5, 1.5]  # η did learn


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_checkpoint_moves_between_ep_sizes(ep, router):
    """full_state_dict under ep_size 2 loads into ep_size 1 (and back) with identical logits."""
    r = ep["train"][f"{router}_zero0"]["roundtrip"]
    assert r["ep2_vs_ep1"] <= 1e-6 and r["ep1_vs_ep2"] <= 1e-6, r
    if router == "deepspeed_topk":
        assert len(r["expert_shapes"]) == 8  # 2 layers x 4 global experts, one key each
    else:
        assert all(shape[0] == 4 for shape in r["expert_shapes"].values()), r["expert_shapes"]


# ---------------------------------------------------------------------------- layouts and errors

def test_invalid_layouts_fail_with_one_line(monkeypatch):
    monkeypatch.setattr(groups, "world_size", lambda: 3)
    with pytest.raises(ConfigError) as err:
        groups.init_expert_parallel(2, 8)
    assert str(err.value) == ("parallel.ep_size=2 must divide the world size 3 "
                              "(world = nodes x processes per node)")
    monkeypatch.setattr(groups, "world_size", lambda: 4)
    with pytest.raises(ConfigError) as err:
        groups.init_expert_parallel(4, 6)
    assert "\n" not in str(err.value) and "ep_size=4" in str(err.value) and "n_experts=6" in str(err.value)
    with pytest.raises(ConfigError, match=r"parallel.ep_size=3 must divide model.routing.n_experts=8"):
        load_config(REPO / "configs" / "tiny-topk.yaml", ["parallel.ep_size=3"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(REPO / "configs" / "tiny-topk.yaml", ["parallel.ep_size=2", "parallel.zero_stage=3"])
    assert groups.ep_size() == 1


def test_deepspeed_moe_needs_torch_distributed():
    from llm.routing.deepspeed_moe import DeepSpeedMoE

    layer = DeepSpeedMoE(tiny_config("deepspeed_topk", vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_experts=4, k=2))
    y, aux = layer(torch.randn(2, 8, 16))  # a single process runs all experts (eval, generation)
    assert y.shape == (2, 8, 16) and aux.item() > 0
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        layer.moe.set_deepspeed_parallelism()


def test_deepspeed_moe_stats_count_its_gate_decisions():
    """DeepSpeed's top-2 gate (GShard): tokens take a slot of an expert in order, first choices
    before second choices, while the expert has capacity; counted here by a loop over tokens."""
    from llm.config import ModelConfig, RoutingConfig
    from llm.inspection.statistics import RoutingTally
    from llm.routing.deepspeed_moe import DeepSpeedMoE

    E, S = 4, 16
    cfg = ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, routing=RoutingConfig.build(
        "deepspeed_topk", n_experts=E, deepspeed_topk={"k": 2, "capacity_factor": 0.5}))
    torch.manual_seed(0)
    layer = DeepSpeedMoE(cfg)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        layer(x)
        probs = torch.softmax(x.reshape(S, 16) @ layer.moe.deepspeed_moe.gate.wg.weight.t(), -1).double()
    first = probs.argmax(-1).tolist()
    second = probs.scatter(1, probs.argmax(-1, keepdim=True), -1.0).argmax(-1).tolist()
    capacity = math.ceil(S / E * 0.5 * 2)
    routed, queue, active = [0] * E, [first.count(e) for e in range(E)], [0] * S
    computed = [0] * E
    for choices, taken in ((first, [0] * E), (second, queue)):
        for i, e in enumerate(choices):
            routed[e] += 1
            if taken[e] < capacity:
                computed[e] += 1
                active[i] += 1
            taken[e] += 1
    c = layer.stats.counts
    assert int(c["tokens"]) == int(c["decisions"]) == S and float(layer.stats.state["k"]) == 2
    assert c["routed"].tolist() == routed and c["computed"].tolist() == computed
    assert c["active_hist"].tolist() == [active.count(a) for a in range(3)]
    assert float(c["entropy"]) == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-5)
    # Without sparse routes (earlier DeepSpeed versions) the gate returns a dispatch mask instead: same counts.
    from deepspeed.moe.sharded_moe import top2gating

    sparse = layer.stats.counts
    gate, flat = layer.moe.deepspeed_moe.gate, x.reshape(S, 16)
    layer._keep_routes(gate, (flat,), top2gating(gate.wg(flat), 0.5, 0, top2_2nd_expert_sampling=False))
    assert all(torch.equal(v, sparse[key]) for key, v in layer.stats.counts.items())
    tally = RoutingTally([0])
    tally.add(0, layer.stats)
    row = tally.rows(None)[0]
    assert row["dropped"] == pytest.approx(1 - sum(computed) / sum(routed)) and row["dropped"] > 0
    assert row["load"] == pytest.approx([n / sum(computed) for n in computed])


# ---------------------------------------------------------------------------- launches

@pytest.fixture(scope="module")
def ep_workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep_train")
    write_tiny_run(root, routing={"router": "topk", "n_experts": 4, "topk": {"k": 2}}, max_steps=STEPS,
                   save_every=STEPS // 2, eval_every=STEPS // 2)
    (root / "hostfile").write_text("localhost slots=2\n")
    ok(run("prepare", "tiny.yaml", cwd=root))
    return root


def launch(*args: str, cwd: Path, launcher: str) -> subprocess.CompletedProcess:
    opts = ["--hostfile", "hostfile"] if launcher == "deepspeed" else ["--launcher", "torchrun", "--nproc-per-node", "2"]
    return run(*args, cwd=cwd, launcher=(str(REPO / "scripts" / "launch.sh"), *opts, "--master-port", str(free_port()),
                                         "--"))


@pytest.fixture(scope="module")
def ds_run(ep_workdir) -> Path:
    """`llm train` with ep_size 2 (ZeRO 0) through the DeepSpeed launcher and a localhost hostfile."""
    ok(launch("train", "tiny.yaml", "train.out_dir=runs/ep2", "parallel.ep_size=2", cwd=ep_workdir,
              launcher="deepspeed"))
    return ep_workdir / "runs" / "ep2"


@pytest.mark.slow
def test_deepspeed_launcher_trains_with_ep2(ds_run):
    losses = train_losses(ds_run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1] - 0.5, losses
    trainer = json.loads((ds_run / "checkpoints" / "step_0000006" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["ep_size"] == 2
    state = load_weights(ds_run / "checkpoints" / "step_0000006")
    assert state["blocks.0.ffn.experts.w1"].shape[0] == 4  # global experts, not this rank's 2


@pytest.mark.slow
def test_ep2_checkpoint_evaluates_identically_with_ep1(ds_run, ep_workdir):
    """The run's validation loss (ep_size 2, two ranks) recomputed by one process holding all experts."""
    import torch.nn.functional as F

    from llm.checkpoint import load_model
    from llm.data import TokenLoader, data_dir

    loaded = load_model(ds_run)
    cfg = loaded.config
    total = 0.0
    for rank in range(2):
        batches = TokenLoader(data_dir(cfg), "val", cfg.data.seq_len, cfg.train.micro_batch_size, rank, 2,
                              cfg.train.seed).val_batches(cfg.train.eval_batches)
        with torch.no_grad():
            total += sum(F.cross_entropy(loaded.model(x).logits.flatten(0, 1), y.flatten()).item()
                         for x, y in batches) / len(batches)
    assert total / 2 == pytest.approx(val_losses(ds_run)[STEPS], abs=1e-5)


@pytest.mark.slow
def test_torchrun_resumes_ep2_exactly(ds_run, ep_workdir):
    half = ds_run / "checkpoints" / "step_0000003"
    ok(launch("train", "tiny.yaml", "train.out_dir=runs/resumed", "parallel.ep_size=2", f"train.resume={half}",
              cwd=ep_workdir, launcher="torchrun"))
    resumed, full = train_losses(ep_workdir / "runs" / "resumed"), train_losses(ds_run)
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert resumed[s] == pytest.approx(full[s], abs=1e-6), (s, resumed[s], full[s])


@pytest.mark.slow
def test_resume_under_another_topology(ds_run, ep_workdir):
    from llm.checkpoint import CheckpointError, check_resumable

    half = ds_run / "checkpoints" / "step_0000003"
    cfg = load_config(ep_workdir / "tiny.yaml", ["parallel.ep_size=1"])
    with pytest.raises(CheckpointError) as err:
        check_resumable(cfg, half, world_size=1)
    msg = str(err.value)
    assert "\n" not in msg and "world_size=2 ep_size=2 ZeRO-0" in msg and "world_size=1 ep_size=1 ZeRO-0" in msg
    assert "train.resume_weights_only=true" in msg
    # Weights only: one process, all experts, the step and LR schedule continue.
    ok(run("train", "tiny.yaml", "train.out_dir=runs/weights", f"train.resume={half}",
           "train.resume_weights_only=true", cwd=ep_workdir))
    weights = ep_workdir / "runs" / "weights"
    losses, full = train_losses(weights), train_losses(ds_run)
    assert sorted(losses) == [4, 5, 6]
    assert losses[4] == pytest.approx(full[4], abs=0.2)  # same weights, one rank's batches instead of two

    def lrs(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}

    assert [lrs(weights)[s] for s in (4, 5, 6)] == pytest.approx([lrs(ds_run)[s] for s in (4, 5, 6)])
