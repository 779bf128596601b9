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
from pikaserve.tune.space import display_name, show_value
from pikaserve.tune.tuner import ConfigResult, TuneConfig, ranked, settings_yaml

if TYPE_CHECKING:
    from rich.console import Console

def best_config(results: list[ConfigResult]) -> ConfigResult | None:
    """The winner: the best of the configs searched more than once when there are any (a
    config first in one search is there partly by luck: its second search is lower, on
    average), else the best; None when no config had goodput."""
    pool = [r for r in results if r.searches > 1] or results
    top = ranked(pool)[0] if pool else None
    return top if top is not None and top.goodput > 0 else None


def search_spread(results: list[ConfigResult]) -> float | None:
    """How far a config's goodput moved between its searches: the mean of |first - second|
    over the configs searched twice (None when none was). Configs closer than this are ties."""
    pairs = [r.goodputs[:2] for r in results if r.searches > 1]
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else None


def best_probe(result: ConfigResult) -> Probe | None:
    """The probe the config's goodput comes from."""
    return max(result.held, key=lambda p: p.goodput, default=None)


@dataclass(frozen=True, slots=True)
class ValueEffect:
    """The best of the measured configs with one value of a knob."""

    goodput: float  # the best goodput measured (a pruned config: what it held before pruning)
    goodput_bound: float  # the most it could be (a pruned config: ConfigResult.goodput_bound)
    capacity: float | None
    unloaded_e2e_ms: float | None  # E2E p50 one request at a time, the lowest

    def text(self) -> str:
        good = f"{self.goodput:.3g}" if self.goodput_bound <= self.goodput else f"{self.goodput:.3g}-{self.goodput_bound:.3g}"
        cap = "-" if self.capacity is None else f"{self.capacity:.3g}"
        e2e = "-" if self.unloaded_e2e_ms is None else f"{self.unloaded_e2e_ms:.0f} ms"
        return f"goodput {good}, capacity {cap} req/s, unloaded E2E p50 {e2e}"


@dataclass(frozen=True, slots=True)
class KnobEffect:
    """How much one knob moved goodput: what each of its values reached at best."""

    knob: str
    by_value: dict[str, ValueEffect]

    @property
    def spread(self) -> tuple[float, float]:
        """The range the goodput spread between its best and worst value lies in (a range
        where pruned configs leave it open)."""
        best = max(v.goodput for v in self.by_value.values())
        return (max(0.0, best - min(v.goodput_bound for v in self.by_value.values())),
                best - min(v.goodput for v in self.by_value.values()))

    @property
    def best_value(self) -> str:
        return max(self.by_value, key=lambda v: self.by_value[v].goodput)

    def sentence(self) -> str:
        lo, hi = self.spread
        spread = f"{hi:.3g}" if hi - lo < 1e-9 else f"{lo:.3g}-{hi:.3g}"
        values = "; ".join(f"{v}: {e.text()}" for v, e in self.by_value.items())
        return f"{self.knob}: goodput spread {spread} req/s ({values})"


def knob_effects(config: TuneConfig, results: list[ConfigResult]) -> list[KnobEffect]:
    """Per knob and value, the best of the measured configs with that value; the knobs with
    the widest goodput spread first. Pruned configs give a range: what they held, up to the
    most they could have had (never above the best config's); configs that failed count 0;
    configs never run do not count."""
    effects = []
    for knob in config.knobs:
        name = display_name(knob.name)
        rows: dict[str, list[ConfigResult]] = {}
        for r in results:
            if r.status != "not-run" and name in r.settings:
                rows.setdefault(show_value(r.settings[name]), []).append(r)
        if len(rows) > 1:
            effects.append(KnobEffect(name, {value: _value_effect(rs) for value, rs in rows.items()}))
    return sorted(effects, key=lambda e: (-e.spread[1], -e.spread[0]))


def _value_effect(results: list[ConfigResult]) -> ValueEffect:
    capacities = [c for r in results if (c := r.capacity) is not None]
    unloaded = [lat["e2e"]["p50"] for r in results for p in r.probes
                if p.kind == "unloaded" and "e2e" in (lat := p.latency_ms)]
    return ValueEffect(
        max(r.goodput for r in results), max(r.goodput_bound for r in results),
        max(capacities, default=None), min(unloaded, default=None),
    )


def _probe_summary(probe: Probe | None, metric: str = "e2e") -> dict[str, float | None]:
    lat = probe.latency_ms.get(metric, {}) if probe is not None else {}
    return {f"{metric}_p50_ms": lat.get("p50"), f"{metric}_p99_ms": lat.get("p99")}


def result_row(rank: int, r: ConfigResult) -> dict[str, Any]:
    """One config in the CSV: latencies at its best rate, and unloaded (one request at a time)."""
    probe = best_probe(r)
    unloaded = next((p for p in r.probes if p.kind == "unloaded"), None)
    return {
        "rank": rank, "config": r.label, "default": r.is_default, "status": r.status,
        "goodput": r.goodput, "searches": r.searches, "goodput_per_search": " ".join(f"{g:.4g}" for g in r.goodputs),
        "max_rate": r.max_rate, "capacity": r.capacity,
        **_probe_summary(probe, "ttft"), **_probe_summary(probe, "e2e"),
        "unloaded_e2e_p50_ms": unloaded.latency_ms.get("e2e", {}).get("p50") if unloaded is not None else None,
        "ready_s": r.ready_s, "detail": r.detail, **{f"knob:{k}": show_value(v) for k, v in r.settings.items()},
    }


def write_reports(config: TuneConfig, results: list[ConfigResult], started_at: str, plots: bool = True) -> list[Path]:
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    order, best = ranked(results), best_config(results)
    effects = knob_effects(config, results)
    report = {
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "slo": str(config.slo),
        "space": {display_name(k.name): [show_value(v) for v in k.values] for k in config.knobs},
        **config.context,
        "budget_s": config.budget_s,
        "best": best.label if best is not None else None,
        "search_spread": search_spread(results),
        "knob_effects": [{"knob": e.knob, "spread": e.spread, "best_value": e.best_value,
                          "by_value": {v: asdict(x) for v, x in e.by_value.items()}} for e in effects],
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
    if best is not None:
        paths.append(write_best_yaml(config, best, out / "best.yaml"))
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
    order = ranked(results)
    for i, r in enumerate(order):
        e2e = _probe_summary(best_probe(r))["e2e_p99_ms"]
        table.add_row(
            str(i + 1), r.label, r.status,
            f"{r.goodput:.3g}" + (f" ({', '.join(f'{g:.3g}' for g in r.goodputs)})" if r.searches > 1 else ""), f"{r.max_rate:.3g}", "-" if r.capacity is None else f"{r.capacity:.3g}",
            "-" if e2e is None else f"{e2e:.0f}", "-" if r.ready_s is None else f"{r.ready_s:.1f}",
        )
    console.print(table)
    for r in order:
        console.print(f"{r.label}: {r.detail}", markup=False, highlight=False)
    if (best := best_config(results)) is not None:
        how = "searched twice" if best.searches > 1 else "searched once"
        console.print(f"Best ({how}): {best.label}, {best.goodput:.3g} req/s", markup=False, highlight=False)
    if (spread := search_spread(results)) is not None:
        console.print(f"Search to search, a config's goodput moved by {spread:.2g} req/s on average: closer configs are ties.")
    effects = knob_effects(config, results)
    if effects:
        console.print("Knobs by how much they moved goodput:")
        for e in effects:
            console.print(f"  {e.sentence()}")
