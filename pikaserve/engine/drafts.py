"""Grammar drafts: tokens a pass computes after a request's known ones, on a guess.

Where a grammar leaves a few choices, a constrained request gets a draft (engine/constraint.py):
a guess of its next token, then every token the grammar forces after it. The scheduler fits
the draft into the request's next pass, after its known tokens; the runner computes logits at
the request's last known token (what is sampled) and at the draft's last token, and says which
row is which (StepLogits); when the sampled token is the guess and the request took the forced
tail, the draft's row already holds the logits of the request's next choice, and the engine
samples it in the same step. The KV slots of a draft count as computed only once confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikaserve.engine.constraint import Draft
from pikaserve.engine.request import Request


@dataclass(slots=True)
class StepLogits:
    """A pass's logits and what each row belongs to."""

    logits: torch.Tensor  # float32 [rows, vocab]
    sampling: list[Request]  # row i: the last known token of sampling[i]
    drafts: dict[str, tuple[int, Draft]]  # request id -> (row of its draft's last token, draft)

    @property
    def sampled_logits(self) -> torch.Tensor:
        return self.logits[: len(self.sampling)]


def propose(req: Request, max_model_len: int) -> None:
    """Gives a running constrained request a draft for its next pass, when its grammar has one
    worth computing and it stays inside the context."""
    if req.finish_reason is not None or req.constraint is None or req.constraint.is_finished:
        return
    draft = req.constraint.draft()
    if draft is not None and req.num_tokens + len(draft.token_ids) < max_model_len:
        req.draft = draft


def confirmed(req: Request, token: int, draft: Draft) -> bool:
    """True when the request went on exactly as its draft guessed (the sampled token, then the
    grammar's forced tail, all appended) and is still running: the pass computed those tokens."""
    n = len(draft.token_ids)
    return (token == draft.token_ids[0] and req.finish_reason is None
            and req.num_tokens == req.num_computed_tokens + n
            and req.all_token_ids[-n:] == draft.token_ids)
