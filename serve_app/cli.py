"""``serve-app`` command line: one entry point, sub-commands registered by the modules that own them.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, adding its sub-commands
with ``parser.set_defaults(func=callable)``; ``callable(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

COMMAND_MODULES = (
    "serve_app.commands.core",  # index, eval
    "serve_app.live.commands",  # ingest, merge
    "serve_app.serve.commands",  # demo, serve
    "serve_app.training.commands",  # train-reranker, distill
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-app", description="Hybrid retrieval and cross-encoder reranking on Ray Serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for expected failures, traceback with -v
        from serve_app.errors import StageError, UserFacingError

        if isinstance(exc, (UserFacingError, StageError)) and not args.verbose:
            print(f"serve-app {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
