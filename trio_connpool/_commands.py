"""The ``get`` and ``load`` commands of ``python -m trio_connpool`` (parsed in ``_cli.py``).

Both run one :func:`~trio_connpool.http.open_client` (so one pool) for the whole command, with
as many connections as concurrent tasks. They speak to users in the way command-line tools
do. ``get`` with one URL is :func:`fetch_command`, which behaves like curl: the body on
stdout (or in a file), anything else on stderr. ``get`` with several URLs and ``load`` print
results on stdout and one line per failure on stderr. Exit status 0 (everything succeeded),
1 (a request failed), 22 (``get -f``: the server answered 400 or more) or 2 (the command line
asked for something impossible; raised here as :class:`UsageError` and reported by
``_cli.main``). No user error ever ends in a traceback.

Request times and throughput come from ``trio.current_time()``, like every other time in the
library: the real clock in a normal run, a test's clock in tests.

A progress bar is drawn on stderr when it is a terminal: a ``tqdm`` bar when tqdm is
installed (the ``progress`` extra), else a plain line redrawn in place. ``tqdm`` is imported
lazily, the first time a bar is wanted, and its absence is never an error. Either is redrawn
on a timer, not only when a request completes.
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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TextIO, cast

import trio

from ._exceptions import InvalidURL, PoolError
from ._pool import Instrument
from .http import URL, Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

    from .http import Client, Response

if sys.version_info < (3, 11):  # pragma: no cover - exercised on Python 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "PROG",
    "REDRAW_INTERVAL",
    "ConnectionTracker",
    "LoadReport",
    "Progress",
    "RequestSpec",
    "UsageError",
    "assign_filenames",
    "describe",
    "fetch_command",
    "get_command",
    "load_command",
    "parse_url",
    "percentile",
    "prepare_directory",
    "request_spec",
    "resolve_output",
    "safe_filename",
    "url_file_name",
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

    def refresh(self) -> None: ...

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


# How often a shown progress line is redrawn while nothing completes (seconds).
REDRAW_INTERVAL = 0.2
_CLEAR_LINE = "\r\x1b[K"


class Progress:
    """A progress line on ``stream`` when it is a terminal; else nothing.

    With ``tqdm`` installed (the ``progress`` extra) it is a tqdm bar; without, a plain line
    redrawn in place (``load: 12/100 req, 1 failed, 3.2 s, 3.7 req/s``). Either is redrawn
    every :data:`REDRAW_INTERVAL` seconds by :meth:`redraw_forever`, run in the command's
    nursery, so the elapsed time and the rate keep moving while a slow request is out.
    Lines printed through :meth:`print` while the bar is shown go above it.
    """

    def __init__(self, total: int, *, description: str, stream: TextIO, enabled: bool) -> None:
        self._factory: _BarFactory | None = None
        self._bar: _Bar | None = None
        self._stream = stream
        self._description = description
        self._total = total
        self._done = 0
        self._failed = 0
        self._plain = False
        self._started: float | None = None
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
            else:
                self._plain = True
                self._draw()

    @property
    def shown(self) -> bool:
        """Whether a bar is being drawn."""
        return self._bar is not None or self._plain

    def advance(self, *, failed: bool = False) -> None:
        """One more item done (``failed``: and it failed)."""
        self._done += 1
        self._failed += failed
        if self._bar is not None:
            self._bar.update(1)

    def refresh(self) -> None:
        """Redraw now (the elapsed time and the rate change even when nothing completes)."""
        if self._bar is not None:
            self._bar.refresh()
        elif self._plain:
            self._draw()

    async def redraw_forever(self) -> None:
        """Redraw every :data:`REDRAW_INTERVAL` seconds until cancelled (or at once, if hidden)."""
        if not self.shown:
            return
        while True:  # until the command's nursery cancels it
            await trio.sleep(REDRAW_INTERVAL)
            self.refresh()

    def _draw(self) -> None:
        now = trio.current_time()
        if self._started is None:
            self._started = now
        elapsed = now - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        failed = f", {self._failed} failed" if self._failed else ""
        line = (
            f"{self._description}: {self._done}/{self._total} req{failed}, "
            f"{elapsed:.1f} s, {rate:,.1f} req/s"
        )
        self._stream.write(_CLEAR_LINE + line)
        self._stream.flush()

    def print(self, line: str, file: TextIO) -> None:
        """Print ``line`` to ``file`` without garbling the bar."""
        if self._bar is not None and self._factory is not None:
            self._factory.write(line, file=file)
        elif self._plain:
            self._stream.write(_CLEAR_LINE)
            self._stream.flush()
            print(line, file=file, flush=True)
            self._draw()
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        """Erase the bar (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
        if self._plain:
            self._plain = False
            with contextlib.suppress(OSError, ValueError):  # a closed terminal: nothing to erase
                self._stream.write(_CLEAR_LINE)
                self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream is not a terminal
        return False


# ---- the client ------------------------------------------------------------------------


class ConnectionTracker(Instrument):
    """Counts the pool's connects and leases, and times the connects (for ``get -v``).

    A lease with no connect since the request began went to a reused connection.
    """

    def __init__(self) -> None:
        self.connects = 0
        self.leases = 0
        self.connect_seconds: list[float] = []
        self._began: dict[Hashable, float] = {}

    def connect_started(self, key: Hashable) -> None:
        """Note when the connect to ``key`` began."""
        self._began[key] = trio.current_time()

    def connect_succeeded(self, key: Hashable, connection: object) -> None:
        """Count the connect and keep how long it took (TCP, and TLS if any)."""
        self.connects += 1
        began = self._began.pop(key, None)
        if began is not None:
            self.connect_seconds.append(trio.current_time() - began)

    def connect_failed(self, key: Hashable, error: BaseException | None) -> None:
        """Forget the connect's start."""
        self._began.pop(key, None)

    def lease_acquired(self, key: Hashable, connection: object) -> None:
        """Count the lease."""
        self.leases += 1


class ConnectOptions:
    """How the commands connect, from curl's options: ``--cacert``, ``--cert`` and ``--key``,
    ``--unix-socket``."""

    __slots__ = ("cacert", "cert", "key", "unix_socket")

    def __init__(
        self,
        *,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        unix_socket: str | None = None,
    ) -> None:
        if key is not None and cert is None:
            raise UsageError("--key: only with --cert (the certificate it belongs to)")
        self.cacert = cacert
        self.cert = cert
        self.key = key
        self.unix_socket = unix_socket

    def client_options(self, *, insecure: bool) -> dict[str, Any]:
        """``open_client``'s options for these (``-k`` wins over ``--cacert``, as in curl)."""
        verify: bool | str = not insecure if self.cacert is None or insecure else self.cacert
        cert: str | tuple[str, str] | None = self.cert
        if self.cert is not None and self.key is not None:
            cert = (self.cert, self.key)
        return {"verify": verify, "cert": cert, "uds": self.unix_socket}


_NO_CONNECT_OPTIONS = ConnectOptions()


async def _open(
    stack: contextlib.AsyncExitStack,
    *,
    concurrency: int,
    http2: bool,
    insecure: bool,
    timeout: float,  # noqa: ASYNC109
    tracker: ConnectionTracker | None = None,
    connect: ConnectOptions = _NO_CONNECT_OPTIONS,
    proxy: str | None = None,
) -> Client:
    """Enter one client (one pool) for the command; option errors become UsageError."""
    try:
        return await stack.enter_async_context(
            open_client(
                **connect.client_options(insecure=insecure),
                http2=http2,
                max_connections=concurrency,
                max_connections_per_key=concurrency,
                # The wait for a connection is bounded by the same --timeout (not the
                # library's 5 s default pool timeout).
                timeouts=Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout),
                instruments=() if tracker is None else (tracker,),
                proxy=proxy,
            )
        )
    except InvalidURL as exc:
        raise UsageError(f"--proxy: {exc}") from None
    except (ValueError, FileNotFoundError) as exc:
        # open_client refuses options it cannot honour at once (http2=True before the HTTP/2
        # layer is available, a certificate file without a certificate); nothing was sent.
        text = str(exc)
        option = "--http2: " if http2 and not text.startswith(("verify:", "cert:")) else ""
        for prefix, flag in (("verify:", "--cacert:"), ("cert:", "--cert/--key:")):
            if text.startswith(prefix):
                text = flag + text.removeprefix(prefix)
        raise UsageError(f"{option}{text}") from None


# ---- what to send ----------------------------------------------------------------------


class RequestSpec:
    """The request ``get`` sends to each URL: method, extra headers, body, redirects.

    Built from curl's options by :func:`request_spec`.
    """

    def __init__(
        self,
        method: str = "GET",
        headers: Sequence[tuple[str, str]] = (),
        content: bytes | None = None,
        *,
        follow_redirects: bool = False,
        max_redirects: int | None = None,
    ) -> None:
        self.method = method
        self.headers = list(headers)
        self.content = content
        self.follow_redirects = follow_redirects
        self.max_redirects = max_redirects

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments for ``client.stream()``/``request()`` besides method and URL."""
        keywords: dict[str, Any] = {}
        if self.headers:
            keywords["headers"] = self.headers
        if self.content is not None:
            keywords["content"] = self.content
        if self.follow_redirects:
            # Only when asked for: a plain request passes no redirect keywords at all.
            keywords["follow_redirects"] = True
        return keywords


def _read_data(text: str, *, binary: bool) -> bytes:
    """curl's DATA: ``@FILE`` (``@-`` standard input) or the text itself, as bytes.

    Without ``binary`` (``-d``) carriage returns and newlines in a file are dropped, as curl
    does; ``--data-binary`` and ``--json`` keep a file's bytes as they are.
    """
    if not text.startswith("@"):
        return text.encode()
    name = text[1:]
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name!r}: {exc.strerror or exc}") from None
    return data if binary else data.replace(b"\r", b"").replace(b"\n", b"")


def _parse_header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not name or any(c.isspace() for c in name):
        raise UsageError(f"-H/--header: expected 'Name: value', got {text!r}")
    return name, value.strip()


def request_spec(
    *,
    method: str | None = None,
    headers: Sequence[str] = (),
    data: Sequence[str] = (),
    data_binary: Sequence[str] = (),
    json: Sequence[str] = (),
    follow_redirects: bool = False,
    max_redirects: int | None = None,
) -> RequestSpec:
    """Build the request from curl's options (``-X``, ``-H``, ``-d``, ``--data-binary``,
    ``--json``, ``-L``, ``--max-redirs``), with curl's meaning.

    Several ``-d``/``--data-binary`` are joined with ``&``; several ``--json`` are
    concatenated. Data makes the default method POST, with ``Content-Type:
    application/x-www-form-urlencoded`` (``-d``) or ``Content-Type`` and ``Accept:
    application/json`` (``--json``). A ``-H`` of the same name replaces those; ``-H 'Name:'``
    (no value) drops one of them.

    Raises:
        UsageError: A header is malformed, a file cannot be read, or ``--json`` is mixed with
            ``-d``.
    """
    given = [_parse_header(text) for text in headers]
    dropped = {name.lower() for name, value in given if not value}
    given = [(name, value) for name, value in given if value]
    content: bytes | None = None
    implied: list[tuple[str, str]] = []
    if json and (data or data_binary):
        raise UsageError("--json cannot be combined with -d/--data or --data-binary")
    if json:
        content = b"".join(_read_data(text, binary=True) for text in json)
        implied = [("Content-Type", "application/json"), ("Accept", "application/json")]
    elif data or data_binary:
        pieces = [_read_data(text, binary=False) for text in data]
        pieces += [_read_data(text, binary=True) for text in data_binary]
        content = b"&".join(pieces)
        implied = [("Content-Type", "application/x-www-form-urlencoded")]
    named = {name.lower() for name, _ in given} | dropped
    all_headers = [(n, v) for n, v in implied if n.lower() not in named] + given
    chosen = method if method is not None else ("POST" if content is not None else "GET")
    return RequestSpec(
        chosen,
        all_headers,
        content,
        follow_redirects=follow_redirects,
        max_redirects=max_redirects,
    )


# ---- get -------------------------------------------------------------------------------


def _open_output(path: Path, *, follow_symlinks: bool = False) -> BinaryIO:
    # O_NOFOLLOW: a symlink planted in the directory must not redirect the write elsewhere
    # (a file the user named, -o FILE, is opened as named, links and all).
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "wb")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: it may never have been created
        path.unlink()


async def _fetch(
    client: Client, url: URL, path: Path | None, spec: RequestSpec
) -> tuple[int, int]:
    """Send ``spec`` to ``url``; stream the body to ``path`` (or count it). (status, bytes)."""
    size = 0
    async with client.stream(spec.method, url, **spec.keywords()) as response:
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


def _timed_out(max_time: float) -> str:
    return f"operation timed out after {max_time:g} s (--max-time)"


async def get_command(
    urls: Sequence[tuple[str, URL]],
    *,
    concurrency: int = 10,
    http2: bool = False,
    insecure: bool = False,
    connect: ConnectOptions = _NO_CONNECT_OPTIONS,
    proxy: str | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 (seconds per I/O step, not a deadline)
    output_dir: Path | None = None,
    progress: bool = True,
    spec: RequestSpec | None = None,
    max_time: float | None = None,
    verbose: bool = False,
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
        connect: CA bundle, client certificate and Unix socket (curl's options).
        proxy: Send the requests through this proxy URL (else the environment's, if any).
        timeout: Seconds for each connect, read and write, and for the wait for a
            connection from the pool.
        output_dir: Write each body to a file in this (existing) directory.
        progress: Draw a progress bar on ``err`` if it is a terminal.
        spec: The request to send (default a plain GET).
        max_time: A bound on the whole command, in seconds (None: none).
        verbose: At the end, say on ``err`` how many connections served the requests.
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
    spec = RequestSpec() if spec is None else spec
    names = assign_filenames([url for _, url in urls]) if output_dir is not None else None
    jobs = iter(enumerate(urls))
    failures = 0
    output_closed = False
    tracker = ConnectionTracker() if verbose else None
    with trio.move_on_after(math.inf if max_time is None else max_time) as deadline:
        async with contextlib.AsyncExitStack() as stack:
            client = await _open(
                stack,
                concurrency=concurrency,
                http2=http2,
                insecure=insecure,
                proxy=proxy,
                timeout=timeout,
                tracker=tracker,
                connect=connect,
            )
            if spec.max_redirects is not None:
                client.max_redirects = spec.max_redirects  # a client's setting, as in httpx
            bar = Progress(
                len(urls), description="get", stream=stderr, enabled=progress and len(urls) > 1
            )
            stack.callback(bar.close)

            async def worker() -> None:
                nonlocal failures, output_closed
                for index, (text, url) in jobs:  # shared: each job is taken by one worker
                    path = (
                        None if output_dir is None or names is None else output_dir / names[index]
                    )
                    began = trio.current_time()
                    try:
                        status, size = await _fetch(client, url, path, spec)
                    except (PoolError, OSError) as exc:
                        failures += 1
                        line, file = (
                            f"{PROG}: {spec.method} {text} failed: {describe(exc)}",
                            stderr,
                        )
                        failed = True
                    else:
                        failed = status >= 400
                        failures += failed
                        milliseconds = 1000 * (trio.current_time() - began)
                        saved = "" if path is None else f" -> {path}"
                        line, file = (
                            f"{status} {size} bytes {milliseconds:.1f} ms {text}{saved}",
                            stdout,
                        )
                    try:
                        bar.print(line, file)
                    except BrokenPipeError:
                        # Whoever read our output is gone (`... | head -1`): stop everything,
                        # and say so outside the pool's block, where it is not an internal
                        # failure.
                        output_closed = True
                        nursery.cancel_scope.cancel()
                        return
                    bar.advance(failed=failed)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(bar.redraw_forever)
                async with trio.open_nursery() as workers:
                    for _ in range(min(concurrency, len(urls))):
                        workers.start_soon(worker)
                nursery.cancel_scope.cancel()
    if output_closed:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
    if deadline.cancelled_caught:
        assert max_time is not None
        print(f"{PROG}: get: {_timed_out(max_time)}", file=stderr, flush=True)
        return 1
    if tracker is not None:
        print(
            f"* {len(urls)} URLs, {tracker.leases} requests over {tracker.connects} new "
            f"connections",
            file=stderr,
            flush=True,
        )
    return 0 if failures == 0 else 1


# ---- get with one URL: the body, as curl shows it ----------------------------------------


def url_file_name(url: URL) -> str:
    """The file name ``-o DIR/`` gives the body of ``url``: the last segment of its path.

    Reduced to safe characters like :func:`safe_filename` (no separator, no leading dot or
    dash, no Windows device name); ``index.html`` when the path has no last segment.
    """
    path = url.target.decode("ascii").split("?", 1)[0]
    name = _UNSAFE_RUN.sub("_", path.rsplit("/", 1)[-1])
    name = name.lstrip("._-").rstrip("._ ")[:_MAX_NAME]
    if not name:
        return "index.html"
    if name.split(".", 1)[0].upper() in _RESERVED:
        name = f"url-{name}"
    return name


def resolve_output(option: str | None, url: URL) -> tuple[Path | None, bool]:
    """Where ``get -o OPTION URL`` writes the body: (path, named by the user).

    ``None`` or ``-`` is standard output (path None). A name ending in ``/`` or naming an
    existing directory is a directory (created if needed) and the file in it is named after
    the URL (:func:`url_file_name`). Anything else is the file itself.

    Raises:
        UsageError: The name is empty, the directory cannot be created, or the file's
            directory does not exist.
    """
    if option is None or option == "-":
        return None, False
    if not option:
        raise UsageError("-o: give a file or directory name, or - for standard output")
    if option.endswith(("/", os.sep)) or Path(option).is_dir():
        return prepare_directory(option) / url_file_name(url), False
    path = Path(option)
    if not path.parent.is_dir():
        raise UsageError(f"-o {option}: directory {str(path.parent)!r} does not exist")
    return path, True


def _head_lines(response: Response) -> list[str]:
    status = f"{response.http_version} {response.status_code} {response.reason_phrase}"
    lines = [status.rstrip()]
    lines.extend(
        f"{name.decode('latin-1')}: {value.decode('latin-1')}"
        for name, value in response.headers.raw
    )
    return lines


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


async def fetch_command(
    text: str,
    url: URL,
    *,
    spec: RequestSpec | None = None,
    output: Path | None = None,
    output_named: bool = False,
    include: bool = False,
    verbose: bool = False,
    fail: bool = False,
    http2: bool = False,
    insecure: bool = False,
    connect: ConnectOptions = _NO_CONNECT_OPTIONS,
    proxy: str | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 (seconds per I/O step, not a deadline)
    max_time: float | None = None,
    out: BinaryIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``get`` with one URL: send ``spec``, write the body to ``out`` or ``output``, as curl.

    Args:
        text: The URL as given on the command line (for messages).
        url: The URL, parsed.
        spec: The request (default a plain GET).
        output: Write the body to this file instead of ``out`` (removed again if the
            transfer fails).
        output_named: ``output`` was named by the user (opened as named, symlinks too).
        include: Write the response's status line and headers before the body (curl -i);
            with ``follow_redirects``, those of each redirect followed first.
        verbose: On ``err``: the request, the response head, whether the connection was
            new (and its connect time) or reused, and the times to the response head and
            to the end of the body.
        fail: A status of 400 or more writes no body and returns 22 (curl -f).
        http2: Ask for HTTP/2.
        insecure: Do not verify TLS certificates.
        connect: CA bundle, client certificate and Unix socket (curl's options).
        proxy: Send the requests through this proxy URL (else the environment's, if any).
        timeout: Seconds for each connect, read and write, and for the pool wait.
        max_time: A bound on the whole command, in seconds (None: none).
        out: Where the body goes (default ``sys.stdout.buffer``).
        err: Where errors and ``-v`` lines go (default stderr).

    Returns:
        0 on a response (any status without ``fail``); 1 when the request failed; 22 with
        ``fail`` on a status of 400 or more.

    Raises:
        UsageError: An option cannot be honoured (``--http2`` unavailable).
        BrokenPipeError: ``out`` was closed by its reader.
    """
    stdout: BinaryIO = sys.stdout.buffer if out is None else out
    stderr: TextIO = sys.stderr if err is None else err
    spec = RequestSpec() if spec is None else spec
    tracker = ConnectionTracker() if verbose else None
    status = 0

    def note(line: str) -> None:
        print(line, file=stderr, flush=True)

    with trio.move_on_after(math.inf if max_time is None else max_time) as deadline:
        async with contextlib.AsyncExitStack() as stack:
            client = await _open(
                stack,
                concurrency=1,
                http2=http2,
                insecure=insecure,
                proxy=proxy,
                timeout=timeout,
                tracker=tracker,
                connect=connect,
            )
            if spec.max_redirects is not None:
                client.max_redirects = spec.max_redirects  # a client's setting, as in httpx
            if verbose:
                note(f"* {spec.method} {text}")
                note(f"* timeouts: {timeout:g} s per connect, read, write and pool wait")
                for name, value in spec.headers:
                    note(f"> {name}: {value}")
                if spec.content is not None:
                    note(f"> ({len(spec.content)} bytes of body)")
            began = trio.current_time()
            size = 0
            try:
                async with client.stream(spec.method, url, **spec.keywords()) as response:
                    head_at = trio.current_time()
                    status = response.status_code
                    # Each response of a followed redirect, then the last (as curl -L).
                    heads = [*response.history, response]
                    if verbose:
                        for hop in heads:
                            for line in _head_lines(hop):
                                note(f"< {line}")
                    if fail and status >= 400:
                        note(
                            f"{PROG}: {spec.method} {text}: the server answered {status} (--fail)"
                        )
                        return 22
                    sink = stdout
                    if output is not None:
                        sink = await trio.to_thread.run_sync(
                            partial(_open_output, output, follow_symlinks=output_named)
                        )
                        stack.callback(sink.close)
                    try:
                        if include:
                            for hop in heads:
                                head = "".join(f"{line}\r\n" for line in _head_lines(hop))
                                sink.write(head.encode("latin-1") + b"\r\n")
                        async for chunk in response.aiter_bytes():
                            sink.write(chunk)
                            size += len(chunk)
                        sink.flush()
                    except BaseException:
                        if output is not None:
                            sink.close()
                            _remove(output)
                        raise
            except (PoolError, OSError) as exc:
                if isinstance(exc, BrokenPipeError) and output is None:
                    raise
                note(f"{PROG}: {spec.method} {text} failed: {describe(exc)}")
                return 1
            done_at = trio.current_time()
            if tracker is not None:
                if tracker.connects:
                    times = ", ".join(_ms(s) for s in tracker.connect_seconds)
                    reuse = f"new connection ({tracker.connects} opened; connect {times})"
                else:
                    reuse = "reused connection"
                note(f"* {response.http_version} over a {reuse}; {tracker.leases} request(s)")
                note(
                    f"* time: first byte (response head) {_ms(head_at - began)}, "
                    f"total {_ms(done_at - began)}; {size} bytes of body"
                )
    if deadline.cancelled_caught:
        assert max_time is not None
        if output is not None:
            _remove(output)
        note(f"{PROG}: {spec.method} {text} failed: {_timed_out(max_time)}")
        return 1
    return 0


# ---- load ------------------------------------------------------------------------------


def _key_name(key: object) -> str:
    origin = getattr(key, "origin", None)
    version = getattr(key, "http_version", None)
    if origin is None:
        return repr(key)
    return f"{origin} ({version})" if version else str(origin)


class LoadReport:
    """What a ``load`` run has measured so far; printed at its end, or when interrupted.

    The command fills it in as requests complete, so a Ctrl-C can still print what was done
    (``_cli.main`` catches the interrupt outside ``trio.run`` and calls :meth:`print`).
    """

    def __init__(self, text: str, requests: int) -> None:
        self.text = text
        self.requests = requests
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None
        self.received = 0
        self.elapsed = 0.0  # updated as requests complete, and by the redraw timer
        self.pool_lines: list[str] = []

    @property
    def completed(self) -> int:
        """Requests that got a response or failed."""
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def failed(self) -> int:
        """Requests that failed, or got a status of 400 or more."""
        bad = sum(n for status, n in self.statuses.items() if status >= 400)
        return sum(self.errors.values()) + bad

    def print(self, out: TextIO, err: TextIO, *, interrupted: bool = False) -> None:
        """Print the summary on ``out``, the first error (if any) on ``err``."""
        done, failed, elapsed = self.completed, self.failed, self.elapsed
        rate = done / elapsed if elapsed > 0 else math.inf
        if interrupted:
            print(
                f"interrupted: {done} of {self.requests} requests done, {done - failed} ok, "
                f"{failed} failed in {elapsed:.3f} s ({rate:,.1f} requests/s, "
                f"{self.received:,} bytes received)",
                file=out,
            )
        else:
            print(
                f"done: {done - failed} ok, {failed} failed in {elapsed:.3f} s "
                f"({rate:,.1f} requests/s, {self.received:,} bytes received)",
                file=out,
            )
        for name, counter in (
            ("status", self.statuses),
            ("protocol", self.versions),
            ("errors", self.errors),
        ):
            if counter:
                items = sorted(counter.items())
                print(f"{name}: " + ", ".join(f"{k} x{n}" for k, n in items), file=out)
        if self.latencies:
            latencies = sorted(self.latencies)
            p50, p90, p99, top = (1000 * percentile(latencies, f) for f in (0.5, 0.9, 0.99, 1.0))
            print(
                f"latency ms: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {top:.2f}",
                file=out,
            )
        else:
            print("latency ms: n/a (no request got a response)", file=out)
        for line in self.pool_lines:
            print(line, file=out)
        out.flush()
        if self.first_error is not None:
            print(
                f"{PROG}: {sum(self.errors.values())} of {done} requests failed; "
                f"first: {self.first_error}",
                file=err,
                flush=True,
            )


async def _keep_time(report: LoadReport, bar: Progress, start: float) -> None:
    """Keep ``report.elapsed`` current and the bar moving until cancelled."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bar.redraw_forever)
        while True:  # until the command cancels it
            report.elapsed = trio.current_time() - start
            await trio.sleep(REDRAW_INTERVAL)


async def load_command(
    text: str,
    url: URL,
    *,
    requests: int = 1000,
    concurrency: int = 10,
    http2: bool = False,
    insecure: bool = False,
    connect: ConnectOptions = _NO_CONNECT_OPTIONS,
    proxy: str | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 (seconds per I/O step, not a deadline)
    progress: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
    report: LoadReport | None = None,
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
        connect: CA bundle, client certificate and Unix socket (curl's options).
        proxy: Send the requests through this proxy URL (else the environment's, if any).
        timeout: Seconds for each connect, read and write, and for the wait for a
            connection from the pool.
        progress: Draw a progress bar on ``err`` if it is a terminal.
        out: Where the summary goes (default stdout).
        err: Where errors and the bar go (default stderr).
        report: Filled in as requests complete (a new one if None); the caller keeps it to
            print a partial summary if the run is interrupted.

    Returns:
        0 if every request got a status below 400, else 1.

    Raises:
        UsageError: An option cannot be honoured (``--http2`` unavailable).
    """
    stdout: TextIO = sys.stdout if out is None else out
    stderr: TextIO = sys.stderr if err is None else err
    report = LoadReport(text, requests) if report is None else report
    tasks = min(concurrency, requests)
    remaining = requests
    print(f"load: {requests} requests to {text} from {tasks} concurrent tasks", file=stdout)
    stdout.flush()
    async with contextlib.AsyncExitStack() as stack:
        client = await _open(
            stack,
            concurrency=concurrency,
            http2=http2,
            insecure=insecure,
            timeout=timeout,
            connect=connect,
            proxy=proxy,
        )
        bar = Progress(requests, description="load", stream=stderr, enabled=progress)
        stack.callback(bar.close)
        start = trio.current_time()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:  # bounded: every turn takes one of `requests`
                remaining -= 1
                began = trio.current_time()
                try:
                    response = await client.request("GET", url)
                except PoolError as exc:
                    report.errors[type(exc).__name__] += 1
                    if report.first_error is None:
                        report.first_error = describe(exc)
                    failed = True
                else:
                    now = trio.current_time()
                    report.latencies.append(now - began)
                    report.statuses[response.status_code] += 1
                    report.versions[response.http_version] += 1
                    report.received += len(response.content)
                    failed = response.status_code >= 400
                report.elapsed = trio.current_time() - start
                bar.advance(failed=failed)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keep_time, report, bar, start)
            async with trio.open_nursery() as workers:
                for _ in range(tasks):
                    workers.start_soon(worker)
            nursery.cancel_scope.cancel()
        report.elapsed = trio.current_time() - start
        bar.close()
        pool = client.pool
        stats = pool.statistics() if pool is not None else None

    if stats is not None:
        report.pool_lines.append(
            f"pool: connections={stats.connections} idle={stats.idle} in_use={stats.in_use} "
            f"connecting={stats.connecting} waiting={stats.waiting} leases={stats.leases} "
            f"max_connections={stats.max_connections}"
        )
        report.pool_lines.extend(
            f"  {_key_name(key)}: idle={key_stats.idle} in_use={key_stats.in_use} "
            f"connecting={key_stats.connecting} waiting={key_stats.waiting} "
            f"leases={key_stats.leases}"
            for key, key_stats in stats.keys.items()
        )
    report.print(stdout, stderr)
    return 0 if report.failed == 0 else 1
