"""Command line of `pikaserve tune`: requirements (an SLO) -> workload -> configs -> benchmark
-> the best config, as one command (docs/tune.md)."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pikaserve.bench.cli import NEEDS_EXTRA
from pikaserve.bench.config import ENDPOINTS, PIKA_SCHEMA_FORMS
from pikaserve.bench.schedule import Arrival

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from pikaserve.tune.space import Candidate
    from pikaserve.tune.tuner import ConfigResult, TuneConfig

DESCRIPTION = (
    "Find the config with the most goodput under an SLO: start a server per config, search the "
    "highest request rate at which the SLO holds, and report the configs ranked, which knobs "
    "mattered, and the best config as a --config YAML. Tunes pikaserve, or any OpenAI-compatible "
    "server through --server-cmd."
)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float:
    """'30m' | '90s' | '1.5h' | '600' (seconds) -> seconds."""
    text = text.strip().lower()
    scale = _DURATION_UNITS.get(text[-1:], None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 30m, 90s, 1h)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the budget must be > 0: {text!r}")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to tune")
    g.add_argument("--space", nargs="+", metavar="KNOB=V1,V2", help="knobs and their values; every combination is a "
                   "config. pikaserve: any serve setting, as in --config YAML (max_num_seqs=8,32 enforce_eager=true,false); "
                   "--server-cmd: its placeholders. Default for pikaserve: a space per device (docs/tune.md)")
    g.add_argument("--server-cmd", metavar="TEMPLATE", help="tune another OpenAI-compatible server: its command with "
                   "{port} and one {KNOB} per --space knob, e.g. 'python -m llama_cpp.server --port {port} --n_threads {threads}'")
    g.add_argument("--serve-args", default="", metavar="ARGS", help="fixed arguments of every pikaserve serve, "
                   "e.g. '--model /models/smollm2.gguf'")
    g.add_argument("--start-timeout", type=parse_budget, default=300.0, help="seconds a server gets to answer "
                   "GET /v1/models before its config counts as failed")

    g = p.add_argument_group("requirements and workload")
    g.add_argument("--slo", required=True, help="limits that p%% of requests must meet, e.g. ttft=50ms,e2e=200ms,p=99 "
                   "(metrics: ttft, tpot, itl, e2e; p defaults to 99); a failed or invalid answer misses it")
    g.add_argument("--workload", default="pika", help="pika | random | prefix-repetition | FILE.jsonl (one request body per line)")
    g.add_argument("--endpoint", choices=list(ENDPOINTS), default="chat", help="chat or completions")
    g.add_argument("--pika-schema", choices=PIKA_SCHEMA_FORMS, default="json_schema", help="pika: how the answer "
                   "schema is sent (json_object for llama-cpp-python's server); answers are checked either way")
    g.add_argument("--warmup", type=int, default=4, help="requests to every new server before measuring")
    g.add_argument("--arrival", choices=[a.value for a in Arrival], default=Arrival.POISSON.value, help="open-loop arrivals of the rate search")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals and random prompts")
    g.add_argument("--request-timeout", type=float, default=60.0, help="seconds without data before a request fails")

    g = p.add_argument_group("search")
    g.add_argument("--budget", type=parse_budget, help="start no config after this long, e.g. 20m (the one running "
                   "finishes); configs not reached are listed as not run (default: the whole space)")
    g.add_argument("--confirm", type=int, default=3, help="search the best K configs and the default once more, "
                   "each on a new server, and rank them by the mean of their searches (0: off)")
    g.add_argument("--probe-requests", type=int, default=64, help="requests of the capacity probe, and at most of a rate probe")
    g.add_argument("--unloaded-requests", type=int, default=8, help="requests sent one at a time first")
    g.add_argument("--capacity-concurrency", type=int, default=32, help="requests in flight when measuring capacity")
    g.add_argument("--max-rate-probes", type=int, default=6, help="open-loop probes of the rate search per config")
    g.add_argument("--tolerance", type=float, default=0.1, help="stop a search when it brackets the highest rate this closely (relative)")
    g.add_argument("--max-probe-seconds", type=float, default=15.0, help="a rate probe sends about this many seconds of arrivals (16 requests at least)")

    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="results directory; run again with the same one to resume "
                   "(default: tune-results/<timestamp>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="find the config with the most goodput under an SLO", description=DESCRIPTION)
    configure_parser(parser)
    parser.set_defaults(func=run)


def default_space() -> tuple[str, ...]:
    from pikaserve.tune.space import DEFAULT_SPACES

    import torch

    return DEFAULT_SPACES["cuda" if torch.cuda.is_available() else "cpu"]


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    from pikaserve.tune.probe import WorkloadSpec, parse_workload
    from pikaserve.tune.search import SearchSettings
    from pikaserve.tune.space import parse_pikaserve_space, parse_slo, parse_template_space
    from pikaserve.tune.tuner import TuneConfig

    if args.server_cmd is not None:
        if not args.space:
            raise ValueError("--server-cmd needs --space: the values of its placeholders")
        knobs = parse_template_space(args.space, args.server_cmd)
    else:
        knobs = parse_pikaserve_space(args.space or default_space())
    name, dataset = parse_workload(args.workload)
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    return TuneConfig(
        knobs=knobs,
        slo=parse_slo(args.slo),
        output_dir=args.out or Path("tune-results") / datetime.now().strftime("%Y%m%d-%H%M%S"),
        workload=WorkloadSpec(name, dataset, args.endpoint, Arrival(args.arrival), args.seed, args.warmup,
                              args.request_timeout, args.pika_schema),
        search=SearchSettings(
            probe_requests=args.probe_requests, unloaded_requests=args.unloaded_requests,
            capacity_concurrency=args.capacity_concurrency, max_probe_s=args.max_probe_seconds,
            tolerance=args.tolerance, max_rate_probes=args.max_rate_probes,
        ),
        server_cmd=args.server_cmd,
        serve_args=tuple(shlex.split(args.serve_args)),
        budget_s=args.budget,
        confirm=args.confirm,
        start_timeout_s=args.start_timeout,
    )


class ConsoleTuneProgress:
    """A line per finished config; with a rich Progress, also one bar over the configs."""

    def __init__(self, console: Console, total: int, bar: Progress | None = None) -> None:
        self._console, self._bar = console, bar
        self._task = bar.add_task("configs", total=total) if bar is not None else None

    def start(self, candidate: Candidate) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=f"measuring {candidate.label}")

    def done(self, result: ConfigResult, reused: bool) -> None:
        note = (f" (mean of {result.searches} searches)" if result.searches > 1 else "") + (" (reused)" if reused else "")
        line = f"{result.label}: {result.status}, goodput {result.goodput:.3g} req/s{note}"
        (self._bar.console if self._bar is not None else self._console).print(line, markup=False, highlight=False)
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task)


def run(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        print(f"error: {NEEDS_EXTRA}", file=sys.stderr)
        return 2
    from pikaserve.tune.report import print_report, write_reports
    from pikaserve.tune.tuner import Tuner

    console = Console()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the server being measured is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        config = config_from_args(args)
        tuner = Tuner(config)
        console.print(f"{len(tuner.candidates)} configs, SLO: {config.slo}; results in {config.output_dir}")
        if args.no_progress:
            tuner.progress = ConsoleTuneProgress(console, len(tuner.candidates))
            results = tuner.run()
        else:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=Console(stderr=True)) as bar:
                total = len(tuner.candidates) + (config.confirm + 1 if config.confirm else 0)  # at most
                tuner.progress = ConsoleTuneProgress(console, total, bar)
                results = tuner.run()
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: finished configs are kept; run again with the same --out to resume[/yellow]")
        return 130
    print_report(config, results, console)
    for path in write_reports(config, results, started_at, plots=not args.no_plots):
        console.print(f"wrote {path}")
    return 0 if any(r.goodput > 0 for r in results) else 1
