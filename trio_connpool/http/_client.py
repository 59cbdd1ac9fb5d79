"""The HTTP client: requests in, responses out, connections from a pool (or not).

Three layers, each usable on its own (rama's design: the connector works with no pool, the
default pool, or a custom pool):

- :class:`HTTPConnector` opens one connection for a pool key: TCP (happy eyeballs), TLS with
  ALPN, then an HTTP/1.1 connection over it. It is a plain ``connector`` for
  :func:`~trio_connpool.open_pool`, so a custom pool of HTTP connections is just
  ``open_pool(HTTPConnector(...), max_connections=...)``.
- A :class:`RequestSender` sends one request and returns its response. Three ship here:
  :class:`PoolSender` (leases a connection from a pool, gives it back when the response body
  ends), :class:`NoPoolSender` (a fresh connection per request, closed after), and any single
  :class:`~trio_connpool.http.HTTP11Connection`.
- :class:`Client` adds what users want on top: URL parsing, default headers, ``request()``
  reading the body, ``stream()`` streaming it. :func:`open_client` makes one with the default
  pool, or wraps a sender or pool you give it.

The lease is released exactly when the response body has been read to its end, or when the
response is closed early (the HTTP/1.1 connection then drains a small remainder or closes). An
exchange that fails or is cancelled half-way closes its connection; it is never returned.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import AsyncGenerator, Hashable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import trio

from .._exceptions import ServerDisconnected
from .._pool import Pool, open_pool
from .._state import ReleasePolicy
from ._connect import create_ssl_context, open_stream
from ._http11 import HTTP11Connection
from ._models import URL, Headers, Origin, Request, Response, Timeouts

if TYPE_CHECKING:
    from .._state import Lease
    from ._models import HeaderTypes, RequestContent

__all__ = [
    "Client",
    "HTTPConnector",
    "HTTPKey",
    "NoPoolSender",
    "PoolSender",
    "RequestSender",
    "open_client",
]

_USER_AGENT = "trio-connpool"


@functools.cache
def _default_context(verify: bool) -> ssl.SSLContext:
    return create_ssl_context(verify)


def _shared_context(verify: bool | ssl.SSLContext) -> ssl.SSLContext:
    """The TLS context for ``verify``: the caller's own, or one shared per setting.

    Pool keys compare contexts by identity, so clients that share a pool with the same
    ``verify=True`` (or False) must share one context to share connections. Contexts are safe
    to share: nothing here modifies one after it is made.
    """
    if isinstance(verify, ssl.SSLContext):
        return verify
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool or an ssl.SSLContext, not {verify!r}")
    return _default_context(verify)


@runtime_checkable
class RequestSender(Protocol):
    """Anything that sends a request and returns its response (head read, body pending).

    Implemented by :class:`PoolSender`, :class:`NoPoolSender` and
    :class:`~trio_connpool.http.HTTP11Connection`; pass any of them to
    ``open_client(pool=...)``.
    """

    async def send_request(self, request: Request) -> Response:
        """Send ``request``; return the response once its head has arrived."""
        ...


class HTTPKey:
    """The pool key of an HTTP connection: a connection is reused only for the same key.

    Attributes:
        origin: Scheme, host and port.
        http_version: The protocol(s) offered: ``"HTTP/1.1"``.
        tls: The TLS context for https, or None for plain HTTP. Compared by identity: two
            contexts with the same settings are still different keys (a context's settings
            cannot be read back completely, so identity is the only safe comparison).
        extra: Anything else that must match (a user agent, a proxy, a tenant).
    """

    __slots__ = ("_hash", "extra", "http_version", "origin", "tls")

    def __init__(
        self,
        origin: Origin,
        *,
        http_version: str = "HTTP/1.1",
        tls: ssl.SSLContext | None = None,
        extra: Hashable = None,
    ) -> None:
        self.origin = origin
        self.http_version = http_version
        self.tls = tls
        self.extra = extra
        self._hash = hash((origin, http_version, id(tls), extra))

    def _identity(self) -> tuple[Origin, str, int, Hashable]:
        return (self.origin, self.http_version, id(self.tls), self.extra)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HTTPKey):
            return NotImplemented
        return self.tls is other.tls and self._identity() == other._identity()

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        tls = "" if self.tls is None else f", tls=<SSLContext at {id(self.tls):#x}>"
        extra = "" if self.extra is None else f", extra={self.extra!r}"
        return f"HTTPKey({str(self.origin)!r}, {self.http_version}{tls}{extra})"


class HTTPConnector:
    """Opens HTTP connections for pool keys: a ``connector`` for :func:`open_pool`.

    Args:
        timeouts: ``connect`` bounds each connect; ``read`` and ``write`` are given to the
            connections.
    """

    def __init__(self, *, timeouts: Timeouts = Timeouts()) -> None:  # noqa: B008
        self.timeouts = timeouts

    async def __call__(self, key: HTTPKey) -> HTTP11Connection:
        """Connect to ``key.origin`` (TLS with ``key.tls`` for https)."""
        stream, _alpn = await open_stream(
            key.origin, ssl_context=key.tls, connect_timeout=self.timeouts.connect
        )
        return HTTP11Connection(stream, key.origin, timeouts=self.timeouts)


class _LeasedBody:
    """A response body that gives its lease back when it ends or is closed."""

    __slots__ = ("_inner", "_lease", "_pool")

    def __init__(self, inner: Any, pool: Pool[HTTPKey, HTTP11Connection], lease: Any) -> None:
        self._inner = inner
        self._pool = pool
        self._lease: Lease[HTTPKey, HTTP11Connection] = lease

    async def receive_some(self) -> bytes:
        try:
            data: bytes = await self._inner.receive_some()
        except BaseException:
            self._release()
            raise
        if not data:
            self._release()
        return data

    def receive_buffered(self) -> bytes | None:
        receive_buffered = getattr(self._inner, "receive_buffered", None)
        data: bytes | None = receive_buffered() if receive_buffered is not None else None
        if data == b"":
            self._release()
        return data

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()

    def _release(self) -> None:
        # is_clean() reads the connection's own state: no syscall on the hot path.
        self._pool.release(self._lease, discard=not self._lease.connection.is_clean())


class PoolSender:
    """Sends each request on a connection leased from ``pool``.

    Args:
        pool: A pool whose connector makes HTTP connections for :class:`HTTPKey` keys (an
            :class:`HTTPConnector`).
        verify: TLS verification for https: True, False or an `ssl.SSLContext`.
        acquire_timeout: Bound on the whole wait for a connection, retries included.
        retry_stale: Retry a request that failed on a reused keep-alive connection before any
            byte of the response arrived (the server had closed it), if the method is
            idempotent and the body can be sent again. Each stale connection is discarded,
            and a failure on a fresh connection is not retried, so this ends.
        key_extra: Added to every pool key (connections are reused only for the same value).
    """

    def __init__(
        self,
        pool: Pool[HTTPKey, HTTP11Connection],
        *,
        verify: bool | ssl.SSLContext = True,
        acquire_timeout: float | None = None,
        retry_stale: bool = True,
        key_extra: Hashable = None,
    ) -> None:
        self.pool = pool
        self._ssl_context = _shared_context(verify)
        self.acquire_timeout = acquire_timeout
        self.retry_stale = retry_stale
        self.key_extra = key_extra
        self._keys: dict[Origin, HTTPKey] = {}

    def key_for(self, origin: Origin) -> HTTPKey:
        """The pool key for ``origin``."""
        key = self._keys.get(origin)
        if key is None:
            tls = self._ssl_context if origin.is_secure else None
            key = self._keys[origin] = HTTPKey(origin, tls=tls, extra=self.key_extra)
        return key

    async def send_request(self, request: Request) -> Response:
        """Lease a connection, send ``request``, and tie the lease to the response body."""
        key = self.key_for(request.url.origin)
        timeout = self.acquire_timeout
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        pool = self.pool
        # The request's own I/O is this call's checkpoint; take an idle connection without
        # yielding first (a cancelled task must not lease, hence checkpoint_if_cancelled).
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                lease = pool.acquire_nowait(key)
            except trio.WouldBlock:
                remaining = None if timeout is None else max(0.0, deadline - trio.current_time())
                lease = await pool.acquire(key, timeout=remaining)
            connection = lease.connection
            try:
                response = await connection.send_request(request)
            except ServerDisconnected:
                pool.release(lease, discard=True)
                if (
                    self.retry_stale
                    and lease.is_reused
                    and request.is_idempotent
                    and request.is_replayable
                ):
                    continue
                raise
            except BaseException:
                pool.release(lease, discard=not connection.is_clean())
                raise
            response._stream = _LeasedBody(response._stream, pool, lease)
            return response


class _ClosingBody:
    """A response body that closes its one-off connection when it ends or is closed."""

    __slots__ = ("_connection", "_inner")

    def __init__(self, inner: Any, connection: HTTP11Connection) -> None:
        self._inner = inner
        self._connection = connection

    async def receive_some(self) -> bytes:
        try:
            data: bytes = await self._inner.receive_some()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._connection.aclose()
            raise
        if not data:
            await self._connection.aclose()
        return data

    async def aclose(self) -> None:
        # The connection is closed either way: draining the rest of the body first would
        # only wait for bytes nobody reads (up to the read timeout).
        await self._connection.aclose()


class NoPoolSender:
    """Sends each request on a new connection, closed when the response ends: no pool.

    Args:
        verify: TLS verification for https: True, False or an `ssl.SSLContext`.
        timeouts: Connect, read and write timeouts.
    """

    def __init__(
        self,
        *,
        verify: bool | ssl.SSLContext = True,
        timeouts: Timeouts = Timeouts(),  # noqa: B008
    ) -> None:
        self._ssl_context = _shared_context(verify)
        self.timeouts = timeouts
        self._connector = HTTPConnector(timeouts=timeouts)

    async def send_request(self, request: Request) -> Response:
        """Connect, send ``request``, and close the connection once the response ends."""
        origin = request.url.origin
        key = HTTPKey(origin, tls=self._ssl_context if origin.is_secure else None)
        connection = await self._connector(key)
        try:
            response = await connection.send_request(request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        response._stream = _ClosingBody(response._stream, connection)
        return response


class Client:
    """Sends HTTP requests through a :class:`RequestSender`; made by :func:`open_client`.

    Attributes:
        sender: What sends the requests.
        headers: Default headers added to every request (the request's own win).
    """

    def __init__(self, sender: RequestSender, *, headers: HeaderTypes = None) -> None:
        self.sender = sender
        self.headers = Headers(headers)
        self._urls: dict[str, URL] = {}
        if "user-agent" not in self.headers:
            self.headers["User-Agent"] = _USER_AGENT

    @property
    def pool(self) -> Pool[HTTPKey, HTTP11Connection] | None:
        """The pool behind the client, or None when it sends without one."""
        sender = self.sender
        return sender.pool if isinstance(sender, PoolSender) else None

    def build_request(
        self,
        method: str,
        url: URL | str,
        *,
        headers: HeaderTypes = None,
        content: RequestContent = None,
    ) -> Request:
        """Validate and build a request with the client's default headers.

        Raises:
            InvalidURL: The URL is malformed, its scheme unsupported or its port out of range.
            InvalidHeader: A header name or value is malformed (CR, LF or NUL in it).
            LocalProtocolError: The method is not a valid token.
            TypeError: ``content`` is a str (encode it) or of another unsupported type.
        """
        if isinstance(url, str):
            # Parsing a URL is the costliest part of building a request: keep the last few
            # hundred (URL objects are immutable, so sharing them is safe).
            parsed = self._urls.get(url)
            if parsed is None:
                if len(self._urls) >= 512:
                    self._urls.clear()
                parsed = self._urls[url] = URL(url)
            url = parsed
        merged = self.headers.copy()
        if headers is not None:
            for name, value in Headers(headers).raw:
                merged[name] = value
        return Request(method, url, headers=merged, content=content)

    async def request(
        self,
        method: str,
        url: URL | str,
        *,
        headers: HeaderTypes = None,
        content: RequestContent = None,
    ) -> Response:
        """Send a request and read the whole response body.

        Args:
            method: The method, e.g. ``"GET"``.
            url: An ``http://`` or ``https://`` URL.
            headers: Extra headers (a mapping or a list of pairs).
            content: The body: bytes, an async iterable of bytes (sent chunked), or None.

        Returns:
            The response, its body read (``response.content``).

        Raises:
            PoolError: Any subclass (see the exception hierarchy): ConnectError,
                PoolTimeout, ReadTimeout, RemoteProtocolError, ...
        """
        request = self.build_request(method, url, headers=headers, content=content)
        response = await self.sender.send_request(request)  # a checkpoint (it did I/O)
        try:
            await response._read_all()  # no extra checkpoint for what is already buffered
        finally:
            if not response.is_closed:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        return response

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: URL | str,
        *,
        headers: HeaderTypes = None,
        content: RequestContent = None,
    ) -> AsyncGenerator[Response, None]:
        """Send a request and stream the response body within the ``async with`` block.

        ::

            async with client.stream("GET", url) as response:
                async for chunk in response.aiter_bytes():
                    ...

        Leaving the block closes the response: its connection goes back to the pool if the
        body was read to the end (or a small remainder could be drained), else it is closed.
        """
        request = self.build_request(method, url, headers=headers, content=content)
        response = await self.sender.send_request(request)
        try:
            yield response
        except BaseException:
            # The block raised or was cancelled: close at once, never wait for the rest of
            # the body (a shielded drain would hold a cancellation up to the read timeout).
            # Within a cancelled scope only bytes already received are drained; otherwise
            # the connection is closed, not returned.
            with trio.CancelScope() as scope:
                scope.cancel()
                await response.aclose()
            raise
        with trio.CancelScope(shield=True):
            await response.aclose()

    async def get(self, url: URL | str, *, headers: HeaderTypes = None) -> Response:
        """``request("GET", url)``."""
        return await self.request("GET", url, headers=headers)


@asynccontextmanager
async def open_client(
    *,
    verify: bool | ssl.SSLContext = True,
    http1: bool = True,
    http2: bool = False,
    max_connections: int = 100,
    max_connections_per_key: int | None = 10,
    release_policy: ReleasePolicy = ReleasePolicy.LIFO,
    timeouts: Timeouts = Timeouts(),  # noqa: B008
    idle_timeout: float | None = 5.0,
    max_lifetime: float | None = None,
    retry_stale: bool = True,
    headers: HeaderTypes = None,
    key_extra: Hashable = None,
    pool: RequestSender | Pool[HTTPKey, HTTP11Connection] | None = None,
) -> AsyncGenerator[Client, None]:
    """Open an HTTP client for the ``async with`` block.

    ::

        async with open_client() as client:
            response = await client.request("GET", "https://example.com/")

    With ``pool=None`` the client opens its own pool (the default pool) with the limits given
    here and closes it, and every connection, when the block ends. ``pool`` may instead be a
    :class:`~trio_connpool.Pool` of HTTP connections you opened with
    ``open_pool(HTTPConnector(...))`` (a custom pool, shared by several clients), or any
    :class:`RequestSender`: :class:`NoPoolSender` for a connection per request, or a single
    connection. The pool options are ignored when ``pool`` is given.

    Args:
        verify: True (verify certificates and host names against the system trust store),
            False (don't; never on an untrusted network) or an `ssl.SSLContext` (used as
            given, never modified).
        http1: Speak HTTP/1.1. Must be True in this release.
        http2: Speak HTTP/2. Not available in this release: True raises ValueError.
        max_connections: The pool's global limit.
        max_connections_per_key: Connections per origin (and TLS settings); None: no limit.
        release_policy: Which idle connection is reused first.
        timeouts: ``connect``, ``read``, ``write`` (per operation), and ``pool`` (the whole
            wait for a connection, retries included).
        idle_timeout: Seconds an idle keep-alive connection is kept.
        max_lifetime: Seconds a connection lives at most.
        retry_stale: See :class:`PoolSender`.
        headers: Default headers for every request.
        key_extra: Added to every pool key (e.g. a user agent or tenant).
        pool: See above.

    Raises:
        ValueError, TypeError: For invalid options, at once.
    """
    if http2:
        raise ValueError("http2=True is not supported yet: this release speaks HTTP/1.1")
    if not http1:
        raise ValueError("http1=False leaves no protocol to speak in this release")
    if not isinstance(timeouts, Timeouts):
        raise TypeError("timeouts must be a trio_connpool.http.Timeouts")
    if pool is None:
        async with open_pool(
            HTTPConnector(timeouts=timeouts),
            max_connections=max_connections,
            max_connections_per_key=max_connections_per_key,
            release_policy=release_policy,
            idle_timeout=idle_timeout,
            max_lifetime=max_lifetime,
        ) as owned:
            sender = PoolSender(
                owned,
                verify=verify,
                acquire_timeout=timeouts.pool,
                retry_stale=retry_stale,
                key_extra=key_extra,
            )
            yield Client(sender, headers=headers)
        return
    if isinstance(pool, Pool):
        given: RequestSender = PoolSender(
            pool,
            verify=verify,
            acquire_timeout=timeouts.pool,
            retry_stale=retry_stale,
            key_extra=key_extra,
        )
    elif isinstance(pool, RequestSender):
        given = pool
    else:
        raise TypeError(f"pool must be a Pool, a RequestSender or None, not {pool!r}")
    await trio.lowlevel.checkpoint()
    yield Client(given, headers=headers)
