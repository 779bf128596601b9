"""Bundled data: the Pika workload (seed request, system prompt, answer schema, turns)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

PIKA = Path(str(files("pikaserve.data") / "pika"))


def pika_seed_request() -> dict[str, Any]:
    return json.loads((PIKA / "seed_request.json").read_text())


def pika_system_prompt() -> str:
    return (PIKA / "system_prompt.txt").read_text()


def pika_answer_schema() -> dict[str, Any]:
    return json.loads((PIKA / "answer.schema.json").read_text())


def pika_turns() -> list[dict[str, str]]:
    lines = (PIKA / "turns.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def pika_user_message(turn: dict[str, str]) -> str:
    return (
        f"Previous Question: {turn['previous_question']}\n"
        f"Previous Answer: {turn['previous_answer']}\n"
        f"Response to check: {turn['response_to_check']}"
    )


def pika_messages(turn: dict[str, str]) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": pika_system_prompt()},
        {"role": "user", "content": pika_user_message(turn)},
    ]
