"""An HTTP/1.1 client connection: `H1Client` over one `trio.abc.Stream`, as a pool connection.

`_h1.py` does all the parsing and framing and no I/O; this module only moves bytes between the
stream and the `H1Client`, with a timeout on every read and write, and keeps the small
lifecycle the pool relies on::

    IDLE ──send_request()──> ACTIVE ──body read to the end, both sides done──> IDLE
                               │
                               ├── Connection: close, error, timeout, cancellation ──> CLOSED
                               └── Response.aclose() early: drain a small rest ──> IDLE
                                                             otherwise ──────────> CLOSED

Rules:

1. An exchange that did not finish cleanly (an exception or a cancellation anywhere in it)
   leaves the connection CLOSED, and its transport is closed at once (forcefully, shielded,
   so it never blocks). Such a connection is never reused: we could not tell where the next
   response starts.
2. There are no background tasks. Bytes are read only by the task that sends a request or
   reads a response body, so a stale keep-alive connection is detected by peeking at its
   socket (`HTTP11Connection.is_closed`), the way urllib3 and httpcore do, and requests
   that meet a connection the server closed just before fail with `ServerDisconnected`,
   which callers may retry.
3. "The server closed before any byte of the response arrived" (`ServerDisconnected`) is
   kept apart from "the server broke off in the middle" (`RemoteProtocolError`): only the
   first one is safe to retry.
4. One cancel scope per exchange carries the read and write timeouts: its deadline is moved
   before every read and write (cheaper than a scope per operation), and lifted while the
   caller's own request body iterator runs. A body read that has to wait opens its own.
5. A response is made only of bytes that arrived after its request was sent. An idle
   connection holds nothing unread unless the server sent what nobody asked for (junk, a
   stray response) or closed it; so before a connection is reused, both when the pool
   checks it (`is_closed`) and again when the request is about to go out (`send_request`,
   which covers a connection handed to a task that runs later, and a connection used
   directly as a sender), every place bytes can wait is looked at: the parser's buffer, the
   TLS object's buffers, and the socket (over TLS, once an exchange has completed: see
   `is_closed`). Anything there and the connection is closed, never
   read from again; `send_request` then raises `ServerDisconnected` without having sent
   anything, as for a keep-alive connection the server closed (rule 2).

Known limit: the request body is written completely before the response is read. A server
that answers early (say 413) and stops reading while still keeping the connection open stalls
the upload until the write timeout. If it closes the connection instead, its answer is still
read and returned.
"""

from __future__ import annotations

import contextlib
import enum
import math
import select
from typing import TYPE_CHECKING, Final, cast, final

import trio

from .._exceptions import (
    InvalidHeader,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    ServerDisconnected,
    TransportError,
    WriteTimeout,
)
from .._pool import clock_reader
from ._h1 import H1Client, LocalViolation, RemoteViolation
from ._models import Headers, Origin, Request, Response, Timeouts, format_authority
from ._trio_ssl import tls_buffers

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterable, Callable

# Private names used across classes and modules of this package, on purpose (each use
# silences pyright's reportPrivateUsage): ``Headers._items`` and ``Headers._from_trusted`` read
# and build headers without a copy or a second check of what the HTTP/1.1 core checked; and
# `_HTTP11Body` is the connection's own body stream, calling the connection's underscored
# methods, which are not API.

__all__ = ["HTTP11Connection"]

_READ_SIZE: Final = 64 * 1024
# Coalesce a bytes body with the request head into one write up to this size.
_COALESCE_LIMIT: Final = 64 * 1024
# Response.aclose() before the body's end drains a rest of at most _MAX_DRAIN bytes to keep
# the connection, waiting at most _DRAIN_TIMEOUT seconds for it (less if the read timeout is
# shorter); a larger, unknown-length or slower rest closes the connection instead. The wait
# is short because aclose() often runs shielded (leaving a stream block): it is as long as
# a caller's cancellation can be held up.
_MAX_DRAIN: Final = 64 * 1024
_DRAIN_TIMEOUT: Final = 0.1
_CLOSE_TIMEOUT: Final = 1.0
# Methods whose requests carry content by definition: with no body we still say
# "Content-Length: 0" (RFC 9110 section 8.6).
_METHODS_WITH_CONTENT: Final = frozenset({"POST", "PUT", "PATCH"})
# The request header names the connection looks at, lowercased, by their lengths (a name of
# any other length is none of them, which spares lowercasing it). With none of the framing
# ones (Connection included) given, the connection frames the body itself and tells H1Client
# so, which spares it a second scan.
_HOST: Final = b"host"
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_NAME_LENGTHS: Final = frozenset({4, 10, 14, 17})
_HTTP_VERSIONS: Final = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0"}
# Which operation a timeout interrupted.
_READING: Final = 0
_WRITING: Final = 1


class _State(enum.Enum):
    IDLE = "IDLE"
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a `trio.SocketStream`, or under a `trio.SSLStream` over one."""
    if isinstance(stream, trio.SSLStream):
        stream = cast("trio.SSLStream[trio.abc.Stream]", stream).transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


@final
class _ReadableProbe:
    """Tells whether a socket has something to read (data, EOF or an error), without
    blocking: one poll() syscall, with the poll object made once per connection."""

    __slots__ = ("_poll", "_sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        # poll() has no FD_SETSIZE limit; select() is the fallback where poll() is missing
        # (Windows, whose select() has no limit on descriptor values either).
        self._poll: Callable[[int], list[tuple[int, int]]] | None = None
        fd = sock.fileno()
        if hasattr(select, "poll") and fd >= 0:
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)
            self._poll = poller.poll

    def __call__(self) -> bool:
        if self._sock.fileno() < 0:
            return True  # closed under us (and its descriptor number may be reused)
        poll = self._poll
        if poll is not None:
            return bool(poll(0))
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)


async def _close_forcefully(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` at once, never blocking and never raising (even if cancelled)."""
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


@final
class _WriteFailed(Exception):
    """The transport broke while we sent the request; the server may have answered first."""


class HTTP11Connection:
    """One HTTP/1.1 connection to one origin, serving one exchange at a time.

    The connection is built on an open stream (see `open_stream`) and is what the pool lends
    out: its `capacity` is 1, it says whether it can be reused (`is_ready`, `is_clean`,
    `is_closed`), and `send_request` runs one request. The response it returns reads its body
    from this connection; the connection becomes idle again once that body has been read to
    its end (or drained by an early `Response.aclose`).

    It is not safe to use from two tasks at once: a second `send_request` while an exchange
    is in progress raises `RuntimeError`.

    Args:
        stream: The open transport (TCP, TLS, or a memory stream in tests).
        origin: The origin the stream is connected to (for the Host header and errors).
        timeouts: ``read`` and ``write`` bound every single read and write (of an exchange
            whose request carries no `Request.timeouts`; those replace them for it).
        max_incomplete_event_size: The largest response head (or chunk header) accepted.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        origin: Origin,
        *,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 (a frozen value)
        max_incomplete_event_size: int = 64 * 1024,
    ) -> None:
        self._stream = stream
        self._origin = origin
        self._now = clock_reader()
        self._default_timeouts = timeouts
        # The limits of the current exchange: the connection's, or its request's own.
        self._timeouts = timeouts
        self._read_timeout = math.inf if timeouts.read is None else timeouts.read
        self._write_timeout = math.inf if timeouts.write is None else timeouts.write
        self._host = format_authority(origin.host, origin.port, origin.scheme).encode("ascii")
        self._h1 = H1Client(max_head_size=max_incomplete_event_size)
        self._state = _State.IDLE
        # Where unread bytes can wait besides the parser (see rule 5): the socket, and over
        # TLS the TLS object's buffers (None where this trio hides them: see _trio_ssl).
        sock = _socket_of(stream)
        self._readable = None if sock is None else _ReadableProbe(sock)
        self._tls = isinstance(stream, trio.SSLStream)
        self._tls_buffers: tuple[ssl.MemoryBIO, ssl.SSLObject] | None = None
        if self._tls:
            self._tls_buffers = tls_buffers(cast("trio.SSLStream[trio.abc.Stream]", stream))
        self._transport_closed = False
        self._close_reason = ""  # why the connection closed, when an error should say it
        # Per exchange:
        self._exchanges = 0  # started exchanges; also identifies the current one
        self._completed = 0  # exchanges that ended with the connection idle again
        self._request: Request | None = None
        self._response_started = False  # any byte of the current response received
        self._write_error: BaseException | None = None
        self._body_error: RemoteProtocolError | None = None  # met by _receive_buffered
        self._reads = 0  # reads from the transport, to know whether we checkpointed
        self._close_pending = False  # body ended in _receive_buffered; transport to close
        # The scope whose deadline bounds the current read or write, and which one it is.
        self._scope = trio.CancelScope()
        self._operation = _READING
        self._armed = False  # the scope's deadline is already the next write's

    # ---- what the pool reads -------------------------------------------------------------

    @property
    def origin(self) -> Origin:
        """The origin this connection is connected to."""
        return self._origin

    @property
    def capacity(self) -> int:
        """How many exchanges can run at once: always 1 for HTTP/1.1."""
        return 1

    @property
    def http_version(self) -> str:
        """``"HTTP/1.1"``."""
        return "HTTP/1.1"

    def is_ready(self) -> bool:
        """Whether a request can be sent now: idle and not closed."""
        return self._state is _State.IDLE

    def is_clean(self) -> bool:
        """Whether no exchange is half-done, so the connection can serve the next request.

        The pool asks this when a lease ended in an exception: an HTTP/1.1 connection is
        clean only if the exchange had completed (body read to its end) before that.
        """
        return self._state is _State.IDLE

    def is_closed(self) -> bool:
        """Whether the connection is closed or unusable. Synchronous, never blocks.

        Besides our own state, an idle connection is checked for anything unread: an idle
        HTTP/1.1 connection has nothing to read unless the server closed it (EOF) or sent
        bytes nobody asked for, so one with bytes left in the parser, in the TLS object or on
        its socket is marked closed. Only this connection is looked at (one poll() syscall
        on a real socket). Over TLS the TLS layer and the socket are looked at only once an
        exchange has completed, since TLS 1.3 servers send session tickets right after the
        handshake.
        """
        if self._state is _State.CLOSED:
            return True
        if self._state is _State.IDLE and self._has_unread():
            self._state = _State.CLOSED
            return True
        return False

    def _has_unread(self) -> bool:
        """Whether anything arrived on the idle connection: see `is_closed`."""
        if self._h1.has_unread_data:
            return True
        if self._tls:
            if self._completed == 0:
                return False  # session tickets may still be arriving
            buffers = self._tls_buffers
            if buffers is None:
                return True  # the TLS layer cannot be seen into: never reuse blind
            incoming, ssl_object = buffers
            if incoming.pending or ssl_object.pending():
                return True
        readable = self._readable
        return readable is not None and readable()

    async def aclose(self) -> None:
        """Close the connection. Idempotent; never raises for a broken transport.

        The transport is closed gracefully within a shielded scope bounded by one second,
        then forcefully. Like every trio ``aclose``, it closes even when cancelled.
        """
        self._state = _State.CLOSED
        self._h1.fail()
        if not self._transport_closed:
            self._transport_closed = True
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError
                    ):
                        await self._stream.aclose()
                await trio.aclose_forcefully(self._stream)
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return (
            f"<HTTP11Connection [{self._origin}, {self._state.value}, "
            f"{self._completed} requests completed]>"
        )

    # ---- one exchange --------------------------------------------------------------------

    @property
    def _url(self) -> str | None:
        # Built only when an error needs it: str(URL) is not free, and most exchanges end well.
        return None if self._request is None else str(self._request.url)

    async def send_request(self, request: Request) -> Response:
        """Send ``request`` and return the response once its head has arrived.

        The body of the response is read from this connection by the returned `Response`;
        the connection is busy until that body ends or the response is closed.

        Args:
            request: The request; its origin should be this connection's.

        Returns:
            The `Response`, with its body still to be read.

        Raises:
            TransportError: If the connection is closed, or was closed locally (by its pool
                or owner) during the exchange.
            RuntimeError: If another exchange is in progress on this connection.
            ServerDisconnected: If the server closed the connection before sending any byte
                of a response (typically a keep-alive connection it had timed out). Also
                raised before anything is sent when the idle connection turns out to hold
                anything unread (EOF, or bytes nobody asked for): the connection is closed,
                and the exception's ``retryable`` attribute says the request never left.
            RemoteProtocolError: If the server sent something invalid or broke off.
            LocalProtocolError: If the request cannot be sent as given (`InvalidHeader`
                for two Host headers). Nothing was sent then, with one exception: a
                streamed body found to be longer or shorter than its Content-Length while
                it is being sent. The head and the body up to that point have gone out
                then (never the whole declared body, so the server never has a complete
                request), and the connection is closed.
            ReadTimeout: If the server sent nothing within ``timeouts.read`` (the request's
                own `Request.timeouts` if it has them, else the connection's; they also bound
                the reads of the response body).
            WriteTimeout: If a write did not complete within ``timeouts.write`` (likewise).
        """
        if self._state is not _State.IDLE:
            if self._state is _State.CLOSED:
                await trio.lowlevel.checkpoint()
                raise TransportError(
                    "the connection is closed and cannot send a request"
                    + (f" ({self._close_reason})" if self._close_reason else ""),
                    key=self._origin,
                    url=str(request.url),
                )
            raise RuntimeError(f"connection is not ready for a request: {self!r}")
        if self._has_unread():
            # Whatever waits there arrived before this request was sent: it answers nothing.
            await self._fail()
            raise ServerDisconnected(
                "the server closed the idle connection or sent data nobody asked for on it "
                "before the request was sent; the request was not sent",
                key=self._origin,
                url=str(request.url),
                retryable=True,
            )
        try:
            fields, framing = self._request_headers(request)
        except InvalidHeader:
            await trio.lowlevel.checkpoint()
            raise
        exchange_timeouts = request.timeouts
        if exchange_timeouts is not None or self._timeouts is not self._default_timeouts:
            self._use_timeouts(exchange_timeouts or self._default_timeouts)
        self._state = _State.ACTIVE
        self._exchanges += 1
        self._request = request
        self._response_started = False
        self._write_error = None
        try:
            # Opened with the first write's deadline, which spares setting it again.
            self._armed = True
            with trio.CancelScope(deadline=self._now() + self._write_timeout) as scope:
                self._scope = scope
                try:
                    await self._send_request(request, fields, framing)
                except _WriteFailed as exc:
                    # The server may have answered before closing (e.g. 413 for a large
                    # upload): look for that answer; if there is none we report the
                    # disconnect.
                    self._write_error = exc.__cause__
                return await self._receive_response_head(request)
            raise self._timeout_error()
        except BaseException:
            await self._fail()
            raise

    def _use_timeouts(self, timeouts: Timeouts) -> None:
        """Bound this exchange's reads and writes (its body's too) by ``timeouts``."""
        self._timeouts = timeouts
        self._read_timeout = math.inf if timeouts.read is None else timeouts.read
        self._write_timeout = math.inf if timeouts.write is None else timeouts.write

    async def _send_request(
        self,
        request: Request,
        fields: list[tuple[bytes, bytes]],
        framing: tuple[int | None, bool] | None,
    ) -> None:
        h1 = self._h1
        content = request.content
        try:
            head = h1.send_request(
                request.method.encode("ascii"), request.url.target, fields, framing
            )
            if content is None:
                await self._write(head + h1.end_request())
            elif isinstance(content, bytes):
                body = h1.send_data(content)
                end = h1.end_request()
                if len(content) <= _COALESCE_LIMIT:
                    await self._write(head + body + end)
                else:
                    await self._write(head)
                    await self._write(body + end)
            else:
                await self._write(head)
                await self._send_streamed_body(content)
        except LocalViolation as exc:
            raise LocalProtocolError(str(exc), key=self._origin, url=self._url) from exc

    async def _send_streamed_body(self, content: AsyncIterable[bytes]) -> None:
        """Send a streamed body, chunked or with the Content-Length `H1Client` accepted.

        With a Content-Length, the bytes that complete it are what make the request complete
        for the server, so they are held back until the iteration has ended: a body longer
        than declared is refused (`LocalViolation`) before the server has a whole request.
        """
        h1 = self._h1
        scope = self._scope
        iterator = aiter(content)
        held = b""
        try:
            # The write timeout bounds our writes, not the caller's iterator.
            scope.deadline = math.inf
            async for chunk in iterator:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):  # pyright: ignore[reportUnnecessaryIsInstance]
                    raise TypeError(
                        f"request content must yield bytes, not {type(chunk).__name__}"
                    )
                if chunk:
                    self._check_open()
                    data = h1.send_data(bytes(chunk))  # raises before a byte too many
                    if h1.request_body_left == 0:
                        held = data  # the end of the body: sent after the iteration
                        continue
                    await self._write(data)
                    scope.deadline = math.inf
        finally:
            # We started this iteration, so we end it: an async generator abandoned half-way
            # would otherwise run its cleanup whenever the garbage collector gets to it.
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                    await aclose()
        self._check_open()
        end = h1.end_request()  # raises if the body fell short: then held is never sent
        await self._write(held + end)

    def _request_headers(
        self, request: Request
    ) -> tuple[list[tuple[bytes, bytes]], tuple[int | None, bool] | None]:
        """The fields to send (``Host`` and framing added when absent) and their framing, if
        we chose it (None: the caller gave framing or Connection fields of its own)."""
        items = request.headers._items  # pyright: ignore[reportPrivateUsage]
        has_host = own_framing = False
        for name, _ in items:
            if len(name) in _NAME_LENGTHS:
                lower = name.lower()
                if lower == _HOST:
                    if has_host:
                        # Two Hosts: a proxy and the server could each pick another one.
                        raise InvalidHeader(
                            "more than one Host header: send one",
                            key=self._origin,
                            url=str(request.url),
                        )
                    has_host = True
                elif lower in _FRAMING:
                    own_framing = True
        extra: list[tuple[bytes, bytes]] = []
        if not has_host:
            extra.append((b"Host", self._host))
        framing: tuple[int | None, bool] | None = None
        if not own_framing:
            content = request.content
            if isinstance(content, bytes):
                framing = (len(content), False)
                if content or request.method not in ("GET", "HEAD"):
                    extra.append((b"Content-Length", str(len(content)).encode("ascii")))
            elif content is not None:
                framing = (None, True)
                extra.append((b"Transfer-Encoding", b"chunked"))
            else:
                framing = (0, False)
                if request.method in _METHODS_WITH_CONTENT:
                    extra.append((b"Content-Length", b"0"))
        return extra + items, framing

    async def _write(self, data: bytes) -> None:
        """Write ``data`` under the write timeout (the current exchange's scope)."""
        self._operation = _WRITING
        if self._armed:
            self._armed = False  # the exchange's scope was opened with this deadline
        else:
            self._scope.deadline = self._now() + self._write_timeout
        if not data:
            return
        try:
            await self._stream.send_all(data)
        except trio.ClosedResourceError as exc:
            raise self._closed_locally_error() from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise _WriteFailed from exc

    async def _read(self) -> bytes:
        """Read what arrived under the read timeout (the current scope's)."""
        self._operation = _READING
        self._armed = False
        self._scope.deadline = self._now() + self._read_timeout
        try:
            self._reads += 1
            data = await self._stream.receive_some(_READ_SIZE)
        except trio.ClosedResourceError as exc:
            raise self._closed_locally_error() from exc
        except (trio.BrokenResourceError, OSError) as exc:
            # (A TLS stream reports its transport closed under it as broken.)
            if self._state is _State.CLOSED:
                raise self._closed_locally_error() from exc
            raise self._disconnected_error(exc) from exc
        self._check_open()  # closed while we waited: the data is nobody's now
        if not data:
            if not self._response_started:
                raise self._disconnected_error(self._write_error) from self._write_error
            return b""
        self._response_started = True
        return data if type(data) is bytes else bytes(data)

    def _timeout_error(self) -> TransportError:
        if self._operation == _WRITING:
            return WriteTimeout(
                f"write did not complete within {self._timeouts.write} s",
                key=self._origin,
                url=self._url,
            )
        return ReadTimeout(
            f"no data within the read timeout of {self._timeouts.read} s",
            key=self._origin,
            url=self._url,
        )

    def _disconnected_error(self, exc: BaseException | None) -> RemoteProtocolError:
        if not self._response_started:
            return ServerDisconnected(
                "the server closed the connection without sending a response",
                key=self._origin,
                url=self._url,
            )
        return RemoteProtocolError(
            "the connection broke in the middle of the response",
            key=self._origin,
            url=self._url,
        )

    def _closed_locally_error(self) -> TransportError:
        return TransportError(
            "the connection was closed locally while in use", key=self._origin, url=self._url
        )

    def _check_open(self) -> None:
        """Raise if the connection was closed under the exchange (by `aclose`, from the pool
        closing) while it awaited: `H1Client` is failed then, and must not be called."""
        if self._state is _State.CLOSED:
            raise self._closed_locally_error()

    def _invalid_response(self, violation: RemoteViolation) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"invalid response: {violation}", key=self._origin, url=self._url
        )

    async def _receive_response_head(self, request: Request) -> Response:
        h1 = self._h1
        self._check_open()  # closed while the request was written
        while True:
            try:
                head = h1.receive_head()
            except RemoteViolation as exc:
                raise self._invalid_response(exc) from exc
            if head is not None:
                break
            h1.receive_data(await self._read())
        status_code, reason, version, fields = head
        return Response(
            status_code,
            request=request,
            headers=Headers._from_trusted(fields),  # pyright: ignore[reportPrivateUsage]
            reason_phrase=reason.decode("latin-1") if reason else "",
            http_version=_HTTP_VERSIONS.get(version) or "HTTP/" + version.decode("ascii"),
            stream=_HTTP11Body(self, self._exchanges),
        )

    # ---- the body, driven by _HTTP11Body -------------------------------------------------

    def _body_is_current(self, exchange: int) -> bool:
        return self._state is _State.ACTIVE and self._exchanges == exchange

    def _body_step(self) -> bytes | None:
        """The next piece of the body from what has arrived (see `H1Client.receive_body`);
        at the body's end the exchange is done."""
        if self._body_error is not None:
            raise self._body_error
        try:
            chunk = self._h1.receive_body()
        except RemoteViolation as exc:
            raise self._invalid_response(exc) from exc
        if chunk == b"":
            self._exchange_done()
        return chunk

    async def _receive_body_chunk(self) -> bytes:
        """The next non-empty chunk of the body, or ``b""`` once it has ended.

        Not a checkpoint on its own when the bytes were already buffered: the caller starts
        with ``checkpoint_if_cancelled`` and this ends with a cancel-shielded checkpoint then.
        """
        reads = self._reads
        if self._close_pending:
            # _receive_buffered met the end of a body after which the connection must close.
            self._close_pending = False
            await self._fail()
            return b""
        try:
            chunk = self._body_step()
            if chunk is None:
                with trio.CancelScope() as self._scope:
                    while chunk is None:
                        self._h1.receive_data(await self._read())
                        chunk = self._body_step()
                if chunk is None:
                    raise self._timeout_error()
        except BaseException:
            await self._fail()
            raise
        if self._state is _State.CLOSED:
            await self._fail()
        elif reads == self._reads:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    def _receive_buffered(self) -> bytes | None:
        """The next body chunk if it has arrived already; ``b""`` at a clean end; else None.

        Synchronous and never raises: anything unusual (more data needed, a protocol error,
        an end after which the connection must close) is left to `_receive_body_chunk`,
        which reads, raises and closes as needed.
        """
        if self._body_error is not None:
            return None
        try:
            chunk = self._body_step()
        except RemoteProtocolError as exc:
            self._body_error = exc  # _receive_body_chunk raises it
            return None
        if chunk != b"":
            return chunk
        if self._state is _State.IDLE:
            return b""
        # The connection must close: let the async path close the transport.
        self._close_pending = True
        return None

    def _exchange_done(self) -> None:
        h1 = self._h1
        if h1.reusable:
            h1.start_next_cycle()
            self._state = _State.IDLE
            self._completed += 1
        else:
            # Either side said "Connection: close" (or the body ran to EOF), the server sent
            # bytes after the response, or our request body was cut short by a write error:
            # the connection cannot carry another exchange.
            self._state = _State.CLOSED
            if h1.has_unread_data:
                self._close_reason = "the server sent data after the last response"

    async def _close_body_early(self) -> None:
        """`Response.aclose` before the body's end: drain a small rest that has arrived or
        arrives within `_DRAIN_TIMEOUT`, else close."""
        remaining = self._h1.body_remaining
        if remaining is None or remaining > _MAX_DRAIN:
            await self._fail()
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        with trio.move_on_after(min(_DRAIN_TIMEOUT, self._read_timeout)):
            try:
                for _ in range(remaining + 2):  # each step consumes >= 1 byte or ends
                    if not await self._receive_body_chunk():
                        return
                    self._check_open()  # that may have yielded
            except TransportError:
                pass  # _receive_body_chunk has closed the connection already
        await self._fail()

    async def _fail(self) -> None:
        """End the connection after an incomplete exchange: state CLOSED, transport closed."""
        self._state = _State.CLOSED
        self._h1.fail()
        if not self._transport_closed:
            self._transport_closed = True
            await _close_forcefully(self._stream)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()


@final
class _HTTP11Body:
    """The `ResponseStream` of one exchange: reads the body from the connection.

    It remembers which exchange it belongs to, so a stale response object can never read
    from (or close) a later exchange on the same connection.
    """

    __slots__ = ("_connection", "_done", "_exchange")

    def __init__(self, connection: HTTP11Connection, exchange: int) -> None:
        self._connection = connection
        self._exchange = exchange
        self._done = False

    async def receive_some(self) -> bytes:
        if self._done:
            await trio.lowlevel.checkpoint()
            return b""
        connection = self._connection
        if (
            not connection._body_is_current(self._exchange)  # pyright: ignore[reportPrivateUsage]
            and not connection._close_pending  # pyright: ignore[reportPrivateUsage]
        ):
            # Closed under us (e.g. the pool was closed): never pass that off as the end.
            self._done = True
            await trio.lowlevel.checkpoint()
            raise connection._closed_locally_error()  # pyright: ignore[reportPrivateUsage]
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            chunk = await connection._receive_body_chunk()  # pyright: ignore[reportPrivateUsage]
        except BaseException:
            self._done = True
            await connection._fail()  # pyright: ignore[reportPrivateUsage]
            raise
        if not chunk:
            self._done = True
        return chunk

    def receive_buffered(self) -> bytes | None:
        if self._done:
            return b""
        connection = self._connection
        if not connection._body_is_current(self._exchange):  # pyright: ignore[reportPrivateUsage]
            return None
        chunk = connection._receive_buffered()  # pyright: ignore[reportPrivateUsage]
        if chunk == b"":
            self._done = True
        return chunk

    async def aclose(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._done = True
        connection = self._connection
        if connection._body_is_current(self._exchange):  # pyright: ignore[reportPrivateUsage]
            await connection._close_body_early()  # pyright: ignore[reportPrivateUsage]
        else:
            await trio.lowlevel.checkpoint()
