"""/openapi.json describes the API the server really has, and fuzzing the server from it finds
nothing: bodies generated from each request schema (valid ones, and arbitrary JSON) never get
a 5xx or a hang, every 4xx is OpenAI's error envelope, every 200 matches its response schema,
and afterwards the server is healthy and the engine idle."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from pikaserve.config import ServerConfig
from pikaserve.heads.served import ServedHeads
from pikaserve.server.app import create_app

from .conftest import TEST_MODEL, ServerThread

EXAMPLES = 40  # per route
CHEAP = {"max_tokens": 2, "max_completion_tokens": 2}  # bounded work per generation
# A body each route answers with 200, for fuzzed fields to be merged into: most wholly
# generated bodies are refused early (a random model name, say), which tests little.
BASES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/classify": {"input": "Response to check: yes!"},
    "/v1/embeddings": {"input": "Hi"},
}


@pytest.fixture(scope="module")
def server(async_engine):
    heads = ServedHeads.load([] if TEST_MODEL else ["pika"])  # the Pika head fits the default
    app = create_app(ServerConfig(disable_log_requests=True), engine=async_engine, heads=heads)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def spec(server):
    r = httpx.get(f"{server.url}/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_the_spec_lists_every_route_with_valid_schemas(server, spec):
    assert spec["openapi"].startswith("3.1")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings",
                 "/classify", "/tokenize", "/detokenize", "/health", "/metrics"):
        assert path in spec["paths"], path
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def _resolved(spec: dict, schema: dict) -> dict:
    """`schema` with the spec's components alongside, so its $refs resolve."""
    return {**schema, "components": spec["components"]}


def _check(spec: dict, op: dict, r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    content_type = r.headers.get("content-type", "")
    if r.status_code >= 400:
        body = r.json()
        jsonschema.validate(body, _resolved(spec, op["responses"]["default"]["content"]
                                            ["application/json"]["schema"]))
        return
    content = op["responses"]["200"].get("content", {})
    if content_type.startswith("text/event-stream"):
        schema = _resolved(spec, content["text/event-stream"]["schema"])
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]"
        for event in events[:-1]:
            obj = json.loads(event)
            if "error" not in obj:  # an in-band error is the envelope, checked as such
                jsonschema.validate(obj, schema)
    elif "application/json" in content:
        jsonschema.validate(r.json(), _resolved(spec, content["application/json"]["schema"]))


def _cheap(body):
    """Bounded work: a chat request without max_tokens may generate up to the context."""
    if isinstance(body, dict):
        body = {**body, **{k: v for k, v in CHEAP.items() if k in body}}
        body.setdefault("max_tokens", 2)
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return body


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize",
                                  "/detokenize", "/classify", "/v1/embeddings"])
def test_fuzzed_bodies_never_break_the_server(server, spec, path, async_engine):
    op = spec["paths"][path]["post"]
    request_schema = _resolved(spec, op["requestBody"]["content"]["application/json"]["schema"])
    client = httpx.Client(base_url=server.url, timeout=60)
    fields = request_schema["components"]["schemas"][
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    ].get("properties", {})
    base = BASES[path]
    # arbitrary JSON; objects with the right field names and arbitrary values; schema-valid
    # bodies; and a working body with some of its fields replaced by schema-valid values
    arbitrary = JSON | st.fixed_dictionaries({}, optional={k: JSON for k in fields})
    valid = from_schema(request_schema)
    mixed = st.builds(lambda b, keep: {**base, **{k: v for k, v in b.items() if k in keep}},
                      valid.filter(lambda b: isinstance(b, dict)),
                      st.sets(st.sampled_from(sorted(fields)), max_size=3))

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=(arbitrary | valid | mixed | mixed).map(_cheap))
    def fuzz(body):
        _check(spec, op, client.post(path, json=body))

    try:
        fuzz()
    finally:
        client.close()
    assert httpx.get(f"{server.url}/health").status_code == 200
    deadline = time.monotonic() + 30
    while not async_engine.is_idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert async_engine.is_idle()
