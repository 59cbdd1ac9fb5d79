"""Opening transports: TCP with happy eyeballs, then TLS with ALPN.

`open_stream` is the one place where sockets come into being, so it owns two promises: a
connect is bounded by the connect timeout as a whole (DNS, TCP and the TLS handshake
together), and a half-open stream is closed on every failure or cancellation, never left to
the garbage collector. Every failure comes out as `ConnectError` (or `ConnectTimeout`),
raised ``from`` the original error so a certificate problem stays visible in the chain, and
its message ends with the root cause in words (``Connection refused``, ``certificate verify
failed: ...``), found in that chain when the message is shown.

TLS verifies certificates and host names by default (`create_ssl_context`), and a caller's
`ssl.SSLContext` is used as given, never modified: contexts are shared objects, and changing
one under its owner would be a security bug waiting to happen.
"""

from __future__ import annotations

import math
import socket
import ssl
from typing import TYPE_CHECKING

import trio

from .._exceptions import ConnectError, ConnectTimeout

if TYPE_CHECKING:
    from ._models import Origin

__all__ = ["create_ssl_context", "open_stream"]


def create_ssl_context(
    verify: bool | ssl.SSLContext = True, *, http1: bool = True, http2: bool = False
) -> ssl.SSLContext:
    """Return the `ssl.SSLContext` to open HTTPS connections with.

    Args:
        verify: ``True`` (the default) verifies the server's certificate against the system's
            trust store and checks the host name. ``False`` turns both off (for tests and
            trusted networks only). An `ssl.SSLContext` is returned as is, never modified:
            its ALPN protocols are then whatever you set on it (none unless you called
            ``set_alpn_protocols``, which means HTTP/1.1).
        http1: Offer ``http/1.1`` in ALPN (ignored for a given context).
        http2: Offer ``h2`` in ALPN, before ``http/1.1`` (ignored for a given context).

    Returns:
        The context.

    Raises:
        TypeError: If ``verify`` is neither a bool nor an `ssl.SSLContext`.
        ValueError: If neither protocol is offered.
    """
    if not (http1 or http2):
        raise ValueError("offer at least one of http1 and http2")
    if isinstance(verify, ssl.SSLContext):
        return verify
    if not isinstance(verify, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"verify must be a bool or an ssl.SSLContext, not {verify!r}")
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"] * http2 + ["http/1.1"] * http1)
    return context


async def open_stream(
    origin: Origin,
    *,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float | None,
) -> tuple[trio.abc.Stream, str | None]:
    """Open a connection to ``origin``: TCP, plus TLS for ``https``.

    TCP uses `trio.open_tcp_stream` (happy eyeballs over every address the name resolves
    to) with ``TCP_NODELAY`` set. For ``https`` the TLS handshake is done here, with SNI and
    host name checking against ``origin.host``.

    Args:
        origin: Where to connect.
        ssl_context: The TLS context for ``https``; ``None`` means `create_ssl_context()`
            (verified, HTTP/1.1 only). Ignored for ``http``.
        connect_timeout: Bound on the whole connect (DNS, TCP, TLS), or ``None``.

    Returns:
        The open stream, and the protocol ALPN selected (``"h2"``, ``"http/1.1"``), or
        ``None`` for plain TCP or when the server did not take part in ALPN.

    Raises:
        ConnectTimeout: If the connect did not finish within ``connect_timeout``.
        ConnectError: If it failed (DNS, refused, unreachable, TLS or certificate error);
            the original error is the ``__cause__``.
    """
    stream: trio.abc.Stream | None = None
    timeout = math.inf if connect_timeout is None else connect_timeout
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
            stream = tcp
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            if not origin.is_secure:
                return tcp, None
            tls = trio.SSLStream(
                tcp,
                ssl_context if ssl_context is not None else create_ssl_context(),
                server_hostname=origin.host,
                https_compatible=True,
            )
            stream = tls
            await tls.do_handshake()
            return tls, tls.selected_alpn_protocol()
    except BaseException as exc:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectTimeout(
                f"connecting to {origin} took longer than {connect_timeout} s", key=origin
            ) from exc
        if isinstance(exc, (OSError, trio.BrokenResourceError, ssl.SSLError)):
            # No "{exc}" here: the words come from the chain when the error is shown (trio's
            # "all attempts to connect ... failed" holds them one exception group further).
            raise ConnectError(f"cannot connect to {origin}", key=origin) from exc
        raise
