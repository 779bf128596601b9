"""Greedy tokens and logprobs match Hugging Face transformers on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_KINDS
from pikaserve.llm import LLM
from reference import PROMPTS, assert_matches_reference


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_models_match_transformers(kind, tiny_model_dir):
    import transformers

    path = tiny_model_dir(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32")
    assert_matches_reference(llm, hf, PROMPTS)


def test_chat_template_matches_transformers(tiny_model_dir):
    import transformers

    path = tiny_model_dir("llama")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    llm = LLM(str(path), dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert llm.prompt_token_ids(messages) == list(expected)
