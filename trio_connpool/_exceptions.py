"""The one exception hierarchy of trio_connpool.

Every failure the library reports is a :class:`PoolError`. Each carries the pool key it
happened on (``.key``, ``None`` where no key applies); the HTTP errors also carry the URL
(``.url``). Errors that wrap a lower-level failure are raised ``from`` it, so the original
(an ``OSError``, an ``ssl.SSLError``, an HTTP/1.1 or h2 protocol error) stays in ``__cause__``.

A message says what failed, where, and why, in that order: ``str(error)`` is the message
given when it was raised, then the URL (or the key's origin, or the key) unless the message
names it already, then the root cause in words, found by walking ``__cause__`` and
``__context__`` down to the innermost error (through exception groups, such as the one
`trio.open_tcp_stream` raises with an error per address tried) and said once::

    cannot connect to https://127.0.0.1:23443: certificate verify failed: unable to get
    local issuer certificate

`TrioRequiredError` stands apart from the hierarchy: it is a bug in the calling program (the
library used outside a trio run), not a failure of the network.

::

    PoolError
    ├── PoolClosed            the pool was closed (or is closing) while you used it
    ├── PoolTimeout           no connection within the acquire timeout
    ├── TooManyWaiters        the waiter queue for a key is full
    ├── TooManyRedirects      a request met more redirects than its client follows
    ├── StreamConsumed        a redirect asks for a streamed body again (also a RuntimeError)
    ├── ConnectError          a connect failed (refused, DNS, TLS, the connector raised)
    │   └── ConnectTimeout
    ├── HTTPStatusError       raise_for_status() found a status other than 2xx
    └── TransportError        an exchange on an open connection failed
        ├── ReadTimeout
        ├── WriteTimeout
        ├── RemoteProtocolError   the peer broke the protocol (truncated body, garbage)
        │   ├── ServerDisconnected    the server closed before sending any byte of a response
        │   └── DecodingError         a gzip or deflate body is corrupt or truncated
        └── LocalProtocolError    we were asked to send something illegal
            ├── InvalidURL        (also a ValueError)
            └── InvalidHeader     (also a ValueError)
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from typing import TYPE_CHECKING, cast

if sys.version_info < (3, 11):  # pragma: no cover - exercised on Python 3.10 only
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import Hashable

    from .http._models import Request, Response

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "DecodingError",
    "HTTPStatusError",
    "InvalidHeader",
    "InvalidURL",
    "LocalProtocolError",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ProxyError",
    "ReadTimeout",
    "RemoteProtocolError",
    "ServerDisconnected",
    "StreamConsumed",
    "TooManyRedirects",
    "TooManyWaiters",
    "TransportError",
    "TrioRequiredError",
    "WriteTimeout",
    "reason_of",
    "words_for",
]

# How deep a chain of causes is followed (chains are short; a cycle must not hang us).
_MAX_DEPTH = 32
# How many distinct reasons a message says (an exception group may hold thousands of errors).
_MAX_REASONS = 8


def _words(exc: BaseException) -> tuple[str, str] | None:
    """What ``exc`` itself says, as (the words to show, the words to look for in a message
    that may say them already); None when it says nothing of its own."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        words = f"certificate verify failed: {exc.verify_message}"
        return words, exc.verify_message
    if isinstance(exc, ssl.SSLError):
        # "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)": keep the words.
        text = str(exc.strerror or exc.reason or exc)
        text = text.rpartition("] ")[2].partition(" (_ssl.c:")[0].strip() or text
        return f"TLS error: {text}", text
    if isinstance(exc, socket.gaierror) and exc.strerror:
        # The resolver's own words: its codes are not the operating system's errno values.
        return exc.strerror, exc.strerror
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        # "Connection refused", not trio's "Error connecting to ('127.0.0.1', 1): ...".
        text = os.strerror(exc.errno)
        return text, text
    if isinstance(exc, PoolError):
        text = exc.message
        return (text, text) if text else None
    text = str(exc)
    if not text:
        return None
    if isinstance(exc, OSError):
        return text, text
    return f"{type(exc).__name__}: {text}", text


def _reasons(exc: BaseException, seen: set[int], depth: int) -> list[tuple[str, str]]:
    """The words of the innermost errors behind ``exc`` (one per leaf of a group)."""
    if id(exc) in seen or depth > _MAX_DEPTH or not isinstance(exc, Exception):
        # A cancellation (a timeout's trio.Cancelled in __context__), KeyboardInterrupt...:
        # not the reason for anything.
        return []
    seen.add(id(exc))
    if isinstance(exc, BaseExceptionGroup):
        group = cast("BaseExceptionGroup[BaseException]", exc)
        found: list[tuple[str, str]] = []
        for inner in group.exceptions:
            found += _reasons(inner, seen, depth + 1)
        if found:
            return found
    else:
        below = exc.__cause__
        if below is None and not exc.__suppress_context__:
            below = exc.__context__
        if below is not None:
            found = _reasons(below, seen, depth + 1)
            if found:
                return found
    words = _words(exc)
    return [] if words is None else [words]


def reason_of(exc: BaseException, message: str = "") -> str | None:
    """The root cause behind ``exc`` in words, or None if nothing below it says more.

    ``__cause__`` (else ``__context__``) is followed down to the innermost error; an
    exception group contributes each of its leaves. What an error says is its OS error
    text for an ``OSError`` (``Connection refused``, not the errno's number or trio's
    "Error connecting to ..."), the resolver's words for a `socket.gaierror`, ``certificate
    verify failed: ...`` for a certificate error, OpenSSL's words for other TLS errors, and
    ``Type: message`` for anything else. Words that ``message`` already contains (or that
    another leaf said) are left out, so each reason is said once.

    Args:
        exc: The error; its own words count only if nothing below it says anything.
        message: What the caller shows already.

    Returns:
        The reasons joined by ``"; "`` (the first 8, then how many more), or None.
    """
    below = exc.__cause__
    if below is None and not exc.__suppress_context__:
        below = exc.__context__
    if below is None:
        return None
    folded = message.casefold()
    shown: dict[str, None] = {}  # in order; a set's lookups (a list's were quadratic)
    for words, probe in _reasons(below, {id(exc)}, 0):
        if words in shown or (probe and probe.casefold() in folded):
            continue
        shown[words] = None
    return _joined(list(shown)) or None


def _joined(reasons: list[str]) -> str:
    """The reasons joined by ``"; "``, the first `_MAX_REASONS` of them and how many more."""
    if len(reasons) <= _MAX_REASONS:
        return "; ".join(reasons)
    return "; ".join(reasons[:_MAX_REASONS]) + f"; and {len(reasons) - _MAX_REASONS} more"


def words_for(exc: BaseException) -> str:
    """``exc`` in words: its root cause as `reason_of` finds it, counting ``exc`` itself
    (``Connection reset by peer`` for a reset socket); its type name if nothing says more.

    For messages that must carry the reason without a ``__cause__`` (a connection's state,
    told to the requests that meet it later).
    """
    found = dict.fromkeys(words for words, _ in _reasons(exc, set(), 0))
    return _joined(list(found)) or type(exc).__name__


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

    @property
    def message(self) -> str:
        """The message given when the error was raised, without place or cause."""
        args = self.args
        return str(args[0]) if args else ""

    @property
    def reason(self) -> str | None:
        """The root cause in words (see `reason_of`), or None; not repeating the message."""
        return reason_of(self, self.message)

    def _place(self, text: str) -> str | None:
        # The URL where there is one, else the key's origin (an HTTP key), else the key;
        # nothing when the message names it already.
        if self.url is not None:
            return None if self.url in text else f"url={self.url}"
        key = self.key
        if key is None:
            return None
        origin = getattr(key, "origin", None)
        kind = type(key)
        if origin is not None:
            name = str(origin)
        elif kind.__module__ != "builtins" and kind.__str__ is not object.__str__:
            name = str(key)  # a key that prints itself readably (an HTTP origin)
        else:
            name = f"key={key!r}"
        return None if name in text else name

    def __str__(self) -> str:
        # Built when shown, never when raised: an error that is caught costs nothing here.
        text = self.message
        place = self._place(text)
        if place is not None:
            text = f"{text} ({place})" if text else place
        reason = reason_of(self, text)
        if reason is not None:
            text = f"{text}: {reason}" if text else reason
        return text


class PoolClosed(PoolError):
    """The pool is closed or closing: no connection can be leased from it any more."""


class PoolTimeout(PoolError):
    """No connection became available within the acquire timeout."""


class TooManyWaiters(PoolError):
    """The queue of tasks waiting for a connection to this key is full (``max_waiters``)."""


class ConnectError(PoolError):
    """Opening a connection failed. The underlying error is in ``__cause__``, and the
    message ends with its words (``Connection refused``, ``Name or service not known``,
    ``certificate verify failed: ...``)."""


class ConnectTimeout(ConnectError):
    """Opening a connection took longer than the connect timeout."""


class ProxyError(ConnectError):
    """A proxy refused or failed to carry a connection: nothing reached the origin.

    Attributes:
        status_code: The status the proxy answered (407 when it wants credentials, 403 when
            it forbids the destination, 502 when it could not reach it), or ``None`` when it
            gave no HTTP answer (unreachable, closed, a SOCKS refusal, an invalid answer).
    """

    def __init__(
        self,
        message: str = "",
        *,
        status_code: int | None = None,
        key: Hashable | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message, key=key, url=url)
        self.status_code = status_code


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


class TrioRequiredError(RuntimeError):
    """trio_connpool was used outside a trio run: from asyncio, say, or another event loop.

    The pool and the client (and so the httpx transport) run under trio only: start the
    program with ``trio.run(main)``. Raised by the entry points (`open_client`, `open_pool`,
    `create_pool`), at once, instead of an error from deep inside.
    """


class DecodingError(RemoteProtocolError):
    """A response body could not be decoded: its ``Content-Encoding`` (gzip, deflate) data is
    corrupt or truncated.

    The response is closed when this is raised; reading stops without waiting for the rest
    of the body.
    """


class HTTPStatusError(PoolError):
    """`Response.raise_for_status` found a status other than 2xx.

    Attributes:
        request: The request.
        response: The response (its body may still be unread; the client's
            ``request()`` has read it).
    """

    def __init__(self, message: str, *, request: Request, response: Response) -> None:
        super().__init__(message, key=request.url.origin, url=str(request.url))
        self.request = request
        self.response = response

    def __str__(self) -> str:
        # The message names the URL already, as httpx's does.
        return Exception.__str__(self)


class TooManyRedirects(PoolError):
    """A request that follows redirects met more of them than its client's ``max_redirects``.

    The message names the limit and the URL of the last redirect response; ``url`` is that
    URL too.
    """


class StreamConsumed(PoolError, RuntimeError):
    """A redirect (307 or 308) asks for the request's body again, but it was streamed (an
    async iterable) and cannot be sent twice: pass the body as ``bytes`` to follow such
    redirects. As httpx's exception of this name, it is also a `RuntimeError`."""
