"""The ``stabwatch`` command: ``demo``, ``diagnose``, ``report``, ``replay``.

Each subcommand lives in the module that owns the feature and exposes ``add_parser(subparsers)``
returning nothing, setting ``func`` on its parser; this file only lists them, and turns a
`StabwatchError` (bad input: a missing file, a bad setting, a missing extra) into its message on stderr
and exit status 2 — no traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from stabwatch.errors import StabwatchError

__all__ = ["main"]

#: (module, ) providing ``add_parser(subparsers)``; each sets ``func(args) -> int`` on its parser.
_SUBCOMMANDS: tuple[str, ...] = ("stabwatch.demo", "stabwatch.replay", "stabwatch.report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stabwatch", description="Training-stability monitoring for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except StabwatchError as exc:
        print(f"stabwatch {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
