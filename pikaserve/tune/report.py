"""What `pikaserve tune` reports: the configs ranked by goodput under the SLO, which knobs
mattered, and the best config as a `pikaserve serve --config` file."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pikaserve.machine import describe_machine
from pikaserve.tune.search import Probe
from pikaserve.tune.space import display_name
from pikaserve.tune.tuner import ConfigResult, TuneConfig, settings_yaml

if TYPE_CHECKING:
    from rich.console import Console

# a config's place among equal goodputs (failures last)
_STATUS_ORDER = {"searched": 0, "pruned": 1, "slo-unmet": 2, "failed": 3, "not-run": 4}


def ranked(results: list[ConfigResult]) -> list[ConfigResult]:
    return sorted(results, key=lambda r: (-r.goodput, _STATUS_ORDER.get(r.status, 9), -r.max_rate, -(r.capacity or 0.0)))


def best_probe(result: ConfigResult) -> Probe | None:
    """The probe the config's goodput comes from."""
    return max(result.held, key=lambda p: p.goodput, default=None)


@dataclass(frozen=True, slots=True)
class KnobEffect:
    """How much one knob moved goodput: the best goodput reached with each of its values."""

    knob: str
    best_by_value: dict[str, float]

    @property
    def spread(self) -> float:
        return max(self.best_by_value.values()) - min(self.best_by_value.values())

    @property
    def best_value(self) -> str:
        return max(self.best_by_value, key=lambda v: self.best_by_value[v])

    def sentence(self) -> str:
        values = ", ".join(f"{v}: {g:.3g}" for v, g in self.best_by_value.items())
        return f"{self.knob}: spread {self.spread:.3g} req/s (best goodput per value: {values})"


def knob_effects(config: TuneConfig, results: list[ConfigResult]) -> list[KnobEffect]:
    """Per knob, the best goodput among the measured configs with each of its values, largest
    spread first. Pruned configs count with their capacity, an upper bound of their goodput
    (so a spread is never overstated), configs that failed with 0; configs never run do not
    count."""
    effects = []
    for knob in config.knobs:
        name = display_name(knob.name)
        best: dict[str, float] = {}
        for r in results:
            if r.status != "not-run" and name in r.settings:
                value = _text(r.settings[name])
                reached = r.capacity or 0.0 if r.status == "pruned" else r.goodput
                best[value] = max(best.get(value, 0.0), reached)
        if len(best) > 1:
            effects.append(KnobEffect(name, best))
    return sorted(effects, key=lambda e: -e.spread)


def _text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _probe_summary(probe: Probe | None, metric: str = "e2e") -> dict[str, float | None]:
    lat = probe.latency_ms.get(metric, {}) if probe is not None else {}
    return {f"{metric}_p50_ms": lat.get("p50"), f"{metric}_p99_ms": lat.get("p99")}


def result_row(rank: int, r: ConfigResult) -> dict[str, Any]:
    """One config in the CSV: latencies at its best rate, and unloaded (one request at a time)."""
    probe = best_probe(r)
    unloaded = next((p for p in r.probes if p.kind == "unloaded"), None)
    return {
        "rank": rank, "config": r.label, "default": r.is_default, "status": r.status,
        "goodput": r.goodput, "max_rate": r.max_rate, "capacity": r.capacity,
        **_probe_summary(probe, "ttft"), **_probe_summary(probe, "e2e"),
        "unloaded_e2e_p50_ms": unloaded.latency_ms.get("e2e", {}).get("p50") if unloaded is not None else None,
        "ready_s": r.ready_s, "detail": r.detail, **{f"knob:{k}": _text(v) for k, v in r.settings.items()},
    }


def write_reports(config: TuneConfig, results: list[ConfigResult], started_at: str, plots: bool = True) -> list[Path]:
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    order = ranked(results)
    effects = knob_effects(config, results)
    report = {
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "slo": str(config.slo),
        "space": {display_name(k.name): [_text(v) for v in k.values] for k in config.knobs},
        **config.context,
        "budget_s": config.budget_s,
        "best": order[0].label if order and order[0].goodput > 0 else None,
        "knob_effects": [{"knob": e.knob, "spread": e.spread, "best_value": e.best_value, "best_by_value": e.best_by_value} for e in effects],
        "results": [{**result_row(i + 1, r), "settings": r.settings, "probes": [asdict(p) for p in r.probes]} for i, r in enumerate(order)],
    }
    paths = [out / "tune.json", out / "tune.csv"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    rows = [result_row(i + 1, r) for i, r in enumerate(order)]
    with open(paths[1], "w", newline="") as f:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if order and order[0].goodput > 0:
        paths.append(write_best_yaml(config, order[0], out / "best.yaml"))
    if plots:
        from pikaserve.tune.plots import write_plots

        paths += write_plots(config, order, out)
    return paths


def write_best_yaml(config: TuneConfig, best: ConfigResult, path: Path) -> Path:
    if config.server_cmd is not None:
        how = f"# the values of --server-cmd's placeholders: {config.server_cmd}\n"
    else:
        how = f"# serve it with: pikaserve serve --config {path.name} {' '.join(config.serve_args)}".rstrip() + "\n"
    head = f"# pikaserve tune: best goodput under {config.slo}: {best.goodput:.3g} req/s ({best.label})\n"
    path.write_text(head + how + settings_yaml(best.settings))
    return path


def print_report(config: TuneConfig, results: list[ConfigResult], console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"pikaserve tune: goodput under {config.slo}")
    for column in ("#", "config", "status", "goodput req/s", "max rate req/s", "capacity req/s", "e2e p99 ms", "ready s"):
        table.add_column(column, justify="left" if column in ("config", "status") else "right")
    for i, r in enumerate(ranked(results)):
        e2e = _probe_summary(best_probe(r))["e2e_p99_ms"]
        table.add_row(
            str(i + 1), r.label, r.status,
            f"{r.goodput:.3g}", f"{r.max_rate:.3g}", "-" if r.capacity is None else f"{r.capacity:.3g}",
            "-" if e2e is None else f"{e2e:.0f}", "-" if r.ready_s is None else f"{r.ready_s:.1f}",
        )
    console.print(table)
    for r in ranked(results):
        console.print(f"{r.label}: {r.detail}", markup=False, highlight=False)
    effects = knob_effects(config, results)
    if effects:
        console.print("Knobs by how much they moved goodput:")
        for e in effects:
            console.print(f"  {e.sentence()}")
