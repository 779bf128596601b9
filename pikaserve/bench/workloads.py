"""Workloads for `pikaserve bench`: what to send, independent of how fast it is sent.

- `pika`: the flagship classifier: fixed system prompt + one rendered turn, temperature 0, answers
  checked against the answer schema (optionally sent as `response_format`).
- `random`: random English words of a given token length (exact when the server has /tokenize).
- `prefix-repetition`: N shared prefixes with unique suffixes (exercises prefix caching).
- `file`: a JSONL file, one OpenAI request body (or `{"prompt": ...}`) per line.

A workload is a fixed list of requests, looked up by a logical index that wraps around, so the
same index means the same request on every server.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pikaserve.bench.validity import make_checker
from pikaserve.data import PIKA, pika_user_message

if TYPE_CHECKING:
    from pikaserve.bench.config import BenchConfig

TokenCounter = Callable[[str], int]
Checker = Callable[[Any], bool]

PIKA_MAX_TOKENS = 50  # as in the seed request
# JSONL fields that do not pass through as `extra`: the tool sets the first three (a line's own
# values are ignored), the others have their own BenchRequest fields.
_NOT_EXTRA = frozenset({"model", "stream", "stream_options", "messages", "prompt", "max_tokens", "temperature", "response_format"})
# Short common words: nearly always one token each (with their leading space) in BPE vocabularies,
# which makes approximate lengths close and exact fitting quick.
_WORDS = tuple(
    "the of and to in is it you that he was for on are as with his they at be this have from or one"
    " had by word but not what all were we when your can said there use an each which she do how"
    " their if will up other about out many then them these so some her would make like him into time"
    " has look two more write go see number no way could people my than first water been call who oil"
    " its now find long down day did get come made may part over new sound take only little work know"
    " place year live me back give most very after thing our just name good man think say great where"
    " help through much before line right too mean old any same tell boy follow came want show also"
    " around form three small set put end does another well large must big even such because turn here"
    " why ask went men read need land different home us move try kind hand picture again change off"
    " play spell air away animal house point page letter mother answer found study still learn should".split()
)
_FILLERS = ("a", "to", "of", "in", "is", "it")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload, before a model name and streaming options are added."""

    messages: tuple[dict[str, str], ...] | None = None  # chat requests
    prompt: str | None = None  # completion requests (sent as a user message on the chat endpoint)
    max_tokens: int | None = None
    temperature: float | None = None
    response_format: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other body fields (ignore_eos, top_p, ...)
    checker: Checker | None = None  # answer validity; None when the answer is not checked

    def body(self, endpoint: str, model: str) -> dict[str, Any]:
        """The JSON body for `endpoint` ('chat' or 'completions'), streaming with usage."""
        body: dict[str, Any] = {"model": model, **self.extra}
        if endpoint == "chat":
            body["messages"] = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]
        elif self.prompt is not None:
            body["prompt"] = self.prompt
        else:
            raise ValueError("a chat request (messages) cannot be sent to the completions endpoint")
        for key in ("max_tokens", "temperature", "response_format"):
            if (value := getattr(self, key)) is not None:
                body[key] = value
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    requests: tuple[BenchRequest, ...]
    warmup: tuple[BenchRequest, ...]  # sent before measuring; not recorded
    tokens_exact: bool = False  # lengths were fitted with the server's tokenizer
    # Each request stands for one real event that never recurs (a child's turn): a run may
    # send each once, warm-up included, unless repeats are allowed (BenchConfig.allow_repeats).
    send_once: bool = False

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"workload {self.name!r} has no requests")

    def request(self, index: int) -> BenchRequest:
        return self.requests[index % len(self.requests)]


# Pika turns, in this order: the 40 unlabelled ones, then the labelled train and dev splits
# (their labels are ignored here), so a run of up to ~1,000 requests sends no turn twice.
PIKA_TURN_FILES = ("turns.jsonl", "train.jsonl", "dev.jsonl")


def pika_workload(
    pika_dir: Path = PIKA, schema_form: str = "json_schema", max_tokens: int = PIKA_MAX_TOKENS,
    warmup: int = 0, turn_files: Sequence[Path] = (),
) -> Workload:
    """The Pika classifier: one request per turn, answers always checked against the schema.

    `schema_form` says how the schema is sent: "json_schema" (OpenAI, vLLM), "json_object" with a
    `schema` key (llama-cpp-python's server, which rejects json_schema), or "none".
    `turn_files`: JSONL files of turns (turns.jsonl's fields) to send instead of the bundled ones.
    A turn is sent once per run (Workload.send_once).
    """
    files = list(turn_files) or [pika_dir / name for name in PIKA_TURN_FILES if (pika_dir / name).is_file()]
    try:
        system = (pika_dir / "system_prompt.txt").read_text(encoding="utf-8")
        schema = json.loads((pika_dir / "answer.schema.json").read_text(encoding="utf-8"))
        turns = [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the Pika workload from {pika_dir} ({', '.join(map(str, files))}): {exc}") from None
    fields = {"previous_question", "previous_answer", "response_to_check"}
    if not all(isinstance(t, dict) and fields <= t.keys() for t in turns):
        raise ValueError(f"Pika turn files need one JSON object per line with the fields {', '.join(sorted(fields))}: {', '.join(map(str, files))}")
    checker = make_checker(schema)
    response_format = {
        "json_schema": {"type": "json_schema", "json_schema": {"name": "pika_answer", "schema": schema, "strict": True}},
        "json_object": {"type": "json_object", "schema": schema},
    }.get(schema_form)
    requests = tuple(
        BenchRequest(
            messages=({"role": "system", "content": system}, {"role": "user", "content": pika_user_message(turn)}),
            max_tokens=max_tokens,
            temperature=0.0,
            response_format=response_format,
            checker=checker,
        )
        for turn in turns
    )
    # warm up on the last turns: the measured requests start at the first, so none repeats
    return Workload("pika", requests, tuple(requests[-1 - i % len(requests)] for i in range(warmup)), send_once=True)


def fit_text(rng: random.Random, target: int, count: TokenCounter | None) -> str:
    """Random words that are `target` tokens long by `count` (or about that long without it)."""
    words = [rng.choice(_WORDS) for _ in range(2 * target + 16)]
    if count is None:
        return " ".join(words[:target])
    n = min(target, len(words))
    tokens = count(" ".join(words[:n]))
    for _ in range(8):  # secant steps on tokens-per-word; usually 1-2 calls
        if tokens == target:
            return " ".join(words[:n])
        step = round((target - tokens) * n / max(tokens, 1)) or (1 if tokens < target else -1)
        new_n = min(max(n + step, 1), len(words))
        if new_n == n:
            break
        n, tokens = new_n, count(" ".join(words[:new_n]))
    while tokens > target and n > 1:
        n -= 1
        tokens = count(" ".join(words[:n]))
    chosen = words[:n]
    for _ in range(target):  # pad with one-token words; bounded in case a tokenizer merges them
        if tokens >= target:
            break
        chosen.append(rng.choice(_FILLERS))
        tokens = count(" ".join(chosen))
    return " ".join(chosen)


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """A length uniform in [mean*(1-r), mean*(1+r)], at least 1."""
    lo, hi = round(mean * (1 - range_ratio)), round(mean * (1 + range_ratio))
    return max(1, rng.randint(lo, hi))


def random_workload(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    count: TokenCounter | None = None,
    warmup: int = 0,
    ignore_eos: bool = True,
) -> Workload:
    """`n` (+ `warmup`) unique prompts of random words; max_tokens is the output length."""
    if input_len < 1 or output_len < 1 or not 0 <= range_ratio < 1:
        raise ValueError("random workload needs input/output lengths >= 1 and 0 <= range ratio < 1")
    rng = random.Random(seed)
    extra = {"ignore_eos": True} if ignore_eos else {}
    requests = tuple(
        BenchRequest(
            prompt=fit_text(rng, _length(rng, input_len, range_ratio), count),
            max_tokens=_length(rng, output_len, range_ratio),
            temperature=0.0,
            extra=extra,
        )
        for _ in range(n + warmup)
    )
    return Workload("random", requests[:n], requests[n:], tokens_exact=count is not None)


def prefix_repetition_workload(
    n: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int = 0,
    count: TokenCounter | None = None,
    warmup: int = 0,
    ignore_eos: bool = True,
) -> Workload:
    """`n` requests, each one of `num_prefixes` shared prefixes followed by a unique suffix."""
    if min(num_prefixes, prefix_len, suffix_len, output_len) < 1:
        raise ValueError("prefix-repetition needs prefixes, prefix/suffix/output lengths >= 1")
    rng = random.Random(seed)
    prefixes = [fit_text(rng, prefix_len, count) for _ in range(num_prefixes)]
    order = [i % num_prefixes for i in range(n + warmup)]
    rng.shuffle(order)  # the prefix groups arrive mixed, not one after the other
    extra = {"ignore_eos": True} if ignore_eos else {}
    requests = tuple(
        BenchRequest(prompt=f"{prefixes[p]} {fit_text(rng, suffix_len, count)}", max_tokens=output_len, temperature=0.0, extra=extra)
        for p in order
    )
    return Workload("prefix-repetition", requests[:n], requests[n:], tokens_exact=count is not None)


def _checker_for(response_format: Any) -> Checker | None:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":  # llama-cpp-python accepts a "schema" here
        return make_checker(response_format.get("schema", True))
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        return make_checker(spec.get("schema", True))
    return None


def file_workload(path: Path, warmup: int = 0) -> Workload:
    """Requests from a JSONL file; answers are checked when a line asks for JSON output."""
    requests = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        messages, prompt = (row.get("messages"), row.get("prompt")) if isinstance(row, dict) else (None, None)
        messages = tuple(messages) if isinstance(messages, list) and messages else None
        prompt = prompt if isinstance(prompt, str) else None
        if messages is None and prompt is None:
            raise ValueError(f"{path}:{number}: each line needs 'messages' (a non-empty list) or 'prompt' (a string)")
        requests.append(
            BenchRequest(
                messages=messages,
                prompt=prompt,
                max_tokens=row.get("max_tokens"),
                temperature=row.get("temperature"),
                response_format=row.get("response_format"),
                extra={k: v for k, v in row.items() if k not in _NOT_EXTRA},
                checker=_checker_for(row.get("response_format")),
            )
        )
    if not requests:
        raise ValueError(f"{path} has no requests")
    return Workload(f"file:{path.name}", tuple(requests), tuple(requests[i % len(requests)] for i in range(warmup)))


SYNTHETIC = ("random", "prefix-repetition")  # workloads whose lengths are fitted with a tokenizer


def workload_from_config(config: BenchConfig, count: TokenCounter | None) -> Workload:
    """Build the configured workload; `count` is the server's token counter, if it has one."""
    if config.workload == "pika":
        return pika_workload(config.pika_dir or PIKA, config.pika_schema, PIKA_MAX_TOKENS, config.warmup, config.pika_turns)
    if config.workload == "file":
        return file_workload(Path(config.dataset or ""), config.warmup)
    if config.num_prompts is not None:
        n = config.num_prompts
    else:  # enough distinct prompts that no request of the run repeats an earlier one
        n = config.first_index + (config.num_requests * len(config.points) if config.num_requests is not None else 1000)
    ignore_eos = config.ignore_eos if config.ignore_eos is not None else True
    if config.workload == "random":
        return random_workload(n, config.input_len, config.output_len, config.range_ratio, config.seed, count, config.warmup, ignore_eos)
    return prefix_repetition_workload(
        n, config.num_prefixes, config.prefix_len, config.suffix_len, config.output_len, config.seed, count, config.warmup, ignore_eos
    )


def requests_per_point(workload: Workload, config: BenchConfig) -> int | None:
    """The run's requests per load point and server: config.num_requests, checked against a
    send-once workload's supply (a ValueError when it cannot last), or for a --duration-only
    run, that supply spread over the load points (None: unbounded)."""
    if not workload.send_once or config.allow_repeats:
        return config.num_requests
    supply = len(workload.requests) - len(workload.warmup) - config.first_index
    points = len(config.points)
    if config.num_requests is None:
        if supply < points:
            raise ValueError(f"workload {workload.name!r} has {len(workload.requests)} distinct requests, too few for {points} load points after {len(workload.warmup)} warm-up")
        return supply // points
    need = points * config.num_requests
    if need > supply:
        raise ValueError(
            f"workload {workload.name!r} has {len(workload.requests)} distinct requests and sends each once; this run needs "
            f"{need + len(workload.warmup)} ({len(workload.warmup)} warm-up + {points} load points x {config.num_requests})"
            + (f" after the {config.first_index} it already sent. " if config.first_index else ". ")
            + "Lower -n or --warmup, add turns with --pika-turns FILE, or pass --allow-repeats"
        )
    return config.num_requests


def check_endpoint(workload: Workload, endpoint: str) -> None:
    """Fail before sending anything if a chat request would go to the completions endpoint."""
    if endpoint == "completions" and any(r.prompt is None for r in workload.requests + workload.warmup):
        raise ValueError(f"workload {workload.name!r} has chat messages: use --endpoint chat")
