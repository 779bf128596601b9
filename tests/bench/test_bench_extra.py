"""The bench's console and plotting libraries are an extra: the server never imports them, and
`pikaserve bench` without them says how to install them."""

from __future__ import annotations

import subprocess
import sys

from pikaserve.cli import main


def test_the_server_imports_neither_rich_nor_matplotlib():
    code = ("import sys, pikaserve.cli, pikaserve.server.app, pikaserve.server.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_bench_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails as if not installed
    assert main(["bench", "--url", "http://127.0.0.1:9"]) == 2
    assert "pikaserve[bench]" in capsys.readouterr().err
