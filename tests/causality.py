"""The causality test of docs/routing.md#causality, shared by every model test.

Change every token after position t and check that logits at positions <= t do not move.
"""
from __future__ import annotations

import torch


def causal_leak(model, input_ids: torch.Tensor, t: int, vocab_size: int, train: bool = False,
                seed: int = 0) -> float:
    """Largest change of logits[:, :t+1] when every token after t is replaced.

    In train mode the RNG is reseeded before each forward, so stochastic parts (expert
    dropout) draw the same numbers for both inputs.
    """
    model.train(train)
    changed = input_ids.clone()
    gen = torch.Generator().manual_seed(seed + t)
    tail = changed[:, t + 1:]
    # Shift every later token by a random non-zero amount so each one really changes.
    shift = torch.randint(1, vocab_size, tail.shape, generator=gen)
    changed[:, t + 1:] = (tail + shift) % vocab_size
    with torch.no_grad():
        torch.manual_seed(seed)
        a = model(input_ids).logits[:, : t + 1]
        torch.manual_seed(seed)
        b = model(changed).logits[:, : t + 1]
    return (a - b).abs().max().item()


def assert_causal(model, input_ids: torch.Tensor, positions, vocab_size: int, tol: float = 1e-5) -> None:
    for train in (False, True):
        for t in positions:
            leak = causal_leak(model, input_ids, t, vocab_size, train=train)
            assert leak <= tol, f"logits at positions <= {t} changed by {leak:.3g} (train={train})"
