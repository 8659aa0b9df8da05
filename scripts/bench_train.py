"""Whole training steps per router: the trainer's DeepSpeed step eager, compiled and with
activation checkpointing, against a bare PyTorch loop (AdamW, no DeepSpeed) on the same model.

    OMP_NUM_THREADS=2 python scripts/bench_train.py --routers dense topk lapsum smear \\
        --d-model 256 --layers 4 --batch 4 --seq-len 256 --steps 6

Per router, every variant starts from the same weights and trains on the same batches:
- `bare`: model(inputs, targets) + backward + clip + AdamW step + LR schedule, plain PyTorch
  (bf16 through autocast);
- `trainer`: `llm train`'s own step (`llm.train.optimizer_step`: the DeepSpeed engine
  `llm.parallel.build_engine` builds, its finite-gradient check, the loss averaged over ranks),
  which also applies train.compile / activation_checkpointing;
- `compile`, `ckpt full`, `ckpt selective`: the trainer with that switch on.
The variants are built side by side and timed in rounds (one step of each variant per round,
on the same batch), so a machine whose load drifts slows them alike and the ratios hold; the
order rotates from round to round, because on CPU the step after another variant's runs
measurably slower (caches), ~4 % at the sizes below.
Reported: median step time after `--warmup` steps (compilation happens there), tokens/s,
the ratio to `trainer` (and of `trainer` to `bare`: the trainer's overhead), and peak memory
of one step above its start (CUDA: max_memory_allocated; CPU: the running sum of the
allocation events torch.profiler records, as CPU has no allocator statistics).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from llm import parallel
from llm.config import Config, ConfigError, load_config
from llm.model import build_model, flops_per_token
from llm.parallel.engine import SCHEDULES, adamw
from llm.routing.tau import end_step
from llm.train import optimizer_step

MiB = 2 ** 20
VARIANTS = {  # name -> train.* overrides
    "bare": {},
    "trainer": {},
    "compile": {"compile": True},
    "ckpt full": {"activation_checkpointing": "full"},
    "ckpt selective": {"activation_checkpointing": "selective"},
}

Step = Callable[[torch.Tensor, torch.Tensor], float]


def config(args, model: str, variant: str) -> Config:
    """`model` is a router name (a model of --d-model/--layers/...) or a config file (its model as is)."""
    common = [f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}",
              f"train.micro_batch_size={args.batch}", f"train.grad_accum=1", f"train.dtype={args.dtype}",
              f"train.loss_chunk={args.loss_chunk}", "parallel.ep_size=1"]
    common += [f"train.{k}={str(v).lower()}" for k, v in VARIANTS[variant].items()] + args.set
    if model.endswith(".yaml"):
        return load_config(model, common)
    return load_config(None, common + [
        f"model.routing.router={model}", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
        f"model.n_heads={args.heads}", f"model.d_ff={4 * args.d_model}", f"model.vocab_size={args.vocab}",
        "model.routing.n_experts=8"] + (["model.routing.smear.segment_len=64"] if model == "smear" else []))


def bare_step(cfg: Config, device: torch.device) -> Step:
    """The reference loop: what a training step costs without the trainer."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    optimizer = adamw(model, t)  # the trainer's AdamW: the comparison is of everything around it
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[t.lr_schedule](t))
    bf16 = parallel.use_bf16(cfg)

    def step(inputs, targets) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs, targets=targets, loss_chunk=t.loss_chunk)
        (out.ce + out.aux_loss).backward()
        if t.grad_clip > 0:  # 0 = off, as in the trainer (clip_grad_norm_ would zero the gradients)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        end_step(model)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        ce, aux = torch.stack([out.ce.detach(), out.aux_loss.detach().float()]).tolist()
        return ce + aux  # summed as the trainer sums them, so equal steps give equal numbers

    return step


def trainer_step(cfg: Config, device: torch.device) -> Step:
    """`llm train`'s step (`llm.train.optimizer_step`) on the engine `llm train` builds."""
    torch.manual_seed(cfg.train.seed)
    engine = parallel.build_engine(parallel.apply_expert_parallel(build_model(cfg.model), cfg), cfg)

    def step(inputs, targets) -> float:
        return optimizer_step(engine, [(inputs, targets)], cfg.train)["loss"]

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated during one call of `step`, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, n in allocs:
        current += n
        peak = max(peak, current)
    return peak


def bench(args, router: str, device: torch.device) -> list[dict]:
    """Every variant of one router, their timed steps interleaved round by round (see the module
    docstring), so that a change in the machine's load falls on all of them alike."""
    gen = torch.Generator().manual_seed(0)
    vocab = config(args, router, "bare").model.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=gen).to(device)
               for _ in range(args.warmup + args.steps + 1)]
    cfgs = {variant: config(args, router, variant) for variant in args.variants}
    steps = {variant: (bare_step if variant == "bare" else trainer_step)(cfg, device) for variant, cfg in cfgs.items()}
    times: dict[str, list[float]] = {variant: [] for variant in steps}
    losses: dict[str, list[float]] = {variant: [] for variant in steps}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    names = list(steps)
    for i, ids in enumerate(batches[:-1]):
        for variant in names[i % len(names):] + names[:i % len(names)]:  # each variant leads in turn
            step = steps[variant]
            if device.type == "cuda":
                torch.cuda.synchronize()
            torch.manual_seed(args.seed + i)  # expert dropout: every variant draws the same numbers at step i
            start = clock()
            losses[variant].append(step(ids[:, :-1], ids[:, 1:]))
            if i >= args.warmup:
                times[variant].append(clock() - start)
    last = batches[-1]
    rows = []
    for variant, step in steps.items():
        peak = peak_bytes(lambda: step(last[:, :-1], last[:, 1:]), device)
        seconds = statistics.median(times[variant])
        tokens_per_s = args.batch * args.seq_len / seconds
        row = {"router": Path(router).stem if router.endswith(".yaml") else router, "variant": variant,
               "step_ms": 1e3 * seconds, "tokens_per_s": tokens_per_s, "peak_mib": peak / MiB,
               "first_loss": losses[variant][0], "last_loss": losses[variant][-1]}
        if args.peak_tflops:
            row["mfu"] = flops_per_token(cfgs[variant].model, args.seq_len) * tokens_per_s / (args.peak_tflops * 1e12)
        rows.append(row)
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = next((r for r in rows if r["variant"] == "trainer"), rows[0])
    for r in rows:
        r["vs_trainer"] = r["step_ms"] / base["step_ms"]
    return rows


def show(rows: list[dict]) -> None:
    print(f"{'router':16} {'variant':15} {'step ms':>9} {'tokens/s':>10} {'x trainer':>9} {'peak MiB':>9} "
          f"{'MFU':>6} {'loss 1st':>9} {'loss last':>9}")
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "     -"
        print(f"{r['router']:16} {r['variant']:15} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{r['vs_trainer']:9.3f} {r['peak_mib']:9.1f} {mfu:>6} {r['first_loss']:9.4f} {r['last_loss']:9.4f}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routers", nargs="+", default=["dense", "topk", "lapsum", "smear"],
                    help="router names (a model of the sizes below) or config files (e.g. configs/gpt-125m-dense.yaml)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps; the median is reported")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="step time as wall time, or as this process's CPU time: steadier on a CPU shared with other "
                         "jobs (run with OMP_NUM_THREADS=1 then; meaningless on a GPU)")
    ap.add_argument("--loss-chunk", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="step i draws its random numbers (dropout) from seed + i")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (989 for H100/H200 bf16)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="further config overrides for every variant, e.g. train.grad_clip=0.1")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    try:  # every config first: a bad --set or config file costs a line, not a half-run benchmark
        for router in args.routers:
            for variant in args.variants:
                config(args, router, variant)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    parallel.init_distributed()
    device = parallel.device()
    rows = [row for router in args.routers for row in bench(args, router, device)]
    shape = "" if all(r.endswith(".yaml") for r in args.routers) else f", d_model {args.d_model}, {args.layers} layers"
    print(f"{device.type}, {torch.get_num_threads()} threads, {args.clock} clock, dtype {args.dtype}, "
          f"batch {args.batch} x {args.seq_len}{shape}")
    show(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
