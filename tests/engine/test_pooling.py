"""Pooling (prefill-only) requests: the states they return do not depend on how they were
scheduled, they reuse only the prefix before their span, and they leave the greedy outputs
of the requests batched with them unchanged."""

from __future__ import annotations

import random

import pytest
import torch

from pikaserve.engine.llm_engine import LLMEngine
from pikaserve.engine.pooling_params import PoolingParams, SpanStates
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.errors import InvalidRequestError
from pikaserve.llm import LLM

from test_scheduling_equivalence import make_prompts

LAYERS = (0, 2, 3)  # 3 = the top layer of the tiny model: full depth
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def pool_all(engine: LLMEngine, prompts, spans, layers=LAYERS) -> dict[int, torch.Tensor]:
    for i, (p, s) in enumerate(zip(prompts, spans)):
        engine.add_request(f"p-{i}", p, PoolingParams(layers, span_start=s))
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id.startswith("p-"):
                assert o.finished and o.new_token_ids == [] and o.finish_reason == "stop"
                out[int(o.request_id[2:])] = o.pooled.states
    return out


def test_states_do_not_depend_on_scheduling(model_dir):
    prompts = make_prompts(12, 400, seed=3)
    spans = [None if i % 3 == 0 else len(p) - 1 - i % 7 for i, p in enumerate(prompts)]
    alone = LLM(model_dir, dtype="float32", enable_prefix_caching=False).engine
    want = {i: pool_all(alone, [p], [s])[0] for i, (p, s) in enumerate(zip(prompts, spans))}
    for args in (dict(), dict(max_num_batched_tokens=7), dict(block_size=1)):
        engine = LLM(model_dir, dtype="float32", **args).engine
        got = pool_all(engine, prompts, spans)
        for i, (p, s) in enumerate(zip(prompts, spans)):
            rows = 1 if s is None else len(p) - s
            assert got[i].shape == (rows, len(LAYERS), 64)
            torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-4)
        assert engine.pool_is_idle()


def test_span_is_never_served_from_the_prefix_cache(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=1)
    prompt = make_prompts(1, 400, seed=5)[0]
    pool_all(llm.engine, [prompt], [None])  # the whole prompt is now cached
    llm.engine.add_request("again", prompt, PoolingParams(LAYERS, span_start=10))
    while llm.engine.has_unfinished_requests():
        for o in llm.engine.step():
            assert o.num_cached_tokens == 10 and o.pooled.states.shape[0] == len(prompt) - 10


def test_pooling_beside_generation_leaves_greedy_outputs_unchanged(model_dir):
    prompts = make_prompts(10, 400, seed=7)
    llm = LLM(model_dir, dtype="float32")
    want = [c.token_ids for c in llm.generate(prompts, PARAMS)]
    llm = LLM(model_dir, dtype="float32", max_num_batched_tokens=64)
    for i, p in enumerate(prompts):
        llm.engine.add_request(f"pool-{i}", p[::-1], PoolingParams(LAYERS, span_start=0))
    got = [c.token_ids for c in llm.generate(prompts, PARAMS)]
    assert got == want
    assert llm.engine.pool_is_idle()


def test_transform_runs_once_per_step_for_all_its_requests(model_dir):
    calls = []

    def norms(spans: list[SpanStates]) -> list[float]:
        calls.append(len(spans))
        return [float(s.states.norm()) for s in spans]

    engine = LLM(model_dir, dtype="float32").engine
    for i, p in enumerate(make_prompts(5, 400, seed=9)):
        engine.add_request(f"n-{i}", p, PoolingParams((3,), norms))
    outs = [o for _ in range(3) for o in engine.step()]
    assert calls == [5] and all(isinstance(o.pooled, float) for o in outs)


@pytest.mark.parametrize("params, match", [
    (PoolingParams(()), "at least one layer"),
    (PoolingParams((4,)), r"layers must be in \[0, 3\]"),
    (PoolingParams((1,), span_start=99), "span_start"),
    (PoolingParams((1,), span_start=1, span_split=0), "span_split"),
])
def test_bad_pooling_params_are_refused(model_dir, params, match):
    engine = LLM(model_dir, dtype="float32").engine
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", [5, 6, 7], params)
    assert not engine.has_unfinished_requests()


def test_split_comes_back_relative_to_the_span(model_dir):
    engine = LLM(model_dir, dtype="float32").engine
    engine.add_request("s", list(range(5, 25)), PoolingParams(LAYERS, span_start=5, span_split=8))
    out = [o for _ in range(2) for o in engine.step()]
    assert out[0].pooled.split == 3 and out[0].pooled.states.shape[0] == 15


def test_steps_of_requests_reading_low_layers_run_only_those(model_dir):
    """A head reading layers <= 2 of 3 skips the top layer once its shared prefix is cached;
    the states are the full-depth ones, and nothing computed shallow reaches the prefix
    cache: a generation over the same prompt afterwards is the same as on a fresh engine."""
    rng = random.Random(11)
    prefix = [rng.randrange(3, 400) for _ in range(30)]
    prompts = [prefix + [rng.randrange(3, 400) for _ in range(12)] for _ in range(6)]
    spans = [len(prefix)] * len(prompts)
    full = LLM(model_dir, dtype="float32", block_size=1).engine
    full.add_request("gen", [7, 8, 9], PARAMS)  # a sampling request keeps every step full depth
    want = pool_all(full, prompts, spans, (1, 2))

    llm = LLM(model_dir, dtype="float32", block_size=1)
    depths = []
    schedule = llm.engine.scheduler.schedule
    llm.engine.scheduler.schedule = lambda: (out := schedule(), depths.append(out.depth))[0]
    got = {}
    for i, (p, s) in enumerate(zip(prompts, spans)):
        got |= {i: pool_all(llm.engine, [p], [s], (1, 2))[0]}
    assert depths and all(d == 2 for d in depths[1:])  # the first also computes the prefix
    for i in want:
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-4)
    alone = LLM(model_dir, dtype="float32").generate(prompts, PARAMS)
    again = llm.generate(prompts, PARAMS)
    assert [c.token_ids for c in again] == [c.token_ids for c in alone]
    # the first ran full depth and published its whole prompt; the shallow ones only the prefix
    assert again[0].num_cached_tokens > spans[0]
    assert all(c.num_cached_tokens == s for c, s in zip(again[1:], spans[1:]))
