"""Cross-entropy of the output head without the fp32 logits of a whole micro-batch.

At 16 x 1024 tokens and a 32k vocabulary the fp32 logits are 2 GB, and their gradient as
much again. Here the head runs on `chunk` tokens at a time, each chunk under activation
checkpointing: its logits are freed after its loss is taken and recomputed in backward,
so at most one chunk's logits (and their gradient) exist at any moment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden [N, d] @ weight [vocab, d]^T against targets [N].

    Logits are taken in fp32 whatever the model dtype, as the unchunked loss does.
    chunk <= 0 or >= N computes it in one piece (no recomputation).
    """
    n = hidden.shape[0]
    if chunk <= 0 or chunk >= n:
        return _summed_cross_entropy(hidden, weight, targets) / n
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_summed_cross_entropy, hidden[piece], weight, targets[piece],
                                   use_reentrant=False)
    return total / n


def _summed_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
