"""Sampler: greedy, temperature, top-k/top-p/min-p, seeds, penalties, logprobs (unit level)."""

from __future__ import annotations

import torch

from pikaserve.engine.request import Request
from pikaserve.engine.sampler import Sampler
from pikaserve.engine.sampling_params import SamplingParams

VOCAB = 8


def req(output=(), prompt=(1,), **kw) -> Request:
    r = Request("r", list(prompt), SamplingParams(**kw), detokenizer=None, eos_token_ids=frozenset())
    r.append_tokens(list(output))
    return r


def draw(logits: torch.Tensor, n: int = 400, **kw) -> torch.Tensor:
    sampler = Sampler(VOCAB)
    rows = logits.expand(n, -1).clone()
    return torch.tensor(sampler(rows, [req(**kw) for _ in range(n)]).token_ids)


LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]]) + 1e-9)


def test_greedy_takes_argmax_per_row():
    logits = torch.randn(5, VOCAB)
    out = Sampler(VOCAB)(logits, [req(temperature=0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_min_p_restrict_support():
    assert set(draw(LOGITS, top_k=2).tolist()) <= {0, 1}
    # mass before token 2 is 0.7 >= 0.7: tokens 0 and 1 only
    assert set(draw(LOGITS, top_p=0.7).tolist()) <= {0, 1}
    assert set(draw(LOGITS, top_p=0.71).tolist()) <= {0, 1, 2}
    # min_p 0.5: keep p >= 0.2
    assert set(draw(LOGITS, min_p=0.5).tolist()) <= {0, 1}
    assert set(draw(LOGITS).tolist()) == {0, 1, 2, 3, 4}


def test_sampling_follows_the_distribution():
    tokens = draw(LOGITS, n=4000)
    freq = torch.bincount(tokens, minlength=VOCAB).float() / len(tokens)
    torch.testing.assert_close(freq[:5], torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]), atol=0.04, rtol=0)


def test_low_temperature_concentrates():
    tokens = draw(LOGITS, temperature=0.05)
    assert (tokens == 0).float().mean() > 0.95


def test_seeded_rows_are_reproducible_and_independent_of_batch():
    sampler = Sampler(VOCAB)
    logits = torch.zeros(3, VOCAB)
    a = [sampler(logits[:1], [req(seed=7)]).token_ids[0] for _ in range(1)]
    r1 = [req(seed=7), req(), req(seed=9)]
    first = [sampler(logits, r1).token_ids for _ in range(6)]
    r2 = [req(seed=7), req(), req(seed=9)]
    second = [sampler(logits, r2).token_ids for _ in range(6)]
    assert [row[0] for row in first] == [row[0] for row in second]
    assert [row[2] for row in first] == [row[2] for row in second]
    assert first[0][0] == a[0]


def test_penalties():
    sampler = Sampler(VOCAB)
    logits = torch.tensor([[2.0, 1.9, 0, 0, 0, 0, 0, 0]])
    assert sampler(logits.clone(), [req(temperature=0)]).token_ids == [0]
    # token 0 generated twice: frequency penalty pushes it below token 1
    r = req(output=[0, 0], temperature=0, frequency_penalty=0.1)
    assert sampler(logits.clone(), [r]).token_ids == [1]
    r = req(output=[0], temperature=0, presence_penalty=0.2)
    assert sampler(logits.clone(), [r]).token_ids == [1]
    r = req(prompt=[0], temperature=0, repetition_penalty=1.1)
    assert sampler(logits.clone(), [r]).token_ids == [1]


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    sampler = Sampler(VOCAB)
    logits = torch.randn(2, VOCAB)
    out = sampler(logits, [req(temperature=0, logprobs=3), req(temperature=0)])
    ref = torch.log_softmax(logits[0], -1)
    chosen, top = out.logprobs[0]
    assert abs(chosen - float(ref.max())) < 1e-6
    assert [t for t, _ in top] == ref.topk(3).indices.tolist()
    assert out.logprobs[1] is None


def test_huge_top_k_means_off():
    assert set(draw(LOGITS, top_k=2**80).tolist()) == {0, 1, 2, 3, 4}


def test_engine_seed_makes_unseeded_sampling_reproducible():
    logits = torch.zeros(4, VOCAB)
    draws = [Sampler(VOCAB, seed=3)(logits, [req() for _ in range(4)]).token_ids for _ in range(2)]
    assert draws[0] == draws[1]
    other = [Sampler(VOCAB, seed=s)(torch.zeros(64, VOCAB), [req() for _ in range(64)]).token_ids
             for s in (3, 4)]
    assert other[0] != other[1]


def test_batched_grammar_masks_equal_per_row_masks(tiny_model_dir):
    """The device path (one packed bitmask for all rows) forbids exactly what masking each
    row in place does: short allowed lists, large bitmaps, forced tokens, free rows."""
    from pikaserve.engine.sampler import apply_constraints
    from pikaserve.engine.sampling_params import StructuredOutputsParams
    from pikaserve.llm import LLM
    from pikaserve.structured.compiler import build_constraint

    tokenizer = LLM(str(tiny_model_dir("llama")), dtype="float32").engine.tokenizer
    specs = [
        StructuredOutputsParams(json={"type": "object", "properties": {
            "emotion": {"enum": ["happy", "sad"]}}, "required": ["emotion"]}),
        StructuredOutputsParams(regex="[a-z ]+"),  # most tokens allowed: a bitmap
        None,
        StructuredOutputsParams(choice=["yes", "no"]),
        StructuredOutputsParams(json={"type": "object"}),  # forced tokens left pending
    ]
    requests = []
    for n, spec in enumerate(specs):
        constraint = None if spec is None else build_constraint(spec, tokenizer)
        if constraint is not None and n < 4:
            constraint.accept(constraint.forced_tokens())
        requests.append(Request("r", [1], SamplingParams(), None, frozenset(), constraint))
    logits = torch.randn(len(requests), 420)  # a model vocabulary past the tokenizer's
    per_row, batched = logits.clone(), logits.clone()
    apply_constraints(per_row, requests, batched=False)
    apply_constraints(batched, requests, batched=True)
    assert torch.equal(per_row, batched)
    assert torch.isinf(per_row).any(dim=1).tolist() == [True, True, False, True, True]


def test_values_that_underflow_float32_still_sample_sanely():
    """temperature or top_p far below float32's range, and extreme repetition penalties, give
    real tokens (not NaN rows that pick token 0)."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.5, 0.1, 0.2, 0.3]])
    assert draw(logits, n=20, temperature=1e-300).tolist() == [1] * 20  # greedy
    assert draw(logits, n=20, top_p=1e-300).tolist() == [1] * 20  # only the top token
    for penalty in (1e-300, 1e300):
        r = req(output=[1, 3], repetition_penalty=penalty)
        tokens = Sampler(VOCAB)(logits.clone(), [r]).token_ids
        assert 0 <= tokens[0] < VOCAB and tokens[0] != 0


def test_logprobs_of_forbidden_tokens_are_finite():
    """A grammar allowing fewer tokens than logprobs asks for: the others are -9999.0 (vLLM's
    convention), never -inf, so every answer is valid JSON."""
    import math

    logits = torch.full((1, VOCAB), float("-inf"))
    logits[0, 2] = 1.0  # what a grammar mask leaves
    out = Sampler(VOCAB)(logits, [req(temperature=0, logprobs=3)])
    chosen, top = out.logprobs[0]
    assert out.token_ids == [2] and chosen == 0.0
    assert all(math.isfinite(v) for _, v in top) and top[1][1] == -9999.0
