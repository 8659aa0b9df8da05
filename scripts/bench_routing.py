"""Routing benchmarks: the LapSum operator against torch.topk + softmax (`bench_operator`),
and whole routed FFN layers against a dense FFN of the same active size and DeepSpeed's
MoE layer (`bench_layers`).

    python scripts/bench_routing.py --tokens 8192 --repeats 30 --threads 2
    python scripts/bench_routing.py --only layers --threads 2
    python scripts/bench_routing.py --only operator --compile --threads 1 --cpu-time

Every variant runs forward + backward on the same scores; variants are interleaved
round by round so that drifting clocks and caches hit them alike, and the median of
the rounds is reported with its ratio to the baseline.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch

from llm.routing.lapsum import soft_topk


def _time_rounds(fns: dict[str, Callable[[], None]], repeats: int, min_round_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, interleaving the fns round by round.

    `clock`: wall time by default; `time.process_time` (CPU seconds of this process) is
    steadier on a shared machine but only meaningful with one intra-op thread.
    """
    # Warm up and size one round: enough calls that timer resolution does not matter.
    calls = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        n, elapsed = 1, 0.0
        while True:
            start = clock()
            for _ in range(n):
                fn()
            elapsed = clock() - start
            if elapsed >= min_round_s:
                break
            n *= 2
        calls[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        # Alternate the order so no variant always runs right after the same other one.
        for name in names if r % 2 == 0 else reversed(names):
            fn, n = fns[name], calls[name]
            start = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - start) / n)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def bench_operator(
    tokens: int = 8192,
    experts: tuple[int, ...] = (8, 32, 128),
    repeats: int = 20,
    k: int = 2,
    alpha: float = 1.0,
    min_round_s: float = 0.02,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    compile: bool = False,
) -> list[dict]:
    """Forward + backward of soft_topk against `v, i = scores.topk(k); softmax(v)`.

    Both get fresh leaf scores of shape [tokens, E] in float32 and an upstream gradient
    of their output's shape. Returns one row per E with the median times in ms. With
    `compile`, each loss (operator, product with the upstream gradient, sum) also runs
    under torch.compile (inductor), the backward included, and the compiled soft_topk is
    given as ratios to both the eager and the compiled top-k + softmax.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n_exp in experts:
        scores = torch.randn(tokens, n_exp, generator=gen).requires_grad_()  # [N, E]
        g_soft = torch.randn(tokens, n_exp, generator=gen)  # [N, E]
        g_hard = torch.randn(tokens, k, generator=gen)  # [N, k]

        def topk_softmax(s: torch.Tensor) -> torch.Tensor:
            v, _ = s.topk(k, dim=-1)
            return (torch.softmax(v, dim=-1) * g_hard).sum()

        def lapsum(s: torch.Tensor) -> torch.Tensor:
            return (soft_topk(s, float(k), alpha) * g_soft).sum()

        losses = {"topk_softmax": topk_softmax, "soft_topk": lapsum}
        if compile:
            torch._dynamo.reset()
            losses.update({f"{name}_compiled": torch.compile(loss) for name, loss in list(losses.items())})
        t = _time_rounds({name: _backward_step(scores, loss) for name, loss in losses.items()}, repeats,
                         min_round_s, clock)
        row = {"E": n_exp, "tokens": tokens, **{f"{name}_ms": 1e3 * ts for name, ts in t.items()},
               "ratio": t["soft_topk"] / t["topk_softmax"]}
        if compile:
            row["compiled_ratio"] = t["soft_topk_compiled"] / t["topk_softmax"]
            row["vs_compiled_topk"] = t["soft_topk_compiled"] / t["topk_softmax_compiled"]
        rows.append(row)
    return rows


def _backward_step(scores: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    def step():
        scores.grad = None
        loss(scores).backward()
    return step


# ---------------------------------------------------------------------------- routed layers


def _init_gloo() -> None:
    """A 1-process gloo group, which DeepSpeed's MoE layer needs for its expert-parallel groups."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def bench_layers(
    tokens: int = 4096,
    d_model: int = 512,
    shapes: tuple[tuple[int, int, int], ...] = ((8, 2, 1024), (32, 2, 256)),
    repeats: int = 5,
    min_round_s: float = 0.05,
    deepspeed_baseline: bool = True,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Forward + backward of one FFN layer on x [tokens, d_model] (as [4, tokens/4, d]), fp32.

    Per (E, k, d_expert) in `shapes`, side by side in one run:
      dense       SwiGLU with d_ff = k·d_expert: the same active parameters (the floor)
      switch      top-1 over E experts of width k·d_expert (same active parameters)
      topk        top-k over E experts of width d_expert, dropless
      topk_cf1.25 the same with capacity_factor 1.25 (our position-order capacity)
      lapsum      LapSum with k_l = k (fixed), cap c = 2, τ tracked over the timed calls
                  (tau_control ema) so the mean number of active experts ≈ k (reported as `active`)
      deepspeed   deepspeed.moe.layer.MoE (through llm.routing.deepspeed_moe), k, capacity 1.25,
                  use_rts False
    `active` is experts computed per token (dense: its one FFN). Times are medians of
    interleaved rounds in ms; `vs_dense` and `vs_topk` are ratios to those rows.
    """
    from llm.config import ModelConfig, RoutingConfig
    from llm.routing.dense import DenseFFN
    from llm.routing import build_ffn

    if deepspeed_baseline:
        _init_gloo()
        from llm.routing.deepspeed_moe import DeepSpeedMoE
    gen = torch.Generator().manual_seed(seed)
    B = 4
    x = torch.randn(B, tokens // B, d_model, generator=gen).requires_grad_()  # [B, T, d]
    g = torch.randn(B, tokens // B, d_model, generator=gen)  # upstream gradient
    rows = []
    for n_exp, k, d_expert in shapes:
        def cfg(router: str, d_ff: int = k * d_expert, **routing) -> ModelConfig:
            return ModelConfig(d_model=d_model, n_layers=1, n_heads=1, d_ff=d_ff, max_seq_len=tokens,
                               routing=RoutingConfig.build(router, n_experts=n_exp, **routing))

        torch.manual_seed(seed)
        layers = {
            "dense": DenseFFN(cfg("dense")),
            "switch": build_ffn(cfg("switch", d_expert=k * d_expert), True),
            "topk": build_ffn(cfg("topk", d_expert=d_expert, k=k), True),
            "topk_cf1.25": build_ffn(cfg("topk", d_expert=d_expert, k=k, capacity_factor=1.25), True),
            "lapsum": build_ffn(cfg("lapsum", d_expert=d_expert, k_mean=float(k), budget="fixed",
                                 expansion_cap=2.0), True),
        }
        if deepspeed_baseline:
            layers["deepspeed"] = DeepSpeedMoE(cfg("deepspeed_topk", d_expert=d_expert,
                                                   deepspeed_topk=dict(k=k, capacity_factor=1.25)))

        def step(layer):
            def fn():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                y, aux = layer(x)
                ((y * g).sum() + aux).backward()
            return fn

        t = _time_rounds({name: step(layer) for name, layer in layers.items()}, repeats, min_round_s, clock)
        for name, layer in layers.items():
            active = _active_experts(layer)
            if active is None:
                active = float({"dense": 1, "switch": 1}.get(name, k))
            rows.append({"E": n_exp, "k": k, "d_expert": d_expert, "layer": name, "active": active,
                         "ms": 1e3 * t[name], "vs_dense": t[name] / t["dense"],
                         "vs_topk": t[name] / t["topk"]})
    return rows


def _active_experts(layer: torch.nn.Module) -> Optional[float]:
    """Mean experts computed per token in the layer's last forward; None for a layer without statistics."""
    from llm.inspection.statistics import RoutingTally

    if not hasattr(layer, "stats"):
        return None
    tally = RoutingTally([0])
    tally.add(0, layer.stats)
    return tally.rows(None)[0]["active_mean"]


def _print_table(title: str, rows: list[dict]) -> None:
    print(title)
    cols = list(rows[0])
    print(" | ".join(f"{c:>15}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]:>15.3f}" if isinstance(row[c], float) else f"{row[c]:>15}" for c in cols))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true",
                        help="also time both operators under torch.compile (inductor; compiling takes minutes)")
    parser.add_argument("--only", choices=["operator", "layers"], default=None, help="run one of the two benchmarks")
    parser.add_argument("--layer-tokens", type=int, default=4096, help="tokens per layer call (bench_layers)")
    parser.add_argument("--d-model", type=int, default=512, help="hidden size (bench_layers)")
    parser.add_argument("--layer-repeats", type=int, default=5)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the deepspeed.moe baseline")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU seconds instead of wall time (needs --threads 1; for a busy "
                             "machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        parser.error("--cpu-time needs --threads 1 (CPU seconds of several threads include their spinning)")
    if args.only != "layers":
        rows = bench_operator(args.tokens, tuple(args.experts), args.repeats, args.k, args.alpha,
                              clock=time.process_time if args.cpu_time else time.perf_counter, compile=args.compile)
        _print_table(
            f"soft_topk vs topk+softmax, forward+backward, {args.tokens} tokens, k={args.k}, "
            f"alpha={args.alpha}, {torch.get_num_threads()} threads, "
            f"{'CPU' if args.cpu_time else 'wall'} time, torch {torch.__version__}",
            rows,
        )
    if args.only != "operator":
        rows = bench_layers(args.layer_tokens, args.d_model, repeats=args.layer_repeats,
                            deepspeed_baseline=not args.no_deepspeed,
                            clock=time.process_time if args.cpu_time else time.perf_counter)
        _print_table(
            f"routed FFN layers, forward+backward, {args.layer_tokens} tokens, d_model={args.d_model}, fp32, "
            f"{torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, torch {torch.__version__}",
            rows,
        )


if __name__ == "__main__":
    main()
