"""What the engine needs from a structured-output constraint (a grammar matcher per request).

The engine masks a constrained request's next-token logits, tells the constraint which tokens
were appended, and, when fast-forward is on, appends the tokens the grammar forces without
sampling them; they are computed together in the next step like a prefill chunk.

Where the grammar leaves a few choices, the engine may also compute a draft in that chunk: a
guess of the next token plus the tokens the grammar forces after it. The pass samples the guess
anyway; when the sample equals it, the draft's last row already holds the logits of the choice
after it, and one pass is saved. A wrong guess costs only its extra rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Draft:
    """Tokens a pass computes after a request's known ones, to be checked against what it
    samples (engine/drafts.py): a grammar's guess of its next token, then every token the
    grammar forces after it; or a speculative proposal (engine/ngram.py)."""

    token_ids: list[int]
    allowed_after: list[int] | None  # the tokens allowed after them (None: many)
    # True: logits after every token, as each may be the first wrong one (a proposal).
    # False: only after the last, as the ones between are forced by the grammar.
    verify_each: bool = False

    @property
    def first_verified(self) -> int:
        """The first of its tokens with logits after it; every later one has them too."""
        return 0 if self.verify_each else len(self.token_ids) - 1


class Constraint(Protocol):
    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place (one row)."""

    def allow_bits(self, row: np.ndarray) -> None:
        """Set the bits of the tokens the grammar allows next in `row`, a packed token bitmask
        (uint8, token t at bit t % 8 of byte t // 8); the others are left as they are. Off a
        CPU the engine masks all rows of a step from one such bitmask, copied once."""

    def allowed_tokens(self) -> list[int] | None:
        """The tokens the grammar allows next when they are few, else None. The engine then
        computes the LM head over those rows of the vocabulary only."""

    def accept(self, token_ids: list[int]) -> None:
        """Advance the grammar over tokens appended to the output."""

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (possibly none); not yet accepted."""

    def draft(self) -> Draft | None:
        """A draft for the next free choice when one is worth computing, else None. Must not
        change the constraint's state."""

    @property
    def is_finished(self) -> bool:
        """True when the answer is complete and nothing but end-of-sequence may follow."""
