"""Expert-parallel checks on real process groups: run under torchrun or the deepspeed launcher.

    torchrun --nproc_per_node 2 tests/ep_worker.py OUT.json [case ...]

Every process runs the same cases (collectives need all of them); rank 0 writes the
measured numbers (max differences, losses, norms) as JSON to OUT.json, and
tests/test_expert_parallel.py asserts on them. One launch amortises the start-up
(process group, DeepSpeed import) over all cases.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import examples.hash_router  # noqa: E402,F401  (registers the plug-in router "hash")
from llm.config import Config, ParallelConfig, TrainConfig  # noqa: E402
from llm.parallel import expert as ep_mod  # noqa: E402
from llm.parallel import groups  # noqa: E402
from llm.routing.tau import end_step  # noqa: E402
from tests.models import tiny_config  # noqa: E402

D, F_, E, B, T, VOCAB = 16, 32, 4, 2, 16, 64
# The model of every case, as `tiny_config` keys (a case's own routing keys override n_experts).
SHAPE = dict(vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=2, d_ff=F_, max_seq_len=T, n_experts=E)


def rank() -> int:
    return dist.get_rank()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def gather_max(value: float) -> float:
    """The largest value over ranks (every rank must agree a check passed)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def summed(grad: torch.Tensor) -> torch.Tensor:
    """Sum of a gradient over ranks: what the owner of a sharded expert receives."""
    g = grad.detach().clone()
    dist.all_reduce(g)
    return g


# ---------------------------------------------------------------------------- layer-level checks

def _compare_layer(layer_ref, layer_ep, make_ctx, store_name="experts"):
    """Run the full layer and its sharded copy on this rank's tokens; compare outputs and grads."""
    torch.manual_seed(100 + rank())
    x = torch.randn(B, T, D)
    g = torch.randn(B, T, D)
    results = {}
    outs = []
    for layer in (layer_ref, layer_ep):
        xi = x.clone().requires_grad_(True)
        ctx = make_ctx()
        y, aux = layer(xi, ctx)
        ((y * g).sum() + aux).backward()
        outs.append((y, xi.grad, ctx))
    (y0, gx0, c0), (y1, gx1, c1) = outs
    results["y"] = maxdiff(y0, y1)
    results["grad_x"] = maxdiff(gx0, gx1)
    ex_ref, ex_ep = getattr(layer_ref, store_name), getattr(layer_ep, store_name)
    sl = slice(ex_ep.first, ex_ep.first + ex_ep.n_local)
    results["grad_experts"] = max(maxdiff(summed(getattr(ex_ref, w).grad)[sl], getattr(ex_ep, w).grad)
                                  for w in ("w1", "w3", "w2"))
    replicated = [(n, p) for n, p in layer_ref.named_parameters() if "expert" not in n]
    ep_params = dict(layer_ep.named_parameters())
    results["grad_router"] = max(maxdiff(p.grad, ep_params[n].grad) for n, p in replicated)
    if c0 is not None and getattr(c0, "k", None) is not None and c0.k.grad is not None:
        results["grad_k"] = maxdiff(c0.k.grad, c1.k.grad)
    return {k: gather_max(v) for k, v in results.items()}


def case_exchange() -> dict:
    """AllToAllExchange vs the local dispatcher: top-k dropless, switch with capacity, LapSum."""
    from llm.routing import build_ffn

    ep = ep_mod.ExpertParallel.current()
    out = {}
    variants = {
        "topk": dict(router="topk", k=2),
        "switch_capacity": dict(router="switch", capacity_factor=1.0),
        "topk_capacity": dict(router="topk", k=2, capacity_factor=0.75),
        "lapsum": dict(router="lapsum", k_mean=1.5, tau=0.05, budget="fixed"),
    }
    for name, routing in variants.items():
        cfg = tiny_config(**{**SHAPE, **routing})
        torch.manual_seed(0)
        ref = build_ffn(cfg, True)
        sharded = copy.deepcopy(ref)
        holder = torch.nn.ModuleDict({"layer": sharded})
        ep_mod.shard_experts(holder, ep)

        def make_ctx():
            k = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
            return SimpleNamespace(k=k)

        out[name] = _compare_layer(ref, sharded, make_ctx)
        out[name]["rows_local"] = float(sharded.experts.n_local)
    return out


def case_smear() -> dict:
    """SMEAR: all-gather merge and reduce-scatter merge vs the local merge, and the auto choice."""
    from llm.routing.smear import SMEARLayer

    ep = ep_mod.ExpertParallel.current()
    cfg = tiny_config("smear", **SHAPE, segment_len=4, expert_dropout=0.0)
    out = {}
    for mode in ("gather", "reduce", "reduce_recompute"):
        torch.manual_seed(0)
        ref = SMEARLayer(cfg)
        sharded = copy.deepcopy(ref)
        sharded.recompute = mode.endswith("recompute")  # merge runs again in backward, collectives too
        ep_mod.shard_experts(torch.nn.ModuleDict({"layer": sharded}), ep, smear_merge=mode.split("_")[0])
        out[mode] = _compare_layer(ref, sharded, lambda: None)
        out[mode]["path"] = sharded.merge.last_path
    # auto: all-gather the experts when E/ep <= G (routing groups per rank), else reduce-scatter.
    torch.manual_seed(0)
    layer = SMEARLayer(cfg)
    ep_mod.shard_experts(torch.nn.ModuleDict({"layer": layer}), ep, smear_merge="auto")
    paths = {}
    for t_len in (4, 16):  # G = 1 (< E/ep = 2: reduce), G = 4 (gather)
        layer(torch.randn(1, t_len, D))
        paths[f"G={t_len // 4}"] = layer.merge.last_path
    uneven = 1 if rank() == 0 else 3  # G differs across ranks: only gather works
    layer(torch.randn(1, 4 * uneven, D))
    paths["G uneven"] = layer.merge.last_path
    out["auto_paths"] = paths
    return out


# ---------------------------------------------------------------------------- engine-level checks

def train_cfg(router: str, ep_size: int, zero: int, **routing) -> Config:
    cfg = Config(name="ep", model=tiny_config(router, **{**SHAPE, **routing}),
                 train=TrainConfig(seed=7, max_steps=5, micro_batch_size=B, lr=1e-2, warmup_steps=0,
                                   grad_clip=0.05, weight_decay=0.1),
                 parallel=ParallelConfig(ep_size=ep_size, zero_stage=zero))
    cfg.data.seq_len = T
    return cfg.validate()


def build(cfg: Config):
    from llm.model import build_model
    from llm.parallel import build_engine

    torch.manual_seed(cfg.train.seed)
    model = ep_mod.apply_expert_parallel(build_model(cfg.model), cfg)
    return build_engine(model, cfg)


def batch(step: int, of_rank: int | None = None):
    """This rank's batch of a step (or rank `of_rank`'s: the single-process reference reads both)."""
    gen = torch.Generator().manual_seed(1000 * step + (rank() if of_rank is None else of_rank))
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def run_steps(cfg: Config, steps: int = 5):
    engine = build(cfg)
    losses, norms, budgets, ds_norms = [], [], [], []
    first_grads = {}
    for step in range(steps):
        torch.manual_seed(10_000 + 100 * step + rank())  # expert dropout: same draw for ep 1 and 2
        inputs, targets = batch(step)
        out = engine(inputs)
        if step == 0:
            routing = routing_rows(engine.module)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten()) + out.aux_loss
        engine.backward(loss)
        if step == 0 and cfg.parallel.zero_stage == 0 and not engine.bfloat16_enabled():
            # DeepSpeed's reduced gradients (fp32, no ZeRO: they sit in .grad until the step)
            first_grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                           if p.grad is not None}
        if cfg.parallel.zero_stage == 0 and not engine.bfloat16_enabled():
            # What DeepSpeed's own fp32 clipping would use (max_norm huge: nothing is clipped).
            from deepspeed.runtime.utils import clip_grad_norm_

            ds_norms.append(float(clip_grad_norm_(engine.module.parameters(), max_norm=1e30)))
        engine.step()
        end_step(engine.module)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
        if engine.module.budget is not None:
            budgets.append(engine.module.budget().detach())
    return engine, losses, norms, budgets, ds_norms, first_grads, routing


def routing_rows(model) -> list[dict]:
    """The routing statistics of the forward just run, summed over the ranks (as `llm inspect` reports them)."""
    from llm.inspection.statistics import RoutingTally

    tally = RoutingTally(sorted(model.route_index))
    for j, ffn in enumerate(model.routed_ffns()):
        tally.add(j, ffn.stats)
    tally.all_reduce(torch.device("cpu"))
    return tally.rows(None)


def budget_check(budgets, total: float) -> dict:
    """Σ_l k_l = K on every rank, and every rank has the same k_l."""
    ks = torch.stack(budgets)  # [steps, L]
    gathered = [torch.empty_like(ks) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, ks)
    return {"sum_err": gather_max((ks.sum(-1) - total).abs().max().item()),
            "rank_disagreement": max(maxdiff(g, gathered[0]) for g in gathered),
            "k_last": ks[-1].tolist()}


# Routers trained once more at ep_size 2 with activation checkpointing (mode), against the plain ep_size 2 run.
CHECKPOINTED = {"topk": "full", "lapsum": "selective", "smear": "full", "deepspeed_topk": "full"}


def case_train() -> dict:
    """ep_size 2 vs 1 under DeepSpeed: losses and grad norms over 5 steps, per router and ZeRO stage."""
    routers = {
        "topk": dict(k=2),
        "lapsum": dict(k_mean=1.5, tau=0.05),
        "smear": dict(segment_len=4, expert_dropout=0.1),
        "deepspeed_topk": dict(deepspeed_topk=dict(k=2, capacity_factor=2.0)),
        "hash": dict(seed=1),
    }
    runs = [(r, 0, "fp32") for r in routers] + [("topk", 1, "fp32"), ("topk", 2, "fp32"), ("topk", 0, "bf16")]
    out = {}
    for router, zero, dtype in runs:
        res = {}
        grads = {}
        for ep_size in (1, 2):
            cfg = train_cfg(router, ep_size, zero, **routers[router])
            cfg.train.dtype = dtype
            engine, losses, norms, budgets, ds_norms, grads[ep_size], routing = run_steps(cfg)
            res[f"ep{ep_size}"] = {"losses": losses, "grad_norms": norms, "routing": routing}
            if ds_norms:
                res[f"ep{ep_size}"]["deepspeed_fp32_norms"] = ds_norms
            if budgets:
                res[f"ep{ep_size}"]["budget"] = budget_check(budgets, cfg.model.routing.options.k_mean * 2)
            if ep_size == 2 and zero == 0 and dtype == "fp32":
                res["roundtrip"] = roundtrip(engine.module, cfg)
            del engine
        if grads[1] and router != "deepspeed_topk":
            res["reduced_grads"] = compare_reduced_grads(grads[1], grads[2])
        if zero == 0 and dtype == "fp32" and router in CHECKPOINTED:
            # Activation checkpointing recomputes the block (dispatch, exchange, dropout) in backward.
            cfg = train_cfg(router, 2, zero, **routers[router])
            cfg.train.activation_checkpointing = CHECKPOINTED[router]
            _, losses, norms, *_ = run_steps(cfg)
            res["ep2_checkpointed"] = {"losses": losses, "grad_norms": norms}
        out[f"{router}_zero{zero}" + ("_bf16" if dtype == "bf16" else "")] = res
    return out


def compare_reduced_grads(full: dict, sharded: dict) -> dict:
    """Gradients after DeepSpeed's reduction, ep_size 2 vs 1: expert parameters (reduced only
    within the expert-data-parallel group, averaged over all ranks) equal the ep 1 gradient
    of the same experts; replicated parameters equal the ep 1 gradient."""
    n_local = E // 2
    first = groups.ep_rank_world()[0] * n_local  # called after the ep_size 2 run
    expert = max(maxdiff(full[n][first:first + n_local], g) for n, g in sharded.items() if ".experts." in n)
    shared = max(maxdiff(full[n], g) for n, g in sharded.items() if ".experts." not in n)
    scale = max(g.abs().max().item() for g in full.values())
    return {"expert": gather_max(expert), "shared": gather_max(shared), "scale": gather_max(scale)}


def roundtrip(sharded, cfg: Config) -> dict:
    """Save with ep_size 2 (full_state_dict), load with ep_size 1, and back: same logits."""
    from llm.model import build_model
    from llm.parallel import full_state_dict

    state = full_state_dict(sharded)
    inputs, _ = batch(99)
    sharded.eval()
    with torch.no_grad():
        logits_ep = sharded(inputs).logits
    full = build_model(cfg.model).eval()
    full.load_state_dict(state)
    with torch.no_grad():
        logits_full = full(inputs).logits
    # and back: the full state sliced into a fresh sharded model
    torch.manual_seed(123)  # different init, so the load must do all the work
    again = ep_mod.shard_experts(build_model(cfg.model)).eval()
    ep_mod.load_full_state_dict(again, full.state_dict())
    with torch.no_grad():
        logits_again = again(inputs).logits
    shapes = {k: list(v.shape) for k, v in state.items() if "experts" in k and k.endswith("w1")}
    sharded.train()
    return {"ep2_vs_ep1": gather_max(maxdiff(logits_ep, logits_full)),
            "ep1_vs_ep2": gather_max(maxdiff(logits_full, logits_again)),
            "expert_shapes": shapes}


REFERENCE = dict(router="lapsum", k_mean=1.5, tau=0.05, n_experts=E)  # learned budget, τ controller
REFERENCE_STEPS = 6


def case_reference() -> dict:
    """LapSum trained with ep_size 2 (τ controller and learned budget on): the final weights
    and buffers in global expert order, for tests/test_expert_parallel.py to compare with a
    single process without DeepSpeed that trains on both ranks' batches."""
    from llm.parallel import full_state_dict

    cfg = train_cfg(REFERENCE["router"], 2, 0, **{k: v for k, v in REFERENCE.items() if k != "router"})
    engine, losses, *_ = run_steps(cfg, REFERENCE_STEPS)
    state = full_state_dict(engine.module)
    if rank() == 0:
        torch.save({"state": state, "losses": torch.tensor(losses, dtype=torch.float64)},
                   sys.argv[1] + ".reference.pt")
    return {"losses": losses}


CASES = {"exchange": case_exchange, "smear": case_smear, "train": case_train, "reference": case_reference}


def main() -> None:
    out_path, names = sys.argv[1], sys.argv[2:] or list(CASES)
    from llm.parallel import init_distributed

    init_distributed()
    groups.init_expert_parallel(2, E)
    results = {"world_size": dist.get_world_size(), "seconds": {}}
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = CASES[name]()
        except Exception:  # report, so the pytest side shows the traceback
            results[name] = {"error": traceback.format_exc()}
        results["seconds"][name] = round(time.perf_counter() - t0, 2)
    if rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
