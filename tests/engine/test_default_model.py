"""SmolLM2-135M-Instruct from the embedded GGUF: tokens match transformers, prefix reuse works."""

from __future__ import annotations

import pytest
import torch

from pikaserve.data import pika_messages, pika_seed_request, pika_turns
from pikaserve.engine.sampling_params import SamplingParams
from reference import hf_greedy

NEW_TOKENS = 32
LOGPROB_ATOL = 2e-3  # fp32 both sides; the 30-layer model accumulates a little more rounding


@pytest.mark.slow
def test_default_gguf_matches_transformers(default_llm_fp32, hf_default_model):
    llm = default_llm_fp32
    prompts = [
        pika_seed_request()["messages"],
        pika_messages(pika_turns()[7]),
        [{"role": "user", "content": "What is the capital of France?"}],
        "Once upon a time, in a small village,",
        "def fibonacci(n):",
    ]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    for out in outs:
        ref_tokens, ref_logprobs = hf_greedy(hf_default_model, out.prompt_token_ids, NEW_TOKENS)
        assert out.token_ids == ref_tokens
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        want = torch.stack([ref[t] for ref, t in zip(ref_logprobs, ref_tokens)])
        torch.testing.assert_close(got, want, atol=LOGPROB_ATOL, rtol=0)


def test_pika_follow_up_turn_reuses_the_conversation(default_llm_fp32):
    """A follow-up turn in the same conversation finds >= 400 prompt tokens in the cache."""
    llm = default_llm_fp32
    params = SamplingParams(max_tokens=16, temperature=0)
    first = pika_seed_request()["messages"]
    answer = llm.generate([first], params)[0]
    follow_up = first + [
        {"role": "assistant", "content": answer.text},
        {"role": "user", "content": "Previous Question: Apple?\nPrevious Answer: apple\n"
                                    "Response to check: Great job!"},
    ]
    second = llm.generate([follow_up], params)[0]
    assert second.num_cached_tokens >= 400
    assert llm.engine.pool_is_idle()


def test_pika_new_turn_reuses_every_full_block_of_the_system_prompt(default_llm_fp32):
    llm = default_llm_fp32
    params = SamplingParams(max_tokens=4, temperature=0)
    turns = pika_turns()
    ids = [llm.prompt_token_ids(pika_messages(t)) for t in turns[10:12]]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    block = llm.engine.config.block_size
    assert shared > 300  # the fixed system prompt and template
    assert llm.engine.pool.reset_prefix_cache()  # whatever earlier tests cached
    outs = llm.generate([pika_messages(turns[10])], params)
    outs = llm.generate([pika_messages(turns[11])], params)
    assert outs[0].num_cached_tokens == shared // block * block
