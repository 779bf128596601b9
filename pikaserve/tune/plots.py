"""PNG plots of a `pikaserve tune` run (matplotlib, no pyplot global state):

- goodput.png: goodput under the SLO per config, ranked (the default in orange);
- latency_vs_load.png: p50 (solid) and p99 (dotted) of each SLO metric against the offered
  request rate of the search's probes, for the best three configs and the default, with the
  limits as grey lines.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from pikaserve.tune.tuner import ConfigResult, TuneConfig


def plot_goodput(config: TuneConfig, ranked: list[ConfigResult], path: Path) -> Path:
    fig = Figure(figsize=(10, 1.2 + 0.3 * len(ranked)), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r.label} [{r.status}]" if r.status != "searched" else r.label for r in ranked][::-1]
    values = [r.goodput for r in ranked][::-1]
    colours = ["C1" if r.is_default else "C0" for r in ranked][::-1]
    ax.barh(range(len(ranked)), values, color=colours)
    ax.set_yticks(range(len(ranked)), labels, fontsize="small")
    ax.set_xlabel("goodput (requests/s meeting the SLO)")
    ax.set_title(f"Goodput under {config.slo}")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def plot_latency_vs_load(config: TuneConfig, ranked: list[ConfigResult], path: Path) -> Path:
    shown = ranked[:3] + [r for r in ranked[3:] if r.is_default]
    metrics = [s.metric for s in config.slo.slos if s.metric in ("ttft", "tpot", "e2e")] or ["e2e"]
    fig = Figure(figsize=(6 * len(metrics), 4.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, r in enumerate(shown):
            probes = sorted((p for p in r.probes if p.kind == "rate" and metric in p.latency_ms), key=lambda p: p.load)
            rates = [p.load for p in probes]
            label = f"{r.label}{' (default)' if r.is_default and r.label != 'default' else ''}"
            ax.plot(rates, [p.latency_ms[metric]["p50"] for p in probes], "-", marker="o", markersize=3, color=f"C{i}", label=f"{label} p50")
            ax.plot(rates, [p.latency_ms[metric]["p99"] for p in probes], ":", marker="o", markersize=3, color=f"C{i}", label=f"{label} p99")
        for slo in config.slo.slos:
            if slo.metric == metric:
                ax.axhline(slo.limit_s * 1e3, color="grey", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{metric.upper()} (ms) vs offered load")
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.savefig(path, dpi=100)
    return path


def write_plots(config: TuneConfig, ranked: list[ConfigResult], output_dir: Path) -> list[Path]:
    return [
        plot_goodput(config, ranked, output_dir / "goodput.png"),
        plot_latency_vs_load(config, ranked, output_dir / "latency_vs_load.png"),
    ]
