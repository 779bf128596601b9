"""Where one step's tokens sit: the host-side facts every attention backend builds from.

The model runner fills a BatchLayout per step (numpy, on the host); the chosen backend turns it
into the tensors its kernels read (its own metadata class), so the runner knows no backend's
internals and a backend never sees a Request.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_decodes(self) -> int:
        """Leading sequences computing one token each."""
        multi = np.flatnonzero(self.query_lens != 1)
        return int(multi[0]) if multi.size else len(self.query_lens)

    def padded_tables(self, count: int | None = None) -> np.ndarray:
        """The first `count` sequences' block tables (all by default) as one zero-padded
        [count, longest] int64 matrix."""
        tables = self.block_tables[:count]
        out = np.zeros((len(tables), max((len(t) for t in tables), default=1)), dtype=np.int64)
        for i, t in enumerate(tables):
            out[i, : len(t)] = t
        return out

    @property
    def query_starts(self) -> np.ndarray:
        """[S] int64: each sequence's first row in the flat token batch."""
        return np.cumsum(self.query_lens) - self.query_lens
