"""The command line: ``python -m trio_connpool {demo,get,load}``.

- ``demo``: the client against an embedded server (no network needed).
- ``get URL``: one URL, like curl: the body on stdout (or ``-o FILE``/``-o DIR/``), with
  curl's ``-X``, ``-H``, ``-d``, ``--json``, ``-L``, ``-i``, ``-f``, ``-v``, ``-m``.
- ``get URL URL...``: fetch URLs concurrently through one pool; a line per URL, or ``-o DIR``.
- ``load URL -n N -c C``: a small load generator; throughput, latency percentiles, pool
  statistics; Ctrl-C prints what was done so far.

Exit status: 0 when everything succeeded, 1 when a request failed, 2 for a usage error (a bad
option or URL), 22 for ``get -f`` and a status of 400 or more; 130 when interrupted. Errors
are one line on stderr, never a traceback.
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
    ConnectOptions,
    LoadReport,
    UsageError,
    describe,
    fetch_command,
    get_command,
    load_command,
    parse_url,
    prepare_directory,
    request_spec,
    resolve_output,
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


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
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


def _file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _ca_bundle(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file or directory: {text!r}")
    return text


def _connect_options(args: argparse.Namespace) -> ConnectOptions:
    return ConnectOptions(
        cacert=args.cacert, cert=args.cert, key=args.key, unix_socket=args.unix_socket
    )


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
        help="bound on each connect, read and write, and on the wait for a connection "
        f"(default {_DEFAULT_TIMEOUT:g})",
    )
    command.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    command.add_argument(
        "--cacert",
        type=_ca_bundle,
        metavar="FILE",
        help="trust the CA certificates in FILE (PEM; or a directory of hashed certificates) "
        "instead of the system's",
    )
    command.add_argument(
        "--cert",
        type=_file,
        metavar="FILE",
        help="client certificate (PEM; with its key unless --key is given)",
    )
    command.add_argument(
        "--key", type=_file, metavar="FILE", help="the private key of --cert (PEM)"
    )
    command.add_argument(
        "--unix-socket",
        metavar="PATH",
        help="connect to this Unix domain socket instead of the URL's host and port",
    )
    command.add_argument(
        "-x",
        "--proxy",
        metavar="URL",
        help="send the requests through this proxy: http://[user:pass@]host:port, https://, "
        "socks5:// or socks5h:// (default: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A trio-native connection pool and HTTP client.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a self-contained demonstration",
        description="Start an embedded HTTP/1.1 and HTTP/2 (h2c) server on 127.0.0.1 and "
        "send it N GET requests from C concurrent tasks through one client, once over "
        "HTTP/1.1 (a pool of keep-alive connections) and once over HTTP/2 (one multiplexed "
        "connection). Prints requests/s, latency percentiles and how many connections the "
        "server saw. Needs no network.",
    )
    demo.add_argument(
        "-n",
        "--requests",
        type=int,
        default=3000,
        metavar="N",
        help="requests per protocol (default 3000)",
    )
    demo.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=200,
        metavar="C",
        help="concurrent tasks sending them (default 200)",
    )
    demo.add_argument(
        "--quiet", action="store_true", help="no progress line (drawn only on a terminal)"
    )

    get = commands.add_parser(
        "get",
        help="fetch one URL like curl, or many concurrently through one pool",
        description="With one URL: write the response body to stdout (binary-safe), like "
        "curl; -o saves it instead. With several URLs: fetch them concurrently through one "
        "pool and print STATUS BYTES TIME URL for each as it completes (on stdout), or why "
        "it failed (on stderr); -o DIR saves each body in DIR. Errors go to stderr, one "
        "line each.",
        epilog="Exit status: 0 success; 1 a request failed (connection, TLS, timeout), or, "
        "with several URLs, a status of 400 or more; 2 a usage error; 22 with -f and one "
        "URL, a status of 400 or more; 130 interrupted.",
    )
    get.add_argument("urls", nargs="+", type=_url, metavar="URL", help="http or https URL")
    get.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="one URL: '-' for stdout (the default), a FILE, or a DIR/ (trailing slash or an "
        "existing directory) to keep the URL's file name (index.html when it has none); "
        "several URLs: a directory (created if needed), each file named after its whole URL",
    )
    get.add_argument(
        "-X",
        "--request",
        dest="method",
        metavar="METHOD",
        help="request method (default GET, or POST with -d/--json)",
    )
    get.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a request header (repeatable); 'NAME:' drops one -d/--json would add",
    )
    get.add_argument(
        "-d",
        "--data",
        action="append",
        default=[],
        metavar="DATA",
        help="send DATA as the body (POST, application/x-www-form-urlencoded); @FILE reads "
        "FILE without its newlines, @- stdin; repeated: joined with &",
    )
    get.add_argument(
        "--data-binary",
        action="append",
        default=[],
        metavar="DATA",
        help="like -d, but @FILE is sent exactly as it is",
    )
    get.add_argument(
        "--json",
        action="append",
        default=[],
        metavar="DATA",
        help="send DATA (or @FILE) as a JSON body: POST, Content-Type and Accept application/json",
    )
    get.add_argument("-L", "--location", action="store_true", help="follow redirects")
    get.add_argument(
        "--max-redirs",
        type=_count,
        metavar="N",
        help="with -L, follow at most N redirects (default: the client's limit)",
    )
    get.add_argument(
        "-i",
        "--include",
        action="store_true",
        help="one URL: write the response status line and headers before the body",
    )
    get.add_argument(
        "-f",
        "--fail",
        action="store_true",
        help="one URL: on a status of 400 or more write no body and exit 22",
    )
    get.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="on stderr: the request, the response head, the protocol, whether the "
        "connection was new (its connect time) or reused, and the times to the first byte "
        "and to the end",
    )
    get.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="N",
        help="several URLs: requests in flight at once, and the most connections (default 10)",
    )
    get.add_argument(
        "-m",
        "--max-time",
        type=_positive_float,
        metavar="SECONDS",
        help="a bound on the whole command (default none)",
    )
    _add_client_options(get)

    load = commands.add_parser(
        "load",
        help="a small load generator",
        description="Send N GET requests to URL from C concurrent tasks through one pool, "
        "then print the throughput, latency percentiles and the pool's statistics. On a "
        "terminal a progress line is drawn on stderr (a tqdm bar with the 'progress' extra "
        "installed). Ctrl-C stops the run and prints what was done so far (exit 130).",
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


def _run_get(args: argparse.Namespace) -> int:
    spec = request_spec(
        method=args.method,
        headers=args.headers,
        data=args.data,
        data_binary=args.data_binary,
        json=args.json,
        follow_redirects=args.location,
        max_redirects=args.max_redirs,
    )
    if len(args.urls) == 1:
        text, url = args.urls[0]
        output, named = resolve_output(args.output, url)
        return trio.run(
            partial(
                fetch_command,
                text,
                url,
                spec=spec,
                output=output,
                output_named=named,
                include=args.include,
                verbose=args.verbose,
                fail=args.fail,
                http2=args.http2,
                insecure=args.insecure,
                connect=_connect_options(args),
                proxy=args.proxy,
                timeout=args.timeout,
                max_time=args.max_time,
            )
        )
    if args.output == "-":
        raise UsageError("-o -: several URLs cannot share stdout; give -o a directory")
    if args.include:
        raise UsageError("-i/--include: only with one URL")
    output_dir = prepare_directory(args.output) if args.output else None
    return trio.run(
        partial(
            get_command,
            args.urls,
            concurrency=args.concurrency,
            http2=args.http2,
            insecure=args.insecure,
            connect=_connect_options(args),
            proxy=args.proxy,
            timeout=args.timeout,
            output_dir=output_dir,
            progress=not args.no_progress,
            spec=spec,
            max_time=args.max_time,
            verbose=args.verbose,
        )
    )


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "demo":
        if args.requests < 1 or args.concurrency < 1:
            parser.error("--requests and --concurrency must be at least 1")
        return trio.run(
            partial(
                run_demo, requests=args.requests, concurrency=args.concurrency, quiet=args.quiet
            )
        )
    if args.command == "get":
        return _run_get(args)
    text, url = args.url
    report = LoadReport(text, args.requests)
    try:
        return trio.run(
            partial(
                load_command,
                text,
                url,
                requests=args.requests,
                concurrency=args.concurrency,
                http2=args.http2,
                insecure=args.insecure,
                connect=_connect_options(args),
                proxy=args.proxy,
                timeout=args.timeout,
                progress=not args.no_progress,
                report=report,
            )
        )
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in _leaves(exc)):
            # Ctrl-C: say what was done before it (the bar was erased as the run unwound).
            with contextlib.suppress(OSError, ValueError):  # a closed stdout: nothing to say
                report.print(sys.stdout, sys.stderr, interrupted=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trio_connpool`` and the ``trio-connpool`` script.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 a request failed, 2 usage error, 22 ``get -f`` and an
        HTTP error status, 130 interrupted.
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
