"""The HTTP client: requests in, responses out, connections from a pool (or not).

Three layers, each usable on its own (the connector works with no pool, the default pool,
or a custom pool):

- :class:`HTTPConnector` opens one connection for a pool key: TCP (happy eyeballs), TLS with
  ALPN, then an HTTP/1.1 or HTTP/2 connection over it, whichever the server chose. It is a
  plain ``connector`` for :func:`~trio_connpool.open_pool`, so a custom pool of HTTP
  connections is just ``open_pool(HTTPConnector(...), max_connections=...)``; its
  ``reserve`` method tells the pool what a connect in flight is expected to bring.
- A :class:`RequestSender` sends one request and returns its response. Three ship here:
  :class:`PoolSender` (leases a connection from a pool, gives it back when the response body
  ends), :class:`NoPoolSender` (a fresh connection per request, closed after), and any single
  :class:`~trio_connpool.http.HTTP11Connection` or
  :class:`~trio_connpool.http.HTTP2Connection`.
- :class:`Client` adds what users want on top, with httpx's names: URL parsing, default
  headers, ``request()`` and the verbs (``get``, ``post``, ...) reading the body,
  ``stream()`` streaming it, query ``params``, ``json`` and form ``data`` bodies, timeouts
  per request (carried by the request to the sender and the connection), and redirects.
  :func:`open_client` makes one with the default pool, or wraps a sender or pool you give
  it.

The lease is released exactly when the response body has been read to its end, or when the
response is closed early (the HTTP/1.1 connection then drains a small remainder or closes). An
exchange that fails or is cancelled half-way closes its connection; it is never returned
(an HTTP/2 stream that was reset leaves its connection in service for the other streams).

HTTP/2 and the pool's weights. A connect to an origin that may speak HTTP/2 reserves the
weight and capacity of an HTTP/2 connection (``http2_weight``, ``max_concurrent_streams``),
so a cold burst of requests opens one connection and multiplexes on it. If ALPN answers
``http/1.1`` the connection reports weight 1 and capacity 1, the pool corrects the
reservation and opens further connections for the waiters, and the connector remembers the
origin's choice, so later connects to it reserve as HTTP/1.1 from the start.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import ssl
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Protocol,
    TypeAlias,
    Union,
    cast,
    final,
    runtime_checkable,
)
from urllib.parse import urljoin

import trio

from .._exceptions import (
    ConnectError,
    ConnectTimeout,
    RemoteProtocolError,
    ServerDisconnected,
    StreamConsumed,
    TooManyRedirects,
    TransportError,
)
from .._options import (
    DEFAULT_RESERVATION,
    PoolOptionArgs,
    PoolOptions,
    Reservation,
    check_duration,
    resolve_options,
)
from .._pool import Pool, clock_reader, hooks_of, open_pool, require_trio
from ._connect import CertTypes, VerifyTypes, create_ssl_context, open_stream
from ._http2 import HTTP2Connection
from ._http11 import HTTP11Connection
from ._models import (
    URL,
    Headers,
    Origin,
    Request,
    Response,
    ResponseStream,
    Timeouts,
    encode_form,
    encode_json,
    merge_params,
)
from ._proxy import (
    ForwardingConnection,
    Proxy,
    ProxyTypes,
    as_proxy,
    open_proxied_stream,
    require_socks,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .._state import Lease
    from ._models import HeaderTypes, QueryParamTypes, RequestContent, RequestData

# Private names shared with the layers below, on purpose (each use silences pyright's
# reportPrivateUsage): ``Request._with_own_headers`` builds a request around headers made
# for it alone, without copying them; ``Response._read_all`` reads a body without the extra
# yield `Response.aread` makes, which the request's own I/O has made already;
# ``Response._started_at`` is when the sender started, for ``Response.elapsed``.

__all__ = [
    "CLIENT_POOL_OPTIONS",
    "Client",
    "HTTPConnection",
    "HTTPConnector",
    "HTTPKey",
    "NoPoolSender",
    "PoolSender",
    "RequestSender",
    "TimeoutTypes",
    "USE_CLIENT_DEFAULT",
    "UseClientDefault",
    "open_client",
]

_USER_AGENT = "trio-connpool"

HTTPConnection: TypeAlias = "HTTP11Connection | HTTP2Connection"
"""A connection the HTTP pool holds: HTTP/1.1 or HTTP/2."""

# What a key offers (HTTPKey.http_version).
HTTP11: Final = "HTTP/1.1"
HTTP2: Final = "HTTP/2"
HTTP2_OR_HTTP11: Final = "HTTP/2,HTTP/1.1"
_OFFERS: Final = frozenset({HTTP11, HTTP2, HTTP2_OR_HTTP11})

# A request the server did not process (GOAWAY, REFUSED_STREAM) is sent again; at most this
# many times for connections that completed nothing (a server that refuses everything must
# not keep a request looping; the pool timeout bounds the whole wait as well)...
_MAX_RETRIES: Final = 5
# ...and at most this many times for connections that stay in service after refusing it
# (REFUSED_STREAM; such a connection also retires itself after a few refusals in a row). A
# connection that served requests and is going away (a server rotating its connections with
# GOAWAY) is not counted: the next attempt waits for a new connection, within the pool
# timeout.
_MAX_REPLAYS: Final = 16
# How many origins' protocol choices a connector remembers (then it starts over).
_MAX_REMEMBERED: Final = 4096
# The statuses a client with follow_redirects follows (when they carry a Location).
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# The body of a redirect response that is followed is read (kept in its content, as httpx
# does) when it declares at most this many bytes and they arrive within this many seconds;
# otherwise the response is closed unread (its connection drained or closed: see stream()).
_MAX_REDIRECT_BODY: Final = 64 * 1024
_REDIRECT_BODY_TIMEOUT: Final = 1.0


@final
class UseClientDefault:
    """The type of `USE_CLIENT_DEFAULT`, httpx's marker for "the client's setting"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: The default of a request's ``timeout`` and ``follow_redirects``: the client's setting
#: applies (``None`` would mean "no limits" for ``timeout``, as in httpx).
USE_CLIENT_DEFAULT: Final = UseClientDefault()

TimeoutTypes = Union[float, Timeouts, None]  # noqa: UP007 (runtime alias)
"""What ``timeout=`` accepts: a number of seconds for all four limits (connect, read, write,
pool), a :class:`~trio_connpool.http.Timeouts`, or ``None`` for no limits at all."""

_NO_LIMITS: Final = Timeouts(connect=None, read=None, write=None, pool=None)


def _check_redirects(follow_redirects: object, max_redirects: object) -> None:
    if not isinstance(follow_redirects, bool):
        raise TypeError(f"follow_redirects must be a bool, not {follow_redirects!r}")
    if not isinstance(max_redirects, int) or isinstance(max_redirects, bool) or max_redirects < 0:
        raise ValueError(f"max_redirects must be an int of at least 0, not {max_redirects!r}")


def _timeouts_of(timeout: TimeoutTypes | UseClientDefault) -> Timeouts:
    """The `Timeouts` a request's ``timeout=`` stands for."""
    if isinstance(timeout, Timeouts):
        return timeout
    if timeout is None:
        return _NO_LIMITS
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"timeout must be a number, a Timeouts or None, not {timeout!r}")
    return Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout)


def _encode_body(
    content: RequestContent | str, data: RequestData | None, json: object
) -> tuple[bytes, str]:
    """The body and Content-Type for ``data=`` or ``json=`` (one of them given).

    Raises:
        TypeError: More than one body was given, or one is of an unsupported type.
        ValueError: ``json`` holds NaN or an infinity.
    """
    given = [name for name, value in (("content", content), ("data", data)) if value is not None]
    if json is not None:
        given.append("json")
    if len(given) > 1:
        raise TypeError(f"give one request body, not {' and '.join(given)}")
    if data is not None:
        return encode_form(data), "application/x-www-form-urlencoded"
    return encode_json(json), "application/json"


def _is_https_upgrade(url: URL, location: URL) -> bool:
    """Whether ``location`` is ``url``'s host, moved from http on port 80 to https on 443
    (httpx keeps ``Authorization`` across this one change of origin)."""
    return (
        url.host == location.host
        and url.scheme == "http"
        and url.port == 80
        and location.scheme == "https"
        and location.port == 443
    )


def _redirect_request(request: Request, response: Response) -> Request:
    """The request that follows ``response``, a redirect with a Location, as httpx builds it.

    Method: 303 and 302 turn every method but HEAD into GET, and 301 turns POST into GET
    (what browsers do, and httpx); 307 and 308 keep it. A request turned into GET loses its
    body and its ``Content-Length`` and ``Transfer-Encoding``; one that keeps its method
    keeps its body, which must be replayable. The Location is resolved against the request's
    URL. Leaving the origin (scheme, host or port) drops ``Authorization`` (except from
    ``http://host`` to ``https://host`` on the default ports), ``Proxy-Authorization`` (a
    :class:`Proxy`'s own credentials are not headers of the request, and follow it) and
    ``Host``; ``Cookie`` is dropped on every redirect, as httpx does (there is no cookie
    store here to tell which cookies the new URL may have). The request's own timeouts
    carry over.

    Raises:
        RemoteProtocolError: The Location is not a valid http or https URL.
        StreamConsumed: The method and body are kept, but the body was streamed.
    """
    status = response.status_code
    method = request.method
    if (status in (302, 303) and method != "HEAD") or (status == 301 and method == "POST"):
        method = "GET"
    location = response.headers.get("location") or ""
    try:
        url = URL(urljoin(str(request.url), location.strip()))
    except ValueError as exc:  # InvalidURL, or urljoin's own (a bad IPv6 literal)
        raise RemoteProtocolError(
            f"the {status} response's Location is not a URL we can follow: {location!r} "
            f"({exc.args[0] if exc.args else exc})",
            key=request.url.origin,
            url=str(request.url),
        ) from exc
    headers = request.headers.copy()
    dropped = ["cookie"]
    if url.origin != request.url.origin:
        # A Proxy-Authorization given by hand was for the first URL's way out: the new one
        # may go direct (to a server that must not see the proxy's credentials), through
        # another proxy, or, from http to https, through a tunnel to the origin itself.
        dropped += ["host", "proxy-authorization"]
        if not _is_https_upgrade(request.url, url):
            dropped.append("authorization")
    content = request.content
    if method != request.method:
        content = None
        dropped += ["content-length", "transfer-encoding"]
    elif not request.is_replayable:
        raise StreamConsumed(
            f"cannot follow the {status} redirect to {url}: it asks for the request body "
            "again, and that body was streamed (pass it as bytes to follow such redirects)",
            key=request.url.origin,
            url=str(request.url),
        )
    for name in dropped:
        if name in headers:
            del headers[name]
    following = Request._with_own_headers(  # pyright: ignore[reportPrivateUsage]
        method, url, headers, content
    )
    following.timeouts = request.timeouts
    return following


async def _read_redirect_body(response: Response) -> None:
    """Read the body of a redirect being followed (kept in its ``content``, as httpx keeps
    it), so that its connection can serve the next hop: at most 64 KiB within 1 s, whether
    its length was declared or not, counted once decoded (a few hundred bytes of gzip can be
    gigabytes). A body beyond either bound is closed instead, unread, which closes an
    HTTP/1.1 connection rather than wait for it."""
    length = response.headers.get("content-length")
    if length is None or (length.isdigit() and int(length) <= _MAX_REDIRECT_BODY):
        chunks: list[bytes] = []
        received = 0
        with trio.move_on_after(_REDIRECT_BODY_TIMEOUT):
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > _MAX_REDIRECT_BODY:
                    break
                chunks.append(chunk)
            else:
                response._content = b"".join(chunks)  # pyright: ignore[reportPrivateUsage]
    if not response.is_closed:
        with trio.CancelScope(shield=True):
            await response.aclose()


async def _close_at_once(response: Response) -> None:
    """Close ``response`` without waiting for the rest of its body (an error path): within a
    cancelled scope only bytes already received are drained, else the connection closes."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await response.aclose()


#: The options of the pool that :func:`open_client` opens when it is given none: those of
#: :class:`~trio_connpool.PoolOptions` but for 10 connections per origin (and TLS settings)
#: and idle keep-alive connections kept 5 s. ``CLIENT_POOL_OPTIONS.replace(...)`` changes
#: some of them for ``open_client(pool_options=...)``.
CLIENT_POOL_OPTIONS: Final = PoolOptions(max_connections_per_key=10, idle_timeout=5.0)


def _offer(*, http1: bool, http2: bool, secure: bool) -> str:
    """The protocols a key offers. Plain HTTP has no ALPN: HTTP/2 there is prior knowledge,
    used only when HTTP/1.1 is off (no h2c upgrade)."""
    if http2 and not http1:
        return HTTP2
    if http2 and secure:
        return HTTP2_OR_HTTP11
    return HTTP11


def _check_protocols(http1: bool, http2: bool) -> None:
    if not isinstance(http1, bool) or not isinstance(http2, bool):
        raise TypeError("http1 and http2 must be bools")
    if not (http1 or http2):
        raise ValueError("http1=False and http2=False leave no protocol to speak")


# What HTTPKey's repr calls the contexts made here: "default" (verified against the system's
# store), "insecure" (verify=False) or "ca-bundle" (a CA path), "+cert" with a client
# certificate; any other context is a caller's own, "custom" (and never modified here).
_CONTEXT_NAMES: weakref.WeakKeyDictionary[ssl.SSLContext, str] = weakref.WeakKeyDictionary()


# (Bounded: each setting of SSL_CERT_FILE/SSL_CERT_DIR seen makes a context of its own.)
@functools.lru_cache(maxsize=64)
def _default_context(
    verify: bool, http1: bool, http2: bool, trust_env: bool, env: tuple[str | None, ...]
) -> ssl.SSLContext:
    # (env: the variables the context was made under, so a change makes a new context.)
    context = create_ssl_context(verify, http1=http1, http2=http2, trust_env=trust_env)
    _CONTEXT_NAMES[context] = "default" if verify else "insecure"
    return context


def _shared_context(
    verify: VerifyTypes,
    *,
    cert: CertTypes | None = None,
    http1: bool = True,
    http2: bool = False,
    trust_env: bool = True,
) -> ssl.SSLContext:
    """The TLS context for ``verify``: the caller's own, one shared per setting, or (for a CA
    path or a client certificate) one made now.

    Pool keys compare contexts by identity, so clients that share a pool with the same
    ``verify=True`` (or False) and protocols must share one context to share connections.
    Contexts are safe to share: nothing here modifies one after it is made. With
    ``trust_env`` the default context honours SSL_CERT_FILE and SSL_CERT_DIR as they are now
    (a client reads them once, when it opens); files are read now, so a bad path fails here.
    """
    if isinstance(verify, bool) and cert is None:
        env: tuple[str | None, ...] = ()
        if verify and trust_env:
            paths = ssl.get_default_verify_paths()
            env = (
                os.environ.get(paths.openssl_cafile_env),
                os.environ.get(paths.openssl_capath_env),
            )
        return _default_context(verify, http1, http2, trust_env, env)
    context = create_ssl_context(verify, cert=cert, http1=http1, http2=http2, trust_env=trust_env)
    if context is not verify:
        name = "ca-bundle" if not isinstance(verify, bool) else "default" if verify else "insecure"
        _CONTEXT_NAMES[context] = name + ("" if cert is None else "+cert")
    return context


def _is_own_context(context: ssl.SSLContext) -> bool:
    """Whether ``context`` was made here (else it is a caller's, used as given)."""
    return context in _CONTEXT_NAMES


def _uds_path(uds: object) -> str | None:
    if uds is None:
        return None
    if isinstance(uds, os.PathLike):
        uds = os.fspath(cast("os.PathLike[str]", uds))
    if not isinstance(uds, str) or not uds:
        raise TypeError(f"uds must be the path of a Unix socket (str or os.PathLike), not {uds!r}")
    if not hasattr(socket, "AF_UNIX"):
        raise ValueError("uds: Unix domain sockets are not supported on this platform")
    return uds


class ProxyLookup(Protocol):
    """Says which proxy, if any, a request goes through (what ``ProxyEnv`` provides)."""

    def proxy_for(self, scheme: str, host: str, port: int) -> str | None:
        """The proxy URL for a request to ``scheme://host:port``, or None (direct)."""
        ...


@runtime_checkable
class RequestSender(Protocol):
    """Anything that sends a request and returns its response (head read, body pending).

    Implemented by :class:`PoolSender`, :class:`NoPoolSender`,
    :class:`~trio_connpool.http.HTTP11Connection` and
    :class:`~trio_connpool.http.HTTP2Connection` (whose reader you run); pass any of them to
    ``open_client(pool=...)``.
    """

    async def send_request(self, request: Request) -> Response:
        """Send ``request``; return the response once its head has arrived."""
        ...


class HTTPKey:
    """The pool key of an HTTP connection: a connection is reused only for the same key.

    Attributes:
        origin: Scheme, host and port. For a key that forwards ``http://`` requests through
            an HTTP proxy, the proxy's own address (``http://proxy-host:port``), shared by
            every origin it forwards to.
        http_version: The protocol(s) offered: ``"HTTP/1.1"``, ``"HTTP/2"`` (HTTP/2 only: ALPN
            ``h2`` over TLS, prior knowledge over plain TCP) or ``"HTTP/2,HTTP/1.1"`` (ALPN
            offering both over TLS; the server chooses).
        tls: The TLS context for https, or None for plain HTTP. Compared by identity: two
            contexts with the same settings are still different keys (a context's settings
            cannot be read back completely, so identity is the only safe comparison).
        extra: Anything else that must match (a user agent, a tenant).
        proxy: The :class:`Proxy` the connection goes through, or None (direct). With an
            HTTP(S) proxy, a key without ``tls`` forwards plain requests to the proxy, and a
            key with ``tls`` tunnels to its https origin through CONNECT; with a SOCKS5 proxy
            every key is a tunnel to its origin.
        uds: The path of the Unix domain socket to connect to instead of the origin's host
            and port, or None (TCP). The origin still gives the Host header, the scheme and
            the TLS server name.
    """

    __slots__ = ("_hash", "extra", "http_version", "origin", "proxy", "tls", "uds")

    def __init__(
        self,
        origin: Origin,
        *,
        http_version: str = "HTTP/1.1",
        tls: ssl.SSLContext | None = None,
        extra: Hashable = None,
        proxy: Proxy | None = None,
        uds: str | None = None,
    ) -> None:
        if http_version not in _OFFERS:
            raise ValueError(
                f"http_version must be one of {sorted(_OFFERS)}, not {http_version!r}"
            )
        if proxy is not None and not isinstance(proxy, Proxy):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"proxy must be a Proxy or None, not {proxy!r}")
        self.origin: Origin = origin
        self.http_version: str = http_version
        self.tls: ssl.SSLContext | None = tls
        self.extra: Hashable = extra
        self.proxy: Proxy | None = proxy
        self.uds: str | None = uds if uds is None else _uds_path(uds)
        self._hash = hash((origin, http_version, id(tls), extra, proxy, self.uds))

    def _identity(self) -> tuple[Origin, str, int, Hashable, Proxy | None, str | None]:
        return (self.origin, self.http_version, id(self.tls), self.extra, self.proxy, self.uds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HTTPKey):
            return NotImplemented
        return self.tls is other.tls and self._identity() == other._identity()

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        # tls=default (verified), insecure (verify=False) or custom (a caller's context):
        # readable in an error message, where an address would say nothing.
        tls = "" if self.tls is None else f", tls={_CONTEXT_NAMES.get(self.tls, 'custom')}"
        extra = "" if self.extra is None else f", extra={self.extra!r}"
        # The proxy's URL never shows its credentials.
        proxy = "" if self.proxy is None else f", proxy={self.proxy.url}"
        uds = "" if self.uds is None else f", uds={self.uds!r}"
        return f"HTTPKey({str(self.origin)!r}, {self.http_version}{tls}{extra}{proxy}{uds})"


class HTTPConnector:
    """Opens HTTP connections for pool keys: a ``connector`` for :func:`open_pool`.

    The protocol follows the key: ``key.http_version`` says what is offered, and over TLS the
    server's ALPN answer decides (``h2``: HTTP/2; ``http/1.1`` or no answer: HTTP/1.1).
    `reserve` is the pool's ``reserve`` callback (:func:`~trio_connpool.open_pool` uses a
    connector's ``reserve`` method by default): a connect that may bring HTTP/2 reserves
    ``http2_weight`` and ``max_concurrent_streams``; an origin known to have chosen HTTP/1.1
    reserves weight 1 and capacity 1.

    A key with a ``proxy`` connects through it (see :class:`HTTPKey`): to the proxy itself
    for a forwarding key (an HTTP/1.1 connection that sends each
    request in absolute form), else through a CONNECT or SOCKS5 tunnel to the key's origin,
    with TLS and ALPN to the origin inside for https. Proxy failures raise
    :class:`~trio_connpool.ProxyError`.

    Args:
        timeouts: ``connect`` bounds each connect (TCP, TLS and the HTTP/2 preface); ``read``
            and ``write`` are given to the connections.
        max_concurrent_streams: Our cap on the streams of one HTTP/2 connection (the server's
            SETTINGS_MAX_CONCURRENT_STREAMS applies below it).
        http2_weight: How much of its origin's ``max_connections_per_key`` an HTTP/2
            connection uses (the pool's ``max_connections`` counts it as one connection).
            Set it to the per-key limit for one multiplexed connection per origin (what
            `open_client` does); 1 lets the pool open more HTTP/2 connections when every
            stream is busy.
        ping_interval: Keep-alive PING on an HTTP/2 connection after this many seconds
            without receiving anything; the connection closes if no answer comes within
            ``ping_timeout``. None: no keep-alive pings.
        ping_timeout: See ``ping_interval``.
        uds: Connect every key over this Unix domain socket (unless the key names its own,
            ``key.uds``) instead of TCP to its origin's host and port.

    When a caller's own `ssl.SSLContext` (never modified here) brings no ALPN answer from an
    origin while the key offers HTTP/2 as well as HTTP/1.1, the connection speaks HTTP/1.1
    and a `UserWarning` says so, once per origin: the context probably lacks
    ``set_alpn_protocols(["h2", "http/1.1"])``.
    """

    def __init__(
        self,
        *,
        timeouts: Timeouts = Timeouts(),  # noqa: B008
        max_concurrent_streams: int = 100,
        http2_weight: int = 1,
        ping_interval: float | None = None,
        ping_timeout: float = 5.0,
        uds: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(timeouts, Timeouts):
            raise TypeError("timeouts must be a trio_connpool.http.Timeouts")
        for name, value in (
            ("max_concurrent_streams", max_concurrent_streams),
            ("http2_weight", http2_weight),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int of at least 1, not {value!r}")
        for name, seconds in (("ping_interval", ping_interval), ("ping_timeout", ping_timeout)):
            if seconds is not None and not seconds > 0:
                raise ValueError(f"{name} must be positive, not {seconds!r}")
        self.timeouts = timeouts
        self.max_concurrent_streams = max_concurrent_streams
        self.http2_weight = http2_weight
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._http2_reservation = Reservation(weight=http2_weight, capacity=max_concurrent_streams)
        self.uds: str | None = _uds_path(uds)
        self._chosen: dict[HTTPKey, str] = {}
        # The origins warned about a caller's context that negotiated no ALPN (bounded).
        self._alpn_warned: set[Origin] = set()

    def reserve(self, key: HTTPKey) -> Reservation:
        """What a connect for ``key`` reserves: HTTP/2's weight and streams, unless the key
        offers only HTTP/1.1 or its origin chose HTTP/1.1 before."""
        if key.http_version == HTTP11 or self._chosen.get(key) == HTTP11:
            return DEFAULT_RESERVATION
        return self._http2_reservation

    def protocol_chosen(self, key: HTTPKey) -> str | None:
        """The protocol the last connection for ``key`` speaks (``"HTTP/1.1"`` or
        ``"HTTP/2"``), or None if none was made (or it was forgotten)."""
        return self._chosen.get(key)

    def _no_alpn(self, key: HTTPKey) -> tuple[str | None, str | None]:
        """A TLS connect for ``key``, which offers HTTP/2, negotiated no ALPN protocol: with a
        caller's context, the refusal to raise when HTTP/2 is all the key speaks (saying what
        is probably missing), else the warning to give (once per origin), or neither."""
        tls = key.tls
        if tls is None or _is_own_context(tls):
            return None, None  # our contexts offer h2: the server took no part in ALPN
        hint = (
            "your ssl.SSLContext negotiated no ALPN protocol (it is used as given, never "
            'modified: call context.set_alpn_protocols(["h2", "http/1.1"]) on it to offer '
            "HTTP/2)"
        )
        if key.http_version == HTTP2:
            return f"{key.origin} did not choose h2: {hint}", None
        origin = key.origin
        if origin in self._alpn_warned:
            return None, None
        if len(self._alpn_warned) >= _MAX_REMEMBERED:
            self._alpn_warned.clear()
        self._alpn_warned.add(origin)
        return None, f"HTTP/2 was asked for, but with {origin} {hint}; speaking HTTP/1.1"

    async def __call__(self, key: HTTPKey) -> HTTPConnection:
        """Connect to ``key.origin`` (TLS with ``key.tls`` for https) and speak the protocol
        the key offers and the server chose.

        Raises:
            ConnectError: The connect failed, the server did not choose a protocol the key
                offers, or the HTTP/2 preface could not be sent. `ConnectTimeout` when it
                took longer than ``timeouts.connect``.
        """
        timeouts = self.timeouts
        origin = key.origin
        proxy = key.proxy
        if proxy is None:
            stream, alpn = await open_stream(
                origin,
                ssl_context=key.tls,
                connect_timeout=timeouts.connect,
                uds=self.uds if key.uds is None else key.uds,
            )
        else:
            forward = key.tls is None and not proxy.is_socks
            stream, alpn = await open_proxied_stream(
                proxy,
                origin,
                forward=forward,
                ssl_context=key.tls,
                connect_timeout=timeouts.connect,
            )
            if forward:
                return ForwardingConnection(stream, proxy, timeouts=timeouts)
        offered = key.http_version
        use_http2 = alpn == "h2" if origin.is_secure else offered == HTTP2
        refusal = notice = None
        if alpn is None and offered != HTTP11 and origin.is_secure:
            refusal, notice = self._no_alpn(key)
        if refusal is None and not use_http2 and offered == HTTP2:
            refusal = f"{origin} did not choose h2 in ALPN (it answered {alpn!r})"
        elif use_http2 and offered == HTTP11:
            # A caller's SSLContext offered h2 to a client that speaks only HTTP/1.1.
            refusal = f"{origin} chose h2 in ALPN, but HTTP/2 is off (pass http2=True)"
        if refusal is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise ConnectError(refusal, key=origin)
        if notice is not None:
            try:  # (a warnings filter may make it an error: the stream is closed then)
                warnings.warn(notice, UserWarning, stacklevel=2)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
                raise
        if len(self._chosen) >= _MAX_REMEMBERED:
            self._chosen.clear()
        if not use_http2:
            self._chosen[key] = HTTP11
            return HTTP11Connection(stream, origin, timeouts=timeouts)
        self._chosen[key] = HTTP2
        connection = HTTP2Connection(
            stream,
            origin,
            timeouts=timeouts,
            max_concurrent_streams=self.max_concurrent_streams,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            weight=self.http2_weight,
        )
        try:
            with trio.fail_after(math.inf if timeouts.connect is None else timeouts.connect):
                await connection.start()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise ConnectTimeout(
                    f"starting HTTP/2 with {origin} took longer than {timeouts.connect} s",
                    key=origin,
                ) from exc
            if isinstance(exc, TransportError):
                # Its message only: the root cause is added from the chain when shown.
                raise ConnectError(
                    f"cannot start HTTP/2 with {origin}: {exc.message}", key=origin
                ) from exc
            raise
        return connection


class _LeasedBody:
    """A response body that gives its lease back when it ends or is closed."""

    __slots__ = ("_inner", "_inner_buffered", "_lease", "_pool")

    def __init__(
        self,
        inner: ResponseStream,
        pool: Pool[HTTPKey, HTTPConnection],
        lease: Lease[HTTPKey, HTTPConnection],
    ) -> None:
        self._inner = inner
        self._pool = pool
        self._lease = lease
        # Bound once: reading a body asks for buffered chunks several times.
        self._inner_buffered = inner.receive_buffered

    async def receive_some(self) -> bytes:
        try:
            data = await self._inner.receive_some()
        except BaseException:
            self._release()
            raise
        if not data:
            self._release()
        return data

    def receive_buffered(self) -> bytes | None:
        data = self._inner_buffered()
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
        lease = self._lease
        self._pool.release(lease, discard=not lease.connection.is_clean())


class PoolSender:
    """Sends each request on a connection leased from ``pool``.

    Args:
        pool: A pool whose connector makes HTTP connections for :class:`HTTPKey` keys (an
            :class:`HTTPConnector`).
        verify: TLS verification for https: True, False, a CA bundle path or an
            `ssl.SSLContext` (see :func:`open_client`).
        cert: A client certificate (see :func:`open_client`).
        trust_env: Whether ``verify=True`` honours SSL_CERT_FILE and SSL_CERT_DIR.
        uds: Send every request over this Unix domain socket (part of every pool key).
        acquire_timeout: Bound on the whole wait for a connection, retries included, for a
            request without `Request.timeouts` (a request's own ``pool`` limit replaces it).
        retry_stale: Retry a request that failed on a reused keep-alive connection before any
            byte of the response arrived (the server had closed it), if the method is
            idempotent and the body can be sent again. Each stale connection is discarded,
            and a failure on a fresh connection is not retried, so this ends.
        key_extra: Added to every pool key (connections are reused only for the same value).
        http1: Offer HTTP/1.1.
        http2: Offer HTTP/2: ALPN ``h2`` over TLS (the server chooses, unless HTTP/1.1 is
            off); over plain TCP, HTTP/2 with prior knowledge when HTTP/1.1 is off.
        health_check_after: Before an HTTP/2 connection that received nothing for this many
            seconds is used, PING it and wait for the answer (bounded by its read timeout);
            a connection that fails the check is closed and another one used. None: never.
        proxy: Send every request through this proxy (a URL or a :class:`Proxy`; see
            :func:`open_client`). An ``https://`` proxy without an ``ssl_context`` of its own
            is verified as ``verify`` says. Forwarded ``http://`` requests are sent to the
            proxy in HTTP/1.1 whatever ``http1`` and ``http2`` say.
        proxy_env: Where to look up the proxy of each origin when ``proxy`` is None: any
            object with ``proxy_for(scheme, host, port) -> str | None`` (the environment's
            ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``, as
            :func:`open_client` reads them). Asked once per origin.

    A request the server did not process (an HTTP/2 stream refused, or above a GOAWAY's
    last stream id) is sent again on another connection whatever its method, if its body can
    be sent again; refusals by connections that completed no request end this after 5, and
    refusals by connections that stay in service after 16.

    A request's own `Request.timeouts` (``timeout=`` of the client's methods) apply as
    follows. ``pool`` bounds its whole wait for a connection: waiting in line, any connect
    the pool makes for it, and the waits of its retries; past it the request raises
    `PoolTimeout`. Connects are made by the pool's own task for whichever requests wait for
    the key, under the connector's ``connect`` limit (the client's), not the request's: a
    request that stops waiting leaves the connect going for the others. So the request's
    ``connect`` limit bounds nothing here beyond what ``pool`` bounds, and with a single
    number (``timeout=0.5``) the wait for a connection, connect included, ends within that
    time. ``read`` and ``write`` bound the exchange's reads and writes on the connection,
    its response body's included.
    """

    def __init__(
        self,
        pool: Pool[HTTPKey, HTTPConnection],
        *,
        verify: VerifyTypes = True,
        acquire_timeout: float | None = None,
        retry_stale: bool = True,
        key_extra: Hashable = None,
        http1: bool = True,
        http2: bool = False,
        health_check_after: float | None = None,
        cert: CertTypes | None = None,
        trust_env: bool = True,
        uds: str | os.PathLike[str] | None = None,
        proxy: ProxyTypes | None = None,
        proxy_env: ProxyLookup | None = None,
    ) -> None:
        _check_protocols(http1, http2)
        check_duration("health_check_after", health_check_after)
        self.pool = pool
        self._ssl_context = _shared_context(
            verify, cert=cert, http1=http1, http2=http2, trust_env=trust_env
        )
        self.uds: str | None = _uds_path(uds)
        # An https proxy is verified as the origins are, but speaks HTTP/1.1 (no h2 in ALPN).
        self._proxy_tls = _shared_context(verify, cert=cert, trust_env=trust_env)
        self._proxy = None if proxy is None else self._bind(as_proxy(proxy))
        if proxy_env is not None and not callable(getattr(proxy_env, "proxy_for", None)):
            raise TypeError("proxy_env must have a proxy_for(scheme, host, port) method")
        self._proxy_env = proxy_env if self._proxy is None else None
        self._env_proxies: dict[str, Proxy] = {}
        if self.uds is not None and self._proxy is not None:
            raise TypeError(
                "uds and proxy cannot be combined: a Unix socket is connected directly"
            )
        if self.uds is not None:
            self._proxy_env = None  # a Unix socket takes no proxy from the environment
        check_duration("acquire_timeout", acquire_timeout)
        self.acquire_timeout = acquire_timeout
        self.retry_stale = retry_stale
        self.key_extra = key_extra
        self.http1 = http1
        self.http2 = http2
        self.health_check_after = health_check_after
        self._keys: dict[Origin, HTTPKey] = {}
        self._now = clock_reader()
        # The request hooks of the instruments that override them (as the pool finds its
        # own), so a request pays for them (clock reads, a call per hook) only if there is one.
        hooks = hooks_of(pool.options.instruments)
        self._on_started = hooks.get("request_started", ())
        self._on_finished = hooks.get("request_finished", ())
        if self._on_started or self._on_finished:
            # Shadows the method for this sender only: a request without observers goes
            # through no extra coroutine.
            self.send_request = self._send_observed  # type: ignore[method-assign]

    def key_for(self, origin: Origin) -> HTTPKey:
        """The pool key for ``origin``."""
        key = self._keys.get(origin)
        if key is None:
            key = self._keys[origin] = self._new_key(origin)
        return key

    def _new_key(self, origin: Origin) -> HTTPKey:
        secure = origin.is_secure
        proxy = self._proxy
        if proxy is None and self._proxy_env is not None:
            proxy = self._proxy_from_env(origin)
        if proxy is not None and not secure and not proxy.is_socks:
            # Forwarded: one key per proxy, whatever the origin.
            return HTTPKey(proxy.origin, extra=self.key_extra, proxy=proxy)
        return HTTPKey(
            origin,
            http_version=_offer(http1=self.http1, http2=self.http2, secure=secure),
            tls=self._ssl_context if secure else None,
            extra=self.key_extra,
            proxy=proxy,
            uds=self.uds,
        )

    def _bind(self, proxy: Proxy) -> Proxy:
        return proxy.with_ssl_context(self._proxy_tls) if proxy.scheme == "https" else proxy

    def _proxy_from_env(self, origin: Origin) -> Proxy | None:
        assert self._proxy_env is not None
        url = self._proxy_env.proxy_for(origin.scheme, origin.host, origin.port)
        if not url:
            return None
        proxy = self._env_proxies.get(url)
        if proxy is None:
            if len(self._env_proxies) >= _MAX_REMEMBERED:
                self._env_proxies.clear()
            proxy = self._env_proxies[url] = self._bind(Proxy(url))
        return proxy

    async def _healthy(self, connection: HTTPConnection) -> bool:
        """PING an HTTP/2 connection that was quiet for too long; False if it failed."""
        threshold = self.health_check_after
        if (
            threshold is None
            or not isinstance(connection, HTTP2Connection)
            or trio.current_time() - connection.last_activity < threshold
        ):
            return True
        try:
            await connection.ping()
        except TransportError:
            return False
        return True

    async def _send_observed(self, request: Request) -> Response:
        """:meth:`send_request`, with the instruments' request hooks around it.

        The request ends when its response head arrives (what :meth:`send_request` returns;
        the body is the caller's to read, for as long as it likes) or when it fails.
        """
        key = self.key_for(request.url.origin)
        started = self._now()
        if self._on_started:
            self._observe(self._on_started, "request_started", key, request)
        try:
            response = await PoolSender.send_request(self, request)
        except BaseException as exc:
            if self._on_finished:
                seconds = self._now() - started
                self._observe(
                    self._on_finished, "request_finished", key, request, None, exc, seconds
                )
            raise
        if self._on_finished:
            seconds = self._now() - started
            self._observe(
                self._on_finished, "request_finished", key, request, response, None, seconds
            )
        return response

    def _observe(self, hooks: tuple[Callable[..., object], ...], name: str, *args: Any) -> None:
        # The pool's rule for hooks: one that raises is reported to hook_failed, and ignored.
        for hook in hooks:
            try:
                hook(*args)
            except Exception as exc:
                for other in self.pool.options.instruments:
                    with contextlib.suppress(Exception):  # nowhere left to report it
                        other.hook_failed(name, exc)

    async def send_request(self, request: Request) -> Response:
        """Lease a connection, send ``request``, and tie the lease to the response body."""
        key = self.key_for(request.url.origin)
        timeouts = request.timeouts
        timeout = self.acquire_timeout if timeouts is None else timeouts.pool
        started = self._now()  # the start of Response.elapsed, as httpx's
        # When waiting for a connection must end, for this request's waits and its retries'.
        deadline = None if timeout is None else started + timeout
        pool = self.pool
        # The request's own I/O is this call's checkpoint; take an idle connection without
        # yielding first (a cancelled task must not lease, hence checkpoint_if_cancelled).
        await trio.lowlevel.checkpoint_if_cancelled()
        retries = replays = 0
        while True:
            lease = pool.try_acquire(key)
            if lease is None:
                # Straight to the line: acquire() would only try the same miss again.
                lease = await pool.acquire_in_line(key, timeout, deadline)
            connection = lease.connection
            try:
                # (_healthy is awaited only when there is something to check: a coroutine
                # per request costs more than the test.)
                if self.health_check_after is not None and not await self._healthy(connection):
                    pool.release(lease, discard=True)
                    continue
                response = await connection.send_request(request)
            except ServerDisconnected as exc:
                pool.release(lease, discard=True)
                if exc.retryable:
                    # Refused before a byte of it was written (the idle connection held
                    # something unread): safe to send again, whatever the method or body.
                    retries += 1
                    if retries <= _MAX_RETRIES:
                        continue
                    raise
                if (
                    self.retry_stale
                    and lease.is_reused
                    and request.is_idempotent
                    and request.is_replayable
                ):
                    continue
                raise
            except RemoteProtocolError as exc:
                pool.release(lease, discard=not connection.is_clean())
                if exc.retryable and request.is_replayable:
                    # A server that rotates connections (GOAWAY after N requests) refuses
                    # many requests once each while it makes progress: refusals from a
                    # connection that completed nothing count towards the tighter bound.
                    if getattr(connection, "requests_completed", 0) == 0:
                        retries += 1
                    elif connection.is_ready():
                        replays += 1
                    if retries <= _MAX_RETRIES and replays <= _MAX_REPLAYS:
                        continue
                raise
            except BaseException:
                pool.release(lease, discard=not connection.is_clean())
                raise
            response.replace_stream(_LeasedBody(response.stream, pool, lease))
            response._started_at = started  # pyright: ignore[reportPrivateUsage]
            return response


class _ClosingBody:
    """A response body that closes its one-off connection when it ends or is closed."""

    __slots__ = ("_connection", "_inner")

    def __init__(self, inner: ResponseStream, connection: HTTPConnection) -> None:
        self._inner = inner
        self._connection = connection

    async def receive_some(self) -> bytes:
        try:
            data = await self._inner.receive_some()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._connection.aclose()
            raise
        if not data:
            await self._connection.aclose()
        return data

    def receive_buffered(self) -> bytes | None:
        data = self._inner.receive_buffered()
        # The end is for receive_some to report: the connection is closed there, and closing
        # takes an await this synchronous method cannot make.
        return None if data == b"" else data

    async def aclose(self) -> None:
        # The connection is closed either way: draining the rest of the body first would
        # only wait for bytes nobody reads (up to the read timeout).
        await self._connection.aclose()


class NoPoolSender:
    """Sends each request on a new connection, closed when the response ends: no pool.

    It speaks HTTP/1.1 only: an HTTP/2 connection needs a reader task, and so a nursery,
    which is what a pool provides.

    Args:
        verify: TLS verification for https: True, False, a CA bundle path or an
            `ssl.SSLContext` (see :func:`open_client`).
        timeouts: Connect, read and write timeouts.
        cert: A client certificate (see :func:`open_client`).
        trust_env: Whether ``verify=True`` honours SSL_CERT_FILE and SSL_CERT_DIR.
        uds: Send every request over this Unix domain socket.
    """

    def __init__(
        self,
        *,
        verify: VerifyTypes = True,
        timeouts: Timeouts = Timeouts(),  # noqa: B008
        cert: CertTypes | None = None,
        trust_env: bool = True,
        uds: str | os.PathLike[str] | None = None,
    ) -> None:
        self._ssl_context = _shared_context(verify, cert=cert, trust_env=trust_env)
        self.timeouts = timeouts
        self.uds: str | None = _uds_path(uds)
        self._connector = HTTPConnector(timeouts=timeouts)

    async def send_request(self, request: Request) -> Response:
        """Connect, send ``request``, and close the connection once the response ends.

        The request's own `Request.timeouts`, if it has them, replace the sender's for its
        connect as well as for its reads and writes (nobody waits for a pool here).
        """
        origin = request.url.origin
        key = HTTPKey(origin, tls=self._ssl_context if origin.is_secure else None, uds=self.uds)
        started = trio.current_time()  # the start of Response.elapsed, as httpx's
        timeouts = request.timeouts
        # The request's own limits: a connector for them (it remembers nothing worth keeping
        # here, where every connection is new and speaks HTTP/1.1).
        connector = self._connector if timeouts is None else HTTPConnector(timeouts=timeouts)
        connection = await connector(key)
        try:
            response = await connection.send_request(request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        response.replace_stream(_ClosingBody(response.stream, connection))
        response._started_at = started  # pyright: ignore[reportPrivateUsage]
        return response


class Client:
    """Sends HTTP requests through a :class:`RequestSender`; made by :func:`open_client`.

    The methods follow httpx's ``AsyncClient``: `request` and the verbs (`get`, `head`,
    `options`, `post`, `put`, `patch`, `delete`) read the whole body, `stream` streams it,
    and `build_request` only builds the request; they take httpx's keywords for the body
    (``content``, ``data``, ``json``), the query (``params``), ``headers``, ``timeout`` and
    ``follow_redirects``.

    Args:
        sender: What sends the requests.
        headers: Default headers for every request.
        follow_redirects: Whether requests follow redirects unless they say otherwise.
        max_redirects: How many redirects one request follows at most.

    Attributes:
        sender: What sends the requests.
        headers: Default headers added to every request (the request's own win).
        follow_redirects: See above.
        max_redirects: See above.

    Raises:
        TypeError, ValueError: ``follow_redirects`` is not a bool, or ``max_redirects`` not
            an int of at least 0.
    """

    def __init__(
        self,
        sender: RequestSender,
        *,
        headers: HeaderTypes = None,
        follow_redirects: bool = False,
        max_redirects: int = 20,
    ) -> None:
        _check_redirects(follow_redirects, max_redirects)
        self.sender = sender
        self.headers: Headers = Headers(headers)
        self.follow_redirects = follow_redirects
        self.max_redirects = max_redirects
        self._urls: dict[str, URL] = {}
        if "user-agent" not in self.headers:
            self.headers["User-Agent"] = _USER_AGENT

    @property
    def pool(self) -> Pool[HTTPKey, HTTPConnection] | None:
        """The pool behind the client, or None when it sends without one."""
        sender = self.sender
        return sender.pool if isinstance(sender, PoolSender) else None

    async def prewarm(self, url: URL | str, n: int) -> int:
        """Open connections to ``url``'s origin until ``n`` are idle in the client's pool.

        ``url`` names the origin (scheme, host, port; the path is ignored) and is mapped to
        the pool key the client's requests to it use. See :meth:`Pool.prewarm
        <trio_connpool.Pool.prewarm>`: the pool's limits hold, one HTTP/2 connection counts
        as many idle connections as it takes streams, and it waits for its connects.

        Returns:
            How many connections it opened.

        Raises:
            TypeError: The client sends without a pool (``open_client(pool=...)`` was given
                a `RequestSender` other than the pool's own), so there is nothing to keep
                connections in; or ``url`` is not a str or a `URL`.
            InvalidURL: ``url`` is not a valid absolute http or https URL.
            ConnectError, PoolClosed, ValueError: As :meth:`Pool.prewarm
                <trio_connpool.Pool.prewarm>`.
        """
        sender = self.sender
        if not isinstance(sender, PoolSender):
            raise TypeError(
                f"prewarm() needs a client with a connection pool; this one sends through "
                f"{type(sender).__name__}, which keeps no connections"
            )
        if isinstance(url, str):
            url = URL(url)
        elif not isinstance(url, URL):
            raise TypeError(f"url must be a str or a URL, not {type(url).__name__}")
        return await sender.pool.prewarm(sender.key_for(url.origin), n)

    def build_request(
        self,
        method: str,
        url: URL | str,
        *,
        content: RequestContent | str = None,
        data: RequestData | None = None,
        json: Any = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Request:
        """Validate and build a request with the client's default headers.

        Args:
            method: The method, e.g. ``"GET"``.
            url: An ``http://`` or ``https://`` URL.
            content: The body: ``bytes``, a ``str`` (sent as UTF-8), an async iterable of
                bytes (sent chunked), or None.
            data: Form fields, sent ``application/x-www-form-urlencoded`` (a mapping; a list
                value repeats the field).
            json: A value sent as compact JSON with ``Content-Type: application/json``.
            params: Query parameters merged into the URL's query (a mapping, a list of
                pairs, or a query string): each name given replaces the URL's values of that
                name, as httpx's ``URL.copy_merge_params``.
            headers: Extra headers (a mapping or a list of pairs); they replace the
                client's defaults of the same names, and a ``Content-Type`` given here wins
                over the one ``data`` or ``json`` sets.
            timeout: This request's limits (`Request.timeouts`): a number of seconds for all
                four, a :class:`Timeouts`, or None for none at all. By default the client's
                (the request carries none).

        Raises:
            InvalidURL: The URL is malformed, its scheme unsupported or its port out of range.
            InvalidHeader: A header name or value is malformed (CR, LF or NUL in it).
            LocalProtocolError: The method is not a valid token.
            TypeError: More than one of ``content``, ``data`` and ``json`` was given, or an
                argument is of an unsupported type (``json`` a value JSON cannot hold).
            ValueError: ``json`` holds NaN or an infinity, or a timeout is negative.
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
        else:
            url = url if isinstance(url, URL) else URL(url)  # not a str: URL raises InvalidURL
        if params is not None:
            url = merge_params(url, params)
        content_type = None
        if data is not None or json is not None:
            content, content_type = _encode_body(content, data, json)
        merged = self.headers.copy()
        if headers is not None:
            given = Headers(headers).raw
            # The request's own headers replace the defaults of the same name; a name given
            # several times keeps every value.
            for name in {name for name, _ in given}:
                if name in merged:
                    del merged[name]
            for name, value in given:
                merged.add(name, value)
        if content_type is not None and "content-type" not in merged:
            merged.add("Content-Type", content_type)
        request = Request._with_own_headers(  # pyright: ignore[reportPrivateUsage]
            method, url, merged, content
        )
        if timeout is not USE_CLIENT_DEFAULT:
            request.timeouts = _timeouts_of(timeout)
        return request

    async def request(
        self,
        method: str,
        url: URL | str,
        *,
        content: RequestContent | str = None,
        data: RequestData | None = None,
        json: Any = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """Send a request and read the whole response body.

        Args:
            method: The method, e.g. ``"GET"``.
            url: An ``http://`` or ``https://`` URL.
            content, data, json, params, headers, timeout: See `build_request`.
            follow_redirects: Follow redirects, up to the client's ``max_redirects``; by
                default as the client says (see below).

        Returns:
            The response, its body read (``response.content``).

        Raises:
            PoolError: Any subclass (see the exception hierarchy): ConnectError,
                PoolTimeout, ReadTimeout, RemoteProtocolError, ...
            TooManyRedirects: More than the client's ``max_redirects`` redirects in a row.
            StreamConsumed: A 307 or 308 asks for a body that was streamed (an async
                iterable) again; it is not sent.
            TypeError, ValueError: Invalid arguments (see `build_request`), at once.

        Redirects. With ``follow_redirects``, a response 301, 302, 303, 307 or 308 that has
        a ``Location`` is followed with the request that
        `RFC 9110 <https://www.rfc-editor.org/rfc/rfc9110#section-15.4>`_ and httpx call
        for: 303, and 302 for any method but HEAD, become a GET without body, and so does a
        POST answered with 301; 307 and 308 keep the method and body. The Location is
        resolved against the request's URL (one that is not an http or https URL raises
        `RemoteProtocolError`). Leaving the origin (scheme, host or port) drops
        ``Authorization``, except for the move from ``http://host`` (port 80) to
        ``https://host`` (port 443), which httpx allows, and ``Proxy-Authorization`` given
        by hand (a :class:`Proxy`'s credentials follow it); ``Cookie`` is dropped on every
        redirect, as in httpx. Each redirect response is read if it declares a body of at
        most 64 KiB that arrives within a second, else closed unread, so its connection
        goes back to the pool (or is closed). The response returned is the last one; its
        ``history`` lists the redirect responses before it (each with its own ``history``,
        as in httpx). A redirect without a ``Location``, or one not followed, is returned
        as it is.
        """
        request = self.build_request(
            method,
            url,
            content=content,
            data=data,
            json=json,
            params=params,
            headers=headers,
            timeout=timeout,
        )
        if follow_redirects is USE_CLIENT_DEFAULT:
            follow_redirects = self.follow_redirects
        if follow_redirects:
            response = await self._send_following(request)
        else:
            response = await self.sender.send_request(request)  # a checkpoint (it did I/O)
        try:
            # No extra checkpoint for what is already buffered.
            await response._read_all()  # pyright: ignore[reportPrivateUsage]
        finally:
            if not response.is_closed:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        return response

    async def _send_following(self, request: Request) -> Response:
        """Send ``request``, following redirects (see `request`); the last response, its body
        still to be read."""
        sender = self.sender
        history: list[Response] = []
        while True:
            response = await sender.send_request(request)
            if (
                response.status_code not in _REDIRECT_STATUSES
                or "location" not in response.headers
            ):
                if history:
                    response.history = history
                return response
            try:
                # Read (or close) it first, errors included: its connection goes back.
                await _read_redirect_body(response)
                if len(history) >= self.max_redirects:
                    raise TooManyRedirects(
                        f"more than {self.max_redirects} redirects: the last one, a "
                        f"{response.status_code} from {response.url}, leads to "
                        f"{response.headers.get('location')!r}",
                        key=request.url.origin,
                        url=str(response.url),
                    )
                following = _redirect_request(request, response)
            except BaseException:
                await _close_at_once(response)
                raise
            response.history = list(history)
            history.append(response)
            request = following

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: URL | str,
        *,
        content: RequestContent | str = None,
        data: RequestData | None = None,
        json: Any = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> AsyncGenerator[Response, None]:
        """Send a request and stream the response body within the ``async with`` block.

        ::

            async with client.stream("GET", url) as response:
                async for chunk in response.aiter_bytes():
                    ...

        The arguments are those of `request`; with ``follow_redirects`` the block gets the
        last response, its body streaming (the redirects before it are in its ``history``).
        The request's ``timeout``, if given, also bounds each read of the body in the block.

        Leaving the block closes the response: its connection goes back to the pool if the
        body was read to the end, or (HTTP/1.1) if a rest of at most 64 KiB has arrived or
        arrives within 0.1 s and is drained; else it is closed. The drain never holds the
        block's exit (or a cancellation) longer than those 0.1 s.
        """
        request = self.build_request(
            method,
            url,
            content=content,
            data=data,
            json=json,
            params=params,
            headers=headers,
            timeout=timeout,
        )
        if follow_redirects is USE_CLIENT_DEFAULT:
            follow_redirects = self.follow_redirects
        if follow_redirects:
            response = await self._send_following(request)
        else:
            response = await self.sender.send_request(request)
        try:
            yield response
        except BaseException:
            # The block raised or was cancelled: close at once, never wait for the rest of
            # the body (a shielded drain would hold a cancellation up to the read timeout).
            # Within a cancelled scope only bytes already received are drained; otherwise
            # the connection is closed, not returned.
            await _close_at_once(response)
            raise
        with trio.CancelScope(shield=True):
            await response.aclose()

    async def get(
        self,
        url: URL | str,
        *,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("GET", url, ...)``."""
        return await self.request(
            "GET",
            url,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )

    async def head(
        self,
        url: URL | str,
        *,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("HEAD", url, ...)``."""
        return await self.request(
            "HEAD",
            url,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )

    async def options(
        self,
        url: URL | str,
        *,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("OPTIONS", url, ...)``."""
        return await self.request(
            "OPTIONS",
            url,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )

    async def delete(
        self,
        url: URL | str,
        *,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("DELETE", url, ...)`` (without a body, as httpx's ``delete``)."""
        return await self.request(
            "DELETE",
            url,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )

    async def post(
        self,
        url: URL | str,
        *,
        content: RequestContent | str = None,
        data: RequestData | None = None,
        json: Any = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("POST", url, ...)``."""
        return await self.request(
            "POST",
            url,
            content=content,
            data=data,
            json=json,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )

    async def put(
        self,
        url: URL | str,
        *,
        content: RequestContent | str = None,
        data: RequestData | None = None,
        json: Any = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("PUT", url, ...)``."""
        return await self.request(
            "PUT",
            url,
            content=content,
            data=data,
            json=json,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )

    async def patch(
        self,
        url: URL | str,
        *,
        content: RequestContent | str = None,
        data: RequestData | None = None,
        json: Any = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes = None,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,  # noqa: ASYNC109
    ) -> Response:
        """``request("PATCH", url, ...)``."""
        return await self.request(
            "PATCH",
            url,
            content=content,
            data=data,
            json=json,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
            timeout=timeout,
        )


@asynccontextmanager
async def open_client(
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
    follow_redirects: bool = False,
    max_redirects: int = 20,
    key_extra: Hashable = None,
    pool: RequestSender | Pool[HTTPKey, HTTPConnection] | None = None,
    max_concurrent_streams: int = 100,
    http2_extra_connections: bool = False,
    ping_interval: float | None = None,
    health_check_after: float | None = None,
    proxy: ProxyTypes | None = None,
    pool_options: PoolOptions | None = None,
    **pool_keywords: Unpack[PoolOptionArgs],
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
    connection. The pool options are checked but not used when ``pool`` is given.

    Args:
        verify: True (verify certificates and host names against the system trust store),
            False (don't; never on an untrusted network), the path (str or `os.PathLike`) of
            a CA bundle to trust instead of the system's (a PEM file, or a directory of
            hashed certificates as ``openssl rehash`` makes; ALPN as for True, so HTTP/2
            works with a private CA), or an `ssl.SSLContext` (used as given, never
            modified). Files are read when the client opens: a bad path raises
            `FileNotFoundError` (or `ValueError` for a file without certificates) then.
        cert: A client certificate for TLS: the path of a PEM file holding the certificate
            and its key, ``(certfile, keyfile)`` or ``(certfile, keyfile, password)``. Not
            with an `ssl.SSLContext` (`TypeError`: a given context is never modified; load
            the certificate into it yourself).
        trust_env: With ``verify=True``, the system trust store honours the
            ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` environment variables, read once, when
            the client opens. False: the locations compiled into OpenSSL, whatever the
            environment says. Without ``proxy``, it also takes each request's proxy from the
            environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), read
            once, when the client opens; False ignores those too.
        uds: The path of a Unix domain socket: every request goes over it instead of TCP.
            URLs still give the Host header and the scheme (``https://`` does TLS over the
            socket, checking the URL's host name); pool keys carry the path.
        http1: Speak HTTP/1.1.
        http2: Speak HTTP/2. Over TLS, ALPN offers ``h2`` (and ``http/1.1`` unless
            ``http1=False``) and the server chooses; over plain ``http://``, HTTP/2 is used
            with prior knowledge (h2c) when ``http1=False``, else HTTP/1.1. A given
            `ssl.SSLContext` is not modified: set its ALPN protocols yourself (when it
            negotiates none with an origin, a `UserWarning` says so, once per origin).
        timeouts: ``connect``, ``read``, ``write`` (per operation), and ``pool`` (the whole
            wait for a connection, retries included). A request's ``timeout=`` replaces
            them for that request (see :class:`PoolSender` for what each bounds then).
        retry_stale: See :class:`PoolSender`.
        headers: Default headers for every request.
        follow_redirects: Whether requests follow redirects unless they say otherwise
            (``follow_redirects=`` of each method); see :meth:`Client.request`.
        max_redirects: How many redirects one request follows at most; one more raises
            :class:`~trio_connpool.TooManyRedirects`.
        key_extra: Added to every pool key (e.g. a user agent or tenant).
        pool: See above.
        max_concurrent_streams: Our cap on the streams of one HTTP/2 connection.
        http2_extra_connections: When every stream of every HTTP/2 connection to an origin
            is busy, open another connection (up to ``max_connections_per_key``) instead of
            waiting for a stream. By default an HTTP/2 connection weighs as much as
            ``max_connections_per_key`` (against ``max_connections`` it counts as one
            connection, like any other), so each origin gets one multiplexed connection;
            True makes it weigh 1. With ``max_connections_per_key=None`` it always weighs 1.
        ping_interval: Keep-alive PING on an idle HTTP/2 connection after this many seconds
            without traffic; no answer within the read timeout closes it. None: no pings.
        health_check_after: PING an HTTP/2 connection that was quiet this many seconds
            before using it (see :class:`PoolSender`). None: never.
        proxy: Send every request through this proxy: a URL or a :class:`Proxy`.
            ``http://[user:pass@]host:port`` forwards ``http://`` requests (one pooled
            connection to the proxy serves every origin) and tunnels ``https://`` requests
            through ``CONNECT`` (TLS to the origin inside, HTTP/2 too); ``https://`` reaches
            the proxy itself over TLS (verified as ``verify`` says, unless the `Proxy` has
            an ``ssl_context``); ``socks5://`` and ``socks5h://`` (the proxy resolves names)
            tunnel to each origin and need the ``socks`` extra. Credentials go to the proxy
            only, as Basic ``Proxy-Authorization``. Its failures raise
            :class:`~trio_connpool.ProxyError`. Given, it wins over the environment.
        pool_options: The options of the client's own pool, a
            :class:`~trio_connpool.PoolOptions`, used as it is. Without it the client's
            defaults apply, which differ from the pool's: ``CLIENT_POOL_OPTIONS``, that is
            ``PoolOptions(max_connections_per_key=10, idle_timeout=5.0)`` (10 connections
            per origin and TLS settings, idle keep-alive connections kept 5 s). Its
            ``acquire_timeout`` must be None: requests wait for a connection at most
            ``timeouts.pool``.
        **pool_keywords: The same options as keywords, each changing the client's defaults:
            ``max_connections`` (the global limit), ``max_connections_per_key``,
            ``release_policy``, ``idle_timeout``, ``max_lifetime``, ``instruments`` (hooks
            for the client's own pool, a :class:`~trio_connpool.LoggingInstrument` say), and
            the rest of :class:`~trio_connpool.PoolOptions`. Not with ``pool_options``.

    Raises:
        TrioRequiredError: Not entered in a trio task (from asyncio, say): the client runs
            under trio only.
        ValueError, TypeError: For invalid options, at once (and for ``pool_options``
            together with pool keywords). `~trio_connpool.InvalidURL` (a ValueError) for a
            malformed proxy URL.
        ImportError: A SOCKS ``proxy`` without python-socks installed (the ``socks``
            extra).
    """
    require_trio("open_client()")
    _check_protocols(http1, http2)
    if not isinstance(timeouts, Timeouts):
        raise TypeError("timeouts must be a trio_connpool.http.Timeouts")
    _check_redirects(follow_redirects, max_redirects)
    if not isinstance(trust_env, bool):
        raise TypeError(f"trust_env must be a bool, not {trust_env!r}")
    environment = None
    if proxy is not None:
        proxy = as_proxy(proxy)  # a bad URL raises here, before anything opens
        if proxy.is_socks:
            require_socks(proxy)
    elif trust_env:
        from ._proxyenv import ProxyEnv  # read when the client opens

        environment = ProxyEnv.from_environ(os.environ)
    # Files are read (and paths checked) here, before a pool opens: a bad one fails plainly.
    options: dict[str, Any] = {
        "verify": _shared_context(
            verify, cert=cert, http1=http1, http2=http2, trust_env=trust_env
        ),
        "uds": _uds_path(uds),
        "acquire_timeout": timeouts.pool,
        "retry_stale": retry_stale,
        "key_extra": key_extra,
        "http1": http1,
        "http2": http2,
        "health_check_after": health_check_after,
        "proxy": proxy,
        "proxy_env": environment,
    }
    chosen = resolve_options(
        pool_options, pool_keywords, name="pool_options", defaults=CLIENT_POOL_OPTIONS
    )
    if chosen.acquire_timeout is not None:
        raise TypeError(
            "open_client waits for a connection at most timeouts.pool: "
            "leave the pool's acquire_timeout None"
        )
    if pool is None:
        weight = 1
        per_key = chosen.max_connections_per_key
        if not http2_extra_connections and per_key is not None:
            weight = per_key
        connector = HTTPConnector(
            timeouts=timeouts,
            max_concurrent_streams=max_concurrent_streams,
            http2_weight=weight,
            ping_interval=ping_interval,
            ping_timeout=5.0 if timeouts.read is None else timeouts.read,
        )
        # The pool takes the connector's own reserve() unless the options say otherwise.
        async with open_pool(connector, options=chosen) as owned:
            yield Client(
                PoolSender(owned, **options),
                headers=headers,
                follow_redirects=follow_redirects,
                max_redirects=max_redirects,
            )
        return
    if isinstance(pool, Pool):
        given: RequestSender = PoolSender(pool, **options)
    elif isinstance(pool, RequestSender):
        if proxy is not None:
            raise TypeError("proxy= needs a pool: a RequestSender given as pool= sends as it is")
        given = pool
    else:
        raise TypeError(f"pool must be a Pool, a RequestSender or None, not {pool!r}")
    await trio.lowlevel.checkpoint()
    yield Client(
        given, headers=headers, follow_redirects=follow_redirects, max_redirects=max_redirects
    )
