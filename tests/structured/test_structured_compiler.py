"""Compiling StructuredOutputsParams: library errors as InvalidRequestError, the grammar cache."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from pikaserve.engine.sampling_params import StructuredOutputsParams as S
from pikaserve.errors import InvalidRequestError
from pikaserve.structured import build_constraint, canonical_spec, compile_off_thread
from pikaserve.structured.compiler import GrammarCompiler, get_compiler

from .walk import random_logits, walk


@pytest.mark.parametrize(
    "spec, param, words",
    [
        (S(json={"type": "strin"}), "json", "Invalid type"),
        (S(json={"type": 12}), "json", "type must be a string"),
        (S(json={"type": "integer", "minimum": 5, "maximum": 2}), "json", "minimum (5) is greater"),
        (S(json={"properties": {"a": {"$ref": "#/nope"}}}), "json", "/nope"),
        (S(json={"type": "string", "format": "weird"}), "json", "Unknown format"),
        (S(json="{not json"), "json", "not valid JSON"),
        (S(json="[1, 2]"), "json", "must be a JSON object"),
        (S(regex="[a-"), "regex", "unclosed character class"),
        (S(regex="(?<=a)b"), "regex", "look-around"),
        (S(grammar="start: foo"), "grammar", 'unknown name: "foo"'),
        (S(grammar="this is not a grammar"), "grammar", "Expected"),
    ],
)
def test_invalid_specs_raise_the_library_message(tiny_tokenizer, spec, param, words):
    with pytest.raises(InvalidRequestError) as info:
        build_constraint(spec, tiny_tokenizer)
    assert words in str(info.value)
    assert info.value.param == param
    with pytest.raises(InvalidRequestError):  # cached errors raise again, as fresh exceptions
        build_constraint(spec, tiny_tokenizer)


def test_cache_is_keyed_by_canonical_spec_and_tokenizer(tiny_tokenizer):
    compiler = get_compiler(tiny_tokenizer)
    assert get_compiler(tiny_tokenizer) is compiler
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    first = compiler.compile(canonical_spec(S(json=schema)))
    # The same schema as JSON text with other spacing is the same grammar.
    assert compiler.compile(canonical_spec(S(json=json.dumps(schema, indent=2)))) is first
    # Property order is part of the grammar (it is the order the answer is written in).
    reordered = {"type": "object", "properties": {"b": {"type": "boolean"}, "a": {"type": "integer"}}}
    assert compiler.compile(canonical_spec(S(json=reordered))) is not first
    # Each request gets its own matcher over the shared compiled grammar.
    assert first.matcher() is not first.matcher()

    from transformers import AutoTokenizer

    from pikaserve.model.tokenizer import Tokenizer

    other = Tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer.hf.name_or_path), set())
    assert get_compiler(other) is not compiler


def test_lru_evicts_the_least_recently_used(tiny_tokenizer):
    compiler = GrammarCompiler(get_compiler(tiny_tokenizer).info, cache_size=2)
    a, b, c = (canonical_spec(S(regex=r)) for r in ("a+", "b+", "c+"))
    ga = compiler.compile(a)
    compiler.compile(b)
    assert compiler.compile(a) is ga  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.compile(a) is ga
    misses = compiler.misses
    compiler.compile(b)
    assert compiler.misses == misses + 1


@pytest.mark.parametrize("choices", [["yes", "no"], ['say "hi"\n', "back\\slash", "xin chào"]])
def test_choice_is_exactly_one_of_the_literals(tiny_tokenizer, choices):
    eos = set(tiny_tokenizer.eos_token_ids)
    seen = set()
    for seed in range(6):
        c = build_constraint(S(choice=choices), tiny_tokenizer)
        tokens, _ = walk(c, True, random_logits(len(tiny_tokenizer.hf), seed), eos)
        text = tiny_tokenizer.decode(tokens)
        assert text in choices and c.is_finished
        seen.add(text)
    assert len(seen) > 1  # random logits reach more than one choice


def test_gbnf_and_lark_grammars(tiny_tokenizer):
    eos = set(tiny_tokenizer.eos_token_ids)
    for grammar in ['root ::= "yes" | "no"', 'start: "yes" | "no"']:
        c = build_constraint(S(grammar=grammar), tiny_tokenizer)
        tokens, _ = walk(c, True, random_logits(len(tiny_tokenizer.hf), 0), eos)
        assert tiny_tokenizer.decode(tokens) in ("yes", "no")


def test_async_compile_runs_on_a_worker_thread(tiny_tokenizer, monkeypatch):
    from pikaserve.structured import compiler

    threads = []
    real = compiler.build_constraint

    def recording(params, tokenizer):
        threads.append(threading.current_thread())
        return real(params, tokenizer)

    monkeypatch.setattr(compiler, "build_constraint", recording)

    async def main():
        ok = await compile_off_thread(compiler.build_constraint, S(regex="[0-9]{3}"),
                                      tiny_tokenizer)
        with pytest.raises(InvalidRequestError):
            await compile_off_thread(compiler.build_constraint, S(regex="[0-"), tiny_tokenizer)
        return ok

    assert asyncio.run(main()).forced_tokens() == []
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_a_compiled_grammar_skips_the_thread_hop(tiny_tokenizer, monkeypatch):
    """constraint_off_loop compiles a new grammar on the grammar threads once; later requests
    with that grammar (and a cached bad one) are answered on the loop, without a hop."""
    from pikaserve.structured import compiler

    hops = []
    real = compiler.compile_off_thread

    async def counting(fn, *args):
        hops.append(args)
        return await real(fn, *args)

    monkeypatch.setattr(compiler, "compile_off_thread", counting)
    good, bad = S(regex="[0-9]{4}"), S(regex="[0-9")

    async def main():
        first = await compiler.constraint_off_loop(good, tiny_tokenizer)
        second = await compiler.constraint_off_loop(good, tiny_tokenizer)
        for _ in range(2):
            with pytest.raises(InvalidRequestError):
                await compiler.constraint_off_loop(bad, tiny_tokenizer)
        return first, second

    first, second = asyncio.run(main())
    assert len(hops) == 2  # one per new spec
    assert first is not second  # each request gets its own matcher
    first.accept(tiny_tokenizer.encode("1", add_special_tokens=False))  # not seen by second
    assert second.allowed_tokens() == compiler.build_constraint(good, tiny_tokenizer).allowed_tokens()
