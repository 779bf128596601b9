"""PNG plots of a `pikaserve bench` run (matplotlib, no pyplot global state):

- latency_vs_load.png: TTFT, ITL, TPOT and E2E percentiles (p50 solid, p90 dashed, p99 dotted)
  against the load (concurrency or request rate), one colour per server;
- throughput_vs_latency.png: median and p99 TTFT and E2E against output tokens/s, one line per
  server, each point labelled with its load.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from pikaserve.bench.runner import BenchResult
from pikaserve.bench.stats import Summary

_STYLES = {"median": "-", "p90": "--", "p99": ":"}
_PANELS = {"ttft": "TTFT", "itl": "ITL", "tpot": "TPOT", "e2e": "E2E"}


def _points(result: BenchResult) -> list[int]:
    """Indices of load points that can go on an axis (an infinite rate cannot)."""
    return [i for i, p in enumerate(result.points) if math.isfinite(p.point.load)]


def _load_axis(result: BenchResult) -> str:
    return "request rate (req/s)" if any(p.point.rate is not None for p in result.points) else "concurrency"


def plot_latency_vs_load(result: BenchResult, path: Path) -> Path:
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    keep = _points(result)
    loads = [result.points[i].point.load for i in keep]
    for ax, (metric, title) in zip(axes, _PANELS.items()):
        for server, target in enumerate(result.targets):
            colour = f"C{server}"
            for stat, style in _STYLES.items():
                ys = [_stat(getattr(result.points[i].servers[server].metrics, metric), stat) for i in keep]
                ax.plot(loads, ys, style, marker="o", markersize=3, color=colour, label=f"{target.label} {stat}")
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel(_load_axis(result))
        ax.set_ylabel("ms")
        if loads and min(loads) > 0 and max(loads) / min(loads) >= 4:
            ax.set_xscale("log", base=2)  # sweeps usually double the load
        ax.set_xticks(loads, [f"{x:g}" for x in loads])  # ticks at the measured loads only
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Latency percentiles vs load — {result.workload.name}")
    fig.savefig(path, dpi=100)
    return path


def plot_throughput_vs_latency(result: BenchResult, path: Path) -> Path:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    keep = _points(result)
    for ax, (metric, title) in zip(axes, (("ttft", "TTFT"), ("e2e", "E2E"))):
        for server, target in enumerate(result.targets):
            runs = [result.points[i].servers[server] for i in keep]
            xs = [r.metrics.output_throughput for r in runs]
            for stat, style in (("median", "-"), ("p99", ":")):
                ys = [_stat(getattr(r.metrics, metric), stat) for r in runs]
                ax.plot(xs, ys, style, marker="o", markersize=3, color=f"C{server}", label=f"{target.label} {stat}")
            for i, x, r in zip(keep, xs, runs):
                y = _stat(r.metrics.e2e if metric == "e2e" else r.metrics.ttft, "median")
                if not math.isnan(y):
                    ax.annotate(f"{result.points[i].point.load:g}", (x, y), fontsize="x-small", textcoords="offset points", xytext=(3, 3))
        ax.set_title(f"{title} vs throughput")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Throughput vs latency — {result.workload.name} (labels: {_load_axis(result)})")
    fig.savefig(path, dpi=100)
    return path


def _stat(summary: Summary | None, stat: str) -> float:
    return math.nan if summary is None else getattr(summary, stat)  # NaN: a gap in the line


def write_plots(result: BenchResult, output_dir: Path) -> list[Path]:
    return [
        plot_latency_vs_load(result, output_dir / "latency_vs_load.png"),
        plot_throughput_vs_latency(result, output_dir / "throughput_vs_latency.png"),
    ]
