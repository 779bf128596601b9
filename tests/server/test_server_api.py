"""The OpenAI-compatible API against a real server: raw HTTP and the official SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from pikaserve.data import PIKA, pika_seed_request
from pikaserve.model.loader import DEFAULT_MODEL_ID

from .conftest import TEST_MODEL, metric_values, serve

MODEL = TEST_MODEL or DEFAULT_MODEL_ID
# The seed request names DEFAULT_MODEL_ID; a run on another model serves that name too.
NAMES = [MODEL, "pika"] + ([DEFAULT_MODEL_ID] if TEST_MODEL else [])
SHORT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(async_engine):
    with serve(async_engine, served_model_name=NAMES) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def check_usage(usage: dict) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


@pytest.mark.slow
def test_seed_request_verbatim(server):
    """The bytes the original deployment sent to vLLM, posted as they are."""
    raw = (PIKA / "seed_request.json").read_bytes()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                   headers={"Content-Type": "application/json"}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["logprobs"] is None
    check_usage(body["usage"])
    assert 0 < body["usage"]["completion_tokens"] <= 50
    # Sent again, the ~400-token system prompt comes from the prefix cache.
    again = httpx.post(f"{server.url}/v1/chat/completions", content=raw, timeout=300).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_sdk_chat(client):
    body = pika_seed_request()
    out = client.chat.completions.create(model=body["model"], messages=body["messages"],
                                         temperature=0, max_tokens=6)
    assert out.object == "chat.completion" and out.model == MODEL
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == 6 or out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_sdk_chat_stream_with_usage(client):
    kw = dict(model="pika", messages=SHORT, temperature=0, max_tokens=8)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == \
        whole.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_ends_with_done(server):
    payload = {"messages": SHORT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}


def test_sdk_completions_prompt_forms(client, async_engine):
    ids = async_engine.tokenizer.encode("The capital of France is")
    one = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=5, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    from_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert from_ids.choices[0].text == one.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["Hello", "The capital of France is"],
                                     max_tokens=5, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]  # prompt index * n + choice
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices agree
    assert many.choices[2].text == one.choices[0].text
    # each prompt counts once, whatever n is
    assert many.usage.prompt_tokens == len(async_engine.tokenizer.encode("Hello")) + len(ids)
    id_lists = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=5,
                                         temperature=0)
    assert id_lists.choices[0].text == one.choices[0].text


def test_completions_stream_and_logprobs(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2)
    whole = client.completions.create(**kw)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 4


def test_logprobs_under_a_grammar_are_valid_json(client):
    """More alternatives asked for than the grammar allows: the forbidden ones come back as
    -9999.0 (vLLM's convention), not as -Infinity or a 500."""
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, logprobs=5,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    top = out.choices[0].logprobs.top_logprobs[0]
    assert len(top) == 5 and min(top.values()) == -9999.0


def test_the_user_field_cannot_forge_a_log_line(client, caplog):
    forged = "kid\nINFO:pikaserve.requests:chatcmpl-0: admin logged in"
    with caplog.at_level("INFO", logger="pikaserve.requests"):
        client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=1, user=forged)
    lines = [r.getMessage() for r in caplog.records if "user=" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)
    assert "user='kid\\nINFO" in lines[-1]


def test_n_with_seed_fans_out(client):
    kw = dict(model=MODEL, messages=SHORT, max_tokens=6, temperature=1.0, seed=1234, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    # seed+i per choice: reproducible run to run
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    single = client.chat.completions.create(**{**kw, "n": 1, "seed": 1235})
    assert single.choices[0].message.content == a.choices[1].message.content
    assert a.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)  # greedy


def test_penalties_and_stop(client):
    out = client.chat.completions.create(
        model=MODEL, messages=SHORT, max_tokens=8, temperature=0, presence_penalty=0.5,
        frequency_penalty=0.5, extra_body={"repetition_penalty": 1.2, "top_k": 5,
                                           "min_p": 0.05, "ignore_eos": True})
    assert out.usage.completion_tokens == 8
    plain = client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    word = plain.choices[0].message.content.split()[1] if len(
        plain.choices[0].message.content.split()) > 1 else None
    if word:
        cut = client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=8,
                                             temperature=0, stop=[word])
        assert word not in cut.choices[0].message.content
        assert cut.choices[0].finish_reason == "stop"


def test_models_and_tokenize(server, client, async_engine):
    models = client.models.list()
    assert [m.id for m in models.data] == NAMES
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == async_engine.tokenizer.encode("Hello world")
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    chat = httpx.post(f"{server.url}/tokenize",
                      json={"messages": SHORT, "return_token_strs": True}).json()
    assert chat["tokens"] == async_engine.tokenizer.encode_chat(SHORT)
    assert len(chat["token_strs"]) == chat["count"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_metrics_move(server, client):
    before = metric_values(server.url)
    client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    after = metric_values(server.url)
    for name in ("pikaserve:time_to_first_token_seconds_count",
                 "pikaserve:e2e_request_latency_seconds_count",
                 "pikaserve:request_queue_time_seconds_count",
                 "pikaserve:request_success_total"):
        assert after[name] == before.get(name, 0) + 1, name
    assert after["pikaserve:inter_token_latency_seconds_count"] >= \
        before.get("pikaserve:inter_token_latency_seconds_count", 0) + 1
    assert after["pikaserve:generation_tokens_total"] == \
        before.get("pikaserve:generation_tokens_total", 0) + 4
    assert after["pikaserve:prompt_tokens_total"] > before.get("pikaserve:prompt_tokens_total", 0)
    assert after["pikaserve:model_forward_total"] >= before["pikaserve:model_forward_total"] + 4
    assert after["pikaserve:prefix_cache_queries_total"] > \
        before["pikaserve:prefix_cache_queries_total"]
    assert after["pikaserve:prefix_cache_hits_total"] >= \
        before["pikaserve:prefix_cache_hits_total"]
    for gauge in ("pikaserve:num_requests_running", "pikaserve:num_requests_waiting",
                  "pikaserve:kv_cache_usage_perc"):
        assert after[gauge] == 0.0
    text = httpx.get(f"{server.url}/metrics").text
    assert 'le="0.001"' in text  # latency buckets go down to 1 ms


def test_models_do_not_show_the_path_on_disk(server, async_engine):
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 200 and str(async_engine.model_path) not in r.text
    assert {m["root"] for m in r.json()["data"]} == {MODEL}


def test_add_generation_prompt_and_message_name_are_honoured(server):
    msgs = [{"role": "user", "content": "Hi", "name": "pika"}]
    url = f"{server.url}/v1/chat/completions"
    with_prompt = httpx.post(url, json={
        "messages": msgs, "max_tokens": 1, "temperature": 0}).json()
    without = httpx.post(url, json={
        "messages": msgs, "max_tokens": 1, "temperature": 0,
        "add_generation_prompt": False}).json()
    # the assistant turn's opening (<|im_start|>assistant\n) is left out
    assert without["usage"]["prompt_tokens"] < with_prompt["usage"]["prompt_tokens"]


def test_cache_salt_separates_prefix_caches(server):
    url = f"{server.url}/v1/completions"
    prompt = "A cache salt keeps one school's prompts out of another's cache. " * 4

    def run(salt=None):
        body = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
        if salt is not None:
            body["cache_salt"] = salt
        r = httpx.post(url, json=body).json()
        return r["usage"]["prompt_tokens_details"]["cached_tokens"], r["choices"][0]["text"]

    _, text = run()
    cached, again = run()
    assert cached > 0 and again == text
    assert run("school-a") == (0, text)  # the unsalted cache is not visible under a salt
    assert run("school-a")[0] > 0
    assert run("school-b")[0] == 0
    bad = httpx.post(url, json={"prompt": "x", "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


def test_metrics_prefix_vllm_gives_vllms_names(async_engine):
    with serve(async_engine, metrics_prefix="vllm") as s:
        httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        text = httpx.get(f"{s.url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds",
                 "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:prefix_cache_queries_total"):
        assert name in text, name
    assert "pikaserve:" not in text
