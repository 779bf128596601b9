"""What the HTTP server needs of an engine: the in-process AsyncEngine (async_engine.py) and
the replicas of a cluster behind one handle (cluster/client.py) both provide it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, Protocol

from pikaserve.engine.outputs import EngineStats, RequestOutput
from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.model.model_config import ModelConfig


class EngineClient(Protocol):
    model: str | None  # as configured (None: the embedded default)
    tokenizer: Any
    model_path: Path
    model_config: ModelConfig
    max_model_len: int

    def generate(self, request_id: str, token_ids: Sequence[int],
                 params: SamplingParams | PoolingParams
                 ) -> AsyncGenerator[RequestOutput, None]:
        """One RequestOutput per step that produced something; stopping early aborts."""
        ...

    def stats(self) -> EngineStats:
        """Gauges and counters, summed over replicas."""
        ...

    def replica_stats(self) -> dict[str, EngineStats]:
        """Each replica's own, by replica id; empty for a single in-process engine."""
        ...

    def replicas_ready(self) -> tuple[int, int] | None:
        """(replicas ready, replicas wanted); None for a single in-process engine."""
        ...

    def end_all(self, reason: str) -> None:
        ...

    def shutdown(self) -> None:
        ...
