"""What the engine needs from a structured-output constraint (a grammar matcher per request).

The engine masks a constrained request's next-token logits, tells the constraint which tokens
were appended, and, when fast-forward is on, appends the tokens the grammar forces without
sampling them; they are computed together in the next step like a prefill chunk.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Constraint(Protocol):
    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place (one row)."""

    def allowed_tokens(self) -> list[int] | None:
        """The tokens the grammar allows next when they are few, else None. The engine then
        computes the LM head over those rows of the vocabulary only."""

    def accept(self, token_ids: list[int]) -> None:
        """Advance the grammar over tokens appended to the output."""

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (possibly none); not yet accepted."""

    @property
    def is_finished(self) -> bool:
        """True when the answer is complete and nothing but end-of-sequence may follow."""
