"""The tuning loop: for every candidate config, start its server, search it, stop it.

Results are written per config as soon as it is done (`OUTPUT_DIR/configs/KEY.json`); a run
pointed at the same directory again reuses every finished config whose server, workload, SLO
and search settings are unchanged, so an interrupted run resumes where it stopped. A config
that fails to start or crashes is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from pikaserve.bench.config import LoadPoint
from pikaserve.tune.probe import BenchProbe, WorkloadSpec
from pikaserve.tune.search import Probe, SearchSettings, search
from pikaserve.tune.server_process import ServerFailed, ServerProcess, free_port
from pikaserve.tune.space import Candidate, Knob, SloSpec, candidates, display_name

HOST = "127.0.0.1"


@dataclass(frozen=True)
class TuneConfig:
    knobs: tuple[Knob, ...]
    slo: SloSpec
    output_dir: Path
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    search: SearchSettings = field(default_factory=SearchSettings)
    server_cmd: str | None = None  # a template with {port} and the knobs; None: pikaserve serve
    serve_args: tuple[str, ...] = ()  # pikaserve serve: fixed arguments (the model, ...)
    budget_s: float | None = None  # no new config after this many seconds (the one running finishes)
    confirm: int = 3  # search the best this many and the default once more; rank by the mean
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.server_cmd is not None and self.serve_args:
            raise ValueError("--serve-args go to pikaserve serve; with --server-cmd, put them in the template")
        flags = {a.split("=", 1)[0] for a in self.serve_args}
        if clash := [k.name for k in self.knobs if f"--{k.name}" in flags]:
            raise ValueError(f"--serve-args sets {', '.join(clash)}, which --space tunes")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError("the budget must be > 0")
        if self.confirm < 0:
            raise ValueError("--confirm must be >= 0")

    @property
    def context(self) -> dict[str, Any]:
        """Everything a config's result depends on besides its own settings."""
        return {
            "server": self.server_cmd or ["pikaserve serve", *self.serve_args],
            "workload": asdict(self.workload),
            "slo": str(self.slo),
            "search": asdict(self.search),
        }


@dataclass(slots=True)
class ConfigResult:
    label: str
    settings: dict[str, Any]  # knob -> value, as a --config YAML takes them
    is_default: bool
    status: str  # searched | slo-unmet | pruned | failed | not-run
    detail: str
    probes: list[Probe] = field(default_factory=list)
    ready_s: float | None = None
    searches: int = 1  # how often it was searched (probes say which search they belong to)

    @property
    def held(self) -> list[Probe]:
        """The open-loop probes at which the SLO held."""
        return [p for p in self.probes if p.kind == "rate" and p.passed]

    def _best_per_search(self, value: Callable[[Probe], float]) -> list[float]:
        """Per search, the highest `value` of the rates that held (0.0: none held)."""
        return [max((value(p) for p in self.held if p.search == s), default=0.0) for s in range(self.searches)]

    @property
    def goodputs(self) -> list[float]:
        """Per search: the best goodput of the rates that held (the unloaded and capacity
        probes only bound the search)."""
        return self._best_per_search(lambda p: p.goodput)

    @property
    def goodput(self) -> float:
        """Goodput under the SLO: the mean over the config's searches."""
        return statistics.fmean(self.goodputs)

    @property
    def max_rate(self) -> float:
        """The highest rate that held, mean over the config's searches."""
        return statistics.fmean(self._best_per_search(lambda p: p.load))

    @property
    def capacity(self) -> float | None:
        return next((p.throughput for p in self.probes if p.kind == "capacity"), None)

    @property
    def goodput_bound(self) -> float:
        """Its goodput, or for a pruned config the most it could have: its capacity or the
        lowest rate that failed, whichever is lower (either was at most the best goodput so
        far, which is why it was pruned)."""
        if self.status != "pruned":
            return self.goodput
        failed = [p.load for p in self.probes if p.kind == "rate" and not p.passed]
        return min([self.capacity or 0.0, *failed])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConfigResult:
        return cls(**{**data, "probes": [Probe(**p) for p in data["probes"]]})


# a config's place among equal goodputs (failures last)
_STATUS_ORDER = {"searched": 0, "pruned": 1, "slo-unmet": 2, "failed": 3, "not-run": 4}


def rank_key(r: ConfigResult) -> tuple[float, int, float, float]:
    return (-r.goodput, _STATUS_ORDER.get(r.status, 9), -r.max_rate, -(r.capacity or 0.0))


def ranked(results: list[ConfigResult]) -> list[ConfigResult]:
    return sorted(results, key=rank_key)


class TuneProgress(Protocol):
    def start(self, candidate: Candidate) -> None: ...

    def done(self, result: ConfigResult, reused: bool) -> None: ...


class Tuner:
    def __init__(self, config: TuneConfig, progress: TuneProgress | None = None) -> None:
        self.config, self.progress = config, progress
        self.template = config.server_cmd is not None
        self.candidates = candidates(config.knobs, self.template)

    def run(self) -> list[ConfigResult]:
        cfg = self.config
        cfg.workload.check_supply(cfg.search.most_requests())
        deadline = time.monotonic() + cfg.budget_s if cfg.budget_s is not None else None
        results: list[ConfigResult] = []
        for candidate in self.candidates:
            key = candidate.key(cfg.context)
            result = self._load(key)
            reused = result is not None
            if result is None:
                if deadline is not None and time.monotonic() >= deadline:
                    result = self._result(candidate, "not-run", "the budget ran out before it")
                else:
                    if self.progress is not None:
                        self.progress.start(candidate)
                    best = max((r.goodput for r in results), default=0.0)
                    result = self._measure(candidate, key, best)
                    self._save(key, result)
            results.append(result)
            if self.progress is not None:
                self.progress.done(result, reused)
        self._confirm(results, deadline)
        return results

    def confirmed(self, results: list[ConfigResult]) -> list[int]:
        """Indices of the configs --confirm searches again: the best ones and the default."""
        order = sorted(range(len(results)), key=lambda i: rank_key(results[i]))
        best = [i for i in order if results[i].status == "searched"][: self.config.confirm]
        if best and results[0].status == "searched" and 0 not in best:
            best.append(0)  # the candidates start with the default
        return best

    def _confirm(self, results: list[ConfigResult], deadline: float | None) -> None:
        """One more search of each chosen config, on a fresh server, without pruning: the
        machine's drift and a probe's sampling move one search by tens of percent, and a
        config's goodput becomes the mean of its searches. Repeated until the chosen ones are
        all searched twice (a config may move up into them when another's mean falls)."""
        while todo := [i for i in self.confirmed(results) if results[i].searches == 1]:
            if deadline is not None and time.monotonic() >= deadline:
                return
            self._search_again(results, todo[0])

    def _search_again(self, results: list[ConfigResult], i: int) -> None:
        first, candidate = results[i], self.candidates[i]
        if self.progress is not None:
            self.progress.start(candidate)
        key = candidate.key(self.config.context)
        again = self._measure(candidate, key, 0.0, search_index=1)
        results[i] = ConfigResult(
            first.label, first.settings, first.is_default, first.status,
            f"{first.detail}; search 2: {again.detail}", first.probes + again.probes, first.ready_s, searches=2,
        )
        self._save(key, results[i])
        if self.progress is not None:
            self.progress.done(results[i], False)

    def _measure(self, candidate: Candidate, key: str, beat: float, search_index: int = 0) -> ConfigResult:
        port = free_port(HOST)
        url = f"http://{HOST}:{port}"
        log = self.config.output_dir / "logs" / f"{key}.log"
        try:
            with ServerProcess(self._argv(candidate, key, port), url, log) as server:
                ready_s = server.wait_ready(self.config.start_timeout_s)
                bench = BenchProbe(url, self.config.workload, self.config.slo)

                def measure(kind: str, point: LoadPoint, requests: int) -> Probe:
                    probe = bench(kind, point, requests)
                    server.check_alive("during the search")  # failed requests: was it a crash?
                    return replace(probe, search=search_index)

                outcome = search(measure, self.config.search, beat)
        except ServerFailed as exc:
            return self._result(candidate, "failed", str(exc))
        except ValueError as exc:  # the bench refused (e.g. the server lists no model)
            return self._result(candidate, "failed", f"bench: {exc}")
        return self._result(candidate, outcome.status, outcome.detail, outcome.probes, ready_s)

    def _result(self, candidate: Candidate, status: str, detail: str, probes: list[Probe] | None = None, ready_s: float | None = None) -> ConfigResult:
        return ConfigResult(candidate.label, candidate.as_dict(), candidate.is_default, status, detail, probes or [], ready_s)

    def _argv(self, candidate: Candidate, key: str, port: int) -> list[str]:
        if self.config.server_cmd is not None:
            values = {name: "null" if v is None else v for name, v in candidate.settings}
            return shlex.split(self.config.server_cmd.format(port=port, host=HOST, **values))
        path = self.config.output_dir / "configs" / f"{key}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(settings_yaml(candidate.as_dict()))
        return [sys.executable, "-m", "pikaserve", "serve", "--config", str(path), "--host", HOST, "--port", str(port), *self.config.serve_args]

    def _path(self, key: str) -> Path:
        return self.config.output_dir / "configs" / f"{key}.json"

    def _load(self, key: str) -> ConfigResult | None:
        try:
            return ConfigResult.from_json(json.loads(self._path(key).read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None  # not measured yet (or an unreadable leftover: measure again)

    def _save(self, key: str, result: ConfigResult) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json(), indent=1))
        tmp.replace(path)  # never a half-written result to resume from


def settings_yaml(settings: dict[str, Any]) -> str:
    """A `pikaserve serve --config` file of these settings (None: the server's default)."""
    return yaml.safe_dump({display_name(k): v for k, v in settings.items() if v is not None}, sort_keys=False) if settings else "{}\n"
