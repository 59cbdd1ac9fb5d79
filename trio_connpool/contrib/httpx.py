"""An httpx transport backed by a trio_connpool client: httpx's API, our pool, on trio.

::

    from trio_connpool.contrib.httpx import AsyncPoolTransport

    async with AsyncPoolTransport(max_connections=50) as transport:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get("https://example.com/")

httpx does the user-facing part (URL building, auth, redirects, cookies, content decoding);
the transport turns each `httpx.Request` into a :class:`~trio_connpool.http.Request`, sends it
through our client's :class:`~trio_connpool.http.RequestSender`, and hands httpx back a
response whose body streams from our connection and gives it back to the pool when httpx
closes it.

Opening and closing. ``AsyncPoolTransport(...)`` opens its own client (and pool) with
:func:`~trio_connpool.http.open_client` when it is entered and closes it when it is left.
httpx enters and leaves its transport too (``async with httpx.AsyncClient(transport=t)``),
so entries nest: only the outermost ``async with`` opens and closes the pool, inner ones
are checkpoints. Both shapes work: enter the transport yourself around several httpx
clients, or let a single httpx client enter it. The pool's nursery belongs to the task and
the block that entered first, so that block must also be the last to leave (trio's rule for
every nursery). :meth:`AsyncPoolTransport.aclose`, which ``httpx.AsyncClient.aclose()``
calls, does not close the pool: a nursery can only be closed by the block that opened it.

:meth:`AsyncPoolTransport.from_client` wraps a client you opened yourself (several httpx
clients can then share one pool); entering and leaving such a transport never closes the
client.

What is passed through and what is not:

- The method, URL (without userinfo: httpx has already turned it into an ``Authorization``
  header, and our URLs refuse it), every header in order (repeated ones included), and the
  body: as ``bytes`` when httpx already holds all of it (so a stale keep-alive connection can
  be retried), else as the async stream httpx gives.
- The response's status, headers in order, raw body (httpx decodes ``Content-Encoding``)
  and the ``http_version`` and ``reason_phrase`` extensions (``reason_phrase`` only over
  HTTP/1.1: HTTP/2 has none, and httpx then shows the standard phrase).
- httpx's timeouts: the ``timeout`` extension httpx gives every request (from
  ``httpx.AsyncClient(timeout=...)`` or a request's own ``timeout=``) becomes the request's
  :class:`~trio_connpool.http.Timeouts`: ``read`` and ``write`` bound each read and write
  of the exchange (the response body's reads too), ``pool`` the whole wait for a
  connection, connect included (the connect itself runs under the transport's
  ``timeouts.connect``: see :class:`~trio_connpool.http.PoolSender`). A request without
  the extension gets the transport's ``timeouts``. Other request extensions are ignored.

Errors. Our exceptions come out as httpx's, raised ``from`` ours (the original, and its own
cause, stay in ``__cause__``), from the request and from reading or closing the body:

================================================  =============================================
trio_connpool                                     httpx
================================================  =============================================
`ConnectTimeout`                                  `httpx.ConnectTimeout`
`ConnectError`                                    `httpx.ConnectError`
`ReadTimeout`                                     `httpx.ReadTimeout`
`WriteTimeout`                                    `httpx.WriteTimeout`
`PoolTimeout`                                     `httpx.PoolTimeout`
`PoolClosed`                                      `PoolClosedError` (an `httpx.TransportError`)
`RemoteProtocolError` (`ServerDisconnected`)      `httpx.RemoteProtocolError`
`LocalProtocolError` (`InvalidURL`, ...)          `httpx.LocalProtocolError`
any other (`TransportError`, `TooManyWaiters`)    `httpx.TransportError`
================================================  =============================================

A proxy's error of ours (a class named ``ProxyError``) becomes `httpx.ProxyError`, ahead of
the table. The message is ours in full, as ``str()`` shows it: what failed, the URL, and the
root cause in words (``cannot connect to https://host:443: certificate verify failed:
unable to get local issuer certificate``); ``__cause__`` is our exception.

A URL whose scheme is neither http nor https raises `httpx.UnsupportedProtocol`. Using a
transport that was never entered, or after its ``async with`` ended, raises `RuntimeError`
(as httpx does for a closed client): that is a bug in the calling code, not a network
failure. `PoolClosed` is different, a pool that closed while requests still used it (a
shared pool whose owner left, a request racing the shutdown), so it is a `TransportError`
that ``except httpx.TransportError`` handlers see. Errors that are not ours (a request
body's iterator raising, `trio.Cancelled`) pass through unchanged.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Final, cast, final

import httpx
import trio

from .._exceptions import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    WriteTimeout,
)
from .._pool import require_trio
from ..http import Client, Proxy, Request, Response, Timeouts, open_client

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator, Callable, Hashable
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    from typing_extensions import Unpack

    from .._options import PoolOptionArgs, PoolOptions
    from .._pool import Pool
    from ..http import (
        CertTypes,
        HeaderTypes,
        HTTPConnection,
        HTTPKey,
        RequestContent,
        RequestSender,
        VerifyTypes,
    )

__all__ = ["AsyncPoolTransport", "PoolClosedError", "PoolResponseStream"]

# How many distinct httpx timeout settings a transport keeps converted (then it starts over).
_MAX_TIMEOUTS_SEEN: Final = 64


class PoolClosedError(httpx.TransportError):
    """The pool behind the transport closed while a request used it (our `PoolClosed`)."""


# Most specific first: the first match wins (ConnectTimeout is a ConnectError, ...).
_ERRORS: Final[tuple[tuple[type[PoolError], type[httpx.TransportError]], ...]] = (
    (ConnectTimeout, httpx.ConnectTimeout),
    (ConnectError, httpx.ConnectError),
    (ReadTimeout, httpx.ReadTimeout),
    (WriteTimeout, httpx.WriteTimeout),
    (PoolTimeout, httpx.PoolTimeout),
    (PoolClosed, PoolClosedError),
    (RemoteProtocolError, httpx.RemoteProtocolError),
    (LocalProtocolError, httpx.LocalProtocolError),
)


def _to_httpx(exc: PoolError, request: httpx.Request | None) -> httpx.TransportError:
    """The httpx exception that stands for ``exc`` (the caller raises it ``from exc``).

    Its message is ours in full: what failed, where, and the root cause in words
    (``Connection refused``, ``certificate verify failed: ...``), as `str` shows it.
    """
    message = str(exc)
    # A proxy's failure is httpx.ProxyError whatever our class derives from (it may be a
    # ConnectError: the connect through the proxy failed), so it is looked for first.
    if any(cls.__name__ == "ProxyError" for cls in type(exc).__mro__):
        return httpx.ProxyError(message, request=request)
    for ours, theirs in _ERRORS:
        if isinstance(exc, ours):
            return theirs(message, request=request)
    return httpx.TransportError(message, request=request)


@final
class _MappedChunks:
    """The body's chunks with our errors turned into httpx's.

    A plain async iterator, not an async generator: an abandoned generator would be finalized
    by the garbage collector in whatever task trio picks, outside every cancel scope.
    """

    __slots__ = ("_chunks", "_request")

    def __init__(self, chunks: AsyncIterator[bytes], request: httpx.Request | None) -> None:
        self._chunks = chunks
        self._request = request

    def __aiter__(self) -> _MappedChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except PoolError as exc:
            raise _to_httpx(exc, self._request) from exc


@final
class PoolResponseStream(httpx.AsyncByteStream):
    """The body of a response from the pool, as httpx reads it.

    Iterating yields the body's chunks as they arrive (each step a checkpoint); reaching the
    end gives the connection back to the pool. `aclose` releases the body early: the
    connection goes back if the rest could be drained cheaply, else it is closed. httpx
    calls `aclose` when the response is closed (at the end of ``client.stream(...)``, after
    ``client.get(...)`` read the body, or when a read failed).

    Args:
        response: Our response, whose head has arrived.
        request: The httpx request, attached to the errors raised while reading.
    """

    def __init__(self, response: Response, request: httpx.Request | None = None) -> None:
        self._response = response
        self._request = request

    @property
    def response(self) -> Response:
        """Our response behind this stream."""
        return self._response

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Iterate over the body's chunks (once).

        Raises:
            httpx.TransportError: A subclass, when reading failed (see the module's table).
            RuntimeError: (when iterated) the body was already read or closed.
        """
        # As received: httpx undoes the content coding itself.
        return _MappedChunks(self._response.aiter_raw(), self._request)

    async def aclose(self) -> None:
        """Release the body: give the connection back, or close it. Idempotent.

        Raises:
            httpx.TransportError: A subclass, if draining the rest of the body failed (the
                connection is closed, not returned, either way).
        """
        try:
            await self._response.aclose()
        except PoolError as exc:
            raise _to_httpx(exc, self._request) from exc


@final
class AsyncPoolTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` that sends through a trio_connpool client and pool.

    httpx on trio gets this project's pool: per-origin and global limits, FIFO waiters,
    LIFO/FIFO reuse, nothing leaked on cancellation, HTTP/2 multiplexing with ``http2=True``.
    It is *not* a drop-in for httpx's own transport options: ``local_address`` and retries
    on connect are not supported, and httpx's connect timeout bounds a connect only through
    the wait for a connection (see the module docstring for what is passed through).

    The options are those of :func:`~trio_connpool.http.open_client`, with the same
    defaults; they are checked when the transport is entered (`ValueError` or `TypeError`
    then). ``pool`` may be a :class:`~trio_connpool.Pool` of HTTP connections or any
    :class:`~trio_connpool.http.RequestSender`; it is not closed with the transport. To
    share a :class:`~trio_connpool.http.Client` you opened, use `from_client`.

    Args:
        verify: True (verify certificates and host names), False (don't), a CA bundle path
            (a PEM file or a directory of hashed certificates) or an `ssl.SSLContext` (used
            as given; set its ALPN protocols yourself).
        cert: A client certificate: a PEM path (certificate and key), ``(certfile,
            keyfile)`` or ``(certfile, keyfile, password)``; not with an `ssl.SSLContext`.
        trust_env: Whether ``verify=True`` honours SSL_CERT_FILE and SSL_CERT_DIR; and,
            without ``proxy``, whether each request's proxy comes from ``HTTP_PROXY``,
            ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (read when the transport is
            entered).
        uds: Send every request over this Unix domain socket (httpx's ``uds``).
        http1: Speak HTTP/1.1.
        http2: Speak HTTP/2 (ALPN ``h2`` over TLS; with ``http1=False``, prior knowledge over
            plain HTTP).
        timeouts: ``connect`` (each connect), and ``read``, ``write`` (per operation) and
            ``pool`` (the whole wait for a connection) for a request that carries no
            ``timeout`` extension; httpx's timeouts, which it gives every request, replace
            these three.
        retry_stale: Send an idempotent request whose body is ``bytes`` (or empty) again on
            another connection when the reused keep-alive connection it met turns out to
            have been closed by the server.
        headers: Default headers, added to a request that lacks them (httpx's own, such as
            its ``User-Agent``, win).
        key_extra: Added to every pool key (connections are reused only for the same value).
        pool: An existing pool or sender to send through (not closed by the transport).
        max_concurrent_streams: Our cap on the streams of one HTTP/2 connection.
        http2_extra_connections: See :func:`~trio_connpool.http.open_client`.
        ping_interval: Keep-alive PING on an idle HTTP/2 connection after this many seconds.
        health_check_after: PING an HTTP/2 connection quiet this long before using it.
        proxy: Send every request through this proxy: a URL, a
            :class:`~trio_connpool.http.Proxy`, or an ``httpx.Proxy`` (its URL, ``auth``,
            ``headers`` and ``ssl_context``); see :func:`~trio_connpool.http.open_client`.
            A proxy's failure reaches httpx as ``httpx.ProxyError``.
        pool_options: The options of the transport's own pool, a
            :class:`~trio_connpool.PoolOptions` (default
            :data:`~trio_connpool.http.CLIENT_POOL_OPTIONS`); see
            :func:`~trio_connpool.http.open_client`.
        **pool_keywords: The same options as keywords (``max_connections``,
            ``max_connections_per_key``, ``release_policy``, ``idle_timeout``,
            ``max_lifetime``, ...), each changing the client's defaults; not with
            ``pool_options``.
    """

    def __init__(
        self,
        *,
        verify: VerifyTypes = True,
        cert: CertTypes | None = None,
        trust_env: bool = True,
        uds: str | os.PathLike[str] | None = None,
        http1: bool = True,
        http2: bool = False,
        timeouts: Timeouts = Timeouts(),  # noqa: B008
        retry_stale: bool = True,
        headers: HeaderTypes = None,
        key_extra: Hashable = None,
        pool: RequestSender | Pool[HTTPKey, HTTPConnection] | None = None,
        max_concurrent_streams: int = 100,
        http2_extra_connections: bool = False,
        ping_interval: float | None = None,
        health_check_after: float | None = None,
        proxy: str | Proxy | httpx.Proxy | None = None,
        pool_options: PoolOptions | None = None,
        **pool_keywords: Unpack[PoolOptionArgs],
    ) -> None:
        if isinstance(proxy, httpx.Proxy):
            proxy = Proxy(
                str(proxy.url),
                auth=proxy.auth,
                headers=dict(proxy.headers.items()) or None,
                ssl_context=proxy.ssl_context,
            )

        def opener() -> AbstractAsyncContextManager[Client]:
            return open_client(
                verify=verify,
                cert=cert,
                trust_env=trust_env,
                uds=uds,
                http1=http1,
                http2=http2,
                timeouts=timeouts,
                retry_stale=retry_stale,
                headers=headers,
                key_extra=key_extra,
                pool=pool,
                max_concurrent_streams=max_concurrent_streams,
                http2_extra_connections=http2_extra_connections,
                ping_interval=ping_interval,
                health_check_after=health_check_after,
                proxy=proxy,
                pool_options=pool_options,
                **pool_keywords,
            )

        self._opener: Callable[[], AbstractAsyncContextManager[Client]] | None = opener
        self._client: Client | None = None
        self._stack: AsyncExitStack | None = None
        self._depth = 0
        self._opening = False
        self._closed = False
        self._timeouts_seen: dict[tuple[object, ...], Timeouts] = {}

    @classmethod
    def from_client(cls, client: Client) -> AsyncPoolTransport:
        """A transport that sends through ``client``, an open client you own.

        It is ready at once (entering it is optional) and never closes ``client``: several
        httpx clients can share one pool this way. Once ``client``'s block has ended,
        requests raise `PoolClosedError` (or the error of whatever sender it wraps).

        ::

            async with open_client(max_connections=20) as pooled:
                transport = AsyncPoolTransport.from_client(pooled)
                async with (
                    httpx.AsyncClient(transport=transport) as first,
                    httpx.AsyncClient(transport=transport, base_url=api) as second,
                ):
                    ...
        """
        if not isinstance(client, Client):
            raise TypeError(f"client must be a trio_connpool.http.Client, not {client!r}")
        transport = cls()
        transport._opener = None
        transport._client = client
        return transport

    @property
    def client(self) -> Client:
        """Our client behind the transport.

        Raises:
            RuntimeError: The transport is not open.
        """
        return self._open_client()

    @property
    def pool(self) -> Pool[HTTPKey, HTTPConnection] | None:
        """The pool behind the transport (None when its sender uses none).

        Raises:
            RuntimeError: The transport is not open.
        """
        return self._open_client().pool

    def _open_client(self) -> Client:
        client = self._client
        if client is None:
            if self._closed:
                raise RuntimeError(
                    "this AsyncPoolTransport is closed (its 'async with' block ended); "
                    "make a new one"
                )
            raise RuntimeError(
                "this AsyncPoolTransport is not open: use it inside "
                "'async with AsyncPoolTransport(...)' or "
                "'async with httpx.AsyncClient(transport=...)'"
            )
        return client

    async def __aenter__(self) -> AsyncPoolTransport:
        """Open the client and its pool (the outermost entry only; a checkpoint otherwise).

        Raises:
            TrioRequiredError: Not entered in a trio task: under asyncio, say (httpx runs
                there, this transport does not).
            RuntimeError: The transport was closed already, or another task is opening it.
            ValueError, TypeError: An option is invalid.
        """
        require_trio("AsyncPoolTransport.__aenter__()")
        if self._opening:
            raise RuntimeError("this AsyncPoolTransport is being opened by another task")
        if self._depth == 0 and self._opener is not None:
            if self._closed:
                self._open_client()  # raises the "closed" error
            stack = AsyncExitStack()
            self._opening = True
            try:
                self._client = await stack.enter_async_context(self._opener())
            finally:
                self._opening = False
            self._stack = stack
        else:
            await trio.lowlevel.checkpoint()
        self._depth += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        """Leave one entry; leaving the outermost one closes the client and its pool.

        The pool closes every connection (gracefully within a bounded time, then
        forcefully) and fails requests still waiting with `PoolClosedError`.

        Raises:
            RuntimeError: The transport was not entered.
        """
        if self._depth == 0:
            raise RuntimeError("AsyncPoolTransport.__aexit__ without a matching __aenter__")
        self._depth -= 1
        stack = self._stack
        if self._depth > 0 or stack is None:
            # Nothing to close; a schedule point that a cancellation cannot interrupt.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._stack = None
        self._client = None
        self._closed = True
        # open_client never swallows the block's exception (it re-raises it, or raises a
        # PoolError for a failure of the pool's own tasks), so the result is not needed.
        await stack.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        """A checkpoint only: the pool closes when the outermost ``async with`` ends.

        ``httpx.AsyncClient.aclose()`` calls this; a trio nursery (the pool's) can only be
        closed by the block that opened it, so closing here is not possible.
        """
        await trio.lowlevel.checkpoint()

    def _request(self, request: httpx.Request, client: Client) -> Request:
        """Our request for ``request``: its headers as given, then the client's defaults for
        the names it does not set."""
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"the request URL's scheme is {scheme!r}: only http and https are supported"
            )
        # netloc and raw_path are ASCII (httpx encodes them); netloc has no userinfo.
        text = f"{scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}"
        content: RequestContent
        try:
            # Read already (httpx reads a bytes body when it builds the request): send it as
            # bytes, which can be sent again if a stale connection needs a retry. httpx has
            # set the framing headers it wants, so an empty body is no body.
            content = request.content or None
        except httpx.RequestNotRead:
            stream = request.stream
            if not isinstance(stream, httpx.AsyncByteStream):
                raise RuntimeError(
                    "the request body is a synchronous stream: an httpx.AsyncClient needs "
                    "bytes or an async iterable"
                ) from None
            content = stream
        ours = client.build_request(
            request.method, text, headers=request.headers.raw, content=content
        )
        timeout = request.extensions.get("timeout")
        if timeout is not None:
            ours.timeouts = self._timeouts_of(timeout)
        return ours

    def _timeouts_of(self, timeout: object) -> Timeouts:
        """Our `Timeouts` for httpx's ``timeout`` extension (a dict of connect, read, write
        and pool). httpx makes a new dict per request with the same values: the last few
        conversions are kept."""
        if not isinstance(timeout, dict):
            raise TypeError(f"the 'timeout' extension must be a dict, not {timeout!r}")
        limits = cast("dict[str, object]", timeout)
        values = (
            limits.get("connect"),
            limits.get("read"),
            limits.get("write"),
            limits.get("pool"),
        )
        timeouts = self._timeouts_seen.get(values)
        if timeouts is None:
            connect, read, write, pool = values
            timeouts = Timeouts(
                connect=connect,  # type: ignore[arg-type]  # checked by Timeouts
                read=read,  # type: ignore[arg-type]
                write=write,  # type: ignore[arg-type]
                pool=pool,  # type: ignore[arg-type]
            )
            if len(self._timeouts_seen) >= _MAX_TIMEOUTS_SEEN:
                self._timeouts_seen.clear()
            self._timeouts_seen[values] = timeouts
        return timeouts

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pool; return the response once its head arrived.

        The response's body streams from the connection (`PoolResponseStream`); httpx
        reads it (or not, with ``client.stream``) and closes it, which gives the connection
        back to the pool.

        Raises:
            httpx.TransportError: A subclass, for every failure of ours (see the module's
                table), raised from our exception.
            httpx.UnsupportedProtocol: The URL's scheme is not http or https.
            RuntimeError: The transport is not open, or the body is a synchronous stream.
        """
        client = self._open_client()
        try:
            response = await client.sender.send_request(self._request(request, client))
        except PoolError as exc:
            raise _to_httpx(exc, request) from exc
        http_version = response.http_version
        extensions: dict[str, object] = {"http_version": http_version.encode("ascii")}
        if http_version == "HTTP/1.1":
            extensions["reason_phrase"] = response.reason_phrase.encode("latin-1", "replace")
        try:
            return httpx.Response(
                response.status_code,
                headers=response.headers.raw,
                stream=PoolResponseStream(response, request),
                extensions=extensions,
            )
        except BaseException:  # pragma: no cover (httpx.Response takes any valid head)
            # Close at once, without waiting for the rest of the body.
            with trio.CancelScope() as scope:
                scope.cancel()
                await response.aclose()
            raise

    def __repr__(self) -> str:
        if self._client is not None:
            state = "open"
        elif self._opening:
            state = "opening"
        elif self._closed:
            state = "closed"
        else:
            state = "not open"
        owner = "owns its client" if self._opener is not None else "shares a client"
        return f"<AsyncPoolTransport [{state}, {owner}]>"
