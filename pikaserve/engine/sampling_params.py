"""Per-request decoding settings, validated once when the request enters the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from pikaserve.errors import InvalidRequestError


GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class StructuredOutputsParams:
    """One output constraint (vLLM's `structured_outputs`); exactly one field is set."""

    json: dict | str | None = None  # a JSON Schema (dict or JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark-style grammar text

    def __post_init__(self) -> None:
        n = sum(x is not None for x in (self.json, self.regex, self.choice, self.grammar))
        n += bool(self.json_object)
        if n != 1:
            raise InvalidRequestError(
                "structured outputs take exactly one of json, json_object, regex, choice, grammar",
                "structured_outputs",
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise InvalidRequestError("choice must be a non-empty list of strings", "choice")


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to max_model_len
    temperature: float = 1.0  # 0 (anything below 1e-5) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # Requests share cached prefixes only with requests of the same salt (None: the unsalted
    # ones), so a client cannot learn from cached_tokens what prompts others sent.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        # below 1e-5 (vLLM's bound too) logits / temperature overflows: that is greedy anyway
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self) -> None:
        def bad(msg: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param)

        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be -1, 0 (off) or positive, got {self.top_k}", "top_k")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not self.cache_salt):
            raise bad("cache_salt must be a non-empty string", "cache_salt")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed must be an integer", "seed")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise bad("stop must be a string or a list of strings", "stop")
        if any(s == "" for s in self.stop):
            raise bad("stop strings must not be empty", "stop")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers", "stop_token_ids")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs must be an integer in [0, 20]", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {value}", name)
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty must be > 0", "repetition_penalty")
