"""Packed, shuffled, resumable batches from a split of a data directory, across data-parallel ranks.

The split's shards, concatenated in unit order, are one token stream. The stream is cut
into non-overlapping windows of seq_len + 1 tokens (consecutive windows share one boundary
token, so every token is a target once; windows run across shard boundaries). Training reads one global
stream of windows: epoch e is a permutation of all windows seeded by (seed, e), and the
epochs follow each other. Global sequence k of step s is

    k = s * G + micro_step * (dp_world * B) + dp_rank * B + row      G = B * dp_world * grad_accum

so what a step reads depends only on (seed, step, G): resuming at step s needs no state,
and any split of G into ranks, micro-batches and accumulation steps reads the same
sequences in the same order.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from llm.data.errors import DataError
from llm.data.store import checked_shards, read_manifest

log = logging.getLogger(__name__)


class TokenStream:
    """The shards of one split as one read-only array of token ids (memory-mapped, never loaded)."""

    def __init__(self, shards: list[tuple[Path, int]], dtype: str):
        self.paths = [p for p, _ in shards]
        self.parts = [np.memmap(p, dtype=np.dtype(dtype), mode="r") for p in self.paths]  # [tokens] each
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])  # [shards + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens start..stop-1 of the stream, across shard boundaries."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            part = self.parts[first]
            offset = start - int(self.starts[first])
            piece = part[offset:offset + stop - start]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class TokenLoader:
    def __init__(self, directory: str | Path, split: str, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0):
        """Reads `split` (train or val) of a prepared data directory; its files are checked first."""
        self.path = Path(directory) / split
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank={dp_rank}: expected 0 <= dp_rank < dp_world={dp_world}")
        shards = checked_shards(directory, split)
        if not shards:
            raise DataError(f"{self.path}: the {split} split holds no tokens")
        self.tokens = TokenStream(shards, read_manifest(directory)["dtype"])
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        self.n_sequences = (len(self.tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}
        self._require(1, "one batch row")

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
        """`n` fixed batches spread evenly over the split, this rank's share of each.

        A split with fewer than n × micro_batch_size × dp_world windows repeats some, so that
        validation works with any number of ranks.
        """
        per_batch = self.micro_batch_size * self.dp_world
        total = n * per_batch
        if total > self.n_sequences:
            log.warning("%s holds %d windows of %d tokens; the %d validation batches repeat some",
                        self.path, self.n_sequences, self.seq_len, n)
        windows = np.arange(total, dtype=np.int64) * self.n_sequences // total
        firsts = [j * per_batch + self.dp_rank * self.micro_batch_size for j in range(n)]
        return [self._gather(windows[f:f + self.micro_batch_size]) for f in firsts]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
        return self._perms[epoch]

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        chunk = np.stack([self.tokens.read(w * self.seq_len, w * self.seq_len + span) for w in windows])  # [B, T+1]
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
