"""One engine replica: a whole pikaserve engine (its own KV cache and loop thread) as a Ray
Serve deployment. The HTTP server tokenizes and formats; a replica only generates."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from pikaserve.config import EngineConfig
from pikaserve.engine.async_engine import AsyncEngine
from pikaserve.engine.outputs import EngineStats, RequestOutput
from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.model.model_config import ModelConfig


@dataclass(frozen=True)
class ReplicaInfo:
    """What the HTTP server needs to know of the model the replicas serve."""

    model: str | None
    model_path: Path
    model_config: ModelConfig
    max_model_len: int
    tokenizer: Any


class EngineReplica:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = AsyncEngine(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(e.model, e.model_path, e.model_config, e.max_model_len, e.tokenizer)

    async def generate(self, request_id: str, token_ids: list[int],
                       params: SamplingParams | PoolingParams
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Streams the engine's outputs; when the caller goes away, Ray Serve cancels this
        generator and closing it aborts the request in the engine."""
        gen = self.engine.generate(request_id, token_ids, params)
        try:
            async for out in gen:
                yield out
        finally:
            await gen.aclose()

    def stats(self) -> tuple[str, EngineStats]:
        """(this replica's id, its stats), for the server's /metrics (a broadcast call)."""
        return self.replica_id, self.engine.stats()

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose engine loop stopped is replaced."""
        if not self.engine.is_alive:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
