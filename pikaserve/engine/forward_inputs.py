"""One model pass's inputs on the host, as the runner hands them to an eager or a graphed pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pikaserve.attention.layout import BatchLayout


@dataclass(slots=True)
class ForwardInputs:
    token_ids: np.ndarray  # [T] int64
    layout: BatchLayout  # where the tokens' keys and values go and what they attend to
    logits_rows: np.ndarray  # [R] int64: rows whose next-token logits are returned
    vocab_rows: np.ndarray | None  # the only tokens that can be chosen (None: all)
    hidden_rows: np.ndarray | None  # rows whose hidden states are returned (pooling)
    hidden_layers: tuple[int, ...]
    depth: int | None  # run only the first `depth` layers (None: all)
