"""Labelled JSONL for training a head: each line a prompt plus one label per schema field.

The prompt of a line is, by the first key present: `messages` (a chat, rendered as is),
`input` (the user message), or a Pika turn (`previous_question`, `previous_answer`,
`response_to_check`, rendered as the Pika seed request renders it). A system prompt, when
given, comes first, exactly as the server would build the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pikaserve.data import pika_user_message
from pikaserve.heads.schema import Field, canonical_value

PIKA_KEYS = ("previous_question", "previous_answer", "response_to_check")


class DataError(ValueError):
    """A labelled file that cannot be used, with the line at fault."""


@dataclass
class LabelledSet:
    messages: list[list[dict[str, str]]]  # one chat per line, system prompt included
    labels: list[list[int]]  # per field, the label index of each line

    def __len__(self) -> int:
        return len(self.messages)


def chat_for(row: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    """The chat a server request for this row would carry."""
    if "messages" in row:
        return list(row["messages"])
    if "input" in row:
        user = row["input"]
    elif all(k in row for k in PIKA_KEYS):
        user = pika_user_message(row)
    else:
        raise KeyError("messages, input or the Pika turn fields")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": user}]


def load_labelled(path: str | Path, fields: tuple[Field, ...],
                  system_prompt: str | None) -> LabelledSet:
    index = [{canonical_value(v): i for i, v in enumerate(f.labels)} for f in fields]
    data = LabelledSet([], [[] for _ in fields])
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
            data.messages.append(chat_for(row, system_prompt))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where}: not a labelled prompt ({exc})") from exc
        for f, idx, column in zip(fields, index, data.labels):
            if f.name not in row:
                raise DataError(f"{where}: no label for field {f.name!r}")
            label = idx.get(canonical_value(row[f.name]))
            if label is None:
                raise DataError(f"{where}: {f.name}={row[f.name]!r} is not one of the "
                                f"schema's labels")
            column.append(label)
    if not data.messages:
        raise DataError(f"{path}: no labelled lines")
    return data
