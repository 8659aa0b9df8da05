"""SMEAR benchmark: the segment-shifted SMEAR layer against a dense SwiGLU FFN of one expert's size.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python scripts/bench_smear.py --batch 2 --seq-len 1024 --d-model 768 --d-ff 2048 \\
        --experts 8 --segment-len 256 --repeats 10 --threads 2

Every variant runs forward + backward on the same hidden states (train mode, so expert
dropout is on). Variants are interleaved round by round; reported are the median time and
the median over rounds of the ratio to the dense FFN, in wall time and in process CPU time
(less disturbed by other jobs on shared cores; on CUDA read wall time). Memory is reported twice:
- held: memory allocated in forward and still alive when it returns (what backward needs,
  plus the output). This is what adds up over the layers of a model.
- peak: the highest allocation above the starting point during forward + backward.
On CPU both come from the allocation events of torch.profiler; on CUDA from
torch.cuda.memory_allocated / max_memory_allocated. Parameter gradients exist before the
measured step, so the accumulation into them is counted but not their storage.

On CPU, run it with glibc's mmap off (as in the command above): blocks over 32 MiB (the
merged experts and their gradients at these shapes) are otherwise returned to the OS on
every free and page-faulted back in on the next step, which costs more than the merge itself
and does not happen under the CUDA caching allocator. The header says which allocator mode ran.

Variants: `smear` keeps the merged experts for backward; `smear recompute` is the layer with
`recompute: true` (selective checkpoint: only the merge is redone in backward);
`smear full ckpt` checkpoints the whole layer (everything is redone), for reference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from llm.config import ModelConfig, RoutingConfig
from llm.model import FFNContext
from llm.routing.dense import DenseFFN
from llm.routing.smear import SMEARLayer

MiB = 2 ** 20


def _time_rounds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, process CPU seconds) of each fn in each round; the fns are interleaved.

    CPU time (all threads) is less disturbed than wall time when other jobs share the cores.
    """
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return samples


def _median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b: each ratio compares runs a few seconds apart, so slow drifts
    of the machine's load cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def _memory(forward: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(held after forward, peak during forward + backward), in bytes above the start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = forward()
        held = torch.cuda.memory_allocated() - base
        y.float().sum().backward()
        del y
        torch.cuda.synchronize()
        return held, torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        y = forward()
        with torch.profiler.record_function("bench_smear::backward"):
            y.float().sum().backward()
        del y
    events = prof.profiler.kineto_results.events()
    backward_start = min(e.start_ns() for e in events if e.name() == "bench_smear::backward")
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    held = sum(n for t, n in allocs if t < backward_start)
    current = peak = 0
    for _, n in allocs:
        current += n
        peak = max(peak, current)
    return held, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=2048, help="hidden size of one expert and of the dense FFN")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--expert-dropout", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)

    def cfg(recompute: bool) -> ModelConfig:
        return ModelConfig(d_model=args.d_model, d_ff=args.d_ff, n_heads=1, max_seq_len=args.seq_len,
                           routing=RoutingConfig.build("smear", n_experts=args.experts, segment_len=args.segment_len,
                                                       expert_dropout=args.expert_dropout, recompute=recompute))

    dense = DenseFFN(cfg(False)).to(device, dtype).train()
    smear = SMEARLayer(cfg(False)).to(device, dtype).train()
    smear_rc = SMEARLayer(cfg(True)).to(device, dtype).train()
    smear_rc.load_state_dict(smear.state_dict())
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device, dtype=dtype, requires_grad=True)
    ctx = FFNContext(input_ids=torch.zeros(args.batch, args.seq_len, dtype=torch.long, device=device))

    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "dense FFN (one expert)": lambda: dense(x)[0],
        "smear": lambda: smear(x, ctx)[0],
        "smear recompute": lambda: smear_rc(x, ctx)[0],
        "smear full ckpt": lambda: checkpoint(lambda h: smear(h, ctx)[0], x, use_reentrant=False),
    }

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            forward().float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    rounds = _time_rounds({name: step(f) for name, f in forwards.items()}, args.repeats)
    memory = {name: _memory(f, device) for name, f in forwards.items()}

    tokens = args.batch * args.seq_len
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} tokens={tokens} "
          f"(B={args.batch}, T={args.seq_len}) d={args.d_model} f={args.d_ff} E={args.experts} "
          f"S={args.segment_len} merge/FFN FLOP ratio E/S={args.experts / args.segment_len:.3f}")
    if device.type == "cpu":
        print(f"glibc MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset (large blocks mmapped)')}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| variant | fwd+bwd ms | vs dense | CPU ms | vs dense (CPU) | held after fwd MiB | peak fwd+bwd MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rounds["dense FFN (one expert)"]
    for name in forwards:
        wall, cpu = zip(*rounds[name])
        held, peak = memory[name]
        print(f"| {name} | {statistics.median(wall) * 1e3:.1f} | {_median_ratio(wall, [w for w, _ in base]):.2f}x "
              f"| {statistics.median(cpu) * 1e3:.1f} | {_median_ratio(cpu, [c for _, c in base]):.2f}x "
              f"| {held / MiB:.1f} | {peak / MiB:.1f} |")

if __name__ == "__main__":
    main()
