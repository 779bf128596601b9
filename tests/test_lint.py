"""ruff and mypy (both configured in pyproject.toml) find nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_ruff_is_clean():
    run = _run("ruff", "check", "pikaserve", "tests", "benchmarks")
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.slow
def test_mypy_is_clean():
    run = _run("mypy")  # the package, as [tool.mypy] in pyproject.toml says
    assert run.returncode == 0, run.stdout + run.stderr
