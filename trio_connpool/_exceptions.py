"""The one exception hierarchy of trio_connpool.

Every failure the library reports is a :class:`PoolError`. Each carries the pool key it
happened on (``.key``, ``None`` where no key applies); the HTTP errors also carry the URL
(``.url``). Errors that wrap a lower-level failure are raised ``from`` it, so the original
(an ``OSError``, an ``ssl.SSLError``, an HTTP/1.1 or h2 protocol error) stays in ``__cause__``.

::

    PoolError
    ├── PoolClosed            the pool was closed (or is closing) while you used it
    ├── PoolTimeout           no connection within the acquire timeout
    ├── TooManyWaiters        the waiter queue for a key is full
    ├── TooManyRedirects      a request met more redirects than its client follows
    ├── StreamConsumed        a redirect asks for a streamed body again (also a RuntimeError)
    ├── ConnectError          a connect failed (refused, DNS, TLS, the connector raised)
    │   └── ConnectTimeout
    └── TransportError        an exchange on an open connection failed
        ├── ReadTimeout
        ├── WriteTimeout
        ├── RemoteProtocolError   the peer broke the protocol (truncated body, garbage)
        │   └── ServerDisconnected    the server closed before sending any byte of a response
        └── LocalProtocolError    we were asked to send something illegal
            ├── InvalidURL        (also a ValueError)
            └── InvalidHeader     (also a ValueError)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Hashable

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "InvalidHeader",
    "InvalidURL",
    "LocalProtocolError",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "ServerDisconnected",
    "StreamConsumed",
    "TooManyRedirects",
    "TooManyWaiters",
    "TransportError",
    "WriteTimeout",
]


class PoolError(Exception):
    """Base class of every error trio_connpool raises.

    Attributes:
        key: The pool key the error happened on, or ``None``.
        url: The URL of the request, for HTTP errors; otherwise ``None``.
    """

    def __init__(
        self, message: str = "", *, key: Hashable | None = None, url: str | None = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.url = url

    def __str__(self) -> str:
        text = super().__str__()
        where: list[str] = []
        if self.url is not None:
            where.append(f"url={self.url!r}")
        elif self.key is not None:
            where.append(f"key={self.key!r}")
        return f"{text} ({', '.join(where)})" if where else text


class PoolClosed(PoolError):
    """The pool is closed or closing: no connection can be leased from it any more."""


class PoolTimeout(PoolError):
    """No connection became available within the acquire timeout."""


class TooManyWaiters(PoolError):
    """The queue of tasks waiting for a connection to this key is full (``max_waiters``)."""


class ConnectError(PoolError):
    """Opening a connection failed. The underlying error is in ``__cause__``."""


class ConnectTimeout(ConnectError):
    """Opening a connection took longer than the connect timeout."""


class TransportError(PoolError):
    """An exchange on an open connection failed.

    Attributes:
        retryable: True when the server certainly did not process the request (it was never
            sent, the server refused its HTTP/2 stream, or it was above a GOAWAY's last
            stream id): it may be sent again, whatever its method.
    """

    def __init__(
        self,
        message: str = "",
        *,
        key: Hashable | None = None,
        url: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, key=key, url=url)
        self.retryable = retryable


class ReadTimeout(TransportError):
    """The peer sent nothing within the read timeout."""


class WriteTimeout(TransportError):
    """The peer took nothing within the write timeout."""


class RemoteProtocolError(TransportError):
    """The peer broke the protocol: garbage, a truncated body, a reset mid-message."""


class ServerDisconnected(RemoteProtocolError):
    """The server closed the connection before sending any byte of a response.

    On a reused keep-alive connection this usually means the server timed the connection out
    just as the request was sent, so the request was not processed and may be retried.
    """


class LocalProtocolError(TransportError):
    """We were asked to send something the protocol does not allow.

    Nothing was sent, except in one case that shows only while sending: a streamed request
    body (an async iterable) that turns out longer or shorter than the Content-Length given
    for it. The request head and the body up to that point may have gone out then, never the
    complete request, and the connection is closed.
    """


class InvalidURL(LocalProtocolError, ValueError):
    """A URL is malformed, has an unsupported scheme or an out-of-range port."""


class InvalidHeader(LocalProtocolError, ValueError):
    """A header name or value is malformed (CR, LF or NUL in it, or an empty name)."""


class TooManyRedirects(PoolError):
    """A request that follows redirects met more of them than its client's ``max_redirects``.

    The message names the limit and the URL of the last redirect response; ``url`` is that
    URL too.
    """


class StreamConsumed(PoolError, RuntimeError):
    """A redirect (307 or 308) asks for the request's body again, but it was streamed (an
    async iterable) and cannot be sent twice: pass the body as ``bytes`` to follow such
    redirects. As httpx's exception of this name, it is also a `RuntimeError`."""
