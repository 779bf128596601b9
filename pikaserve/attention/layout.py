"""Where one step's tokens sit: the host-side facts every attention backend builds from.

The model runner fills a BatchLayout per step (numpy, on the host); the chosen backend turns it
into the tensors its kernels read (its own metadata class), so the runner knows no backend's
internals and a backend never sees a Request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class BatchLayout:
    """Sequences in row order: single-token (decode) rows first, then multi-token chunks."""

    query_lens: np.ndarray  # [S] int64: tokens each sequence computes this step
    context_lens: np.ndarray  # [S] int64: its tokens in the KV cache after this step
    block_tables: list[np.ndarray]  # per sequence: its KV block ids in order (int64)
    slot_mapping: np.ndarray  # [T] int64: the flat KV slot each new token is written to
    positions: np.ndarray  # [T] int64
    block_size: int  # tokens per KV block

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def padded_tables(self, seqs: Sequence[int] | None = None) -> np.ndarray:
        """The block tables of the sequences `seqs` (all by default) as one zero-padded
        [len(seqs), longest] int64 matrix."""
        tables = self.block_tables if seqs is None else [self.block_tables[i] for i in seqs]
        out = np.zeros((len(tables), max((len(t) for t in tables), default=1)), dtype=np.int64)
        for i, t in enumerate(tables):
            out[i, : len(t)] = t
        return out

    @property
    def query_starts(self) -> np.ndarray:
        """[S] int64: each sequence's first row in the flat token batch."""
        return np.cumsum(self.query_lens) - self.query_lens


@dataclass(slots=True)
class LayoutBuilder:
    """Collects a step's sequences, one chunk each, in row order, into a BatchLayout."""

    block_size: int
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)

    def add(self, block_ids: Sequence[int], start: int, n: int) -> None:
        """A sequence computing its tokens start .. start + n - 1 into its blocks."""
        bs = self.block_size
        pos = np.arange(start, start + n, dtype=np.int64)
        table = np.asarray(block_ids, dtype=np.int64)
        self.positions.append(pos)
        self.slots.append(table[pos // bs] * bs + pos % bs)
        self.query_lens.append(n)
        self.context_lens.append(start + n)
        self.block_tables.append(table)

    def build(self) -> BatchLayout:
        return BatchLayout(
            query_lens=np.asarray(self.query_lens, dtype=np.int64),
            context_lens=np.asarray(self.context_lens, dtype=np.int64),
            block_tables=self.block_tables,
            slot_mapping=np.concatenate(self.slots),
            positions=np.concatenate(self.positions),
            block_size=self.block_size,
        )
