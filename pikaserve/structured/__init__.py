"""Structured output: JSON Schema, regex, choice and Lark grammars via llguidance.

`build_constraint(params, tokenizer)` compiles (with a cache) and returns a per-request
GrammarMatcher, the engine's Constraint; `constraint_off_loop` is the same for an event loop
(a new grammar compiles on the grammar threads).
See docs/structured_output.md.
"""

from pikaserve.structured.compiler import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarSpec,
    build_constraint,
    canonical_spec,
    compile_off_thread,
    constraint_off_loop,
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
    "canonical_spec",
    "compile_off_thread",
    "constraint_off_loop",
    "get_compiler",
    "warm_up",
]
