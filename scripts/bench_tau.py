"""Cost of LapSum's τ controller: whole forward+backward of a tiny-lapsum-shaped model in
training mode, `tau_control: ema` (slot histograms every forward) against `fixed`, in one run.

    python scripts/bench_tau.py [--reps 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.config import ModelConfig, RoutingConfig  # noqa: E402
from llm.model import build_model  # noqa: E402


def step_seconds(control: str, iters: int = 10) -> float:
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=128,
                      routing=RoutingConfig.build("lapsum", n_experts=8, tau_control=control))
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(0, 512, (16, 128))
    for _ in range(3):
        model(ids).logits.sum().backward()
    start = time.perf_counter()
    for _ in range(iters):
        model(ids).logits.sum().backward()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.reps):
        fixed, ema = step_seconds("fixed"), step_seconds("ema")
        print(f"fixed {fixed * 1e3:.1f} ms  ema {ema * 1e3:.1f} ms  ema/fixed {ema / fixed:.3f}")


if __name__ == "__main__":
    main()
