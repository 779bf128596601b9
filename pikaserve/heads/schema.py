"""What a head answers: the fields of a JSON Schema object, each a closed set of labels.

An enum field (strings, numbers, booleans or null) becomes a softmax over its values and a boolean
field a two-way choice; anything else cannot be answered by a classifier and is refused.
Schemas are compared canonically (sorted keys, no whitespace), so a client's copy of the schema
matches whatever its key order or formatting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class HeadSchemaError(ValueError):
    """A JSON Schema that a classification head cannot answer."""


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    labels: tuple[Any, ...]  # JSON values, in the schema's order


def canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_fields(schema: Any) -> tuple[Field, ...]:
    """The schema's properties as label sets, in the schema's order."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise HeadSchemaError('the schema must be a JSON object schema ("type": "object")')
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise HeadSchemaError("the schema has no properties to classify")
    fields = []  # a head answers every property: valid whatever is required
    for name, prop in props.items():
        if not isinstance(prop, dict):
            raise HeadSchemaError(f"property {name!r}: expected a schema object")
        if "enum" in prop:
            labels = prop["enum"]
            distinct = isinstance(labels, list) and len(set(map(canonical_value, labels)))
            if not distinct or distinct < 2 or distinct != len(labels):
                raise HeadSchemaError(
                    f"property {name!r}: enum needs two or more distinct values")
        elif prop.get("type") == "boolean":
            labels = [False, True]
        else:
            raise HeadSchemaError(
                f"property {name!r}: only enum and boolean properties can be classified")
        fields.append(Field(name, tuple(labels)))
    return tuple(fields)


def canonical_value(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def render_answer(fields: tuple[Field, ...], choice: list[int]) -> str:
    """The compact JSON object of the chosen labels, in schema order (as the grammar path
    writes it)."""
    answer = {f.name: f.labels[i] for f, i in zip(fields, choice)}
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)
