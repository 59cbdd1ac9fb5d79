"""The command line: ``python -m trio_connpool demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ._demo import run_demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trio_connpool`` and the ``trio-connpool`` script."""
    parser = argparse.ArgumentParser(prog="trio-connpool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a self-contained demonstration")
    demo.add_argument("-n", "--requests", type=int, default=3000, help="requests to send")
    demo.add_argument("-c", "--concurrency", type=int, default=200, help="concurrent tasks")
    demo.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    return trio.run(
        partial(run_demo, requests=args.requests, concurrency=args.concurrency, quiet=args.quiet)
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
