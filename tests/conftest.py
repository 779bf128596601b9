"""Shared fixtures: tiny random models (made once per session) and the default model path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py for every test package

from tiny_models import make_tiny_model
from triton_interpreter import interpret_without_cuda

interpret_without_cuda()  # before any kernel module is imported

TINY_KINDS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> "callable":
    """tiny_model_dir(kind) -> folder with a random HF checkpoint of that kind (cached)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny_{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from pikaserve.model.loader import default_model_path as path

    return path()


@pytest.fixture(scope="session")
def hf_default_model(default_model_path):
    """transformers' own load of the default GGUF (dequantized to fp32; ~20 s, so cached)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def default_llm_fp32():
    from pikaserve.llm import LLM

    return LLM(None, dtype="float32")
