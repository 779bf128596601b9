"""--api-key: the API needs `Authorization: Bearer KEY`; /health and /metrics stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import serve

KEY = "sk-test-pika"


@pytest.fixture(scope="module")
def server(async_engine):
    with serve(async_engine, api_key=KEY) as s:
        yield s


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-Api-Key": KEY},
], ids=["none", "wrong", "no-bearer", "other-header"])
def test_missing_or_wrong_key_is_401(server, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/tokenize")]:
        r = httpx.request(method, server.url + path, headers=headers, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_open_paths(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_right_key_works_with_the_sdk(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.choices[0].message.role == "assistant"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
