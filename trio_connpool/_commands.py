"""The ``get`` and ``load`` commands of ``python -m trio_connpool`` (parsed in ``_cli.py``).

Both run one :func:`~trio_connpool.http.open_client` (so one pool) for the whole command, with
as many connections as concurrent tasks. They speak to users in the way command-line tools
do: results on stdout, one line per failure on stderr, exit status 0 (everything succeeded),
1 (a request failed) or 2 (the command line asked for something impossible; raised here as
:class:`UsageError` and reported by ``_cli.main``). No user error ever ends in a traceback.

Request times and throughput come from ``trio.current_time()``, like every other time in the
library: the real clock in a normal run, a test's clock in tests.

A progress bar is drawn on stderr when it is a terminal and ``tqdm`` is installed (the
``progress`` extra). ``tqdm`` is imported lazily, the first time a bar is wanted, and its
absence is never an error: there is simply no bar.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import math
import os
import re
import ssl
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TextIO, cast

import trio

from ._exceptions import InvalidURL, PoolError
from .http import URL, Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .http import Client

if sys.version_info < (3, 11):  # pragma: no cover - exercised on Python 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "PROG",
    "UsageError",
    "assign_filenames",
    "describe",
    "get_command",
    "load_command",
    "parse_url",
    "percentile",
    "prepare_directory",
    "safe_filename",
]

PROG = "trio-connpool"

# The longest file name -o writes (most file systems allow 255 bytes; leave room for "-N").
_MAX_NAME = 120
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}")
# Device names Windows reserves in every directory, whatever the extension.
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)


class UsageError(Exception):
    """The command line asks for something impossible (exit status 2; nothing was sent)."""


# ---- messages --------------------------------------------------------------------------


def _root_reason(exc: BaseException) -> str | None:
    """The words for the innermost OSError behind ``exc`` (the OS's, or OpenSSL's), if any.

    ``trio.open_tcp_stream`` reports "all attempts to connect to ... failed" and puts the
    individual errors (``Connection refused``) in a chained exception group.
    """
    reason: str | None = None
    current: BaseException | None = exc
    for _ in range(32):  # bounded: chains are short, and a cycle must not hang us
        if current is None:
            break
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {current.verify_message}"
        elif isinstance(current, ssl.SSLError):
            # Its errno is an OpenSSL code, not the operating system's.
            reason = str(current.reason or current)
        elif isinstance(current, OSError) and current.errno is not None:
            reason = os.strerror(current.errno)
        if isinstance(current, BaseExceptionGroup):
            group = cast("BaseExceptionGroup[BaseException]", current)
            current = group.exceptions[0] if group.exceptions else None
        else:
            current = current.__cause__
    return reason


def describe(exc: BaseException) -> str:
    """One line saying what went wrong: ``"ConnectError: cannot connect to ... (refused)"``.

    A :class:`~trio_connpool.PoolError` is described by its message without the pool key
    (which repeats the URL the caller prints anyway); the operating system's reason for a
    failed connect is added when the message does not already say it.
    """
    if isinstance(exc, PoolError):
        # Its message and root cause (PoolError.reason says each once), without the key.
        reason = exc.reason
        message = f"{exc.message}: {reason}" if reason else exc.message
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return " ".join(text.split())
    message = str(exc)
    reason = _root_reason(exc)
    if reason is not None and reason.lower() not in message.lower():
        # "cannot connect to X: " ends where an error with no words of its own was put.
        stripped = message.rstrip(": ")
        message = f"{stripped}: {reason}" if stripped != message else f"{message} ({reason})"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return " ".join(text.split())  # one line, whatever the message held


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ascending ``sorted_values`` (NaN when empty).

    Args:
        sorted_values: The values, sorted in ascending order.
        fraction: 0.5 for the median, 0.99 for p99, 1.0 for the maximum.

    Returns:
        The smallest value that at least ``fraction`` of the values do not exceed.
    """
    if not sorted_values:
        return math.nan
    rank = math.ceil(fraction * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


# ---- command-line values ---------------------------------------------------------------


def parse_url(text: str) -> URL:
    """Parse one URL given on the command line.

    Raises:
        UsageError: The URL is malformed or not http/https.
    """
    try:
        return URL(text)
    except InvalidURL as exc:
        raise UsageError(str(exc.args[0]) if exc.args else f"invalid URL {text!r}") from None


def safe_filename(url: URL) -> str:
    """A file name for the body of ``url``: host, port and target, reduced to safe characters.

    The name never contains a path separator, never starts with a dot or a dash, and is
    never a Windows device name, so joining it to a directory always names a plain file
    directly inside that directory. Long names are cut and end with a hash of the URL, so
    different long URLs still get different names.

    Example:
        ``http://127.0.0.1:8000/bytes/10?x=1`` becomes ``127.0.0.1_8000_bytes_10_x_1``.
    """
    default_port = 443 if url.is_secure else 80
    parts = [url.host]
    if url.port != default_port:
        parts.append(str(url.port))
    parts.append(url.target.decode("ascii"))
    name = _UNSAFE_RUN.sub("_", "_".join(parts))
    name = re.sub(r"_+", "_", name).lstrip("._-").rstrip("._ ")
    if not name:
        name = "index"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(str(url).encode("ascii")).hexdigest()[:16]
        name = f"{name[: _MAX_NAME - 17].rstrip('._-')}-{digest}"
    if name.split(".", 1)[0].upper() in _RESERVED:
        name = f"url-{name}"
    return name


def assign_filenames(urls: Sequence[URL]) -> list[str]:
    """A distinct :func:`safe_filename` for each URL, in order.

    Names that would collide (the same URL twice, or URLs that reduce to the same name,
    compared without case for case-insensitive file systems) get ``-2``, ``-3``... before
    the extension of their path (``h_a-2.txt``), or at the end (``example.com-2``).
    """
    taken: set[str] = set()
    names: list[str] = []
    for url in urls:
        base = safe_filename(url)
        stem, extension = os.path.splitext(base)
        if "_" not in base or not _EXTENSION.fullmatch(extension):
            # No path, or no real extension ("127.0.0.1_8000" splits at ".1_8000"): the
            # number goes at the end.
            stem, extension = base, ""
        name = base
        for number in range(2, len(urls) + 2):  # bounded: at most len(urls) names are taken
            if name.lower() not in taken:
                break
            name = f"{stem}-{number}{extension}"
        taken.add(name.lower())
        names.append(name)
    return names


def prepare_directory(text: str) -> Path:
    """Make sure the ``-o`` directory exists (creating it if needed) and return it.

    Raises:
        UsageError: It exists and is not a directory, or cannot be created.
    """
    directory = Path(text)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"output directory {text!r} exists and is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot create output directory {text!r}: {exc.strerror}") from None
    return directory


# ---- progress --------------------------------------------------------------------------


class _Bar(Protocol):
    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


class _BarFactory(Protocol):
    def __call__(
        self,
        *,
        total: int,
        desc: str,
        unit: str,
        file: TextIO,
        leave: bool,
        dynamic_ncols: bool,
    ) -> _Bar: ...

    def write(self, s: str, file: TextIO | None = None) -> None: ...


def _load_tqdm() -> _BarFactory | None:
    """``tqdm.tqdm``, or None when it is not installed (or is broken: never an error)."""
    try:
        module = importlib.import_module("tqdm")
        factory = cast("_BarFactory", module.tqdm)
        # tqdm's monitor thread only re-tunes miniters; a trio program needs no extra thread.
        module.tqdm.monitor_interval = 0
    except Exception:
        return None
    return factory


class Progress:
    """A progress bar on ``stream`` when it is a terminal and tqdm is installed; else nothing.

    Lines printed through :meth:`print` while the bar is shown go above it instead of
    through it.
    """

    def __init__(self, total: int, *, description: str, stream: TextIO, enabled: bool) -> None:
        self._factory: _BarFactory | None = None
        self._bar: _Bar | None = None
        if enabled and total > 0 and _isatty(stream):
            self._factory = _load_tqdm()
            if self._factory is not None:
                self._bar = self._factory(
                    total=total,
                    desc=description,
                    unit="req",
                    file=stream,
                    leave=False,
                    dynamic_ncols=True,
                )

    @property
    def shown(self) -> bool:
        """Whether a bar is being drawn."""
        return self._bar is not None

    def advance(self) -> None:
        """One more item done."""
        if self._bar is not None:
            self._bar.update(1)

    def print(self, line: str, file: TextIO) -> None:
        """Print ``line`` to ``file`` without garbling the bar."""
        if self._bar is not None and self._factory is not None:
            self._factory.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        """Erase the bar (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream is not a terminal
        return False


# ---- the client ------------------------------------------------------------------------


async def _open(
    stack: contextlib.AsyncExitStack,
    *,
    concurrency: int,
    http2: bool,
    insecure: bool,
    timeout: float,  # noqa: ASYNC109
) -> Client:
    """Enter one client (one pool) for the command; option errors become UsageError."""
    try:
        return await stack.enter_async_context(
            open_client(
                verify=not insecure,
                http2=http2,
                max_connections=concurrency,
                max_connections_per_key=concurrency,
                timeouts=Timeouts(connect=timeout, read=timeout, write=timeout),
            )
        )
    except ValueError as exc:
        # open_client refuses options it cannot honour at once (http2=True before the HTTP/2
        # layer is available); nothing has been sent.
        option = "--http2: " if http2 else ""
        raise UsageError(f"{option}{exc}") from None


# ---- get -------------------------------------------------------------------------------


def _open_output(path: Path) -> BinaryIO:
    # O_NOFOLLOW: a symlink planted in the directory must not redirect the write elsewhere.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "wb")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: it may never have been created
        path.unlink()


async def _fetch(client: Client, url: URL, path: Path | None) -> tuple[int, int]:
    """GET ``url``; stream its body to ``path`` (or count it). Return (status, bytes)."""
    size = 0
    async with client.stream("GET", url) as response:
        if path is None:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
            return response.status_code, size
        file = trio.wrap_file(await trio.to_thread.run_sync(_open_output, path))
        try:
            async for chunk in response.aiter_bytes():
                await file.write(chunk)
                size += len(chunk)
            await file.aclose()
        except BaseException:
            with trio.CancelScope(shield=True):
                await file.aclose()
                await trio.to_thread.run_sync(_remove, path)
            raise
        return response.status_code, size


async def get_command(
    urls: Sequence[tuple[str, URL]],
    *,
    concurrency: int = 10,
    http2: bool = False,
    insecure: bool = False,
    timeout: float = 30.0,  # noqa: ASYNC109 (seconds per I/O step, not a deadline)
    output_dir: Path | None = None,
    progress: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Fetch ``urls`` concurrently through one client; print one line per URL.

    A line is printed as each URL completes: ``STATUS BYTES bytes MS ms URL`` on stdout
    (``-> PATH`` added with ``output_dir``), or ``trio-connpool: GET URL failed: ...`` on
    stderr.

    Args:
        urls: Each URL as given on the command line and parsed.
        concurrency: Requests in flight at once (and the pool's connection limit).
        http2: Ask for HTTP/2.
        insecure: Do not verify TLS certificates.
        timeout: Seconds for each connect, read and write.
        output_dir: Write each body to a file in this (existing) directory.
        progress: Draw a progress bar on ``err`` if it is a terminal.
        out: Where results go (default stdout).
        err: Where errors and the bar go (default stderr).

    Returns:
        0 if every URL answered with a status below 400, else 1.

    Raises:
        UsageError: An option cannot be honoured (``--http2`` unavailable).
        BrokenPipeError: ``out`` or ``err`` was closed by its reader; the command stopped.
    """
    stdout: TextIO = sys.stdout if out is None else out
    stderr: TextIO = sys.stderr if err is None else err
    names = assign_filenames([url for _, url in urls]) if output_dir is not None else None
    jobs = iter(enumerate(urls))
    failures = 0
    output_closed = False
    async with contextlib.AsyncExitStack() as stack:
        client = await _open(
            stack, concurrency=concurrency, http2=http2, insecure=insecure, timeout=timeout
        )
        bar = Progress(
            len(urls), description="get", stream=stderr, enabled=progress and len(urls) > 1
        )
        stack.callback(bar.close)

        async def worker() -> None:
            nonlocal failures, output_closed
            for index, (text, url) in jobs:  # shared: each job is taken by one worker
                path = None if output_dir is None or names is None else output_dir / names[index]
                began = trio.current_time()
                try:
                    status, size = await _fetch(client, url, path)
                except (PoolError, OSError) as exc:
                    failures += 1
                    line, file = f"{PROG}: GET {text} failed: {describe(exc)}", stderr
                else:
                    if status >= 400:
                        failures += 1
                    milliseconds = 1000 * (trio.current_time() - began)
                    saved = "" if path is None else f" -> {path}"
                    line, file = (
                        f"{status} {size} bytes {milliseconds:.1f} ms {text}{saved}",
                        stdout,
                    )
                try:
                    bar.print(line, file)
                except BrokenPipeError:
                    # Whoever read our output is gone (`... | head -1`): stop everything, and
                    # say so outside the pool's block, where it is not an internal failure.
                    output_closed = True
                    nursery.cancel_scope.cancel()
                    return
                bar.advance()

        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(urls))):
                nursery.start_soon(worker)
    if output_closed:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
    return 0 if failures == 0 else 1


# ---- load ------------------------------------------------------------------------------


def _key_name(key: object) -> str:
    origin = getattr(key, "origin", None)
    version = getattr(key, "http_version", None)
    if origin is None:
        return repr(key)
    return f"{origin} ({version})" if version else str(origin)


async def load_command(
    text: str,
    url: URL,
    *,
    requests: int = 1000,
    concurrency: int = 10,
    http2: bool = False,
    insecure: bool = False,
    timeout: float = 30.0,  # noqa: ASYNC109 (seconds per I/O step, not a deadline)
    progress: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Send ``requests`` GETs to ``url`` from ``concurrency`` tasks; print a summary.

    The summary gives the throughput, the latency percentiles (p50/p90/p99/max, over the
    requests that got a response), the status codes, the protocol versions the responses
    came in, the errors by type, and the pool's statistics at the end of the run.

    Args:
        text: The URL as given on the command line (for the report).
        url: The URL, parsed.
        requests: How many requests to send in all (at least 1).
        concurrency: Tasks sending them (and the pool's connection limit).
        http2: Ask for HTTP/2.
        insecure: Do not verify TLS certificates.
        timeout: Seconds for each connect, read and write.
        progress: Draw a progress bar on ``err`` if it is a terminal.
        out: Where the summary goes (default stdout).
        err: Where errors and the bar go (default stderr).

    Returns:
        0 if every request got a status below 400, else 1.

    Raises:
        UsageError: An option cannot be honoured (``--http2`` unavailable).
    """
    stdout: TextIO = sys.stdout if out is None else out
    stderr: TextIO = sys.stderr if err is None else err
    tasks = min(concurrency, requests)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    versions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    first_error: str | None = None
    received = 0
    remaining = requests
    print(f"load: {requests} requests to {text} from {tasks} concurrent tasks", file=stdout)
    async with contextlib.AsyncExitStack() as stack:
        client = await _open(
            stack, concurrency=concurrency, http2=http2, insecure=insecure, timeout=timeout
        )
        bar = Progress(requests, description="load", stream=stderr, enabled=progress)
        stack.callback(bar.close)

        async def worker() -> None:
            nonlocal remaining, received, first_error
            while remaining > 0:  # bounded: every turn takes one of `requests`
                remaining -= 1
                began = trio.current_time()
                try:
                    response = await client.request("GET", url)
                except PoolError as exc:
                    errors[type(exc).__name__] += 1
                    if first_error is None:
                        first_error = describe(exc)
                else:
                    latencies.append(trio.current_time() - began)
                    statuses[response.status_code] += 1
                    versions[response.http_version] += 1
                    received += len(response.content)
                bar.advance()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)
        elapsed = trio.current_time() - start
        bar.close()
        pool = client.pool
        stats = pool.statistics() if pool is not None else None

    failed = sum(errors.values()) + sum(n for status, n in statuses.items() if status >= 400)
    rate = requests / elapsed if elapsed > 0 else math.inf
    print(
        f"done: {requests - failed} ok, {failed} failed in {elapsed:.3f} s "
        f"({rate:,.1f} requests/s, {received:,} bytes received)",
        file=stdout,
    )
    if statuses:
        print(
            "status: " + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())), file=stdout
        )
    if versions:
        print(
            "protocol: " + ", ".join(f"{v} x{n}" for v, n in sorted(versions.items())),
            file=stdout,
        )
    if errors:
        print("errors: " + ", ".join(f"{e} x{n}" for e, n in sorted(errors.items())), file=stdout)
    if latencies:
        latencies.sort()
        p50, p90, p99, top = (1000 * percentile(latencies, f) for f in (0.5, 0.9, 0.99, 1.0))
        print(
            f"latency ms: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {top:.2f}", file=stdout
        )
    else:
        print("latency ms: n/a (no request got a response)", file=stdout)
    if stats is not None:
        print(
            f"pool: connections={stats.connections} idle={stats.idle} in_use={stats.in_use} "
            f"connecting={stats.connecting} waiting={stats.waiting} leases={stats.leases} "
            f"max_connections={stats.max_connections}",
            file=stdout,
        )
        for key, key_stats in stats.keys.items():
            print(
                f"  {_key_name(key)}: idle={key_stats.idle} in_use={key_stats.in_use} "
                f"connecting={key_stats.connecting} waiting={key_stats.waiting} "
                f"leases={key_stats.leases}",
                file=stdout,
            )
    if first_error is not None:
        print(
            f"{PROG}: {sum(errors.values())} of {requests} requests failed; first: {first_error}",
            file=stderr,
            flush=True,
        )
    return 0 if failed == 0 else 1
