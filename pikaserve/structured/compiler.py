"""Turns a request's StructuredOutputsParams into a compiled llguidance grammar, with a cache.

A spec is first made canonical (a JSON schema parsed and re-serialised, a choice list as JSON,
...); the compiled grammar is cached per tokenizer by that canonical spec, in an LRU, errors
included, so a repeated schema costs one dictionary lookup plus a ~1 us matcher copy. A spec the
library rejects raises InvalidRequestError carrying the library's message (HTTP 400).

JSON is compact by default (no free whitespace, "," and ":" separators): every fixed byte of an
answer is then forced and fast-forwarded, and a small model cannot wander off into whitespace.
A schema can still opt into flexible whitespace with llguidance's own `"x-guidance":
{"whitespace_flexible": true}` key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from pikaserve.engine.sampling_params import StructuredOutputsParams
from pikaserve.errors import InvalidRequestError
from pikaserve.structured.matcher import ExploreCache, GrammarMatcher
from pikaserve.structured.tokenizer_info import TokenizerInfo

if TYPE_CHECKING:  # a type of llguidance's stubs only
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")

JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}
CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A structured-output request in canonical form: the cache key (with the tokenizer)."""

    kind: str  # "json" | "regex" | "choice" | "grammar": also the request field at fault
    text: str


def canonical_spec(params: StructuredOutputsParams) -> GrammarSpec:
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}", "json") from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("a JSON schema must be a JSON object", "json")
        # Key order is kept: it is the order in which the answer's properties are written.
        return GrammarSpec("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    if params.json_object:
        return GrammarSpec("json", '{"type":"object"}')
    if params.regex is not None:
        return GrammarSpec("regex", params.regex)
    if params.choice is not None:
        return GrammarSpec("choice", json.dumps(list(params.choice), ensure_ascii=False))
    return GrammarSpec("grammar", params.grammar or "")


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar (its JSON form) for a spec; not yet checked."""
    if spec.kind == "json":
        return LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_DEFAULTS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        # An alternation of literals; JSON string escapes are valid Lark string escapes.
        choices = json.loads(spec.text)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    try:
        lark = any_to_lark(spec.text)  # Lark as is; GBNF (llama.cpp / xgrammar style) converted
    except Exception as exc:  # noqa: BLE001  # the converter raises anything on bad text
        raise InvalidRequestError(f"invalid grammar: {exc}", "grammar") from None
    return LLMatcher.grammar_from_lark(lark)


class CompiledGrammar:
    """A checked grammar bound to one tokenizer; `matcher()` makes a fresh per-request matcher."""

    __slots__ = ("spec", "info", "_template", "_explored")

    def __init__(self, spec: GrammarSpec, info: TokenizerInfo, template: LLMatcher) -> None:
        self.spec, self.info, self._template = spec, info, template
        self._explored = ExploreCache()  # masks and canonical checks per state, shared

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.info, self._explored)


class GrammarCompiler:
    """Compiles specs for one tokenizer; thread-safe (compilation runs off the engine loop)."""

    def __init__(self, info: TokenizerInfo, cache_size: int = CACHE_SIZE) -> None:
        self.info = info
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar | InvalidRequestError] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        compiled = self.cached(spec)
        if compiled is not None:
            return compiled
        entry = self._build(spec)  # outside the lock: llguidance drops the GIL here
        with self._lock:
            self.misses += 1
            self._cache[spec] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(entry, InvalidRequestError):
            raise InvalidRequestError(str(entry), entry.param)
        return entry

    def cached(self, spec: GrammarSpec) -> CompiledGrammar | None:
        """The compiled grammar if it is in the cache (a bad spec raises as compile does)."""
        with self._lock:
            entry = self._cache.get(spec)
            if entry is None:
                return None
            self._cache.move_to_end(spec)
            self.hits += 1
        if isinstance(entry, InvalidRequestError):
            raise InvalidRequestError(str(entry), entry.param)
        return entry

    def _build(self, spec: GrammarSpec) -> CompiledGrammar | InvalidRequestError:
        try:
            grammar = grammar_text(spec)
        except InvalidRequestError as exc:
            return exc
        except ValueError as exc:
            return InvalidRequestError(f"invalid {spec.kind}: {exc}", spec.kind)
        template = LLMatcher(self.info.ll, grammar, log_level=0)
        if template.is_error():
            return InvalidRequestError(f"invalid {spec.kind}: {template.get_error()}", spec.kind)
        for warning in template.get_grammar_warnings():
            logger.debug("grammar warning (%s): %s", spec.kind, warning)
        return CompiledGrammar(spec, self.info, template)


_compilers: "weakref.WeakKeyDictionary[Any, GrammarCompiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def get_compiler(tokenizer: Any) -> GrammarCompiler:
    """The compiler of a tokenizer (pikaserve Tokenizer or HF fast tokenizer), built on first
    use and kept while the tokenizer lives: the grammar cache is keyed by (spec, tokenizer)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(TokenizerInfo(tokenizer))
        return compiler


def build_constraint(params: StructuredOutputsParams, tokenizer: Any) -> GrammarMatcher:
    """A fresh matcher for one request; raises InvalidRequestError for a bad spec."""
    return get_compiler(tokenizer).compile(canonical_spec(params)).matcher()


async def constraint_off_loop(params: StructuredOutputsParams, tokenizer: Any) -> GrammarMatcher:
    """build_constraint for an event loop: a grammar already compiled gives its matcher at once
    (~7 us: a lookup and a matcher copy, less than a thread hop); a new one is compiled on the
    grammar threads, so the loop never waits on a compile."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
    if compiler is not None:
        compiled = compiler.cached(canonical_spec(params))
        if compiled is not None:
            return compiled.matcher()
    return await compile_off_thread(build_constraint, params, tokenizer)


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def compile_executor() -> ThreadPoolExecutor:
    """Threads that compile grammars, so that the engine loop and event loop never do."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pikaserve-grammar")
        return _executor


async def compile_off_thread(compile_fn: Callable[..., T], *args: Any) -> T:
    """`compile_fn(*args)` on the grammar threads, awaited from an event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(compile_executor(), compile_fn, *args)


def warm_up(tokenizer: Any) -> None:
    """Builds the tokenizer's llguidance index in the background (about a second, once)."""
    compile_executor().submit(get_compiler, tokenizer)
