"""Packed, shuffled, resumable batches from a flat token file, split across data-parallel ranks.

The file is cut into non-overlapping windows of seq_len + 1 tokens (consecutive windows
share one boundary token, so every token is a target once). Training reads one global
stream of windows: epoch e is a permutation of all windows seeded by (seed, e), and the
epochs follow each other. Global sequence k of step s is

    k = s * G + micro_step * (dp_world * B) + dp_rank * B + row      G = B * dp_world * grad_accum

so what a step reads depends only on (seed, step, G): resuming at step s needs no state,
and any split of G into ranks, micro-batches and accumulation steps reads the same
sequences in the same order.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from llm.data.errors import DataError

log = logging.getLogger(__name__)


class TokenLoader:
    def __init__(self, path: str | Path, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, dtype: str | None = None):
        """`dtype` defaults to the one in meta.json beside the file (written by `prepare`)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"token file {self.path} not found (run `llm prepare` first)")
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank={dp_rank}: expected 0 <= dp_rank < dp_world={dp_world}")
        if dtype is None:
            meta = self.path.parent / "meta.json"
            if not meta.is_file():
                raise DataError(f"{meta} not found: pass the token dtype of {self.path} explicitly")
            dtype = json.loads(meta.read_text())["dtype"]
        if self.path.stat().st_size < np.dtype(dtype).itemsize:
            raise DataError(f"token file {self.path} is empty")
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r")  # [n_tokens]
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        self.n_sequences = (len(self.tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}
        self._require(micro_batch_size * dp_world, "micro_batch_size × dp_world")

    def batch(self, step: int, micro_step: int = 0, grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch `micro_step` of optimizer step `step`: (inputs, targets), int64 [B, T]."""
        if not 0 <= micro_step < grad_accum:
            raise DataError(f"micro_step={micro_step}: expected 0 <= micro_step < grad_accum={grad_accum}")
        b, world = self.micro_batch_size, self.dp_world
        per_step = b * world * grad_accum
        self._require(per_step, "micro_batch_size × dp_world × grad_accum")
        first = step * per_step + micro_step * b * world + self.dp_rank * b
        k = np.arange(first, first + b, dtype=np.int64)  # global sequence indices
        epochs, positions = np.divmod(k, self.n_sequences)
        windows = np.empty(b, dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            windows[rows] = self._permutation(int(epoch))[positions[rows]]
        return self._gather(windows)

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` fixed batches spread evenly over the file, this rank's share of each.

        Fewer than `n` when the file holds fewer than n × micro_batch_size × dp_world windows.
        """
        per_batch = self.micro_batch_size * self.dp_world
        self._require(per_batch, "micro_batch_size × dp_world")
        fit = min(n, self.n_sequences // per_batch)
        if fit < n:
            log.warning("%s holds %d validation batches, not the %d asked for", self.path, fit, n)
        total = fit * per_batch
        windows = np.arange(total, dtype=np.int64) * self.n_sequences // total
        out = []
        for j in range(fit):
            first = j * per_batch + self.dp_rank * self.micro_batch_size
            out.append(self._gather(windows[first:first + self.micro_batch_size]))
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
        return self._perms[epoch]

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        chunk = np.stack([self.tokens[w * self.seq_len:w * self.seq_len + span] for w in windows])  # [B, T+1]
        chunk = torch.from_numpy(chunk.astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def _require(self, sequences: int, what: str) -> None:
        if self.n_sequences < sequences:
            raise DataError(
                f"{self.path}: {len(self.tokens):,} tokens make {self.n_sequences} sequences of "
                f"seq_len+1={self.seq_len + 1} tokens, fewer than the {sequences} that {what} needs; "
                f"use more data or lower data.seq_len / train.micro_batch_size")

    def __repr__(self) -> str:
        return (f"TokenLoader({self.path}, {len(self.tokens):,} tokens, {self.n_sequences} sequences of "
                f"{self.seq_len}, B={self.micro_batch_size}, rank {self.dp_rank}/{self.dp_world})")
