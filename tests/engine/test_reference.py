"""Greedy tokens and logprobs match Hugging Face transformers on the same weights (fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_KINDS
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM
from reference import hf_greedy

PROMPTS = [
    "Hello world! How are",
    "The quick brown fox",
    '{"emotion":"happy","learn_score":',
    "Xin chào! Tớ buồn quá. Previous Question: 0123",
]
NEW_TOKENS = 32
LOGPROB_ATOL = 1e-3  # fp32 on both sides; differences come from op order only
TOP = 5


def assert_matches_reference(llm: LLM, hf_model, prompts, max_tokens: int = NEW_TOKENS) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=TOP)
    outs = llm.generate(prompts, params)
    for out in outs:
        ref_tokens, ref_logprobs = hf_greedy(hf_model, out.prompt_token_ids, max_tokens)
        assert out.token_ids == ref_tokens
        for step, (lp, ref) in enumerate(zip(out.logprobs, ref_logprobs)):
            assert math.isclose(lp.logprob, float(ref[lp.token_id]), abs_tol=LOGPROB_ATOL), step
            ref_top = ref.topk(TOP)
            assert [t for t, _ in lp.top] == ref_top.indices.tolist()
            got = torch.tensor([v for _, v in lp.top])
            torch.testing.assert_close(got, ref_top.values, atol=LOGPROB_ATOL, rtol=0)


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
