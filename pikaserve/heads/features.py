"""Pooled hidden states of many prompts from the engine itself, batched, reusing cached
prefixes.

The first prompt runs alone so that its prefix (a shared system prompt) is in the prefix cache
before the rest are queued; the engine then batches the rest under its token budget, and each
prompt's new tokens are the only ones computed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from pikaserve.engine.llm_engine import LLMEngine
from pikaserve.engine.pooling_params import PoolingParams, SpanStates
from pikaserve.heads.head import pool_parts


def pooled_parts(engine: LLMEngine, prompts: Sequence[tuple[list[int], int, int]],
                 layers: tuple[int, ...], progress: str | None = None) -> torch.Tensor:
    """For (token ids, span start, span split) prompts, as ClassificationHead.prompt gives
    them: [N, len(PARTS), len(layers), H], the parts head.pool_parts makes of each span."""
    done: dict[int, torch.Tensor] = {}
    bar = _Progress(progress, len(prompts))

    def run() -> None:
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[int(out.request_id.rsplit("-", 1)[1])] = out.pooled
            bar.show(len(done))

    for i, (ids, start, split) in enumerate(prompts):
        engine.add_request(f"features-{i}", ids, PoolingParams(layers, _pool, start, split))
        if i == 0:
            run()  # warm the shared prefix first
    run()
    bar.done()
    return torch.stack([done[i] for i in range(len(prompts))])


def _pool(spans: list[SpanStates]) -> list[torch.Tensor]:
    return [pool_parts(s) for s in spans]


class _Progress:
    """A one-line progress bar on stderr (nothing when `label` is None)."""

    def __init__(self, label: str | None, total: int) -> None:
        self.label, self.total, self.start = label, total, time.perf_counter()

    def show(self, n: int) -> None:
        if self.label is None:
            return
        width = 30
        filled = width * n // max(self.total, 1)
        rate = n / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{n}/{self.total} {rate:.1f}/s")
        sys.stderr.flush()

    def done(self) -> None:
        if self.label is not None:
            sys.stderr.write(f" {time.perf_counter() - self.start:.1f}s\n")
