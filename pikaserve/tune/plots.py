"""PNG plots of a `pikaserve tune` run (matplotlib, no pyplot global state):

- goodput.png: goodput under the SLO per config, ranked (the default in orange), with the
  range of a config's searches and the most a pruned config could have had;
- latency_vs_load.png: p50 (o) and p99 (x) of each SLO metric at every rate probed, for the
  best three configs and the default, the limits as grey lines.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from pikaserve.tune.tuner import ConfigResult, TuneConfig


def plot_goodput(config: TuneConfig, ranked: list[ConfigResult], path: Path) -> Path:
    fig = Figure(figsize=(12, 1.5 + 0.3 * len(ranked)), layout="constrained")
    ax = fig.subplots()
    rows = ranked[::-1]  # best at the top
    y = range(len(rows))
    labels = [r.label if r.status == "searched" else f"{r.label} [{r.status}]" for r in rows]
    ax.barh(y, [r.goodput for r in rows], color=["C1" if r.is_default else "C0" for r in rows])
    # pruned configs: the most they could have had
    ax.barh(y, [r.goodput_bound if r.status == "pruned" else 0.0 for r in rows], color="lightgrey", hatch="//")
    for i, r in enumerate(rows):
        if r.searches > 1:  # the spread of its searches
            ax.plot([min(r.goodputs), max(r.goodputs)], [i, i], color="black", linewidth=1.5)
    ax.set_yticks(y, labels, fontsize="small")
    ax.set_xlabel("goodput (req/s meeting the SLO)\nblack: range of a config's searches; hatched: the most a pruned config could have had")
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Goodput under {config.slo} (default in orange)")
    fig.savefig(path, dpi=100)
    return path


def plot_latency_vs_load(config: TuneConfig, ranked: list[ConfigResult], path: Path) -> Path:
    shown = ranked[:3] + [r for r in ranked[3:] if r.is_default]
    metrics = [s.metric for s in config.slo.slos if s.metric in ("ttft", "tpot", "e2e")] or ["e2e"]
    fig = Figure(figsize=(7 * len(metrics), 4.5 + 0.25 * len(shown)), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, r in enumerate(shown):
            probes = [p for p in r.probes if p.kind == "rate" and metric in p.latency_ms]
            rates = [p.load for p in probes]
            name = r.label + (" (default)" if r.is_default and r.label != "default" else "")
            ax.scatter(rates, [p.latency_ms[metric]["p50"] for p in probes], marker="o", color=f"C{i}", label=f"{name}: p50")
            ax.scatter(rates, [p.latency_ms[metric]["p99"] for p in probes], marker="x", color=f"C{i}", label=f"{name}: p99")
        for slo in config.slo.slos:
            if slo.metric == metric:
                ax.axhline(slo.limit_s * 1e3, color="grey", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{metric.upper()} (ms) at each probed rate")
        ax.set_xlabel("offered request rate (req/s)")
        ax.grid(True, alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def write_plots(config: TuneConfig, ranked: list[ConfigResult], output_dir: Path) -> list[Path]:
    return [
        plot_goodput(config, ranked, output_dir / "goodput.png"),
        plot_latency_vs_load(config, ranked, output_dir / "latency_vs_load.png"),
    ]
