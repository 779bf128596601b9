"""Fixtures for structured-output tests: the tiny test tokenizer, wrapped as the engine's."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from pikaserve.model.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    return Tokenizer(hf, {hf.eos_token_id})
