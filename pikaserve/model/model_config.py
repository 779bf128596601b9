"""The architecture facts the model code needs, read from a Hugging Face config dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pikaserve.model.checkpoint import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 family
    qk_norm: bool  # Qwen3 family

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = cfg.get("architectures") or model_type
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope_scaling = cfg.get("rope_scaling") or None
            rope_theta = float(cfg.get("rope_theta", 10000.0))
            if rope_scaling is None and isinstance(cfg.get("rope_parameters"), dict):
                # transformers >= 5 folds theta and scaling into rope_parameters
                params = dict(cfg["rope_parameters"])
                rope_theta = float(params.pop("rope_theta", rope_theta))
                if params.get("rope_type", "default") != "default":
                    rope_scaling = params
            if rope_scaling is not None:
                rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
                if rope_type not in SUPPORTED_ROPE_TYPES:
                    raise ModelLoadError(
                        f"unsupported rope_scaling type {rope_type!r}; supported: "
                        f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                    )
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"invalid model config: {exc!r}") from exc
