"""Answers from classification heads (/classify, chat requests carrying a head's schema) and
embeddings (/v1/embeddings), on the default model with the built-in Pika head."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from pikaserve.config import ServerConfig
from pikaserve.data import PIKA, pika_answer_schema, pika_messages, pika_turns, pika_user_message
from pikaserve.heads.head import ClassificationHead, HeadLoadError
from pikaserve.heads.served import BUILTIN_HEADS, ServedHeads
from pikaserve.server.app import create_app
from pikaserve.server.sampling import load_default_response_format

from .conftest import TEST_MODEL, ServerThread, free_port, metric_values, serve, wait_for

pytestmark = pytest.mark.skipif(TEST_MODEL is not None,
                                reason="the Pika head fits the default model only")
LABELS = pika_answer_schema()["properties"]["emotion"]["enum"]
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "pika", "schema": pika_answer_schema()}}


@pytest.fixture(scope="module")
def server(async_engine):
    default = load_default_response_format(str(PIKA / "answer.schema.json"))
    app = create_app(ServerConfig(),
                     engine=async_engine, default_response_format=default,
                     heads=ServedHeads.load(["pika"]))
    with ServerThread(app) as s:
        yield s


def chat(url: str, turn: dict, **extra) -> httpx.Response:
    body = {"messages": pika_messages(turn), "temperature": 0, "max_tokens": 50} | extra
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def check_answer(content: str) -> dict:
    answer = json.loads(content)
    assert list(answer) == ["emotion", "learn_score"]
    assert answer["emotion"] in LABELS and isinstance(answer["learn_score"], bool)
    return answer


def test_classify_shapes(server):
    turns = pika_turns()[:3]
    r = httpx.post(f"{server.url}/classify", timeout=120,
                   json={"input": [pika_user_message(t) for t in turns]})
    assert r.status_code == 200, r.text
    assert r.headers["x-pikaserve-head"] == "pika"
    body = r.json()
    assert body["object"] == "list" and body["model"] == "pika" and len(body["data"]) == 3
    assert body["usage"]["prompt_tokens"] > 3 * 300 and body["usage"]["completion_tokens"] == 0
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["num_classes"] == 23 and item["label"] in LABELS
        assert abs(sum(item["probs"]) - 1) < 1e-4
        assert item["label"] == LABELS[int(np.argmax(item["probs"]))]
        assert set(item["fields"]) == {"emotion", "learn_score"}
        ls = item["fields"]["learn_score"]
        assert ls["num_classes"] == 2 and isinstance(ls["label"], bool)
        assert item["fields"]["emotion"]["label"] == item["label"]
    one = httpx.post(f"{server.url}/v1/classify", timeout=120,
                     json={"model": "pika", "input": pika_user_message(turns[1])}).json()
    assert one["data"][0]["label"] == body["data"][1]["label"]
    msgs = httpx.post(f"{server.url}/classify", timeout=120,
                      json={"messages": pika_messages(turns[1])}).json()
    np.testing.assert_allclose(msgs["data"][0]["probs"], body["data"][1]["probs"], atol=1e-4)


def test_chat_with_the_head_schema_is_one_forward_pass(server):
    turns = pika_turns()
    assert chat(server.url, turns[0], response_format=RESPONSE_FORMAT).status_code == 200
    before = metric_values(server.url)
    r = chat(server.url, turns[1], response_format=RESPONSE_FORMAT)
    after = metric_values(server.url)
    assert r.status_code == 200, r.text
    assert r.headers["x-pikaserve-head"] == "pika"
    choice = r.json()["choices"][0]
    check_answer(choice["message"]["content"])
    assert choice["finish_reason"] == "stop"
    assert after["pikaserve:model_forward_total"] - before["pikaserve:model_forward_total"] == 1
    assert after["pikaserve:head_answers_total"] - before["pikaserve:head_answers_total"] == 1
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 300


def test_seed_request_verbatim_is_answered_by_the_head(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   content=(PIKA / "seed_request.json").read_bytes())
    assert r.status_code == 200, r.text
    assert r.headers["x-pikaserve-head"] == "pika"
    check_answer(r.json()["choices"][0]["message"]["content"])


def test_head_answer_agrees_with_classify_and_streams(server):
    turn = pika_turns()[2]
    label = httpx.post(f"{server.url}/classify", timeout=120,
                       json={"input": pika_user_message(turn)}).json()["data"][0]["label"]
    content = chat(server.url, turn).json()["choices"][0]["message"]["content"]
    assert check_answer(content)["emotion"] == label
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      json={"messages": pika_messages(turn), "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["x-pikaserve-head"] == "pika"
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == content and events[-1]["usage"]["completion_tokens"] > 0


def test_sampling_from_the_head_is_seeded(server):
    turn = pika_turns()[3]
    extra = dict(temperature=2.0, seed=123, n=4)
    a = chat(server.url, turn, **extra).json()["choices"]
    b = chat(server.url, turn, **extra).json()["choices"]
    assert [c["message"]["content"] for c in a] == [c["message"]["content"] for c in b]
    for c in a:
        check_answer(c["message"]["content"])


def test_logprobs_fall_back_to_the_grammar_path(server):
    r = chat(server.url, pika_turns()[4], logprobs=True, top_logprobs=2)
    assert r.status_code == 200 and "x-pikaserve-head" not in r.headers
    check_answer(r.json()["choices"][0]["message"]["content"])
    assert r.json()["choices"][0]["logprobs"]["content"]


def test_max_tokens_cuts_a_head_answer_like_generation(server):
    r = chat(server.url, pika_turns()[5], max_tokens=3)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 3
    assert choice["message"]["content"].startswith('{"emotion')


def test_embeddings(server):
    texts = ["I like cats.", "I like dogs.", "The stock market fell."]
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=120)
    assert r.status_code == 200, r.text
    vecs = np.array([d["embedding"] for d in r.json()["data"]])
    assert vecs.shape == (3, len(ServedHeads.load(["pika"]).heads["pika"].layers) * 576)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    b64 = httpx.post(f"{server.url}/v1/embeddings", timeout=120,
                     json={"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(decoded, vecs[0], atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("path, body, status, match", [
    ("/classify", {}, 400, "exactly one of input or messages"),
    ("/classify", {"input": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
     "exactly one"),
    ("/classify", {"input": []}, 400, "input must hold"),
    ("/classify", {"input": 5}, 400, "input"),
    ("/classify", {"model": "nope", "input": "x"}, 404, "does not exist"),
    ("/classify", {"input": "word " * 5000}, 400, "maximum context length"),
    ("/v1/embeddings", {"input": []}, 400, "must not be empty"),
    ("/v1/embeddings", {"input": [10**9]}, 400, "token ids"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "does not exist"),
])
def test_bad_input_gets_an_error_envelope_and_the_server_keeps_serving(server, path, body,
                                                                        status, match):
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/classify", json={"input": "ok"}, timeout=120).status_code == 200


def test_classify_without_a_head_is_a_clear_error(async_engine):
    with serve(async_engine) as s:
        r = httpx.post(f"{s.url}/classify", json={"input": "hi"}, timeout=60)
        assert r.status_code == 400 and "--head" in r.json()["error"]["message"]


def test_a_head_of_other_weights_is_refused(async_engine, tmp_path):
    head = ClassificationHead.load(BUILTIN_HEADS["pika"])
    head.info.weights_fingerprint = "0" * 16
    head.save(tmp_path / "other")
    with pytest.raises(HeadLoadError, match="trained on other model weights"):
        create_app(ServerConfig(),
                   engine=async_engine, heads=ServedHeads.load([f"other={tmp_path / 'other'}"]))


@pytest.mark.slow
def test_serve_refuses_bad_heads_at_start(tmp_path):
    def serve_with(spec: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pikaserve", "serve", "--head", spec,
                               "--port", str(free_port())], capture_output=True, text=True,
                              timeout=300, check=False)

    out = serve_with(f"x={tmp_path / 'missing'}")
    assert out.returncode == 2 and "missing head.json" in out.stderr
    out = serve_with("nosuchhead")
    assert out.returncode == 2 and "not a built-in head" in out.stderr
    head = ClassificationHead.load(BUILTIN_HEADS["pika"])
    head.info.tokenizer_fingerprint = "f" * 16
    head.save(tmp_path / "tok")
    out = serve_with(f"tok={tmp_path / 'tok'}")
    assert out.returncode == 1 and "another tokenizer" in out.stderr


def test_one_bad_input_fails_the_request_and_leaks_nothing(server, async_engine):
    body = {"input": ["Response to check: yes!", "word " * 5000, "Response to check: no"]}
    r = httpx.post(f"{server.url}/classify", json=body, timeout=120)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert wait_for(async_engine.is_idle)
