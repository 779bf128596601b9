"""Command line of `pikaserve bench` (also `python -m pikaserve.bench`).

`add_parser(subparsers)` registers the `bench` subcommand on pikaserve's CLI and `run(args)` runs
it; `main(argv)` is the standalone entry point. Flags map one to one onto `BenchConfig`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from pikaserve.bench.config import ENDPOINTS, PIKA_SCHEMA_FORMS, WORKLOADS, BenchConfig, LoadPoint, normalize_url
from pikaserve.bench.schedule import Arrival
from pikaserve.bench.stats import parse_slos

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

T = TypeVar("T")
NEEDS_EXTRA = "pikaserve bench needs its extra: pip install 'pikaserve[bench]' (rich, matplotlib)"
DESCRIPTION = "Load generator for OpenAI-compatible servers: streams requests and reports TTFT, ITL, TPOT, E2E, throughput and goodput."


def _list_of(convert: Callable[[str], T]) -> Callable[[str], list[T]]:
    def parse(text: str) -> list[T]:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add every `bench` flag to `p`."""
    g = p.add_argument_group("servers")
    g.add_argument("--url", required=True, help="base URL of the server to measure (the baseline), e.g. http://127.0.0.1:8000")
    g.add_argument("--compare", nargs="+", default=[], metavar="URL", help="more servers: the same requests go to each, interleaved")
    g.add_argument("--labels", type=_list_of(str), default=[], help="comma-separated display names, one per server")
    g.add_argument("--model", type=_list_of(str), default=[], help="model id for all servers, or one per server (default: first of GET /v1/models)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--endpoint", choices=list(ENDPOINTS), default="chat", help="chat (/v1/chat/completions) or completions (/v1/completions)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds without data before a request counts as a timeout")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="pika", help="what to send (pika: "
                   "the Pika classifier, each turn new; see docs/bench.md)")
    g.add_argument("--dataset", type=Path, help="JSONL file for --workload file: one request body per line")
    g.add_argument("--pika-dir", type=Path, help="directory with the Pika files (default: the copy bundled in pikaserve.data)")
    g.add_argument("--pika-turns", type=Path, nargs="+", default=[], metavar="FILE",
                   help="JSONL files of Pika turns (turns.jsonl's fields) to send instead of the bundled ~1,880")
    g.add_argument("--allow-repeats", action="store_true",
                   help="pika: cycle through the turns when the run needs more (by default each turn is sent once per run)")
    g.add_argument("--pika-schema", choices=PIKA_SCHEMA_FORMS, default="json_schema",
                   help="how the answer schema is sent as response_format: OpenAI json_schema, json_object+schema "
                        "(llama-cpp-python's form), or none; answers are checked against it either way")  # fmt: skip
    g.add_argument("--input-len", type=int, default=256, help="random: prompt tokens")
    g.add_argument("--output-len", type=int, default=64, help="random, prefix-repetition: output tokens (max_tokens)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in [L*(1-r), L*(1+r)]")
    g.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct shared prefixes")
    g.add_argument("--prefix-len", type=int, default=256, help="prefix-repetition: tokens per prefix")
    g.add_argument("--suffix-len", type=int, default=32, help="prefix-repetition: tokens per unique suffix")
    g.add_argument("--num-prompts", type=int, help="random, prefix-repetition: distinct prompts (default: one per request)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="send ignore_eos so answers run to max_tokens (default: on for random and prefix-repetition)")  # fmt: skip
    g.add_argument("--max-tokens", type=int, help="override every request's max_tokens")
    g.add_argument("--temperature", type=float, help="override every request's temperature")
    g.add_argument("--extra-body", type=_json_object, default={}, help="JSON object merged into every request body")
    g.add_argument("--server-body", type=_json_object, nargs="+", default=[], metavar="JSON",
                   help="one JSON object per server (--url, then each --compare), merged last into that server's requests")

    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=_list_of(int), default=None, help="closed loop: requests in flight; a list sweeps (1,2,4,8)")
    g.add_argument("--rate", type=_list_of(float), default=None, help="open loop: requests/s ('inf': all at once); a list sweeps")
    g.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight (waiting counts as queue wait)")
    g.add_argument("--arrival", choices=[a.value for a in Arrival], default=Arrival.POISSON.value, help="open-loop arrivals")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals and random prompts")
    g.add_argument("-n", "--num-requests", type=int, help="requests per load point and server (default 100, or unbounded with --duration)")
    g.add_argument("--duration", type=float, help="seconds per load point: no new requests (or --compare rounds) after it")
    g.add_argument("--warmup", type=int, default=0, help="requests per server before measuring, not recorded")
    g.add_argument("--round-size", type=int, help="with --compare: requests per server turn (default: 4 x concurrency, or ~2 s of arrivals)")
    g.add_argument("--slo", default=None, help="SLOs for goodput, e.g. ttft=50ms,e2e=200ms (metrics: ttft, tpot, itl, e2e)")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, help="where results go (default: bench-results/<timestamp>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` on pikaserve's CLI."""
    parser = subparsers.add_parser("bench", help="measure servers under load", description=DESCRIPTION)
    configure_parser(parser)
    parser.set_defaults(func=run)  # pikaserve.cli dispatches with args.func(args)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Map parsed flags onto a BenchConfig (raises ValueError with a readable message)."""
    if args.concurrency is not None and args.rate is not None:
        raise ValueError("use --concurrency (closed loop) or --rate (open loop, capped by --max-concurrency), not both")
    if args.rate is not None:
        points = tuple(LoadPoint(concurrency=args.max_concurrency, rate=r) for r in args.rate)
    else:
        points = tuple(LoadPoint(concurrency=c) for c in (args.concurrency or [1]))
    num_requests = args.num_requests if args.num_requests is not None or args.duration is not None else 100
    return BenchConfig(
        urls=tuple(normalize_url(u) for u in [args.url, *args.compare]),
        labels=tuple(args.labels),
        models=tuple(args.model),
        api_key=args.api_key,
        endpoint=args.endpoint,
        workload=args.workload,
        pika_dir=args.pika_dir,
        pika_turns=tuple(args.pika_turns),
        allow_repeats=args.allow_repeats,
        pika_schema=args.pika_schema,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        num_prompts=args.num_prompts,
        ignore_eos=args.ignore_eos,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        extra_body=args.extra_body,
        server_bodies=tuple(args.server_body),
        points=points,
        arrival=Arrival(args.arrival),
        seed=args.seed,
        num_requests=num_requests,
        duration_s=args.duration,
        warmup=args.warmup,
        round_size=args.round_size,
        timeout_s=args.timeout,
        slos=parse_slos(args.slo),
        output_dir=args.output_dir,
        plots=not args.no_plots,
        progress=not args.no_progress,
    )


class RichProgress:
    """Progress bar: one task per load point."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start_point(self, point: LoadPoint, total: int | None) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
        self._task = self._progress.add_task(point.label, total=total)

    def advance(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)


def run(args: argparse.Namespace) -> int:
    """Run `bench` from parsed arguments; returns the exit status."""
    try:  # the bench's console output is rich's; the server does not need it
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        print(f"error: {NEEDS_EXTRA}", file=sys.stderr)
        return 2
    from pikaserve.bench.report import print_report, write_reports  # imports the runner (httpx) lazily
    from pikaserve.bench.runner import run_bench

    console = Console()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request under INFO logging
    try:
        config = config_from_args(args)
        if config.progress:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
                result = run_bench(config, RichProgress(bar))
        else:
            result = run_bench(config)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: no report written[/yellow]")
        return 130
    print_report(result, console)
    output_dir = config.output_dir or Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    for path in write_reports(result, output_dir, plots=config.plots):
        console.print(f"wrote {path}")
    # A server that answered nothing at some load point is a failed run (the tables say why).
    return 1 if any(s.metrics.completed == 0 for p in result.points for s in p.servers) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pikaserve bench", description=DESCRIPTION)
    configure_parser(parser)
    return run(parser.parse_args(argv))
