"""Request bodies -> SamplingParams and structured-output constraints (no server needed)."""

from __future__ import annotations

import json

import pytest

from pikaserve.config import ConfigError
from pikaserve.errors import InvalidRequestError
from pikaserve.server.protocol import ChatCompletionRequest, CompletionRequest
from pikaserve.server.sampling import (
    chat_messages,
    load_default_response_format,
    sampling_params,
)

MSGS = [{"role": "user", "content": "Hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps({"messages": MSGS, **kw}))


def so_of(req, default=None):
    return sampling_params(req, default)[0].structured_outputs


@pytest.mark.parametrize("body,expect", [
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}}, {"json": SCHEMA}),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     {"json": SCHEMA}),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]}),
    ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
    ({"structured_outputs": {"json": SCHEMA}}, {"json": SCHEMA}),
    ({"structured_outputs": {"grammar": "start: 'a'"}}, {"grammar": "start: 'a'"}),
    ({"guided_choice": ["x"]}, {"choice": ["x"]}),
    ({"guided_regex": "a+"}, {"regex": "a+"}),
    ({"guided_json": SCHEMA}, {"json": SCHEMA}),
    ({"guided_grammar": "start: 'b'"}, {"grammar": "start: 'b'"}),
])
def test_every_spelling_maps_to_one_constraint(body, expect):
    so = so_of(chat(**body))
    for key, value in expect.items():
        assert getattr(so, key) == value


def test_default_response_format_only_when_none_given(tmp_path):
    bare = tmp_path / "schema.json"
    bare.write_text(json.dumps(SCHEMA))
    wrapped = tmp_path / "rf.json"
    wrapped.write_text(json.dumps({"type": "json_schema",
                                   "json_schema": {"name": "a", "schema": SCHEMA}}))
    for path in (bare, wrapped):
        default = load_default_response_format(str(path))
        assert so_of(chat(), default).json == SCHEMA
        assert so_of(chat(response_format={"type": "text"}), default) is None
        assert so_of(chat(guided_choice=["x"]), default).choice == ["x"]
    assert so_of(chat()) is None


@pytest.mark.parametrize("text", ["not json", "[1, 2]",
                                  '{"type": "json_schema", "json_schema": {}}'])
def test_bad_default_response_format_fails_at_start_up(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="default-response-format"):
        load_default_response_format(str(path))


def test_n_fans_out_with_seed_plus_i():
    params = sampling_params(chat(n=3, seed=7, temperature=0.8))
    assert [p.seed for p in params] == [7, 8, 9]
    assert all(p.temperature == 0.8 for p in params)
    assert [p.seed for p in sampling_params(chat(n=2, seed=2**64 - 1))] == [2**64 - 1, 0]
    assert [p.seed for p in sampling_params(chat(n=2))] == [None, None]
    so = sampling_params(chat(n=2, guided_choice=["a"]))
    assert so[0].structured_outputs is not so[1].structured_outputs  # one matcher each


def test_field_mapping():
    (p,) = sampling_params(chat(max_tokens=5, max_completion_tokens=9, stop="END", top_k=4,
                                min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25,
                                repetition_penalty=1.1, ignore_eos=True, logprobs=True,
                                top_logprobs=2))
    assert (p.max_tokens, p.stop, p.top_k, p.min_p) == (9, ["END"], 4, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, 0.25, 1.1)
    assert p.ignore_eos and p.logprobs == 2
    assert sampling_params(chat())[0].max_tokens is None  # chat: up to the context length
    assert sampling_params(chat(logprobs=True))[0].logprobs == 0
    comp = CompletionRequest.model_validate_json('{"prompt": "x", "logprobs": 3}')
    (p,) = sampling_params(comp)
    assert p.max_tokens == 16 and p.logprobs == 3  # OpenAI's completions default


def test_content_parts_and_roles():
    req = chat(messages=[{"role": "developer", "content": "be brief"}, {"role": "user",
               "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert chat_messages(req.messages) == [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "a\nb"}]
    with pytest.raises(InvalidRequestError):
        chat_messages(chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]).messages)
