"""A stand-in for the engine loop over one constraint, with a deterministic fake model.

`walk` does what LLMEngine does with a constraint (mask -> argmax -> accept -> fast-forward), so
matcher properties can be checked in milliseconds, without a model. The fake model's logits are
a pure function of the tokens so far: two runs that reach the same tokens see the same logits,
as a real model would (up to numerics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def random_logits(vocab: int, seed: int) -> Callable[[list[int]], torch.Tensor]:
    def logits(tokens: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, *tokens)) & 0x7FFFFFFF)
        return torch.randn(vocab, generator=g) * 3

    return logits


def walk(constraint, fast_forward: bool, logits_fn, eos: set[int], max_tokens: int = 64):
    """Returns (tokens, passes): the greedy tokens and how many sampling steps it took."""
    tokens: list[int] = []
    passes = 0
    if fast_forward:
        forced = constraint.forced_tokens()
        constraint.accept(forced)
        tokens += forced
    while len(tokens) < max_tokens and not constraint.is_finished:
        row = logits_fn(tokens)
        constraint.mask_logits(row)
        passes += 1
        token = int(row.argmax())
        if token in eos:
            break
        tokens.append(token)
        constraint.accept([token])
        if constraint.is_finished or not fast_forward:
            continue
        forced = constraint.forced_tokens()
        constraint.accept(forced)
        tokens += forced
    return tokens, passes


def same_greedy_output(a: list[int], b: list[int], max_tokens: int) -> bool:
    """Fast-forward may overshoot max_tokens by a forced run; compare up to the limit."""
    if len(a) >= max_tokens or len(b) >= max_tokens:
        n = min(len(a), len(b))
        return a[:n] == b[:n] and n >= max_tokens
    return a == b
