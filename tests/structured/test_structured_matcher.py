"""GrammarMatcher against a fake model: fast-forward never changes greedy output, answers are
valid, forced tokens are masked as the only choice, and failures end the answer cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pikaserve.engine.sampling_params import StructuredOutputsParams as S
from pikaserve.structured import build_constraint

from .walk import random_logits, same_greedy_output, walk

try:
    import jsonschema
except ImportError:  # not a project dependency; the JSON is still parsed
    jsonschema = None

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "where": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"pattern": "^[0-9]{3}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "nick": {"type": "string", "maxLength": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "tags", "where"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "emotion": {"enum": ["happy", "happy_2", "thats_right", "thats_right_2", "thinking"]},
        "n": {"enum": [1, 2, 10]},
        "flag": {"type": "boolean"},
    },
    "required": ["emotion", "n", "flag"],
    "additionalProperties": False,
}
SPECS = {
    "nested": S(json=NESTED),
    "enums": S(json=ENUMS),
    "json_object": S(json_object=True),
    "regex": S(regex=r"(cat|dog|bird)s? are (great|fine)!? [0-9]{2,4}"),
    "choice": S(choice=["positive", "negative", "neutral", "neutral-ish"]),
    "grammar": S(grammar='start: "The answer is " NUM "." \nNUM: /[0-9]+/'),
}
MAX_TOKENS = 80


@pytest.mark.parametrize("name", SPECS)
def test_fast_forward_on_and_off_give_identical_greedy_output(tiny_tokenizer, name):
    eos = set(tiny_tokenizer.eos_token_ids)
    vocab = len(tiny_tokenizer.hf)
    fewer_passes = 0
    for seed in range(8):
        logits = random_logits(vocab, seed)
        on, on_passes = walk(build_constraint(SPECS[name], tiny_tokenizer), True, logits, eos, MAX_TOKENS)
        off, off_passes = walk(build_constraint(SPECS[name], tiny_tokenizer), False, logits, eos, MAX_TOKENS)
        assert same_greedy_output(on, off, MAX_TOKENS), (tiny_tokenizer.decode(on), tiny_tokenizer.decode(off))
        fewer_passes += on_passes < off_passes
    assert fewer_passes > 0  # and fast-forward did skip passes


@pytest.mark.parametrize("name", ["nested", "enums"])
def test_finished_answers_are_valid_json(tiny_tokenizer, name):
    schema = SPECS[name].json
    eos = set(tiny_tokenizer.eos_token_ids)
    finished = 0
    for seed in range(8):
        c = build_constraint(SPECS[name], tiny_tokenizer)
        tokens, _ = walk(c, True, random_logits(len(tiny_tokenizer.hf), seed), eos, 400)
        if not c.is_finished:
            continue  # random logits can write long strings and numbers
        finished += 1
        value = json.loads(tiny_tokenizer.decode(tokens))
        if jsonschema is not None:
            jsonschema.validate(value, schema)
    assert finished >= 4


def test_forced_tokens_are_the_only_choice_in_the_mask(tiny_tokenizer):
    c = build_constraint(S(json=ENUMS), tiny_tokenizer)
    forced = c.forced_tokens()
    assert tiny_tokenizer.decode(forced) == '{"emotion":"'
    row = torch.zeros(len(tiny_tokenizer.hf))
    c.mask_logits(row)
    assert torch.isfinite(row).nonzero().flatten().tolist() == forced[:1]
    c.accept(forced)
    row = torch.zeros(len(tiny_tokenizer.hf) + 7)  # model rows past the vocabulary stay masked
    c.mask_logits(row)
    allowed = torch.isfinite(row).nonzero().flatten().tolist()
    assert len(allowed) > 1 and max(allowed) < len(tiny_tokenizer.hf)


def test_whole_answer_forced_then_finished(tiny_tokenizer):
    c = build_constraint(S(choice=["only answer"]), tiny_tokenizer)
    forced = c.forced_tokens()
    assert tiny_tokenizer.decode(forced) == "only answer"
    assert not c.is_finished
    c.accept(forced)
    assert c.is_finished and c.error is None


def test_rejected_token_ends_the_answer(tiny_tokenizer):
    c = build_constraint(S(regex="[0-9]+"), tiny_tokenizer)
    letter = tiny_tokenizer.encode("x", add_special_tokens=False)[0]
    c.accept([letter])
    assert c.is_finished and "not allowed" in c.error
    assert c.forced_tokens() == []
    row = torch.zeros(len(tiny_tokenizer.hf))
    c.mask_logits(row)  # only end-of-sequence is left
    assert torch.isfinite(row).nonzero().flatten().tolist() == sorted(tiny_tokenizer.eos_token_ids)


def test_accepting_a_token_other_than_the_forced_one_drops_the_plan(tiny_tokenizer):
    c = build_constraint(S(choice=["Hello world"]), tiny_tokenizer)
    plan = c.forced_tokens()
    chars = [tiny_tokenizer.encode(ch, add_special_tokens=False)[0] for ch in "Hello world"]
    assert plan != chars  # the plan is the canonical split; accept another one
    c.accept(chars[:1])
    assert not c.is_finished and c.error is None
    c.accept(chars[1:])
    assert c.is_finished and c.error is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy and torch paths
def test_masks_fit_model_rows_of_another_size(dtype):
    from pikaserve.structured.matcher import _keep_ids, _Mask

    row = torch.zeros(10, dtype=dtype)
    _Mask(ids=[1, 5, 399]).apply(row)  # the model's vocabulary is smaller than the tokenizer's
    assert torch.isfinite(row).nonzero().flatten().tolist() == [1, 5]
    forbidden = np.ones(8, dtype=bool)
    forbidden[3] = False
    row = torch.arange(12, dtype=dtype)
    _Mask(forbidden=forbidden).apply(row)  # ... or larger (padded rows)
    assert torch.isfinite(row).nonzero().flatten().tolist() == [3]
    assert row[3] == 3
    row = torch.arange(12, dtype=dtype)
    _keep_ids(row, [7])
    assert torch.isfinite(row).nonzero().flatten().tolist() == [7] and row[7] == 7
