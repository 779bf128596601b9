"""Turns parsed API requests into what the engine takes: chat messages, SamplingParams, and the
structured-output constraint (StructuredOutputsParams) from whichever of the three spellings
a client used (OpenAI response_format, vLLM structured_outputs, older guided_* fields).

Everything a client can get wrong surfaces here as InvalidRequestError (HTTP 400), before the
request reaches the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pikaserve.config import ConfigError
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.errors import InvalidRequestError
from pikaserve.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    _Sampling,
)

MAX_CHOICES = 128  # n per request; each choice is one engine request
MAX_SEED = 2**64 - 1  # torch.Generator takes seeds in [-2**63, 2**64)
MIN_SEED = -(2**63)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them (plain string content)."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"content part type {part.type!r} is not supported; only text parts are",
                        f"messages[{i}].content",
                    )
                texts.append(part.text)
            # vLLM's "string" content format: text parts joined by newlines
            content = "\n".join(texts)
        elif m.content is None and m.role != "assistant":  # only an assistant turn may be empty
            raise InvalidRequestError(f"a {m.role} message needs content",
                                      f"messages[{i}].content")
        else:
            content = m.content or ""
        # The templates we serve know system/user/assistant; developer is OpenAI's new system.
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:  # for the templates that render it, as vLLM passes it on
            message["name"] = m.name
        out.append(message)
    return out


def structured_outputs(
    req: _Sampling, default: dict[str, Any] | None = None
) -> StructuredOutputsParams | None:
    """The one constraint a request asks for; `default` applies when it asks for none."""
    found: list[tuple[str, StructuredOutputsParams | None]] = []
    if req.response_format is not None:
        found.append(("response_format", _from_response_format(req.response_format)))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        found.append(("structured_outputs", StructuredOutputsParams(
            json=so.json_, json_object=bool(so.json_object), regex=so.regex, choice=so.choice,
            grammar=so.grammar,
        )))
    if req.guided_json is not None:
        found.append(("guided_json", StructuredOutputsParams(json=req.guided_json)))
    if req.guided_regex is not None:
        found.append(("guided_regex", StructuredOutputsParams(regex=req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", StructuredOutputsParams(choice=req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutputsParams(grammar=req.guided_grammar)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(f"give one output constraint, not several ({names})", found[1][0])
    if found:
        return found[0][1]  # None for response_format {"type": "text"}: explicitly unconstrained
    return parse_response_format(default, "default_response_format") if default else None


def _from_response_format(rf: ResponseFormat) -> StructuredOutputsParams | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        if rf.schema_ is not None:
            return StructuredOutputsParams(json=rf.schema_)
        return StructuredOutputsParams(json_object=True)
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise InvalidRequestError(
            'response_format type "json_schema" needs json_schema.schema', "response_format"
        )
    return StructuredOutputsParams(json=rf.json_schema.schema_)


def parse_response_format(obj: dict[str, Any], param: str) -> StructuredOutputsParams | None:
    """An OpenAI response_format object, or a bare JSON Schema (anything without a "type" of
    text/json_object/json_schema)."""
    if obj.get("type") in ("text", "json_object", "json_schema"):
        try:
            rf = ResponseFormat.model_validate(obj)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid response_format: {exc}", param) from exc
        return _from_response_format(rf)
    return StructuredOutputsParams(json=obj)


def load_default_response_format(path: str | None) -> dict[str, Any] | None:
    """Reads --default-response-format at start-up, so a bad file stops the server there."""
    if path is None:
        return None
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--default-response-format {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"--default-response-format {path}: expected a JSON object")
    try:
        parse_response_format(obj, "default_response_format")
    except InvalidRequestError as exc:
        raise ConfigError(f"--default-response-format {path}: {exc}") from exc
    return obj


def _refuse_unsupported(req: _Sampling) -> None:
    if req.logit_bias:
        raise InvalidRequestError("logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise InvalidRequestError("tools are not supported by this server", "tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice is not supported by this server", "tool_choice")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise InvalidRequestError("echo is not supported", "echo")
        if req.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of other than n is not supported", "best_of")


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    default_response_format: dict[str, Any] | None = None,
) -> list[SamplingParams]:
    """One SamplingParams per choice (n); choice i gets seed + i when a seed is given."""
    _refuse_unsupported(req)
    if not 1 <= req.n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be in [1, {MAX_CHOICES}], got {req.n}", "n")
    if req.seed is not None and not MIN_SEED <= req.seed <= MAX_SEED:
        raise InvalidRequestError(f"seed must be in [{MIN_SEED}, {MAX_SEED}]", "seed")
    if isinstance(req, ChatCompletionRequest):
        # None: up to the context length, as vLLM does for chat
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else (
            req.max_tokens)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        so = structured_outputs(req, default_response_format)
    else:
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        param = "max_tokens"
        logprobs = req.logprobs
        so = structured_outputs(req)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"{param} must be at least 1, got {max_tokens}", param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_token_ids = list(req.stop_token_ids or [])
    out = []
    for i in range(req.n):
        seed = None
        if req.seed is not None:
            seed = req.seed + i
            if seed > MAX_SEED:  # wrap, so seed + i stays a valid generator seed
                seed -= 2**64
        # A fresh constraint spec per choice: each engine request compiles its own matcher.
        so_i = None if so is None else StructuredOutputsParams(
            json=so.json, json_object=so.json_object, regex=so.regex,
            choice=None if so.choice is None else list(so.choice), grammar=so.grammar,
        )
        out.append(SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,  # the engine treats k >= vocab as off
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=seed,
            stop=stop,  # one list for all the choices: the engine only reads it
            stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if req.repetition_penalty is None
                                else req.repetition_penalty),
            include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=so_i,
            cache_salt=req.cache_salt,
        ))
    return out
