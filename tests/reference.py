"""Hugging Face transformers as the correctness reference: plain greedy decoding, no tricks."""

from __future__ import annotations

import math
import random

import torch

from pikaserve.engine.sampling_params import SamplingParams


def hf_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of every step, EOS treated as an ordinary token."""
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    with torch.no_grad():
        device = model.device
        out = model(torch.tensor([prompt_ids], device=device), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1].float()
            logprobs.append(torch.log_softmax(logits, -1).cpu())
            tokens.append(int(logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]], device=device),
                        past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


PROMPTS = [
    "Hello world! How are",
    "The quick brown fox",
    '{"emotion":"happy","learn_score":',
    "Xin chào! Tớ buồn quá. Previous Question: 0123",
]
NEW_TOKENS = 32
LOGPROB_ATOL = 1e-3  # fp32 on both sides; differences come from op order only
TOP = 5


def assert_matches_reference(llm, hf_model, prompts, max_tokens: int = NEW_TOKENS) -> None:
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


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts sharing a few prefixes (so the prefix cache has work) with unique tails."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(k)] for k in (37, 50, 20)]
    return [
        rng.choice(prefixes) + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        for _ in range(n)
    ]
