"""Grammar drafts (engine/constraint.py) change how many passes a request takes, never its tokens.

A tiny random model picks labels at random, so its drafts are often wrong: both the confirmed
and the rejected path run here, batched and alone, greedy and seeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from pikaserve.data import pika_answer_schema
from pikaserve.engine import drafts as drafts_mod
from pikaserve.engine.constraint import Draft
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.engine.sampling_params import StructuredOutputsParams as S
from pikaserve.llm import LLM
from pikaserve.structured import build_constraint

PIKA = S(json=pika_answer_schema())
SPECS = [
    PIKA,
    S(choice=["yes", "yes please", "no", "no thanks", "maybe"]),
    S(json={"type": "object", "properties": {
        "mood": {"enum": ["happy", "happy_2", "sad"]},
        "size": {"enum": ["small", "smaller", "big"]},
    }, "required": ["mood", "size"], "additionalProperties": False}),
]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 400) for _ in range(rng.randint(5, 40))] for _ in range(24)]


def params(i: int, temperature: float = 0.0) -> SamplingParams:
    seed = i if temperature else None
    return SamplingParams(max_tokens=40, temperature=temperature, seed=seed,
                          logprobs=2 if i % 2 else None, structured_outputs=SPECS[i % len(SPECS)])


def run(llm: LLM, prompts, params_list, drafts: bool, monkeypatch) -> tuple[list, int, list]:
    """Outputs, forward passes, and whether each draft computed was confirmed."""
    verdicts = []
    match = drafts_mod.DraftCheck.match

    def recording(check):
        first = check.matched == 0  # a grammar draft is confirmed whole in its first round
        m = match(check)
        if first:
            verdicts.append(m == len(check.rows.draft.token_ids))
        return m

    monkeypatch.setattr(drafts_mod.DraftCheck, "match", recording)
    monkeypatch.setattr(llm.engine.config, "structured_output_draft", drafts)
    before = llm.engine.num_forward_passes
    outs = llm.generate(prompts, params_list)
    assert llm.engine.pool_is_idle() and not llm.engine.has_unfinished_requests()
    results = [Result(o.token_ids, o.text, o.finish_reason,
                      [(lp.token_id, [t for t, _ in lp.top]) for lp in o.logprobs],
                      [lp.logprob for lp in o.logprobs]) for o in outs]
    return results, llm.engine.num_forward_passes - before, verdicts


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str
    sampled: list[tuple[int, list[int]]]  # each sampled token and its top alternatives
    # their logprobs: rows computed in differently shaped passes differ in the last bits
    logprobs: list[float] = field(compare=False)

    def same_as(self, other: Result) -> bool:
        return self == other and self.logprobs == pytest.approx(other.logprobs, abs=1e-4)


def all_same(a: list[Result], b: list[Result]) -> bool:
    return len(a) == len(b) and all(x.same_as(y) for x, y in zip(a, b))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_drafts_leave_outputs_unchanged_alone_and_batched(llm, prompts, temperature, monkeypatch):
    ps = [params(i, temperature) for i in range(len(prompts))]
    off, _, _ = run(llm, prompts, ps, False, monkeypatch)
    batched, _, verdicts = run(llm, prompts, ps, True, monkeypatch)
    assert all_same(batched, off)
    assert True in verdicts and False in verdicts  # both paths ran
    assert any(r.sampled for r in off)  # logprobs were asked for and came back
    alone_passes = 0
    for p, q, want in zip(prompts, ps, off):
        got, passes, _ = run(llm, [p], [q], True, monkeypatch)
        assert all_same(got, [want])
        alone_passes += passes
    assert alone_passes < sum(run(llm, [p], [q], False, monkeypatch)[1]
                              for p, q in zip(prompts, ps))


def test_max_tokens_inside_a_draft_cuts_the_same_way(llm, prompts, monkeypatch):
    for max_tokens in range(1, 16):
        ps = [SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=PIKA)]
        ps = ps * len(prompts)
        assert all_same(run(llm, prompts, ps, True, monkeypatch)[0],
                        run(llm, prompts, ps, False, monkeypatch)[0])


class WrongDrafts:
    """A matcher whose drafts never come true: tokens the grammar never allows, long enough to
    span KV blocks, at every free choice."""

    def __init__(self, inner, bogus: int) -> None:
        self.inner, self.bogus = inner, bogus

    def draft(self):
        return Draft([self.bogus] * 7, None) if not self.inner.is_finished else None

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_rejected_drafts_leave_no_trace_in_the_kv_cache(llm, prompts, monkeypatch):
    """The scratch KV of wrong drafts is overwritten and never published: later requests that
    reuse the same prefixes from the cache answer as before."""
    engine = llm.engine
    ps = [params(i) for i in range(len(prompts))]
    want, _, _ = run(llm, prompts, ps, False, monkeypatch)
    bogus = llm.tokenizer.encode("fox", add_special_tokens=False)[0]
    monkeypatch.setattr(engine.config, "structured_output_draft", True)
    for i, (p, q) in enumerate(zip(prompts, ps)):
        c = WrongDrafts(build_constraint(q.structured_outputs, llm.tokenizer), bogus)
        engine.add_request(f"wrong-{i}", p, q, c)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [got[f"wrong-{i}"] for i in range(len(prompts))] == [w.token_ids for w in want]
    assert engine.pool_is_idle()
    assert all_same(run(llm, prompts, ps, True, monkeypatch)[0], want)
