"""A tiny random model and a head trained on it with synthetic labels that its hidden states
separate: the colour word and the trailing mark of the user message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

COLOURS = ["red", "green", "blue"]
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": COLOURS}, "loud": {"type": "boolean"}},
    "required": ["colour", "loud"],
    "additionalProperties": False,
}
SYSTEM = "Tell the colour."
MARKER = "Say:"
WORDS = ["the", "fox", "dog", "hello", "world", "quick", "brown", "lazy", "today", "fine"]


def synthetic_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour, loud = rng.choice(COLOURS), rng.random() < 0.5
        text = f"{rng.choice(WORDS)} {rng.choice(WORDS)}. {MARKER} {colour}{'!!!' if loud else '.'}"
        rows.append({"input": text, "colour": colour, "loud": loud})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def head_files(tiny_model_dir, tmp_path_factory):
    """(model dir, folder with schema/system prompt/train/dev files, trained head dir)."""
    from pikaserve.cli import main

    model = tiny_model_dir("llama")
    d = tmp_path_factory.mktemp("head_data")
    (d / "schema.json").write_text(json.dumps(SCHEMA))
    (d / "system.txt").write_text(SYSTEM)
    write_jsonl(d / "train.jsonl", synthetic_rows(90, seed=1))
    write_jsonl(d / "dev.jsonl", synthetic_rows(30, seed=2))
    out = d / "head"
    argv = ["heads", "train", "--model", str(model), "--data", str(d / "train.jsonl"),
            "--dev", str(d / "dev.jsonl"), "--schema", str(d / "schema.json"),
            "--system-prompt", str(d / "system.txt"), "--span-marker", MARKER,
            "--out", str(out), "--dtype", "float32"]
    assert main(argv) == 0
    return model, d, out
