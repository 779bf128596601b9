"""Is an answer valid? JSON that parses and matches the request's JSON Schema.

Uses the `jsonschema` package when it is installed (full Draft 2020-12). Otherwise a small
built-in checker covers the keywords structured-output answers use (type, enum, const,
properties, required, additionalProperties, items, min/max, lengths, anyOf/oneOf/allOf);
keywords it does not know are ignored, so it can only be more lenient, never stricter.
"""

from __future__ import annotations

import json
from typing import Any, Callable

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    # bool is an int in Python but not a number in JSON.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _matches(value: Any, schema: Any) -> bool:
    """Built-in subset checker (see module docstring)."""
    if schema is True or schema == {}:
        return True
    if schema is False or not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return False
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        return False
    if "const" in schema and not _same(value, schema["const"]):
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", ())):
            return False
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = props.get(key, extra)
            if not _matches(item, sub):
                return False
    if isinstance(value, list):
        if "items" in schema and not all(_matches(item, schema["items"]) for item in value):
            return False
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
    if "allOf" in schema and not all(_matches(value, s) for s in schema["allOf"]):
        return False
    if "anyOf" in schema and not any(_matches(value, s) for s in schema["anyOf"]):
        return False
    if "oneOf" in schema and sum(_matches(value, s) for s in schema["oneOf"]) != 1:
        return False
    return True


def make_checker(schema: dict[str, Any] | bool) -> Callable[[Any], bool]:
    """A function value -> bool for `schema`, built once per schema."""
    try:
        import jsonschema
    except ImportError:
        return lambda value: _matches(value, schema)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return validator.is_valid


def is_valid_answer(text: str, checker: Callable[[Any], bool]) -> bool:
    """The whole answer (surrounding whitespace aside) is one JSON value accepted by `checker`."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return checker(value)
