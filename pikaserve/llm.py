"""Offline Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pikaserve.config import EngineConfig
from pikaserve.engine.llm_engine import LLMEngine
from pikaserve.engine.outputs import TokenLogprob
from pikaserve.engine.sampling_params import SamplingParams

Prompt = str | Sequence[int] | list[dict[str, Any]]  # text, token ids, or chat messages


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    ttft: float | None = None  # seconds from arrival to the first token
    e2e: float | None = None  # seconds from arrival to the last token


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        # the first item tells messages from token ids
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(cast(list[dict[str, Any]], list(prompt)))
        return list(cast(Sequence[int], prompt))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Runs all prompts together (continuously batched) and returns them in order."""
        batch: Sequence[Prompt]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            batch = [cast(Prompt, prompts)]  # one prompt
        else:
            batch = cast(Sequence[Prompt], prompts)
        params = params or SamplingParams()
        all_params = [params] * len(batch) if isinstance(params, SamplingParams) else params
        ids = [f"offline-{next(self._ids)}" for _ in batch]
        # Compile every grammar first, so a bad schema raises before anything is queued.
        constraints = [self.engine.constraint_for(p) for p in all_params]
        results = {}
        for rid, prompt, p, constraint in zip(ids, batch, all_params, constraints):
            token_ids = self.prompt_token_ids(prompt)
            self.engine.add_request(rid, token_ids, p, constraint)
            results[rid] = Completion(prompt_token_ids=token_ids)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                c = results.get(out.request_id)
                if c is None:
                    continue
                c.token_ids += out.new_token_ids
                c.text += out.new_text
                c.logprobs += out.logprobs
                c.num_cached_tokens = out.num_cached_tokens
                if out.first_token_time is not None:
                    c.ttft = out.first_token_time - out.arrival_time
                if out.finished:
                    c.finish_reason = out.finish_reason
                if out.finished_time is not None:  # set on the finished output
                    c.e2e = out.finished_time - out.arrival_time
        return [results[rid] for rid in ids]

