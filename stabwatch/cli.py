"""The ``stabwatch`` command: ``demo``, ``diagnose``, ``report``, ``replay``.

Each subcommand lives in the module that owns the feature and exposes ``add_parser(subparsers)``
returning nothing, setting ``func`` on its parser; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
