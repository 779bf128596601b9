"""The Pika request four ways, side by side in one run, on the default model.

1. unconstrained, max_tokens 50, temperature 0: what the seed deployment sent;
2. constrained by the Pika answer schema, token by token (fast-forward off);
3. constrained, with fast-forward but no grammar drafts;
4. constrained, with fast-forward and grammar drafts (the default).

Every request finds only the system prompt in the prefix cache, as a new turn of a running
deployment does: the cache is reset and re-warmed with a turn outside the measured ones before
each request (otherwise a turn's second mode would find the whole turn cached). Modes are
interleaved turn by turn (rotating their order) so machine noise hits them alike. Per
request: wall latency of LLM.generate, forward passes (engine.num_forward_passes), output
tokens, whether the answer is valid, and the time spent in the grammar (mask, accept, forced
tokens, drafts). Writes
benchmarks/results/pika_structured.json.

    python benchmarks/pika_structured.py [--turns 39] [--rounds 2] [--dtype auto] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import llguidance  # noqa: F401  (version recorded below)
import torch

from pikaserve.data import pika_answer_schema, pika_messages, pika_turns
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine
from pikaserve.structured import build_constraint
from pikaserve.structured.matcher import GrammarMatcher

RESULTS = Path(__file__).parent / "results"
SCHEMA = pika_answer_schema()
TURNS = pika_turns()
WARM_TURN = TURNS[-1]  # re-warms the system prompt before each request; never measured
LABELS = set(SCHEMA["properties"]["emotion"]["enum"])
MODES = ("unconstrained", "constrained_token_by_token", "constrained_fast_forward",
         "constrained_drafts")
DEFAULT = "constrained_drafts"


class GrammarClock:
    """Adds up the time spent inside GrammarMatcher's engine-facing methods."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("mask_logits", "accept", "forced_tokens", "draft"):
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        original = getattr(GrammarMatcher, name)

        def timed(matcher, *args, _original=original):
            start = time.perf_counter()
            try:
                return _original(matcher, *args)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(GrammarMatcher, name, timed)


def valid(text: str) -> bool:
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(answer, dict)
        and set(answer) == {"emotion", "learn_score"}
        and answer["emotion"] in LABELS
        and isinstance(answer["learn_score"], bool)
    )


def warm_system_prompt_only(llm: LLM) -> None:
    if not llm.engine.pool.reset_prefix_cache():
        raise RuntimeError("a cached block is still in use: the engine is not idle")
    llm.generate([pika_messages(WARM_TURN)], SamplingParams(max_tokens=1))


def run_one(llm: LLM, clock: GrammarClock, messages, mode: str) -> dict:
    warm_system_prompt_only(llm)
    structured = None if mode == "unconstrained" else StructuredOutputsParams(json=SCHEMA)
    config = llm.engine.config
    config.structured_output_fast_forward = mode in ("constrained_fast_forward", DEFAULT)
    config.structured_output_draft = mode == DEFAULT
    params = SamplingParams(max_tokens=50, temperature=0, structured_outputs=structured)
    passes, grammar = llm.engine.num_forward_passes, clock.seconds
    start = time.perf_counter()
    out = llm.generate([messages], params)[0]
    wall = time.perf_counter() - start
    return {
        "latency_ms": wall * 1e3,
        "ttft_ms": out.ttft * 1e3,
        "forward_passes": llm.engine.num_forward_passes - passes,
        "output_tokens": len(out.token_ids),
        "grammar_ms": (clock.seconds - grammar) * 1e3,
        "cached_prompt_tokens": out.num_cached_tokens,
        "finish_reason": out.finish_reason,
        "valid": valid(out.text),
        "text": out.text,
    }


def summarize(rows: list[dict]) -> dict:
    lat = sorted(r["latency_ms"] for r in rows)
    return {
        "requests": len(rows),
        "latency_ms_median": statistics.median(lat),
        "latency_ms_mean": statistics.fmean(lat),
        "latency_ms_p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))],
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in rows),
        "after_first_token_ms_median": statistics.median(
            r["latency_ms"] - r["ttft_ms"] for r in rows),
        "forward_passes_mean": statistics.fmean(r["forward_passes"] for r in rows),
        "forward_passes_max": max(r["forward_passes"] for r in rows),
        "output_tokens_mean": statistics.fmean(r["output_tokens"] for r in rows),
        "grammar_ms_mean": statistics.fmean(r["grammar_ms"] for r in rows),
        "valid": sum(r["valid"] for r in rows),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows)
                           for k in sorted({r["finish_reason"] for r in rows})},
    }


def lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)")
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs if k.strip() in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=39)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "pika_structured.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    llm = LLM(None, dtype=args.dtype)
    clock = GrammarClock()
    spec = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    build_constraint(spec, llm.tokenizer)  # tokenizer index + grammar, once per process
    compile_cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        build_constraint(spec, llm.tokenizer)
    compile_cached = (time.perf_counter() - start) / 100

    turns = TURNS[: min(args.turns, len(TURNS) - 1)]
    for mode in MODES:  # warm the system prompt and every code path
        run_one(llm, clock, pika_messages(turns[0]), mode)
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for i, turn in enumerate(turns):
            k = (i + r) % len(MODES)
            for mode in MODES[k:] + MODES[:k]:
                rows[mode].append(run_one(llm, clock, pika_messages(turn), mode) | {"turn": i})

    summary = {m: summarize(rows[m]) for m in MODES}
    best = summary[DEFAULT]
    result = {
        "benchmark": "pika_structured",
        "machine": describe_machine() | {
            "lscpu": lscpu(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "llguidance": _version("llguidance"),
        "config": {"turns": len(turns), "rounds": args.rounds, "max_tokens": 50,
                   "temperature": 0, "prefix_caching": True},
        "compile_ms": {"cold_with_tokenizer_index": compile_cold * 1e3,
                       "cached": compile_cached * 1e3},
        "summary": summary,
        "speedup_of_drafts_over": {
            m: summary[m]["latency_ms_median"] / best["latency_ms_median"] for m in MODES[:3]
        },
        # the same turn in the same round, one mode right after the other: less noise
        "paired_speedup_of_drafts_over": {
            m: statistics.median(a["latency_ms"] / b["latency_ms"]
                                 for a, b in zip(rows[m], rows[DEFAULT]))
            for m in MODES[:3]
        },
        "greedy_outputs_identical_constrained_modes": all(
            len({r["text"] for r in same_turn}) == 1
            for same_turn in zip(*(rows[m] for m in MODES[1:]))
        ),
        "requests": rows,
        "notes": "latency = wall time of LLM.generate for one request with the system prompt "
                 "cached; speedup > 1 means the default (fast-forward + drafts) is faster.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("machine", "dtype", "compile_ms", "summary",
                                              "speedup_of_drafts_over",
                                              "paired_speedup_of_drafts_over",
                                              "greedy_outputs_identical_constrained_modes")},
                     indent=2))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
