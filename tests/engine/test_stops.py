"""Stop strings, stop token ids, EOS, ignore_eos and max_tokens, end to end on a tiny model."""

from __future__ import annotations

import pytest

from pikaserve.engine.detokenizer import IncrementalDetokenizer
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM


class CharTokenizer:
    """Token i decodes to chr(i); enough to test windowing and stop-string holdback."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stop_string_split_across_tokens_is_cut_and_never_leaked():
    d = IncrementalDetokenizer(CharTokenizer(), [ord("x")], stop=["END"])
    emitted = ""
    for ch in "hello EN":
        assert d.add_tokens([ord(ch)]) is None
        emitted += d.take_delta(finished=False)
    assert emitted == "hello "  # "EN" held back: it may start the stop string
    assert d.add_tokens([ord("D")]) == "END"
    emitted += d.take_delta(finished=True)
    assert emitted == "hello "


def test_include_stop_string():
    d = IncrementalDetokenizer(CharTokenizer(), [], stop=["!"], include_stop_str_in_output=True)
    d.add_tokens([ord(c) for c in "hi!"])
    assert d.take_delta(finished=True) == "hi!"


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32")


@pytest.fixture(scope="module")
def free_run(llm):
    """A greedy run long enough to pick stop conditions from."""
    return llm.generate(["Hello world"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]


def test_max_tokens_gives_length(free_run):
    assert len(free_run.token_ids) == 24 and free_run.finish_reason == "length"


def test_stop_token_id_ends_with_stop(llm, free_run):
    target = free_run.token_ids[5]
    out = llm.generate(["Hello world"], SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free_run.token_ids[: free_run.token_ids.index(target) + 1]


def test_stop_string_is_excluded_from_text(llm, free_run):
    text = free_run.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip() or "\ufffd" in stop:
        pytest.skip("the tiny model's output has no usable stop substring")
    out = llm.generate(["Hello world"], SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_eos_stops_unless_ignored(llm, free_run, monkeypatch):
    eos = free_run.token_ids[3]  # pretend a token the model emits early is end-of-sequence
    monkeypatch.setattr(llm.engine.tokenizer, "eos_token_ids", frozenset({eos}))
    out = llm.generate(["Hello world"], SamplingParams(max_tokens=24, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert out.token_ids == free_run.token_ids[: free_run.token_ids.index(eos) + 1]
    out = llm.generate(["Hello world"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == free_run.token_ids and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    a = llm.generate(["Hello world"], p)[0].token_ids
    b = llm.generate(["Hello world", "The quick"], [p, SamplingParams(max_tokens=4)])[0].token_ids
    assert a == b
