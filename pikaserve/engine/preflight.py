"""What can be checked of an EngineConfig before anything loads, so that a wrong model path
or an impossible setting stops `pikaserve serve` before it binds its port."""

from __future__ import annotations

from pathlib import Path

from pikaserve.config import ConfigError, EngineConfig
from pikaserve.engine.device import resolve_device, resolve_kv_cache_dtype
from pikaserve.model.checkpoint import ModelLoadError
from pikaserve.model.loader import resolve_model_path


def check_engine_config(config: EngineConfig) -> Path:
    """The model's path (resolved, cheap: nothing is read); ConfigError with the reason
    otherwise."""
    try:
        path = resolve_model_path(config.model)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from exc
    if config.quantization == "gguf" and path.suffix != ".gguf":
        raise ConfigError(f"--quantization gguf needs a .gguf model; {path} is not one")
    if config.kv_cache_dtype != "auto":  # fp8 needs a GPU that has it: say so now
        resolve_kv_cache_dtype(config.kv_cache_dtype, resolve_device(config.device))
    return path
