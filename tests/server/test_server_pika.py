"""--default-response-format: the Pika seed request, unchanged, gets a valid Pika answer."""

from __future__ import annotations

import json

import httpx
import pytest

from pikaserve.data import PIKA, pika_answer_schema, pika_messages, pika_turns
from pikaserve.model.loader import DEFAULT_MODEL_ID
from pikaserve.server.sampling import load_default_response_format

from .conftest import TEST_MODEL, serve

pytest.importorskip("pikaserve.structured", reason="structured outputs not built yet")


@pytest.fixture(scope="module")
def server(async_engine):
    names = [TEST_MODEL, DEFAULT_MODEL_ID] if TEST_MODEL else None
    default = load_default_response_format(str(PIKA / "answer.schema.json"))  # a bare schema
    with serve(async_engine, default_response_format=default, served_model_name=names) as s:
        yield s


def check_answer(content: str) -> None:
    answer = json.loads(content)
    schema = pika_answer_schema()
    assert set(answer) == set(schema["required"])
    assert answer["emotion"] in schema["properties"]["emotion"]["enum"]
    assert isinstance(answer["learn_score"], bool)


@pytest.mark.slow
def test_seed_request_unchanged_gets_a_valid_answer(server):
    raw = (PIKA / "seed_request.json").read_bytes()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    check_answer(choice["message"]["content"])
    assert choice["finish_reason"] == "stop"


@pytest.mark.slow
def test_streamed_turns_get_valid_answers(server):
    for turn in pika_turns()[:3]:
        body = {"model": DEFAULT_MODEL_ID, "messages": pika_messages(turn), "temperature": 0,
                "max_tokens": 50, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                          timeout=300) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: {")]
        text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or ""
                       for x in lines if json.loads(x[6:])["choices"])
        check_answer(text)


def test_explicit_text_format_opts_out(server):
    body = {"model": DEFAULT_MODEL_ID, "temperature": 0, "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "text"}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 3 or \
        r.json()["choices"][0]["finish_reason"] == "stop"
