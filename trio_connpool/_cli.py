"""The command line: ``python -m trio_connpool {demo,get,load}``.

- ``demo``: the client against an embedded server (no network needed).
- ``get URL...``: fetch URLs concurrently through one pool; a line per URL, or ``-o DIR``.
- ``load URL -n N -c C``: a small load generator; throughput, latency percentiles, pool
  statistics.

Exit status: 0 when everything succeeded, 1 when a request failed, 2 for a usage error (a bad
option or URL); 130 when interrupted. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from functools import partial
from typing import TYPE_CHECKING, NoReturn, cast

import trio

from ._commands import (
    PROG,
    UsageError,
    describe,
    get_command,
    load_command,
    parse_url,
    prepare_directory,
)
from ._demo import run_demo
from ._exceptions import PoolError
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .http import URL

if sys.version_info < (3, 11):  # pragma: no cover - exercised on Python 3.10 only
    from exceptiongroup import BaseExceptionGroup

_DEFAULT_TIMEOUT = 30.0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _url(text: str) -> tuple[str, URL]:
    try:
        return text, parse_url(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_client_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--http2", action="store_true", help="speak HTTP/2 where the server offers it"
    )
    command.add_argument(
        "-k", "--insecure", action="store_true", help="do not verify TLS certificates"
    )
    command.add_argument(
        "--timeout",
        type=_positive_float,
        default=_DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on each connect, read and write (default {_DEFAULT_TIMEOUT:g})",
    )
    command.add_argument("--no-progress", action="store_true", help="never draw a progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A trio-native connection pool and HTTP client.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run a self-contained demonstration")
    demo.add_argument("-n", "--requests", type=int, default=3000, help="requests to send")
    demo.add_argument("-c", "--concurrency", type=int, default=200, help="concurrent tasks")
    demo.add_argument("--quiet", action="store_true", help="no progress line")

    get = commands.add_parser(
        "get",
        help="fetch URLs concurrently through one pool",
        description="Fetch URLs concurrently through one pool. Prints STATUS BYTES TIME URL "
        "for each as it completes (on stdout) or why it failed (on stderr). Exit status 1 if "
        "any failed or answered with a status of 400 or more.",
    )
    get.add_argument("urls", nargs="+", type=_url, metavar="URL", help="http or https URL")
    get.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="N",
        help="requests in flight at once, and the most connections (default 10)",
    )
    get.add_argument(
        "-o",
        "--output-dir",
        metavar="DIR",
        help="write each body to a file in DIR (created if needed), named after its URL",
    )
    _add_client_options(get)

    load = commands.add_parser(
        "load",
        help="a small load generator",
        description="Send N GET requests to URL from C concurrent tasks through one pool, "
        "then print the throughput, latency percentiles and the pool's statistics.",
    )
    load.add_argument("url", type=_url, metavar="URL", help="http or https URL")
    load.add_argument(
        "-n",
        "--requests",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="requests in all (default 1000)",
    )
    load.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="C",
        help="concurrent tasks, and the most connections (default 10)",
    )
    _add_client_options(load)
    return parser


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        group = cast("BaseExceptionGroup[BaseException]", exc)
        return [leaf for inner in group.exceptions for leaf in _leaves(inner)]
    return [exc]


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "demo":
        if args.requests < 1 or args.concurrency < 1:
            parser.error("--requests and --concurrency must be at least 1")
        return trio.run(
            partial(
                run_demo, requests=args.requests, concurrency=args.concurrency, quiet=args.quiet
            )
        )
    progress = not args.no_progress
    if args.command == "get":
        output_dir = prepare_directory(args.output_dir) if args.output_dir else None
        return trio.run(
            partial(
                get_command,
                args.urls,
                concurrency=args.concurrency,
                http2=args.http2,
                insecure=args.insecure,
                timeout=args.timeout,
                output_dir=output_dir,
                progress=progress,
            )
        )
    text, url = args.url
    return trio.run(
        partial(
            load_command,
            text,
            url,
            requests=args.requests,
            concurrency=args.concurrency,
            http2=args.http2,
            insecure=args.insecure,
            timeout=args.timeout,
            progress=progress,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trio_connpool`` and the ``trio-connpool`` script.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 a request failed, 2 usage error, 130 interrupted.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PoolError as exc:
        # Not one request's failure (those are reported per request): the pool itself failed.
        print(f"{PROG}: error: {describe(exc)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, BrokenPipeError, BaseExceptionGroup) as exc:
        leaves = _leaves(exc)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        if all(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            # The reader of our output went away (`... | head`): stop quietly, and keep the
            # interpreter from complaining again when it flushes stdout at exit.
            with contextlib.suppress(OSError, ValueError):  # no real stdout: nothing to do
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
