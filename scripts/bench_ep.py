"""Expert-parallel benchmark: one routed layer, forward + backward, on 2 processes.

    python scripts/bench_ep.py --tokens 2048 --d-model 256 --d-expert 512 --experts 8

(re-launches itself under torchrun with --nproc 2; CPU: gloo, one thread per process.)

For each layer the same shapes run with ep_size 1 (every rank holds all E experts and
computes its own tokens: data parallel) and ep_size 2 (each rank holds E/2 experts;
tokens move by all-to-all, or SMEAR's merge by all-gather / reduce-scatter). Our
dispatcher and DeepSpeed's MoE layer (`router: deepspeed_topk`) run the same top-2
routing at the same ep_size and capacity factor. Reported: tokens/s of the whole group
(tokens per rank x ranks / the slowest rank's median step), and ratios to the baselines.
Variants are interleaved round by round so that clock drift hits them alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_variants(args) -> dict[str, tuple[torch.nn.Module, str]]:
    from llm.config import ModelConfig, RoutingConfig
    from llm.parallel.expert import ExpertParallel, shard_experts
    from llm.routing import build_ffn

    def cfg(router: str, **routing) -> ModelConfig:
        c = ModelConfig(d_model=args.d_model, n_heads=4, d_ff=args.d_expert, max_seq_len=args.seq_len,
                        routing=RoutingConfig.build(router, n_experts=args.experts, **routing))
        c.validate()
        return c

    ep = ExpertParallel.current()
    layers = {
        "topk (ours, dropless)": cfg("topk", k=2),
        f"topk (ours, capacity {args.capacity})": cfg("topk", k=2, capacity_factor=args.capacity),
        f"deepspeed_topk (capacity {args.capacity})": cfg("deepspeed_topk", deepspeed_topk=dict(k=2, capacity_factor=args.capacity)),
        f"smear (S={args.segment})": cfg("smear", segment_len=args.segment, expert_dropout=0.0),
    }
    variants = {}
    for name, c in layers.items():
        torch.manual_seed(0)
        full = build_ffn(c, True)
        variants[f"{name} | ep 1"] = (full, name)
        merges = ("gather", "reduce") if c.routing.router == "smear" else ("auto",)
        for merge in merges:
            sharded = copy.deepcopy(full)
            shard_experts(torch.nn.ModuleDict({"layer": sharded}), ep, smear_merge=merge)
            label = f"ep 2, {merge}" if len(merges) > 1 else "ep 2"
            variants[f"{name} | {label}"] = (sharded, name)
    return variants


def step_fn(layer: torch.nn.Module, x: torch.Tensor):
    def step():
        xi = x.detach().requires_grad_(True)
        y, aux = layer(xi, None)
        (y.float().square().mean() + aux).backward()
        layer.zero_grad(set_to_none=True)
    return step


def time_rounds(fns: dict, repeats: int) -> dict[str, float]:
    """Median over rounds of the slowest rank's seconds per step, variants interleaved."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            dist.barrier()
            start = time.perf_counter()
            fns[name]()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            samples[name].append(elapsed.item())
    return {name: statistics.median(ts) for name, ts in samples.items()}


def worker(args) -> None:
    from llm.parallel import groups, init_distributed

    torch.set_num_threads(args.threads)
    init_distributed()
    groups.init_expert_parallel(2, args.experts)
    world = dist.get_world_size()
    variants = build_variants(args)
    torch.manual_seed(1 + dist.get_rank())
    B = args.tokens // args.seq_len
    x = torch.randn(B, args.seq_len, args.d_model)
    seconds = time_rounds({name: step_fn(layer, x) for name, (layer, _) in variants.items()}, args.repeats)
    if dist.get_rank() == 0:
        report(args, variants, seconds, B * args.seq_len * world)
    dist.barrier()  # no rank exits while another still works
    dist.destroy_process_group()


def report(args, variants: dict, seconds: dict[str, float], tokens: int) -> None:
    world = dist.get_world_size()
    base = {layer: seconds[f"{layer} | ep 1"] for _, layer in variants.values()}
    ds_layer = next(layer for _, layer in variants.values() if layer.startswith("deepspeed"))
    print(f"\n{world} processes x {args.threads} thread(s), {args.tokens} tokens/rank (seq {args.seq_len}), "
          f"d_model {args.d_model}, d_expert {args.d_expert}, E {args.experts}, top-2, "
          f"{args.repeats} rounds, median\n")
    print("| layer | ep_size | tokens/s | vs ep 1 | vs deepspeed_topk (same ep) |")
    print("|---|---|---:|---:|---:|")
    for name, (_, layer) in variants.items():
        label = name.split(" | ")[1]
        ds_same = seconds[f"{ds_layer} | {label}"] if f"{ds_layer} | {label}" in seconds else None
        vs_ds = f"{ds_same / seconds[name]:.2f}x" if ds_same and not layer.startswith("smear") else ""
        print(f"| {layer} | {label.replace('ep ', '')} | {tokens / seconds[name]:,.0f} | "
              f"{base[layer] / seconds[name]:.2f}x | {vs_ds} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--capacity", type=float, default=1.25)
    p.add_argument("--segment", type=int, default=64, help="SMEAR segment length")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    if "LOCAL_RANK" not in os.environ:  # re-launch under torchrun
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-port", os.environ.get("MASTER_PORT", "29555"), os.path.abspath(__file__), *sys.argv[1:]]
        sys.exit(subprocess.call(cmd))
    worker(args)


if __name__ == "__main__":
    main()
