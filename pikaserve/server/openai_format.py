"""Builders for OpenAI-shaped JSON: responses, SSE chunks, usage, logprobs and error envelopes.

Kept free of HTTP and engine plumbing so the shapes can be checked on their own. Field order
and presence follow OpenAI's API (role chunk first, then content deltas, then an empty delta
carrying finish_reason, then an optional usage chunk with no choices).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pikaserve.engine.outputs import TokenLogprob
from pikaserve.server.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    ErrorResponse,
    TopLogprob,
    Usage,
)

DONE = b"data: [DONE]\n\n"

# HTTP status -> (OpenAI error type, default code)
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> ErrorResponse:
    etype, default_code = _ERROR_TYPES.get(status, ("invalid_request_error", None))
    return {"error": {"message": message, "type": etype, "param": param,
                      "code": code or default_code}}


def sse(obj: Mapping[str, object]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class TokenTexts:
    """Token id -> its text, cached: logprobs name every token and its alternatives."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = text
        return text


@dataclass(slots=True)
class Choice:
    """What one choice (one engine request) has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def usage_of(choices: list[Choice], num_choices_per_prompt: int) -> Usage:
    """The prompt counts once per distinct prompt, not once per choice (as OpenAI bills n>1)."""
    firsts = choices[::num_choices_per_prompt]
    return usage(
        sum(c.num_prompt_tokens for c in firsts),
        sum(c.num_tokens for c in choices),
        sum(c.num_cached_tokens for c in firsts),
    )


# --- logprobs ------------------------------------------------------------------------------
def chat_logprobs(items: list[TokenLogprob], texts: TokenTexts, top_n: int) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        t = texts(token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

    content: list[ChatTokenLogprob] = []
    for lp in items:
        content.append({**entry(lp.token_id, lp.logprob),
                        "top_logprobs": [entry(t, v) for t, v in lp.top[:top_n]]})
    return {"content": content, "refusal": None}


def completion_logprobs(items: list[TokenLogprob], texts: TokenTexts,
                        offset: int) -> CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for lp in items:
        t = texts(lp.token_id)
        tokens.append(t)
        values.append(lp.logprob)
        tops.append({texts(tid): v for tid, v in lp.top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


# --- chat ----------------------------------------------------------------------------------
def chat_response(rid: str, created: int, model: str, choices: list[Choice],
                  texts: TokenTexts, top_n: int | None) -> ChatCompletion:
    out: list[ChatChoice] = []
    for c in choices:
        out.append({
            "index": c.index,
            "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
            "logprobs": None if top_n is None else chat_logprobs(c.logprobs, texts, top_n),
            "finish_reason": c.finish_reason,
        })
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": out, "usage": usage_of(choices, len(choices)),
            "system_fingerprint": None}


class _Chunks:
    """SSE chunks of one streamed response: the same head on each, one choice per chunk, and
    with include_usage a last chunk holding the usage and no choice."""

    object = ""

    def __init__(self, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.head = {"id": rid, "object": self.object, "created": created, "model": model,
                     "system_fingerprint": None}
        self.include_usage = include_usage

    def _event(self, choice: dict[str, Any]) -> bytes:
        obj = dict(self.head)
        obj["choices"] = [choice]
        if self.include_usage:
            obj["usage"] = None  # OpenAI: null on every chunk but the last
        return sse(obj)

    def usage(self, u: Usage) -> bytes:
        obj = dict(self.head)
        obj["choices"] = []
        obj["usage"] = u
        return sse(obj)


class ChatChunks(_Chunks):
    """Events of a streamed chat completion (protocol.ChatCompletionChunk)."""

    object = "chat.completion.chunk"

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: Any = None,
               finish_reason: str | None = None) -> bytes:
        return self._event({"index": index, "delta": delta, "logprobs": logprobs,
                            "finish_reason": finish_reason})

    def role(self, index: int) -> bytes:
        return self._chunk(index, {"role": "assistant", "content": "", "refusal": None})

    def content(self, index: int, text: str, logprobs: ChatLogprobs | None) -> bytes:
        return self._chunk(index, {"content": text}, logprobs)

    def finish(self, index: int, reason: str | None) -> bytes:
        return self._chunk(index, {}, None, reason)


# --- text completions ----------------------------------------------------------------------
def completion_response(rid: str, created: int, model: str, choices: list[Choice],
                        texts: TokenTexts, want_logprobs: bool, n: int) -> Completion:
    out: list[CompletionChoice] = []
    for c in choices:
        out.append({
            "index": c.index,
            "text": "".join(c.text),
            "logprobs": completion_logprobs(c.logprobs, texts, 0) if want_logprobs else None,
            "finish_reason": c.finish_reason,
        })
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": out, "usage": usage_of(choices, n), "system_fingerprint": None}


class CompletionChunks(_Chunks):
    """Events of a streamed completion (protocol.CompletionChunk)."""

    object = "text_completion"

    def text(self, index: int, text: str, logprobs: CompletionLogprobs | None,
             finish_reason: str | None = None) -> bytes:
        return self._event({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": finish_reason})
