"""What a head can answer, how a request's schema finds its head, and `--head` specs."""

from __future__ import annotations

import json

import pytest

from pikaserve.config import ConfigError
from pikaserve.heads.schema import HeadSchemaError, render_answer, schema_fields
from pikaserve.heads.served import BUILTIN_HEADS, ServedHeads, parse_head_specs

from .conftest import SCHEMA


def test_fields_and_answer_rendering():
    fields = schema_fields(SCHEMA)
    assert [(f.name, f.labels) for f in fields] == [("colour", ("red", "green", "blue")),
                                                    ("loud", (False, True))]
    assert render_answer(fields, [2, 1]) == '{"colour":"blue","loud":true}'


@pytest.mark.parametrize("schema, match", [
    ({"type": "array"}, "object schema"),
    ({"type": "object", "properties": {}}, "no properties"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
      "additionalProperties": False}, "only enum and boolean"),
    ({"type": "object", "properties": {"a": {"enum": ["x", "x"]}}, "required": ["a"],
      "additionalProperties": False}, "two or more distinct"),
])
def test_schemas_a_head_cannot_answer(schema, match):
    with pytest.raises(HeadSchemaError, match=match):
        schema_fields(schema)


def test_a_request_schema_finds_its_head_canonically(head_files):
    _, _, out = head_files
    heads = ServedHeads.load([f"colours={out}"])
    reordered = {"additionalProperties": False, "required": ["colour", "loud"], "type": "object",
                 "properties": {"loud": {"type": "boolean"},
                                "colour": {"enum": ["red", "green", "blue"], "type": "string"}}}
    assert heads.for_schema(reordered) == "colours"
    assert heads.for_schema(json.dumps(SCHEMA, indent=4)) == "colours"
    assert heads.for_schema({**SCHEMA, "title": "other"}) is None
    assert heads.for_schema("not json") is None


@pytest.mark.parametrize("specs, match", [
    (["nosuch"], "not a built-in head"),
    (["a=x", "a=y"], "given twice"),
    (["bad name=x"], "a head name is"),
    (["=x"], "a head name is"),
])
def test_bad_head_specs(specs, match):
    with pytest.raises(ConfigError, match=match):
        parse_head_specs(specs)


def test_builtin_and_missing_heads():
    assert parse_head_specs(["pika", "x=~/h"])["pika"] == BUILTIN_HEADS["pika"]
    with pytest.raises(ConfigError, match="missing head.json"):
        ServedHeads.load(["x=/nonexistent/head"])
