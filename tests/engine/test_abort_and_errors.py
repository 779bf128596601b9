"""Aborts at every stage return the KV pool to free; bad input raises and the engine serves on."""

from __future__ import annotations

import pytest

from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.errors import InvalidRequestError
from pikaserve.llm import LLM

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    # A small token budget so a 40-token prompt takes several chunked steps.
    return LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=64,
               max_num_batched_tokens=16)


def prompt(n: int, start: int = 5) -> list[int]:
    return [start + (i % 300) for i in range(n)]


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.pool_is_idle()
    assert not engine.requests


@pytest.mark.parametrize("steps_before_abort", [0, 1, 2, 4, 6])
def test_abort_at_every_stage(llm, steps_before_abort):
    engine = llm.engine
    engine.add_request("a", prompt(40), GREEDY)  # 3 prefill chunks, then decodes
    engine.add_request("b", prompt(5, 100), GREEDY)
    for _ in range(steps_before_abort):
        engine.step()
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(llm)


def test_abort_unknown_and_finished_requests_is_harmless(llm):
    assert llm.engine.abort_request("nope") is None
    llm.generate([prompt(3)], GREEDY)
    assert llm.engine.abort_request("offline-0") is None
    assert_idle(llm)


def test_abort_everything_midway(llm):
    engine = llm.engine
    for i in range(10):
        engine.add_request(f"m{i}", prompt(10 + i, i), GREEDY)
    engine.step()
    engine.step()
    for i in range(10):
        engine.abort_request(f"m{i}")
    assert_idle(llm)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ([], SamplingParams()),  # empty prompt
        lambda: (prompt(64), SamplingParams()),  # prompt reaches max_model_len
        lambda: (prompt(60), SamplingParams(max_tokens=10)),  # max_tokens does not fit
        lambda: ([10**9], SamplingParams()),  # token id outside the vocabulary
    ],
    ids=["empty", "too-long", "max-tokens-too-big", "bad-token-id"],
)
def test_bad_prompts_raise_and_engine_keeps_serving(llm, make):
    tokens, params = make()
    with pytest.raises(InvalidRequestError):
        llm.engine.add_request("bad", tokens, params)
    assert_idle(llm)
    assert llm.generate([prompt(4)], GREEDY)[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(stop=5), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(logprobs=100), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_invalid_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
    assert str(err.value)


def test_structured_outputs_need_exactly_one_kind():
    with pytest.raises(InvalidRequestError):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError):
        StructuredOutputsParams(regex="a+", choice=["a"])


def test_duplicate_request_id_is_rejected(llm):
    llm.engine.add_request("dup", prompt(3), GREEDY)
    with pytest.raises(InvalidRequestError):
        llm.engine.add_request("dup", prompt(3), GREEDY)
    llm.engine.abort_request("dup")
    assert_idle(llm)
