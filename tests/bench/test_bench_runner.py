"""The load loop against fake servers: concurrency, arrival rates, bounds, warmup, errors,
validity counting, and fair interleaving of --compare servers."""

from __future__ import annotations

import json
import time
from itertools import count
from pathlib import Path
from typing import Any, Callable

import pytest

from pikaserve.bench.config import BenchConfig, LoadPoint
from pikaserve.bench.runner import BenchResult, run_bench
from pikaserve.bench.schedule import Arrival, arrival_offsets
from pikaserve.bench.stats import parse_slos
from pikaserve.bench.workloads import pika_workload

from .conftest import JITTER
from .fake_openai import FakeOpenAIServer, Plan, user_text

Factory = Callable[..., FakeOpenAIServer]


def bench(*servers: FakeOpenAIServer, **kw: Any) -> BenchResult:
    kw.setdefault("workload", "random")
    kw.setdefault("input_len", 8)
    kw.setdefault("output_len", 2)
    return run_bench(BenchConfig(urls=tuple(s.url for s in servers), progress=False, **kw))


def slow(seconds: float) -> Callable[[dict[str, Any]], Plan]:
    return lambda body: Plan(chunks=[(seconds, "x"), (0.0, "y")], usage_tokens=2)


def test_fixed_concurrency_keeps_that_many_in_flight(fake_server: Factory) -> None:
    server = fake_server(slow(0.05))
    result = bench(server, points=(LoadPoint(concurrency=3),), num_requests=9)
    run = result.points[0].servers[0]
    assert server.max_in_flight == 3 and len(server.completions()) == 9
    assert run.metrics.completed == 9 and run.metrics.output_tokens == 18
    assert run.metrics.queue_wait is None  # closed loop: nothing is scheduled, so nothing waits
    assert run.metrics.request_throughput == pytest.approx(9 / run.active_s)
    assert run.target.model == "fake-model"  # from GET /v1/models


def assert_sent_on_schedule(result: BenchResult, server: FakeOpenAIServer, planned: list[float]) -> None:
    records = result.points[0].servers[0].records
    scheduled = [r.scheduled for r in records]
    assert all(t is not None for t in scheduled)
    base = records[0].scheduled or 0.0
    assert [(t or 0.0) - base for t in scheduled] == pytest.approx(planned, abs=1e-9)  # exactly the schedule
    assert all(0.0 <= r.start - (r.scheduled or 0.0) < JITTER for r in records)  # each sent when due
    received = sorted(r.received for r in server.completions())
    assert all(got >= (due or 0.0) for got, due in zip(received, scheduled))  # never early


def test_constant_rate_sends_on_schedule(fake_server: Factory) -> None:
    server = fake_server(slow(0.0))
    result = bench(server, points=(LoadPoint(concurrency=None, rate=20.0),), arrival=Arrival.CONSTANT, num_requests=6)
    assert_sent_on_schedule(result, server, [0.05 * i for i in range(6)])


def test_poisson_rate_follows_the_seeded_arrivals(fake_server: Factory) -> None:
    server = fake_server(slow(0.0))
    result = bench(server, points=(LoadPoint(concurrency=None, rate=25.0),), arrival=Arrival.POISSON, seed=5, num_requests=8)
    assert_sent_on_schedule(result, server, arrival_offsets(8, 25.0, Arrival.POISSON, seed=5))


def test_queue_wait_grows_when_the_cap_cannot_keep_up(fake_server: Factory) -> None:
    server = fake_server(slow(0.1))
    result = bench(server, points=(LoadPoint(concurrency=1, rate=50.0),), arrival=Arrival.CONSTANT, num_requests=4)
    waits = [r.queue_wait for r in result.points[0].servers[0].records]
    # Due every 20 ms but served one at a time, each >= 100 ms: request i waits >= i * 80 ms.
    assert waits[0] is not None and waits[0] < JITTER
    assert all(w is not None and w >= 0.08 * i - 0.002 for i, w in enumerate(waits))
    assert server.max_in_flight == 1 and result.points[0].servers[0].metrics.queue_wait is not None


def test_duration_bounds_an_unbounded_run(fake_server: Factory) -> None:
    server = fake_server(slow(0.05))
    started = time.perf_counter()
    result = bench(server, num_requests=None, duration_s=0.3)
    elapsed = time.perf_counter() - started
    n = result.points[0].servers[0].metrics.requests
    assert 2 <= n <= 7 and len(server.completions()) == n
    assert elapsed < 0.3 + 0.05 + 1.0  # stops issuing at the deadline (1 s for set-up)


def test_duration_bounds_an_open_loop_run(fake_server: Factory) -> None:
    server = fake_server(slow(0.0))
    result = bench(server, points=(LoadPoint(concurrency=None, rate=20.0),), arrival=Arrival.CONSTANT, num_requests=None, duration_s=0.3)
    indices = [r.index for r in result.points[0].servers[0].records]
    assert indices == list(range(6))  # due at 0, 50, ..., 250 ms; the one due at 300 ms is past the deadline
    assert len(server.completions()) == 6


def test_warmup_is_sent_but_not_recorded(fake_server: Factory) -> None:
    server = fake_server(slow(0.0))
    result = bench(server, num_requests=3, warmup=2)
    assert len(server.completions()) == 5 and result.points[0].servers[0].metrics.requests == 3
    assert result.warmup_errors == [{}]
    warm = {user_text(r.body) for r in server.completions()[:2]}
    assert not warm & {user_text(r.body) for r in server.completions()[2:]}  # distinct prompts: no cache head start


def test_sweep_never_repeats_a_prompt(fake_server: Factory) -> None:
    server = fake_server(slow(0.0))
    result = bench(server, points=(LoadPoint(concurrency=1), LoadPoint(concurrency=2)), num_requests=4)
    prompts = [user_text(r.body) for r in server.completions()]
    assert len(prompts) == 8 and len(set(prompts)) == 8
    assert [p.point.concurrency for p in result.points] == [1, 2]


def test_errors_are_counted_by_kind(fake_server: Factory, closed_port_url: str, tmp_path: Path) -> None:
    plans = {"ok": Plan(), "e500": Plan(status=500), "cut": Plan(chunks=[(0.0, "a"), (0.0, "b")], abort_after=1), "bad": Plan(error_event=True)}
    server = fake_server(lambda body: plans[user_text(body)])
    dataset = tmp_path / "mix.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ok", "e500", "cut", "ok", "bad", "e500"]), encoding="utf-8")
    result = bench(server, workload="file", dataset=dataset, num_requests=12, points=(LoadPoint(concurrency=2),))
    m = result.points[0].servers[0].metrics
    assert m.errors == {"aborted": 2, "http_500": 4, "stream_error": 2} and m.completed == 4 and m.failed == 8
    refused = run_bench(BenchConfig(urls=(closed_port_url,), models=("m",), workload="file", dataset=dataset, num_requests=3, progress=False))
    assert refused.points[0].servers[0].metrics.errors == {"connect": 3}


def test_pika_json_validity_and_goodput(fake_server: Factory) -> None:
    answers = count()

    def planner(body: dict[str, Any]) -> Plan:
        assert body["response_format"]["type"] == "json_schema" and body["temperature"] == 0
        valid = next(answers) % 2 == 0
        return Plan(chunks=[(0.0, '{"emotion":"happy","learn_score":' + ("true}" if valid else "maybe}"))], usage_tokens=9)

    server = fake_server(planner)
    result = bench(server, workload="pika", num_requests=10, slos=parse_slos("e2e=10s"))
    m = result.points[0].servers[0].metrics
    assert (m.json_checked, m.json_valid, m.json_validity) == (10, 5, 0.5)
    assert m.slo_attainment == 0.5  # invalid answers are not good, however fast


def compare_log(a: FakeOpenAIServer, b: FakeOpenAIServer) -> tuple[list[str], list[tuple[int, str, float, float]]]:
    """Prompts in request order, and every request as (server, prompt, received, finished) by time."""
    events = [(k, user_text(r.body), r.received, r.finished) for k, s in enumerate((a, b)) for r in s.completions()]
    return [user_text(r.body) for r in a.completions()], sorted(events, key=lambda e: e[2])


def test_compare_alternates_request_by_request(fake_server: Factory) -> None:
    a, b = fake_server(slow(0.01)), fake_server(slow(0.01))
    result = bench(a, b, num_requests=6, round_size=1, labels=("A", "B"))
    prompts, events = compare_log(a, b)
    assert prompts == [user_text(r.body) for r in b.completions()]  # the same requests, in the same order
    assert [(e[0], prompts.index(e[1])) for e in events] == [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (1, 2), (1, 3), (0, 3), (0, 4), (1, 4), (1, 5), (0, 5)]
    assert all(nxt[2] >= cur[3] for cur, nxt in zip(events, events[1:]))  # one server at a time: never overlapping
    runs = result.points[0].servers
    assert [r.target.label for r in runs] == ["A", "B"] and [r.index for r in runs[0].records] == [r.index for r in runs[1].records]


def test_compare_rounds_at_concurrency(fake_server: Factory) -> None:
    a, b = fake_server(slow(0.02)), fake_server(slow(0.02))
    bench(a, b, points=(LoadPoint(concurrency=2),), num_requests=16)  # default round: 4 x 2 = 8 requests
    prompts, events = compare_log(a, b)
    assert sorted(prompts) == sorted(user_text(r.body) for r in b.completions()) and len(prompts) == 16
    rounds = [(e[0], prompts.index(e[1]) // 8) for e in events]
    assert rounds == [(0, 0)] * 8 + [(1, 0)] * 8 + [(1, 1)] * 8 + [(0, 1)] * 8  # round 1 starts with B
    assert a.max_in_flight == 2 and b.max_in_flight == 2
    for k in range(1, 4):  # a turn starts only when the previous one has finished
        assert min(e[2] for e in events[8 * k : 8 * k + 8]) >= max(e[3] for e in events[: 8 * k])


def test_compare_with_duration_gives_every_server_the_same_requests(fake_server: Factory) -> None:
    a, b = fake_server(slow(0.02)), fake_server(slow(0.0))
    result = bench(a, b, num_requests=None, duration_s=0.2, round_size=2)
    counts = [run.metrics.requests for run in result.points[0].servers]
    assert counts[0] == counts[1] and counts[0] % 2 == 0 and counts[0] >= 2


def test_server_bodies_apply_to_their_server_only(fake_server: Factory) -> None:
    a, b = fake_server(slow(0.0)), fake_server(slow(0.0))
    bench(a, b, num_requests=3, server_bodies=({}, {"max_tokens": 1, "response_format": {"type": "text"}}))
    assert [r.body["max_tokens"] for r in a.completions()] == [2, 2, 2]
    assert all(r.body["max_tokens"] == 1 and r.body["response_format"] == {"type": "text"} for r in b.completions())
    with pytest.raises(ValueError, match="1 server bodies for 2 servers"):
        BenchConfig(urls=(a.url, b.url), server_bodies=({},))


def test_pika_turns_never_repeat_within_the_labelled_set(fake_server: Factory) -> None:
    server = fake_server(lambda body: Plan(chunks=[(0.0, '{"emotion":"happy","learn_score":true}')], usage_tokens=9))
    bench(server, workload="pika", num_requests=120, warmup=3, points=(LoadPoint(concurrency=8),))
    turns = [user_text(r.body) for r in server.completions()]
    assert len(turns) == 123 and len(set(turns)) == 123


def pika_answer(body: dict[str, Any]) -> Plan:
    return Plan(chunks=[(0.0, '{"emotion":"happy","learn_score":true}')], usage_tokens=9)


def write_turns(path: Path, n: int) -> Path:
    turns = [{"previous_question": "What color is it?", "previous_answer": f"blue {i}", "response_to_check": "Great!"} for i in range(n)]
    path.write_text("".join(json.dumps(t) + "\n" for t in turns), encoding="utf-8")
    return path


def test_pika_run_that_needs_more_turns_than_it_has_is_refused(fake_server: Factory, tmp_path: Path) -> None:
    server = fake_server(pika_answer)
    turns = write_turns(tmp_path / "turns.jsonl", 10)
    points = (LoadPoint(concurrency=1), LoadPoint(concurrency=2))
    with pytest.raises(ValueError, match=r"10 distinct requests and sends each once; this run needs 12 \(2 warm-up \+ 2 load points x 5\)"):
        bench(server, workload="pika", pika_turns=(turns,), num_requests=5, warmup=2, points=points)
    assert not server.completions()  # refused before anything was sent
    bench(server, workload="pika", pika_turns=(turns,), num_requests=4, warmup=2, points=points)
    sent = [user_text(r.body) for r in server.completions()]
    assert len(sent) == 10 and len(set(sent)) == 10  # every turn exactly once


def test_pika_repeats_only_when_allowed(fake_server: Factory, tmp_path: Path) -> None:
    server = fake_server(pika_answer)
    turns = write_turns(tmp_path / "turns.jsonl", 3)
    result = bench(server, workload="pika", pika_turns=(turns,), num_requests=7, allow_repeats=True)
    sent = [user_text(r.body) for r in server.completions()]
    assert len(sent) == 7 and len(set(sent)) == 3 and result.points[0].servers[0].metrics.completed == 7


def test_pika_duration_run_stops_when_its_turns_run_out(fake_server: Factory, tmp_path: Path) -> None:
    server = fake_server(pika_answer)
    turns = write_turns(tmp_path / "turns.jsonl", 9)
    points = (LoadPoint(concurrency=2), LoadPoint(concurrency=4))
    bench(server, workload="pika", pika_turns=(turns,), num_requests=None, duration_s=30.0, warmup=1, points=points)
    sent = [user_text(r.body) for r in server.completions()]
    assert len(sent) == 9 and len(set(sent)) == 9  # 1 warm-up + 2 points x 4, well before 30 s


def test_pika_turn_files_must_have_the_turn_fields(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="previous_answer, previous_question, response_to_check"):
        pika_workload(turn_files=(bad,))


def test_report_tables_keep_one_line_per_row_on_a_narrow_console(fake_server: Factory) -> None:
    import io

    from rich.console import Console

    from pikaserve.bench.report import print_report

    a, b = fake_server(), fake_server()
    result = bench(a, b, points=(LoadPoint(concurrency=1), LoadPoint(concurrency=2)), num_requests=2)
    out = io.StringIO()
    print_report(result, Console(file=out, width=60, color_system=None))
    lines = out.getvalue().splitlines()
    sweep = lines[next(i for i, line in enumerate(lines) if line.startswith("Sweep")):]
    header = [line for line in sweep if line.startswith("┃")]
    rows = [line for line in sweep if line.startswith("│")]
    assert len(header) == 1 and "TTFT p50" in header[0] and "E2E p99" in header[0]
    assert len(rows) == 2 * 2  # (load point, server) pairs: one line each
