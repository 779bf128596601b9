"""Two engine replicas on Ray Serve behind one pikaserve HTTP server (a local Ray instance,
tiny model): prefix routing, outputs equal to a single server's, a killed replica, client
disconnects, /health and /metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from pikaserve.cluster.launch import DEPLOYMENT_NAME, start_cluster, stop_cluster
from pikaserve.config import EngineConfig, ServerConfig
from pikaserve.engine.async_engine import AsyncEngine
from pikaserve.server.app import create_app
from server.conftest import ServerThread

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 512


def engine_config(model_dir: str) -> EngineConfig:
    return EngineConfig(model=model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
                        num_threads=1)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def cluster(model_dir):
    config = ServerConfig(replicas=2)
    app = create_app(config, start_engine=lambda: start_cluster(engine_config(model_dir), config))
    try:
        with ServerThread(app) as server:
            wait_until(lambda: server.state.phase != "starting", 180, "the replicas to load")
            assert server.state.phase == "ready"
            yield server
    finally:
        stop_cluster(config)


@pytest.fixture(scope="module")
def single(model_dir):
    engine = AsyncEngine(engine_config(model_dir))
    with ServerThread(create_app(ServerConfig(), engine=engine)) as server:
        yield server
    engine.shutdown()


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def complete(server, prompt, max_tokens: int = 8, **extra) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        **extra})
    assert r.status_code == 200, r.text
    return r.json()


def queries_by_replica(server) -> dict[str, int]:
    """Prompt tokens each replica has looked up, fresh from the replicas."""
    engine = server.state.engine
    engine.poll()
    return {rid: s.prefix_cache_queries for rid, s in engine.replica_stats().items()}


def prefixed(prefix_token: int, i: int) -> list[int]:
    return [prefix_token] * 64 + [200 + i, 201, 202]


def test_requests_sharing_a_prefix_go_to_one_replica_and_hit_its_cache(cluster):
    before = queries_by_replica(cluster)
    assert len(before) == 2
    answers = [complete(cluster, prefixed(40, i)) for i in range(4)]
    after = queries_by_replica(cluster)
    grew = [rid for rid in after if after[rid] > before[rid]]
    assert len(grew) == 1  # all four on one replica
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    assert cached[0] == 0 and all(c == 64 for c in cached[1:])


def test_different_prefixes_spread_over_both_replicas(cluster):
    before = queries_by_replica(cluster)
    for p in range(6):
        complete(cluster, prefixed(60 + p, 0))
    after = queries_by_replica(cluster)
    assert all(after[rid] > before[rid] for rid in after)


def test_greedy_outputs_equal_a_single_servers(cluster, single):
    prompts = [prefixed(80 + i % 3, i) for i in range(9)]
    for prompt in prompts:
        assert complete(cluster, prompt, 12)["choices"][0]["text"] == \
            complete(single, prompt, 12)["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Hello world!"}], "max_tokens": 10,
            "temperature": 0}
    answers = [httpx.post(f"{s.url}/v1/chat/completions", json=chat, timeout=60).json()
               for s in (cluster, single)]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]


def test_one_request_fanning_out_over_prompts_and_choices(cluster, single):
    body = {"prompt": [prefixed(85, i) for i in range(3)], "n": 2, "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    answers = [httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
               for s in (cluster, single)]
    texts = [[c["text"] for c in sorted(a["choices"], key=lambda c: c["index"])]
             for a in answers]
    assert len(texts[0]) == 6 and texts[0] == texts[1]


def test_streaming_through_a_replica(cluster):
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == complete(cluster, "The quick brown fox", 12)["choices"][0]["text"]


def test_a_bad_request_is_refused_by_the_replica_with_a_clean_400(cluster):
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=30,
                   json={"prompt": [1] * (MAX_MODEL_LEN + 5), "max_tokens": 4})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error"
    assert "maximum context length is 512" in error["message"]


def test_health_and_metrics_count_the_replicas(cluster):
    r = httpx.get(f"{cluster.url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"replicas_ready": 2, "replicas": 2}
    complete(cluster, prefixed(90, 0))
    cluster.state.engine.poll()
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    rows = [line for line in text.splitlines()
            if line.startswith("pikaserve:prefix_cache_queries_total{")]
    assert len(rows) == 2 and all('replica="' in row for row in rows)


def test_a_client_disconnect_frees_the_blocks_on_the_replica(cluster):
    body = {"prompt": "Hello", "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    # the connection is closed: the request is aborted on its replica, its blocks freed
    engine = cluster.state.engine

    def idle() -> bool:
        engine.poll()
        stats = engine.replica_stats().values()
        return len(stats) == 2 and all(s.num_running == 0 and s.kv_usage == 0 for s in stats)

    wait_until(idle, 20, "the aborted request to leave its replica")


def test_shutdown_ends_requests_in_flight_with_a_clean_error(cluster):
    body = {"prompt": "Hello", "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines)
        cluster.state.engine.end_all("the server is shutting down")  # as the drain does
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "service_unavailable" and error["message"] == \
        "the server is shutting down"


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(cluster):
    import ray

    body = {"prompt": "Hello", "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        engine = cluster.state.engine
        engine.poll()
        busy = [rid for rid, s in engine.replica_stats().items() if s.num_running]
        assert len(busy) == 1, "the long request should still be running"
        # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<replica id>
        actor = f"SERVE_REPLICA::{engine.app_name}#{DEPLOYMENT_NAME}#{busy[0]}"
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["error"]["code"] == "service_unavailable"  # HTTP 503
    assert "replica" in events[-1]["error"]["message"]
    assert all(e.get("choices", [{}])[0].get("finish_reason") is None for e in events[:-1])
    # Ray Serve starts a new replica; the server serves on meanwhile and after
    complete(cluster, prefixed(95, 0))
    wait_until(lambda: httpx.get(f"{cluster.url}/health", timeout=10).json().get(
        "replicas_ready") == 2 and len(queries_by_replica(cluster)) == 2, 120,
        "the killed replica to be replaced")
    complete(cluster, prefixed(96, 0))
