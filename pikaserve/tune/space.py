"""What `pikaserve tune` searches: the knobs and their values, the SLO, and the candidates.

A knob is a `pikaserve serve` setting (its flag or YAML key, e.g. `max_num_seqs`) or, with
`--server-cmd`, a `{placeholder}` of the command template. Values are written as YAML scalars,
the same as in a `--config` file: `16`, `true`, `bfloat16`, `null` (the server's default).
The candidates are the Cartesian product of the knobs' values, after the default config.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import string
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from pikaserve.bench.stats import Slo, parse_slos
from pikaserve.config import ConfigError

# set by the tuner itself for every candidate
OWNED_BY_TUNER = ("host", "port")

# Default spaces: the knobs that shape a step, by device. Small enough to finish in ~30 min
# on a 2-core CPU for the Pika workload.
DEFAULT_SPACES = {
    "cpu": ("max_num_seqs=4,16,64", "max_num_batched_tokens=512,2048", "block_size=4,16",
            "structured_output_draft=true,false"),
    "cuda": ("max_num_seqs=16,64,256", "max_num_batched_tokens=2048,8192", "enforce_eager=false,true",
             "kv_cache_dtype=auto,fp8"),
}


@dataclass(frozen=True, slots=True)
class Knob:
    name: str  # pikaserve: the flag name (dashes); --server-cmd: the placeholder
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class SloSpec:
    """Limits that at least `percentile` % of a load's requests must meet (and succeed, valid)."""

    slos: tuple[Slo, ...]
    percentile: float = 99.0

    def __str__(self) -> str:
        return ", ".join(map(str, self.slos)) + f" for {self.percentile:g}% of requests"


def parse_slo(text: str) -> SloSpec:
    """'ttft=50ms,e2e=200ms,p=99' -> SloSpec (p is optional, 99 by default)."""
    items = [item for item in text.split(",") if item.strip()]
    limits = [item for item in items if item.partition("=")[0].strip().lower() != "p"]
    percentiles = [item.partition("=")[2] for item in items if item not in limits]
    if not limits:
        raise ValueError(f"bad --slo {text!r}: give at least one limit, e.g. e2e=200ms (metrics: ttft, tpot, itl, e2e)")
    if len(percentiles) > 1:
        raise ValueError(f"bad --slo {text!r}: p= given twice")
    try:
        percentile = float(percentiles[0]) if percentiles else 99.0
    except ValueError:
        raise ValueError(f"bad --slo {text!r}: p must be a number in (0, 100]") from None
    if not 0 < percentile <= 100:
        raise ValueError(f"bad --slo {text!r}: p must be in (0, 100]")
    return SloSpec(parse_slos(",".join(limits)), percentile)


def split_values(text: str) -> list[str]:
    """'8,16' -> ['8', '16']; commas inside {}, [] or quotes stay (a YAML mapping is one value:
    'null,{method: ngram, num_speculative_tokens: 4}')."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [v.strip() for v in [*values, text[start:]]]


def _split(item: str) -> tuple[str, list[str]]:
    name, sep, values = item.partition("=")
    texts = split_values(values)
    if not sep or not name.strip() or not all(texts):
        raise ValueError(f"bad --space item {item!r}: expected KNOB=VALUE[,VALUE...], e.g. max_num_seqs=8,32")
    return name.strip(), texts


def parse_pikaserve_space(items: Sequence[str]) -> tuple[Knob, ...]:
    """Knobs of `pikaserve serve`: every value checked as `--config` checks it, and alone over
    the defaults (a value the server would refuse fails here, not after minutes of tuning)."""
    from pikaserve.server.cli import checked_setting, configs_from_settings

    knobs: dict[str, Knob] = {}
    for item in items:
        key, texts = _split(item)
        values = []
        for text in texts:
            try:
                name, value = checked_setting(key, yaml.safe_load(text), "--space")
                if name in OWNED_BY_TUNER:
                    raise ConfigError(f"--space: {name} is set by the tuner for every candidate")
                configs_from_settings({name: value})
            except yaml.YAMLError as exc:
                raise ValueError(f"bad --space value {text!r} of {key}: {exc}") from None
            except ConfigError as exc:
                raise ValueError(f"{exc} (in --space {item!r})") from None
            values.append(value)
        _add(knobs, Knob(name, tuple(values)))
    return tuple(knobs.values())


def template_fields(template: str) -> set[str]:
    """The {placeholders} of a --server-cmd template."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise ValueError(f"bad --server-cmd template: {exc}") from None


def parse_template_space(items: Sequence[str], template: str) -> tuple[Knob, ...]:
    """Knobs of a --server-cmd template: its placeholders, values substituted as written."""
    fields = template_fields(template)
    if "port" not in fields:
        raise ValueError("--server-cmd needs a {port} placeholder: the tuner picks a free port for every server it starts")
    knobs: dict[str, Knob] = {}
    for item in items:
        name, texts = _split(item)
        if name not in fields or name in OWNED_BY_TUNER:
            raise ValueError(f"--space knob {name!r} is not a placeholder of --server-cmd (its placeholders: {', '.join(sorted(fields))})")
        _add(knobs, Knob(name, tuple(texts)))
    if missing := fields - set(knobs) - set(OWNED_BY_TUNER):
        raise ValueError(f"--server-cmd placeholders without values in --space: {', '.join(sorted(missing))}")
    return tuple(knobs.values())


def _add(knobs: dict[str, Knob], knob: Knob) -> None:
    if knob.name in knobs:
        raise ValueError(f"--space names {knob.name} twice")
    if len(set(map(repr, knob.values))) != len(knob.values):
        raise ValueError(f"--space repeats a value of {knob.name}")
    knobs[knob.name] = knob


@dataclass(frozen=True, slots=True)
class Candidate:
    """One config to measure: knob -> value (only the knobs of the space)."""

    settings: tuple[tuple[str, Any], ...]
    is_default: bool = False

    @property
    def label(self) -> str:
        text = " ".join(f"{display_name(k)}={show_value(v)}" for k, v in self.settings)
        return f"default ({text})" if self.is_default and text else "default" if self.is_default else text

    def as_dict(self) -> dict[str, Any]:
        """Knob -> value, keys as YAML and `--space` write them (max_num_seqs)."""
        return {display_name(k): v for k, v in self.settings}

    def key(self, context: dict[str, Any]) -> str:
        """A stable id of this candidate measured under `context` (server, workload, SLO, ...):
        a finished result is reused only when all of it is the same."""
        blob = json.dumps({"settings": self.settings, **context}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def display_name(knob: str) -> str:
    return knob.replace("-", "_")


def show_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def candidates(knobs: Sequence[Knob], template: bool) -> list[Candidate]:
    """The default first, then every other combination of the knobs' values.

    pikaserve's default is its built-in config, measured even when no combination equals it
    (the combination that does becomes the default); a template has no defaults of its own, so
    there the first value of every knob is the default.
    """
    combos = [tuple(zip((k.name for k in knobs), values)) for values in itertools.product(*(k.values for k in knobs))]
    if template:
        return [Candidate(combos[0], is_default=True), *(Candidate(c) for c in combos[1:])]
    from pikaserve.server.cli import configs_from_settings

    def is_default(combo: tuple[tuple[str, Any], ...]) -> bool:
        try:
            return configs_from_settings(dict(combo)) == default
        except ConfigError:  # refused together: its start fails and is recorded
            return False

    default = configs_from_settings({})
    same = [c for c in combos if is_default(c)]
    return [Candidate(same[0] if same else (), is_default=True), *(Candidate(c) for c in combos if c not in same)]
