"""The `pikaserve` command: serve | generate | bench | tune | heads | export-tokenizer."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pikaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from pikaserve import export_tokenizer_cli, generate_cli
    from pikaserve.bench import cli as bench_cli
    from pikaserve.heads import cli as heads_cli
    from pikaserve.server import cli as serve_cli
    from pikaserve.tune import cli as tune_cli

    serve_cli.add_parser(sub)
    generate_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    tune_cli.add_parser(sub)
    heads_cli.add_parser(sub)
    export_tokenizer_cli.add_parser(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
