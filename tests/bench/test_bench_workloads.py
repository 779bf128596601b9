"""Workloads (pika, random, prefix-repetition, JSONL file) and answer validity, without a server."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pikaserve.bench import validity
from pikaserve.data import PIKA
from pikaserve.bench.workloads import (
    PIKA_TURN_FILES,
    BenchRequest,
    file_workload,
    fit_text,
    pika_workload,
    prefix_repetition_workload,
    random_workload,
)



def fake_count(text: str) -> int:
    """A stand-in tokenizer: words of up to 4 letters are one token, longer ones two."""
    return sum(1 if len(w) <= 4 else 2 for w in text.split())


def test_pika_requests_match_the_seed_request() -> None:
    seed = json.loads((PIKA / "seed_request.json").read_text(encoding="utf-8"))
    first_turn = json.loads((PIKA / "turns.jsonl").read_text(encoding="utf-8").splitlines()[0])
    w = pika_workload(PIKA, schema_form="none", warmup=3)
    n = sum(len((PIKA / f).read_text(encoding="utf-8").splitlines()) for f in PIKA_TURN_FILES)
    assert len(w.requests) == n > 600 and len(w.warmup) == 3
    assert w.warmup[0] is w.requests[-1]  # warm-up turns come from the end: none is measured
    body = w.request(n).body("chat", "m")  # indices wrap around
    assert body["messages"][0] == seed["messages"][0]  # the system prompt, verbatim
    expected = "Previous Question: Tớ buồn quá.\nPrevious Answer: i think a yummy\nResponse to check: " + first_turn["response_to_check"]
    assert body["messages"][1]["content"] == expected
    assert (body["temperature"], body["max_tokens"], body["stream"]) == (0.0, 50, True)
    assert body["stream_options"] == {"include_usage": True} and "response_format" not in body
    with_schema = pika_workload(PIKA).request(0).body("chat", "m")
    assert with_schema["response_format"]["type"] == "json_schema"
    assert with_schema["response_format"]["json_schema"]["schema"]["required"] == ["emotion", "learn_score"]
    llama_form = pika_workload(PIKA, schema_form="json_object").request(0).body("chat", "m")["response_format"]
    assert llama_form["type"] == "json_object" and llama_form["schema"]["required"] == ["emotion", "learn_score"]


@pytest.mark.parametrize("use_jsonschema", [True, False])
def test_pika_answers_are_checked_against_the_schema(use_jsonschema: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_jsonschema:  # the built-in checker must agree with jsonschema on these answers
        monkeypatch.setitem(__import__("sys").modules, "jsonschema", None)
    check = pika_workload(PIKA).requests[0].checker
    assert check is not None
    good = ['{"emotion":"thats_right","learn_score":true}', ' {"learn_score": false, "emotion": "happy_2"}\n']
    bad = [
        '{"emotion":"joyful","learn_score":true}',  # not one of the 23 labels
        '{"emotion":"happy"}',  # learn_score missing
        '{"emotion":"happy","learn_score":1}',  # not a boolean
        '{"emotion":"happy","learn_score":true,"why":"x"}',  # additionalProperties: false
        '```json\n{"emotion":"happy","learn_score":true}\n```',  # not bare JSON
        '{"emotion":"happy","learn_score":tr',  # cut off at max_tokens
        "Previous Question: Tớ buồn quá.",  # the echo the seed report saw
    ]
    assert all(validity.is_valid_answer(a, check) for a in good)
    assert not any(validity.is_valid_answer(a, check) for a in bad)


def test_builtin_checker_keywords() -> None:
    schema = {"type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "x"}]}, "maxItems": 3}
    assert validity._matches([0, 9, "x"], schema)
    assert not validity._matches([0, 9, "x", 1], schema)
    assert not validity._matches([10], schema) and not validity._matches([True], schema) and not validity._matches(["y"], schema)
    assert validity._matches(1.0, {"enum": [1]}) and not validity._matches(True, {"enum": [1]}) and not validity._matches(1, {"const": True})
    assert validity._matches("abc", {"type": "string", "minLength": 3, "maxLength": 3}) and not validity._matches("ab", {"minLength": 3})


def test_fit_text_hits_the_token_count_exactly() -> None:
    rng = random.Random(0)
    calls: list[int] = []

    def count(text: str) -> int:
        calls.append(1)
        return fake_count(text)

    for target in (1, 2, 7, 64, 300):
        assert fake_count(fit_text(rng, target, count)) == target
    assert len(calls) < 5 * 20  # a handful of /tokenize calls per prompt, not a search over every length
    assert len(fit_text(rng, 50, None).split()) == 50  # without a tokenizer: one word per token


def test_random_workload_lengths_and_uniqueness() -> None:
    w = random_workload(20, input_len=32, output_len=8, range_ratio=0.5, seed=1, count=fake_count, warmup=2)
    assert len(w.requests) == 20 and len(w.warmup) == 2 and w.tokens_exact
    assert all(16 <= fake_count(r.prompt or "") <= 48 and 4 <= (r.max_tokens or 0) <= 12 for r in w.requests)
    assert len({r.prompt for r in w.requests + w.warmup}) == 22
    assert all(r.extra == {"ignore_eos": True} for r in w.requests)
    again = random_workload(20, input_len=32, output_len=8, range_ratio=0.5, seed=1, count=fake_count, warmup=2)
    assert again.requests == w.requests  # seeded
    fixed = random_workload(5, input_len=10, output_len=3, count=fake_count, ignore_eos=False)
    assert {fake_count(r.prompt or "") for r in fixed.requests} == {10} and fixed.requests[0].extra == {}
    with pytest.raises(ValueError):
        random_workload(5, input_len=0, output_len=3)


def test_prefix_repetition_shares_prefixes() -> None:
    w = prefix_repetition_workload(12, num_prefixes=3, prefix_len=20, suffix_len=5, output_len=4, seed=2, count=fake_count)
    prompts = [(r.prompt or "").split() for r in w.requests]

    def shared(a: list[str], b: list[str]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # Each prompt's longest word-prefix shared with another prompt is its prefix: 3 of them, 4 uses each.
    heads = [" ".join(p[: max(shared(p, q) for q in prompts if q is not p)]) for p in prompts]
    assert sorted(heads.count(h) for h in set(heads)) == [4, 4, 4]
    assert all(fake_count(h) == 20 for h in heads)
    assert all(fake_count(" ".join(p)) == 25 for p in prompts) and len({" ".join(p) for p in prompts}) == 12


def test_request_bodies_for_both_endpoints() -> None:
    r = BenchRequest(prompt="hi", max_tokens=3, extra={"ignore_eos": True})
    assert r.body("completions", "m") == {"model": "m", "ignore_eos": True, "prompt": "hi", "max_tokens": 3, "stream": True,
                                         "stream_options": {"include_usage": True}}  # fmt: skip
    assert r.body("chat", "m")["messages"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError):
        BenchRequest(messages=({"role": "user", "content": "x"},)).body("completions", "m")


def test_file_workload(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    lines = [
        {"model": "ignored", "stream": False, "messages": [{"role": "user", "content": "q"}], "max_tokens": 5, "top_p": 0.5,
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        {"prompt": "p", "temperature": 0.7, "response_format": {"type": "json_object"}},
        {"prompt": "plain"},
    ]  # fmt: skip
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    w = file_workload(path, warmup=1)
    body = w.requests[0].body("chat", "real")
    assert body["model"] == "real" and body["stream"] is True and body["top_p"] == 0.5 and body["max_tokens"] == 5
    assert w.requests[0].checker is not None and w.requests[0].checker({"a": 1}) and not w.requests[0].checker({"b": 1})
    assert w.requests[1].checker is not None and w.requests[1].checker([1]) and w.requests[1].body("completions", "m")["temperature"] == 0.7
    assert w.requests[2].checker is None and len(w.warmup) == 1
    path.write_text('{"prompt": "ok"}\n{"nothing": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2:"):
        file_workload(path)
