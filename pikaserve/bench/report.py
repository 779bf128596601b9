"""Reports of `pikaserve bench`: console tables (rich), results.json, results.csv, requests.csv.

Every number is flattened once by `flat_metrics`, so the table, the CSV columns and the ratios of
a --compare run all show the same values under the same names. PNG plots are in plots.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from enum import Enum
from pathlib import Path
from typing import Any, Literal, cast

from rich.console import Console
from rich.table import Table

from pikaserve.bench.runner import BenchResult, PointRun, ServerRun
from pikaserve.bench.stats import Metrics, Summary, ratio
from pikaserve.machine import describe_machine

LATENCY_NAMES = {"ttft": "TTFT", "itl": "ITL", "tpot": "TPOT", "e2e": "E2E", "queue_wait": "Queue wait"}
# Scalar columns of results.csv, in order, with their table captions.
SCALARS = {
    "requests": "Requests issued",
    "completed": "Completed",
    "failed": "Failed",
    "duration_s": "Duration (s)",
    "request_throughput": "Requests/s",
    "output_throughput": "Output tok/s",
    "input_tokens": "Input tokens",
    "output_tokens": "Output tokens",
    "goodput": "Goodput (req/s)",
    "slo_attainment": "SLO attainment",
    "json_checked": "JSON checked",
    "json_valid": "JSON valid",
    "json_validity": "JSON validity",
}


def flat_metrics(metrics: Metrics) -> dict[str, float | int | None]:
    """Metrics as one flat dict: scalars, then `<latency>_<stat>_ms` for every summary."""
    row: dict[str, float | int | None] = {key: getattr(metrics, key) for key in SCALARS}
    for name in Metrics.LATENCIES:
        summary: Summary | None = getattr(metrics, name)
        for stat in Summary.STATS:
            row[f"{name}_{stat}_ms"] = None if summary is None else getattr(summary, stat)
    return row


def errors_text(errors: dict[str, int]) -> str:
    return ";".join(f"{kind}={count}" for kind, count in errors.items())


def compare_ratios(point: PointRun) -> dict[str, dict[str, float | None]]:
    """For each non-baseline server: every flat metric divided by the baseline's (server 0)."""
    base = flat_metrics(point.servers[0].metrics)
    out = {}
    for server in point.servers[1:]:
        values = flat_metrics(server.metrics)
        out[server.target.label] = {k: ratio(v, base[k]) for k, v in values.items() if isinstance(v, float)}
    return out


def _jsonable(value: Any) -> Any:
    """Dataclasses/paths/enums/inf -> plain JSON (inf is not JSON: it becomes the string 'inf')."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def result_json(result: BenchResult) -> dict[str, Any]:
    config = _jsonable(result.config)
    config["slos"] = [str(s) for s in result.config.slos]
    return {
        "started_at": result.started_at,
        "machine": describe_machine(),
        "config": config,
        "workload": {"name": result.workload.name, "distinct_requests": len(result.workload.requests), "tokens_exact": result.workload.tokens_exact},
        "servers": [_jsonable(t) for t in result.targets],
        "warmup_errors": result.warmup_errors,
        "points": [
            {
                "concurrency": p.point.concurrency,
                "rate": _jsonable(p.point.rate),
                "label": p.point.label,
                "servers": [{"label": s.target.label, "url": s.target.url, "model": s.target.model, "metrics": _jsonable(s.metrics)} for s in p.servers],
                "ratios": compare_ratios(p),
            }
            for p in result.points
        ],
    }


def _point_columns(point: PointRun, server: ServerRun) -> dict[str, Any]:
    return {
        "point": point.point.label,
        "concurrency": point.point.concurrency,
        "rate": point.point.rate,
        "server": server.target.label,
        "url": server.target.url,
        "model": server.target.model,
    }


def write_csv(result: BenchResult, path: Path) -> None:
    """results.csv: one row per (load point, server)."""
    rows = [
        {**_point_columns(p, s), **flat_metrics(s.metrics), "errors": errors_text(s.metrics.errors)}
        for p in result.points
        for s in p.servers
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def write_requests_csv(result: BenchResult, path: Path) -> None:
    """requests.csv: one row per measured request (for looking into outliers and wrong answers)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["point", "server", "index", "error", "ttft_ms", "tpot_ms", "e2e_ms", "max_itl_ms", "queue_wait_ms",
                         "output_tokens", "prompt_tokens", "finish_reason", "valid", "text"])  # fmt: skip
        for p in result.points:
            for s in p.servers:
                for r in s.records:
                    writer.writerow([p.point.label, s.target.label, r.index, r.error or "", _ms(r.ttft), _ms(r.tpot), _ms(r.e2e),
                                     _ms(max(r.itls, default=None)), _ms(r.queue_wait), r.output_tokens, r.prompt_tokens,
                                     r.finish_reason, r.valid, r.text])  # fmt: skip


def write_reports(result: BenchResult, output_dir: Path, plots: bool = True) -> list[Path]:
    """Write every output file; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "results.json", output_dir / "results.csv", output_dir / "requests.csv"]
    paths[0].write_text(json.dumps(result_json(result), indent=2) + "\n", encoding="utf-8")
    write_csv(result, paths[1])
    write_requests_csv(result, paths[2])
    if plots:
        from pikaserve.bench.plots import write_plots  # matplotlib is slow to import: only when plotting

        paths += write_plots(result, output_dir)
    return paths


def _fmt(value: float | int | None, key: str = "") -> str:
    if value is None:
        return "-"
    if key in ("slo_attainment", "json_validity"):
        return f"{value * 100:.1f}%"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def point_table(point: PointRun) -> Table:
    """Every metric of one load point, a column per server, then the ratios to the baseline."""
    servers = point.servers
    table = Table(title=point.point.label, title_justify="left")
    table.add_column("Metric")
    for s in servers:
        table.add_column(s.target.label, justify="right")
    for s in servers[1:]:
        table.add_column(f"{s.target.label} / {servers[0].target.label}", justify="right", style="cyan")
    flats = [flat_metrics(s.metrics) for s in servers]
    ratios = compare_ratios(point)
    table.add_row("Errors", *(errors_text(s.metrics.errors) or "-" for s in servers), *("" for _ in servers[1:]))
    captions = dict(SCALARS)
    for name, caption in LATENCY_NAMES.items():
        captions.update({f"{name}_{stat}_ms": f"{caption} {stat} (ms)" for stat in Summary.STATS})
    for key, caption in captions.items():
        if all(f[key] is None for f in flats):
            continue  # e.g. no SLOs given, no JSON answers, closed loop (no queue wait)
        cells = [_fmt(f[key], key) for f in flats]
        cells += [_fmt(ratios[s.target.label].get(key)) + ("x" if ratios[s.target.label].get(key) is not None else "") for s in servers[1:]]
        table.add_row(caption, *cells)
    return table


def sweep_table(result: BenchResult) -> Table:
    """One line per (load point, server): the headline numbers of a sweep."""
    open_loop = any(p.point.rate is not None for p in result.points)
    table = Table(title="Sweep (latencies in ms)", title_justify="left")
    table.add_column("Rate/s" if open_loop else "Conc.", no_wrap=True)
    table.add_column("Server", no_wrap=True)
    for head in ("Req/s", "Tok/s", "TTFT p50", "TTFT p99", "ITL p50", "TPOT p50", "E2E p50", "E2E p99", "Goodput", "Valid"):
        table.add_column(head, justify="right")
    table.add_column("Errors")
    for p in result.points:
        for s in p.servers:
            f = flat_metrics(s.metrics)
            keys = ["request_throughput", "output_throughput", "ttft_median_ms", "ttft_p99_ms", "itl_median_ms", "tpot_median_ms",
                    "e2e_median_ms", "e2e_p99_ms", "goodput", "json_validity"]  # fmt: skip
            table.add_row(f"{p.point.load:g}", s.target.label, *(_fmt(f[k], k) for k in keys), errors_text(s.metrics.errors) or "-")
    return table


def print_report(result: BenchResult, console: Console) -> None:
    for server, errors in zip(result.targets, result.warmup_errors):
        if errors:
            console.print(f"[yellow]warmup errors on {server.label}: {errors_text(errors)}[/yellow]")
    for point in result.points:
        _print_whole(console, point_table(point))
    if len(result.points) > 1:
        _print_whole(console, sweep_table(result))


def _print_whole(console: Console, table: Table) -> None:
    """At the table's natural width, never squeezed into the console's: a narrow terminal
    wraps whole lines, and a redirected run (rich assumes 80 columns) writes one line per
    row, instead of cells folded into stacks nobody can read."""
    natural = console.measure(table, options=console.options.update(max_width=10_000)).maximum
    if natural <= console.width:
        console.print(table)
        return
    # rich types Console.color_system as str; its values are names Console() takes
    colors = cast(Literal["standard", "256", "truecolor", "windows"] | None, console.color_system)
    wide = Console(file=console.file, width=natural, color_system=colors,
                   force_terminal=console.is_terminal)
    wide.print(table)
