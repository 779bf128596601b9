"""Every `pikaserve` subcommand has a description, and every option says what it does."""

from __future__ import annotations

import argparse

import pytest

from pikaserve import export_tokenizer_cli, generate_cli
from pikaserve.bench import cli as bench_cli
from pikaserve.heads import cli as heads_cli
from pikaserve.server import cli as serve_cli
from pikaserve.tune import cli as tune_cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="pikaserve")
    sub = parser.add_subparsers(dest="command")
    for module in (serve_cli, generate_cli, bench_cli, tune_cli, heads_cli, export_tokenizer_cli):
        module.add_parser(sub)
    found = {}
    stack = list(sub.choices.items())
    while stack:  # nested subcommands too (heads train, ...)
        name, p = stack.pop()
        found[name] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += [(f"{name} {n}", q) for n, q in action.choices.items()]
    return found


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help(name):
    parser = subcommands()[name]
    assert parser.description, f"pikaserve {name} has no description"
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and not a.help and a.dest != "help"]
    assert missing == [], f"pikaserve {name}: options without help: {missing}"
