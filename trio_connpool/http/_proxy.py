"""Proxies: forwarding through an HTTP proxy, tunnels through CONNECT, and SOCKS5.

An HTTP (or HTTPS) proxy carries a request in one of two ways. A plain ``http://`` request is
*forwarded*: it is sent to the proxy in absolute form (the request target is the whole URL),
so one connection to the proxy serves every ``http://`` origin and the pool key is the proxy
itself. An ``https://`` request goes through a *tunnel*: ``CONNECT host:port`` asks the proxy
for a byte stream to the origin, and TLS to the origin runs inside it, ALPN included (so
HTTP/2 works there); the pool key is then the proxy and the origin together. The proxy sees
the plain request in the first case and only the tunnel's encrypted bytes in the second.

Credentials in the proxy URL (``http://user:pass@host:port``) are sent as Basic
``Proxy-Authorization`` to the proxy only: on CONNECT, and on forwarded requests (the proxy
removes the field before passing a request on). Nothing of them goes to an origin through a
tunnel.

An ``https://`` proxy is reached over TLS first, verified with the `Proxy`'s own
``ssl_context`` if it has one, else with the client's ``verify`` setting; forwarding and
CONNECT then run inside that TLS (TLS in TLS for a tunnel).

SOCKS5 (``socks5://`` resolves the origin's name here, ``socks5h://`` lets the proxy resolve
it) is a tunnel per origin, opened by python-socks, an optional dependency: the ``socks``
extra. It is the one maintained SOCKS client with a trio backend, its own typed errors and
username/password authentication, so this module needs no SOCKS code of its own.

The answer to CONNECT is parsed by the library's own HTTP/1.1 core (`H1Client`), with its
bound on the head's size and its linear-time parser; the whole proxy handshake runs under the
connect timeout, and the half-open stream is closed on every failure.
"""

from __future__ import annotations

import base64
import importlib
import math
import socket
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, final
from urllib.parse import unquote, urlsplit

import trio

from .._exceptions import ConnectError, ConnectTimeout, InvalidURL, ProxyError
from ._connect import open_stream, start_tls
from ._h1 import H1Client, RemoteViolation
from ._http11 import HTTP11Connection
from ._models import Origin, Timeouts, format_authority

if TYPE_CHECKING:
    from ._models import Request, Response

__all__ = ["ForwardingConnection", "Proxy", "ProxyTypes", "open_proxied_stream"]

#: The proxy URL schemes, and the port each one uses when the URL gives none.
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}

#: The largest answer head to CONNECT we keep while waiting for its end.
_MAX_CONNECT_HEAD: Final = 64 * 1024

_REASONS: Final = {
    403: "the proxy forbids this destination",
    407: "proxy credentials are missing or wrong",
}


@final
class Proxy:
    """A proxy to send requests through (httpx's ``Proxy``).

    Args:
        url: ``http://[user:pass@]host[:port]``, ``https://...`` (TLS to the proxy),
            ``socks5://...`` (the origin's name is resolved here) or ``socks5h://...`` (the
            proxy resolves it). User and password are percent-decoded.
        auth: ``(username, password)`` for the proxy, instead of credentials in the URL.
        headers: Extra fields for the proxy (HTTP proxies only): sent with CONNECT and with
            forwarded requests.
        ssl_context: Verifies an ``https://`` proxy's certificate. None: the client's
            ``verify`` setting decides.

    Equal proxies (same URL, credentials, headers and TLS context, the latter by identity)
    share pooled connections; the repr shows no credentials.

    Raises:
        InvalidURL: The URL has another scheme, no host, a bad port, a path or a query.
        TypeError: An argument of the wrong type.
    """

    __slots__ = (
        "_hash",
        "_identity",
        "authorization",
        "headers",
        "host",
        "origin",
        "password",
        "port",
        "scheme",
        "ssl_context",
        "username",
    )

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(url, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"a proxy URL must be a str, not {type(url).__name__}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError("ssl_context must be an ssl.SSLContext or None")
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
            raise InvalidURL(f"invalid character in proxy URL {_redact(url)!r}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidURL(f"invalid proxy URL {_redact(url)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise InvalidURL(
                f"unsupported proxy scheme {scheme!r} in {_redact(url)!r}: "
                "use http://, https://, socks5:// or socks5h://"
            )
        host = parts.hostname
        if not host:
            raise InvalidURL(f"proxy URL has no host: {_redact(url)!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidURL(f"a proxy URL has no path or query: {_redact(url)!r}")
        if port is None:
            port = _DEFAULT_PORTS[scheme]
        if port == 0:
            raise InvalidURL(f"proxy URL has port 0: {_redact(url)!r}")
        username = password = None
        if parts.username is not None:
            username = unquote(parts.username)
            password = unquote(parts.password or "")
        if auth is not None:
            if (
                not isinstance(auth, tuple)  # pyright: ignore[reportUnnecessaryIsInstance]
                or len(auth) != 2
                or not all(isinstance(part, str) for part in auth)  # pyright: ignore[reportUnnecessaryIsInstance]
            ):
                raise TypeError("auth must be a (username, password) tuple of str")
            username, password = auth
        fields: list[tuple[bytes, bytes]] = []
        for name, value in (headers or {}).items():
            if not isinstance(name, str) or not isinstance(value, str):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise TypeError("proxy headers must map str to str")
            encoded = (name.encode("ascii"), value.encode("latin-1"))
            if any(c in part for part in encoded for c in b"\r\n\x00") or not name:
                raise ValueError(f"invalid proxy header {name!r}")
            fields.append(encoded)
        self.scheme: str = scheme
        self.host: str = host
        self.port: int = port
        self.username: str | None = username
        self.password: str | None = password
        self.headers: tuple[tuple[bytes, bytes], ...] = tuple(fields)
        self.ssl_context: ssl.SSLContext | None = ssl_context
        #: The Proxy-Authorization value (Basic), or None without credentials.
        self.authorization: bytes | None = None
        if username is not None:
            token = f"{username}:{password}".encode()
            self.authorization = b"Basic " + base64.b64encode(token)
        #: Where the connection goes: http or https (for TLS to the proxy) and its address.
        self.origin: Origin = Origin("https" if scheme == "https" else "http", host, port)
        self._identity = (scheme, host, port, username, password, self.headers)
        self._hash = hash((self._identity, id(ssl_context)))

    @property
    def url(self) -> str:
        """The proxy's URL without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def is_socks(self) -> bool:
        """Whether this is a SOCKS5 proxy (a tunnel per origin, never forwarding)."""
        return self.scheme.startswith("socks")

    def with_ssl_context(self, ssl_context: ssl.SSLContext) -> Proxy:
        """This proxy with ``ssl_context`` for its TLS (itself when it has one already)."""
        if self.ssl_context is not None:
            return self
        copy = Proxy.__new__(Proxy)
        for name in Proxy.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.ssl_context = ssl_context
        copy._hash = hash((self._identity, id(ssl_context)))
        return copy

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Proxy):
            return NotImplemented
        return self.ssl_context is other.ssl_context and self._identity == other._identity

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Proxy({self.url!r})"

    def __str__(self) -> str:
        return self.url


#: What ``proxy=`` accepts: a URL or a `Proxy`.
ProxyTypes = str | Proxy


def as_proxy(proxy: ProxyTypes) -> Proxy:
    """``proxy`` as a `Proxy`, checked."""
    if isinstance(proxy, Proxy):
        return proxy
    if isinstance(proxy, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        return Proxy(proxy)
    raise TypeError(f"proxy must be a URL string or a Proxy, not {type(proxy).__name__}")


def _redact(url: str) -> str:
    """``url`` without the password of its userinfo (for error messages)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostport}{slash}{tail}"


def _connect_target(origin: Origin) -> bytes:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return f"{host}:{origin.port}".encode("ascii")


def absolute_target(request: Request) -> bytes:
    """The absolute-form request target of a forwarded request (the whole URL)."""
    url = request.url
    authority = format_authority(url.host, url.port, url.scheme)
    return f"{url.scheme}://{authority}".encode("ascii") + url.target


async def _connect_tunnel(stream: trio.abc.Stream, proxy: Proxy, origin: Origin) -> None:
    """Ask the HTTP proxy at the other end of ``stream`` for a tunnel to ``origin``."""
    h1 = H1Client(max_head_size=_MAX_CONNECT_HEAD)
    h1.allow_tunnel = True
    target = _connect_target(origin)
    fields = [(b"Host", target)]
    if proxy.authorization is not None:
        fields.append((b"Proxy-Authorization", proxy.authorization))
    fields += proxy.headers
    head = h1.send_request(b"CONNECT", target, fields, (0, False))
    await stream.send_all(head + h1.end_request())
    try:
        while (answer := h1.receive_head()) is None:
            h1.receive_data(bytes(await stream.receive_some(_MAX_CONNECT_HEAD)))
    except RemoteViolation as exc:
        raise ProxyError(
            f"the proxy {proxy} gave no valid answer to CONNECT {target.decode()}: {exc}",
            key=origin,
        ) from exc
    status = answer.status_code
    if not 200 <= status < 300:
        reason = answer.reason.decode("latin-1", "replace")
        why = _REASONS.get(status, "the proxy refused the tunnel")
        raise ProxyError(
            f"{why}: {proxy} answered CONNECT {target.decode()} with {status} {reason}".rstrip(),
            status_code=status,
            key=origin,
        )
    if h1.trailing_data:
        # The origin speaks TLS, where the client speaks first: bytes already here are not
        # the origin's, and nothing may be read past the tunnel's start.
        raise ProxyError(f"the proxy {proxy} sent data after its answer to CONNECT", key=origin)


def require_socks(proxy: Proxy) -> None:
    """Check that python-socks can be imported for the SOCKS ``proxy``.

    Raises:
        ImportError: It cannot; the message names the ``socks`` extra.
    """
    try:
        importlib.import_module("python_socks.async_.trio")
    except ImportError as exc:
        raise ImportError(
            f"{proxy.scheme}:// proxies need python-socks: pip install 'trio-connpool[socks]'"
        ) from exc


async def _open_socks(proxy: Proxy, origin: Origin) -> trio.SocketStream:
    try:
        from python_socks import ProxyError as SocksError, ProxyType
        from python_socks.async_.trio import Proxy as SocksProxy
    except ImportError as exc:
        raise ProxyError(
            f"{proxy.scheme}:// proxies need python-socks: pip install 'trio-connpool[socks]'",
            key=origin,
        ) from exc
    socks = SocksProxy(
        ProxyType.SOCKS5,
        proxy.host,
        proxy.port,
        username=proxy.username,
        password=proxy.password,
        rdns=proxy.scheme == "socks5h",
    )
    try:
        # The caller's scope bounds the time; python-socks's own default would cut it at 60 s.
        sock = await socks.connect(origin.host, origin.port, timeout=math.inf)
    except SocksError as exc:
        raise ProxyError(
            f"the SOCKS proxy {proxy} refused the connection to {origin}: {exc}", key=origin
        ) from exc
    except OSError as exc:  # python-socks's ProxyConnectionError is one
        raise ProxyError(f"cannot connect to the proxy {proxy}", key=origin) from exc
    stream = trio.SocketStream(sock)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


async def open_proxied_stream(
    proxy: Proxy,
    origin: Origin,
    *,
    forward: bool,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float | None,
) -> tuple[trio.abc.Stream, str | None]:
    """Open a stream through ``proxy``: to the proxy itself for forwarding, else a tunnel to
    ``origin`` (with TLS to it over the tunnel for https, ALPN included).

    Returns:
        The stream, and the protocol ALPN selected with the origin (None for forwarding and
        plain tunnels).

    Raises:
        ProxyError: The proxy could not be reached or refused (its status, if it answered).
        ConnectTimeout: The whole connect, proxy handshake included, took longer than
            ``connect_timeout``.
        ConnectError: TLS with the origin failed through the tunnel.
    """
    timeout = math.inf if connect_timeout is None else connect_timeout
    stream: trio.abc.Stream | None = None
    tunnelled = False  # past the proxy: a failure from here on is the origin's
    try:
        with trio.fail_after(timeout):
            if proxy.is_socks:
                stream = await _open_socks(proxy, origin)
            else:
                try:
                    stream, alpn = await open_stream(
                        proxy.origin, ssl_context=proxy.ssl_context, connect_timeout=None
                    )
                except ConnectError as exc:
                    raise ProxyError(
                        f"cannot connect to the proxy {proxy}", key=origin
                    ) from exc.__cause__
                if alpn == "h2":
                    # A caller's context offered h2 to the proxy, which is spoken to in
                    # HTTP/1.1: give the Proxy an ssl_context without h2.
                    raise ProxyError(
                        f"the proxy {proxy} chose h2 in ALPN; a proxy is spoken to in "
                        "HTTP/1.1 (give the Proxy an ssl_context that offers http/1.1 only)",
                        key=origin,
                    )
                if forward:
                    return stream, None
                await _connect_tunnel(stream, proxy, origin)
            tunnelled = True
            if not origin.is_secure:
                return stream, None
            stream = tls = start_tls(stream, origin, ssl_context)
            await tls.do_handshake()
            return tls, tls.selected_alpn_protocol()
    except BaseException as exc:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectTimeout(
                f"connecting to {origin} through the proxy {proxy} took longer than "
                f"{connect_timeout} s",
                key=origin,
            ) from exc
        if isinstance(exc, (OSError, trio.BrokenResourceError, ssl.SSLError)):
            if tunnelled:
                raise ConnectError(
                    f"cannot connect to {origin} through the proxy {proxy}", key=origin
                ) from exc
            raise ProxyError(
                f"the proxy {proxy} closed or broke the connection during its handshake",
                key=origin,
            ) from exc
        raise


class _AbsoluteFormH1(H1Client):
    """The HTTP/1.1 core with the request target replaced by the whole URL."""

    __slots__ = ("target",)

    def __init__(self, *, max_head_size: int) -> None:
        super().__init__(max_head_size=max_head_size)
        self.target = b""

    def send_request(
        self,
        method: bytes,
        target: bytes,
        fields: list[tuple[bytes, bytes]],
        framing: tuple[int | None, bool] | None = None,
    ) -> bytes:
        return super().send_request(method, self.target, fields, framing)


class ForwardingConnection(HTTP11Connection):
    """An HTTP/1.1 connection to an HTTP proxy that forwards ``http://`` requests: each is sent
    in absolute form with its own origin's ``Host``, plus the proxy's credentials and
    headers. One such connection serves every ``http://`` origin.

    Args:
        stream: The open stream to the proxy (TLS for an ``https://`` proxy).
        proxy: The proxy.
        timeouts: As for `HTTP11Connection`.
        max_incomplete_event_size: As for `HTTP11Connection`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        proxy: Proxy,
        *,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 (a frozen value)
        max_incomplete_event_size: int = 64 * 1024,
    ) -> None:
        super().__init__(
            stream,
            proxy.origin,
            timeouts=timeouts,
            max_incomplete_event_size=max_incomplete_event_size,
        )
        self._forward_h1 = _AbsoluteFormH1(max_head_size=max_incomplete_event_size)
        self._h1 = self._forward_h1
        fields = list(proxy.headers)
        if proxy.authorization is not None:
            fields.insert(0, (b"Proxy-Authorization", proxy.authorization))
        self._proxy_fields = fields
        self._proxy = proxy

    async def send_request(self, request: Request) -> Response:
        """Send ``request`` to the proxy in absolute form; see `HTTP11Connection`.

        Raises:
            ProxyError: The proxy answered 407 (its credentials are missing or wrong): the
                request did not reach the origin. The connection stays usable.
        """
        response = await super().send_request(request)
        if response.status_code == 407:
            await response.aclose()
            raise ProxyError(
                f"proxy credentials are missing or wrong: {self._proxy} answered "
                f"{request.method} {request.url} with 407 {response.reason_phrase}".rstrip(),
                status_code=407,
                key=self._proxy.origin,
                url=str(request.url),
            )
        return response

    def _request_headers(
        self, request: Request
    ) -> tuple[list[tuple[bytes, bytes]], tuple[int | None, bool] | None]:
        url = request.url
        self._forward_h1.target = absolute_target(request)
        # Host names the request's origin, not the proxy (the connection's own origin).
        self._host = format_authority(url.host, url.port, url.scheme).encode("ascii")
        fields, framing = super()._request_headers(request)
        return fields + self._proxy_fields, framing
