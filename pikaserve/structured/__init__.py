"""Structured output: JSON Schema, regex, choice and Lark grammars via llguidance.

`build_constraint(params, tokenizer)` compiles (with a cache) and returns a per-request
GrammarMatcher, the engine's Constraint; `build_constraint_async` does it on a worker thread.
See docs/structured_output.md.
"""

from pikaserve.structured.compiler import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarSpec,
    build_constraint,
    build_constraint_async,
    canonical_spec,
    get_compiler,
    warm_up,
)
from pikaserve.structured.matcher import GrammarMatcher
from pikaserve.structured.tokenizer_info import TokenizerInfo

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "GrammarSpec",
    "TokenizerInfo",
    "build_constraint",
    "build_constraint_async",
    "canonical_spec",
    "get_compiler",
    "warm_up",
]
