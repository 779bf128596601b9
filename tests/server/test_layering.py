"""The HTTP layer talks to the engine through AsyncEngine's public surface only: it imports
nothing from the scheduler, the KV cache or the model, and never reaches through
AsyncEngine into the LLMEngine the loop thread owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pikaserve.server

SERVER = Path(pikaserve.server.__file__).parent
FORBIDDEN = ("pikaserve.engine.scheduler", "pikaserve.engine.llm_engine",
             "pikaserve.engine.model_runner", "pikaserve.kv", "pikaserve.model")


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_server_imports_no_engine_internals():
    bad = [f"{path.name}: {name}" for path in sorted(SERVER.glob("*.py"))
           for name in _imports(ast.parse(path.read_text()))
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []


def test_the_server_never_reaches_past_async_engine():
    bad = []
    for path in sorted(SERVER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            # `<something>.engine.engine`: the AsyncEngine's LLMEngine
            if (isinstance(node, ast.Attribute) and node.attr == "engine"
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "engine"):
                bad.append(f"{path.name}:{node.lineno}")
    assert bad == []
