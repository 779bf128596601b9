"""The `pikaserve` command: serve | generate | bench."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pikaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from pikaserve import generate_cli

    generate_cli.add_parser(sub)
    try:
        from pikaserve.server import cli as serve_cli

        serve_cli.add_parser(sub)
    except ImportError:  # the server is optional for the offline API
        serve_cli = None
    try:
        from pikaserve.bench import cli as bench_cli

        bench_cli.add_parser(sub)
    except ImportError:
        bench_cli = None

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
