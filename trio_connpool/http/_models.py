"""The values the HTTP layer passes around: URL, origin, headers, request, timeouts, response.

These are plain data with validation at the boundary. Everything a caller hands us is checked
when the object is built (a URL with whitespace, a header value with CR/LF, a method that is not
a token), so that nothing illegal can reach the wire later and header injection is impossible
by construction. The protocol modules (`_http11.py`, and the HTTP/2 one) then trust these
objects and only move bytes.

`Response` owns the body of one exchange through the small `ResponseStream` protocol, so the
same class serves HTTP/1.1 and HTTP/2: the connection supplies an object that yields body bytes
and knows how to release the connection when the caller is done with them.
"""

from __future__ import annotations

import codecs
import datetime
import ipaddress
import json as jsonlib
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar, Final, Protocol, Union, cast, final
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

import attrs
import trio

from .._exceptions import (
    DecodingError,
    HTTPStatusError,
    InvalidHeader,
    InvalidURL,
    LocalProtocolError,
)
from .._options import check_duration
from ._decoders import (
    MAX_LINE_SIZE,
    ContentDecoder,
    LineDecoder,
    content_decoder,
    text_decoder,
)

# Private names used across classes here, on purpose (each use silences pyright's
# reportPrivateUsage): `_BodyIterator` is the response's own iterator and calls its
# underscored methods, which are not API.

__all__ = [
    "Headers",
    "HeaderTypes",
    "Origin",
    "PrimitiveData",
    "QueryParamTypes",
    "Request",
    "RequestContent",
    "RequestData",
    "Response",
    "ResponseStream",
    "Timeouts",
    "URL",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Characters allowed in a registered name (RFC 3986 section 3.2.2), once lowercased.
_REG_NAME_RE = re.compile(r"[a-z0-9\-._~!$&'()*+,;=%]+")
# Any control character other than HTAB makes a header value illegal (RFC 9110 section 5.5).
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Text encodings a Content-Type charset may not choose: those that cannot decode bytes with
# errors="replace" (they always raise, or ignore it), and those whose incremental decoders
# hold an unfinished run whole and decode it again from its start with every chunk (a utf-7
# "+AAAA..." or a "\N{..." that never ends: quadratic time, nothing given out).
_UNDECODABLE: Final = frozenset({"undefined", "idna", "punycode", "utf-7", "unicode-escape"})
# What `Response.raise_for_status` calls a status of each class (as httpx).
_STATUS_KINDS: Final = {
    1: "Informational response",
    3: "Redirect response",
    4: "Client error",
    5: "Server error",
}
# The redirects a client can follow, given a Location (`Response.has_redirect_location`).
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# Headers whose values `Headers.__repr__` hides, so that logging a request leaks no secret.
_SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization"})


# The ASCII characters a URL may never contain: controls, space and DEL.
_UNSAFE_ASCII = re.compile(r"[\x00-\x20\x7f]")
# A lone surrogate (what a failed decode with errors="surrogateescape" leaves in a str) is no
# character at all: it has no UTF-8 form to percent-encode or IDNA-encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_control_or_space(char: str) -> bool:
    code = ord(char)
    return code <= 0x20 or 0x7F <= code <= 0x9F or char.isspace()


def format_authority(host: str, port: int, scheme: str) -> str:
    """Return ``host[:port]`` as it appears in a URL or a Host header.

    IPv6 literals get their brackets back, and the port is left out when it is the scheme's
    default.

    Args:
        host: The host without brackets.
        port: The port.
        scheme: ``"http"`` or ``"https"``, to know the default port.

    Returns:
        The authority text.
    """
    text = f"[{host}]" if ":" in host else host
    if _DEFAULT_PORTS.get(scheme) != port:
        text = f"{text}:{port}"
    return text


@attrs.frozen(cache_hash=True)
class Origin:
    """Where a connection goes: the scheme, host and port of a URL.

    Two requests with equal origins may share a connection. The host is lowercased and IPv6
    literals carry no brackets, exactly as `URL.host`.

    Attributes:
        scheme: ``"http"`` or ``"https"``.
        host: The host name or IP address.
        port: The TCP port.
    """

    scheme: str
    host: str
    port: int

    @property
    def is_secure(self) -> bool:
        """Whether the connection uses TLS."""
        return self.scheme == "https"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _parse_host(parts: SplitResult, text: str) -> str:
    host = parts.hostname  # lowercased, brackets removed
    if not host:
        raise InvalidURL(f"URL has no host: {text!r}")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidURL(f"invalid IPv6 address in URL: {text!r}") from None
        return host
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidURL(f"host cannot be IDNA-encoded: {text!r}") from exc
    if not _REG_NAME_RE.fullmatch(host):
        raise InvalidURL(f"invalid character in host: {text!r}")
    return host


@final
class URL:
    """An absolute ``http`` or ``https`` URL, parsed and checked once.

    Parsing is done by `urllib.parse.urlsplit`; on top of it we refuse everything we could not
    send safely: whitespace or control characters anywhere, userinfo (credentials belong in
    headers, not in a URL that ends up in logs), schemes other than http/https, and ports
    outside 1..65535. Non-ASCII host names are IDNA-encoded; non-ASCII characters in the path
    or query are percent-encoded (as UTF-8); a lone surrogate, which has no UTF-8 form, is
    refused anywhere in the URL. The fragment is dropped: it is never sent.

    Args:
        text: The URL, e.g. ``"https://example.com/search?q=trio"``.

    Attributes:
        scheme: ``"http"`` or ``"https"``.
        host: The lowercased host, IDNA-encoded, IPv6 literals without brackets.
        port: The port, 80 or 443 when the URL gives none.
        target: The request target sent on the wire: path (``/`` when empty) plus
            ``?query``.

    Raises:
        InvalidURL: If ``text`` is not an acceptable URL (also a `ValueError`).
    """

    __slots__ = ("_origin", "_text", "host", "port", "scheme", "target")

    scheme: str
    host: str
    port: int
    target: bytes

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidURL(f"URL must be a str, not {type(text).__name__}")
        if not text:
            raise InvalidURL("URL is empty")
        if not text.isascii() or _UNSAFE_ASCII.search(text):
            bad = any(_is_control_or_space(char) for char in text)
        else:
            bad = False
        if bad:
            raise InvalidURL(f"URL contains whitespace or a control character: {text!r}")
        if not text.isascii() and _SURROGATE.search(text):
            raise InvalidURL(f"URL contains a lone surrogate, which is not text: {text!r}")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise InvalidURL(f"invalid URL {text!r}: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise InvalidURL(_scheme_error(text, parts))
        if "@" in parts.netloc:
            raise InvalidURL("URL must not contain userinfo; send credentials in a header")
        host = _parse_host(parts, text)
        if port is None:
            port = _DEFAULT_PORTS[scheme]
        elif not 1 <= port <= 65535:
            raise InvalidURL(f"port out of range 1..65535: {text!r}")
        target = _quote_non_ascii(parts.path or "/")
        if parts.query:
            target += "?" + _quote_non_ascii(parts.query)
        self.scheme = scheme
        self.host = host
        self.port = port
        self.target = target.encode("ascii")
        self._origin: Origin | None = None
        self._text: str | None = None

    @property
    def is_secure(self) -> bool:
        """Whether the URL's scheme is ``https``."""
        return self.scheme == "https"

    @property
    def origin(self) -> Origin:
        """The `Origin` (scheme, host, port) this URL's requests are sent to."""
        origin = self._origin
        if origin is None:
            origin = self._origin = Origin(self.scheme, self.host, self.port)
        return origin

    def _key(self) -> tuple[str, str, int, bytes]:
        return (self.scheme, self.host, self.port, self.target)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, URL):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        text = self._text
        if text is None:
            authority = format_authority(self.host, self.port, self.scheme)
            text = self._text = f"{self.scheme}://{authority}{self.target.decode('ascii')}"
        return text

    def __repr__(self) -> str:
        return f"URL({str(self)!r})"


def _scheme_error(text: str, parts: SplitResult) -> str:
    """Why ``text`` has no usable scheme: none at all (``example.com/path``, or
    ``localhost:8000``, which reads as scheme ``localhost``), or one we do not speak."""
    after = text[len(parts.scheme) + 1 :] if parts.scheme else ""
    if not parts.scheme or ("://" not in text and after[:1].isdigit()):
        return f"URL has no scheme: {text!r} is missing 'http://' or 'https://' in front"
    return f"unsupported URL scheme {parts.scheme!r} in {text!r} (use http or https)"


def _quote_non_ascii(text: str) -> str:
    if text.isascii():
        return text
    return "".join(char if char.isascii() else quote(char, safe="") for char in text)


HeaderTypes = Union[
    "Headers",
    Mapping[str, str],
    Mapping[bytes, bytes],
    Mapping[str | bytes, str | bytes],
    Iterable[tuple[str, str]],
    Iterable[tuple[bytes, bytes]],
    Iterable[tuple[str | bytes, str | bytes]],
    None,
]
"""Everything `Headers` (and the ``headers`` argument of `Request`) accepts."""


def _encode_name(name: object) -> bytes:
    if isinstance(name, str):
        try:
            raw = name.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidHeader(f"header name is not a token: {name!r}") from None
    elif isinstance(name, bytes):
        raw = name
    else:
        raise TypeError(f"header name must be str or bytes, not {type(name).__name__}")
    if not _TOKEN_RE.fullmatch(raw):
        raise InvalidHeader(f"header name is not a token: {name!r}")
    return raw


def _encode_value(name: bytes, value: object) -> bytes:
    if isinstance(value, str):
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidHeader(
                f"value of header {name.decode()!r} cannot be encoded as latin-1; "
                "encode it yourself (e.g. percent-encoding) and pass bytes"
            ) from None
    elif isinstance(value, bytes):
        raw = value
    else:
        raise TypeError(
            f"value of header {name.decode()!r} must be str or bytes, not {type(value).__name__}"
        )
    if _BAD_VALUE_RE.search(raw):
        raise InvalidHeader(
            f"value of header {name.decode()!r} contains CR, LF, NUL or another "
            f"control character: {value!r}"
        )
    return raw.strip(b" \t")


@final
class Headers:
    """HTTP header fields: case-insensitive, multi-valued, in the order given.

    A header may appear several times (``Set-Cookie``); `get` joins the values with ``", "``,
    `get_list` returns them one by one, and `items` / `raw` return every pair in order, with
    the names as they were given. Names and values are stored as bytes (``str`` values are
    encoded as latin-1, as HTTP/1.1 defines).

    Every name and value is validated when it goes in: a name must be an RFC 9110 token, and a
    value must not contain CR, LF, NUL or any other control character except tab (leading and
    trailing spaces and tabs are stripped). This is what makes header injection impossible.

    Iteration, `keys` and ``len()`` see each distinct name once, lowercased, like a mapping.

    Args:
        headers: ``None``, a mapping, an iterable of ``(name, value)`` pairs, or another
            `Headers` (copied).

    Raises:
        InvalidHeader: If a name or value is malformed (also a `ValueError`).
        TypeError: If a name or value is neither ``str`` nor ``bytes``.
    """

    __slots__ = ("_items", "_names")
    __hash__: ClassVar[None] = None  # type: ignore[assignment]  # mutable

    def __init__(self, headers: HeaderTypes = None) -> None:
        self._items: list[tuple[bytes, bytes]] = []
        # The lowercased names, built on the first lookup and dropped by every change, so
        # that the lookups a request and its response go through (``"host" in headers``,
        # ``get("content-length")``) do not lowercase every name each time. Immutable, so a
        # copy shares it.
        self._names: frozenset[bytes] | None = None
        if headers is None:
            return
        if isinstance(headers, Headers):
            self._items = list(headers._items)
            self._names = headers._names
            return
        pairs: Iterable[object]
        if isinstance(headers, Mapping):
            pairs = cast("Mapping[object, object]", headers).items()
        else:
            pairs = cast("Iterable[object]", headers)
        for pair in pairs:
            if not isinstance(pair, tuple):
                raise TypeError(f"headers must be (name, value) pairs, got {pair!r}")
            items = cast("tuple[object, ...]", pair)
            if len(items) != 2:
                raise TypeError(f"headers must be (name, value) pairs, got {pair!r}")
            raw_name = _encode_name(items[0])
            self._items.append((raw_name, _encode_value(raw_name, items[1])))

    @classmethod
    def _from_trusted(cls, items: list[tuple[bytes, bytes]]) -> Headers:
        """Wrap pairs that a protocol parser (ours for HTTP/1.1, h2) has already validated."""
        self = cls()
        self._items = items
        return self

    def _lowered_names(self) -> frozenset[bytes]:
        names = self._names
        if names is None:
            names = self._names = frozenset([n.lower() for n, _ in self._items])
        return names

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """Return the value of ``name``, several values joined by ``", "``, or ``default``."""
        key = _lower(name)
        if key not in self._lowered_names():
            return default
        return ", ".join([v.decode("latin-1") for n, v in self._items if n.lower() == key])

    def get_list(self, name: str | bytes) -> list[str]:
        """Return every value of ``name`` in order (an empty list if absent)."""
        key = _lower(name)
        if key not in self._lowered_names():
            return []
        return [v.decode("latin-1") for n, v in self._items if n.lower() == key]

    def add(self, name: str | bytes, value: str | bytes) -> None:
        """Append a value for ``name``, keeping the values it already has."""
        raw_name = _encode_name(name)
        self._items.append((raw_name, _encode_value(raw_name, value)))
        self._names = None

    def __getitem__(self, name: str | bytes) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every value of ``name`` with ``value``, at the place of the first one."""
        raw_name = _encode_name(name)
        pair = (raw_name, _encode_value(raw_name, value))
        key = raw_name.lower()
        position = next(
            (i for i, (n, _) in enumerate(self._items) if n.lower() == key), len(self._items)
        )
        self._items = [p for p in self._items if p[0].lower() != key]
        self._items.insert(position, pair)
        self._names = None

    def __delitem__(self, name: str | bytes) -> None:
        key = _lower(name)
        if key not in self._lowered_names():
            raise KeyError(name)
        self._items = [p for p in self._items if p[0].lower() != key]
        self._names = None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        return _lower(name) in self._lowered_names()

    def keys(self) -> list[str]:
        """Return each distinct name once, lowercased, in order of first appearance."""
        return list(dict.fromkeys(n.lower().decode("latin-1") for n, _ in self._items))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> list[tuple[str, str]]:
        """Return every ``(name, value)`` pair in order, names as given."""
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._items]

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        """Every ``(name, value)`` pair as bytes, in order (a new list)."""
        return list(self._items)

    def copy(self) -> Headers:
        """Return an independent copy."""
        copy = Headers._from_trusted(list(self._items))
        # Copies are made from templates (a client's default headers): the names are worked
        # out once on the template, and every copy starts with them.
        copy._names = self._lowered_names()
        return copy

    def _normalized(self) -> list[tuple[bytes, bytes]]:
        # Stable sort: the relative order of one name's values matters, the order of
        # different names does not.
        return sorted(((n.lower(), v) for n, v in self._items), key=lambda p: p[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            try:
                other = Headers(other)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return NotImplemented
        return self._normalized() == other._normalized()

    def __repr__(self) -> str:
        shown = [
            (
                n.decode("latin-1"),
                "[secret]" if n.lower() in _SECRET_HEADERS else v.decode("latin-1"),
            )
            for n, v in self._items
        ]
        return f"Headers({shown!r})"


# Lowercased lookup keys of the str names asked for: a program asks for a few names, over
# and over ("host", "content-length"). Bounded all the same.
_LOWERED: dict[str, bytes] = {}
_MAX_LOWERED: Final = 256


def _lower(name: str | bytes) -> bytes:
    if type(name) is str:
        key = _LOWERED.get(name)
        if key is None:
            key = name.encode("latin-1", errors="replace").lower()
            if len(_LOWERED) >= _MAX_LOWERED:
                _LOWERED.clear()
            _LOWERED[name] = key
        return key
    if isinstance(name, str):
        return name.encode("latin-1", errors="replace").lower()
    return name.lower()


RequestContent = Union[bytes, AsyncIterable[bytes], None]  # noqa: UP007 (runtime alias)
"""A request body: all of it as bytes, an async iterable of byte chunks, or none."""

# Methods already found to be tokens, so that a request does not run the regex again. A
# program uses a handful; the bound only stops a stream of odd methods from growing it.
_VALID_METHODS: set[str] = set()
_MAX_VALID_METHODS: Final = 64


def _check_method(method: object) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, not {type(method).__name__}")
    if not method.isascii() or not _TOKEN_RE.fullmatch(method.encode("ascii")):
        raise LocalProtocolError(f"invalid HTTP method {method!r}")
    if type(method) is str:  # a subclass could compare equal to a token and be another
        if len(_VALID_METHODS) >= _MAX_VALID_METHODS:
            _VALID_METHODS.clear()
        _VALID_METHODS.add(method)


def _checked_content(method: object, content: object) -> RequestContent:
    """Check a request's method and body; the body as it will be sent (bytes-likes copied)."""
    if type(method) is not str or method not in _VALID_METHODS:
        _check_method(method)
    if content is None or type(content) is bytes:
        return content
    return _check_content(content)


def _check_content(content: object) -> RequestContent:
    if isinstance(content, str):
        return content.encode("utf-8")  # as httpx does
    if isinstance(content, (bytearray, memoryview)):
        return bytes(cast("bytearray | memoryview[int]", content))
    if not (content is None or isinstance(content, bytes) or hasattr(content, "__aiter__")):
        raise TypeError(
            "content must be bytes, a str, an async iterable of bytes or None, "
            f"not {type(content).__name__}"
        )
    return cast("RequestContent", content)


@final
class Request:
    """One HTTP request: method, URL, headers and an optional body.

    Args:
        method: The method, e.g. ``"GET"``; it must be an RFC 9110 token and is sent exactly as
            given (methods are case-sensitive).
        url: The absolute URL, as a `URL` or a string.
        headers: Extra header fields. ``Host``, ``Content-Length`` and ``Transfer-Encoding`` are
            added by the connection when absent.
        content: The body: ``bytes``, a ``str`` (sent encoded as UTF-8, as httpx does), an
            async iterable of ``bytes`` chunks (streamed; sent chunked unless you give a
            ``Content-Length``), or ``None``.
        timeouts: Limits for this request alone, replacing those of the connection and pool
            it is sent through (see `timeouts`); ``None``: theirs apply.

    Attributes:
        method: The method.
        url: The parsed `URL`.
        headers: The `Headers`.
        content: The body as given (a ``str`` encoded as UTF-8, bytes-likes copied to
            ``bytes``).
        timeouts: The request's own `Timeouts`, or ``None``. ``read`` and ``write`` bound
            each read and write of its exchange (its response body's reads too), on HTTP/1.1
            and HTTP/2 alike; ``pool`` bounds its wait for a connection from a pool, and
            ``connect`` a connect made for this request alone (see
            :class:`~trio_connpool.http.PoolSender` for what a pool guarantees).

    Raises:
        LocalProtocolError: If the method is not a token.
        InvalidURL: If the URL is invalid.
        InvalidHeader: If a header is invalid.
        TypeError: If ``content`` is of an unsupported type, or ``timeouts`` is not a
            `Timeouts` or ``None``.
    """

    __slots__ = ("content", "headers", "method", "timeouts", "url")

    def __init__(
        self,
        method: str,
        url: URL | str,
        *,
        headers: HeaderTypes = None,
        content: RequestContent | str = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        checked = _checked_content(method, content)
        if timeouts is not None and not isinstance(timeouts, Timeouts):
            raise TypeError(f"timeouts must be a Timeouts or None, not {timeouts!r}")
        self.method: str = method
        self.url: URL = url if isinstance(url, URL) else URL(url)
        self.headers: Headers = Headers(headers)
        self.content: RequestContent = checked
        self.timeouts: Timeouts | None = timeouts

    @classmethod
    def _with_own_headers(
        cls, method: str, url: URL, headers: Headers, content: RequestContent | str
    ) -> Request:
        """`Request` for a caller that made ``headers`` for this request alone: no copy."""
        content = _checked_content(method, content)
        self = object.__new__(cls)
        self.method = method
        self.url = url
        self.headers = headers
        self.content = content
        self.timeouts = None
        return self

    @property
    def is_replayable(self) -> bool:
        """Whether the body can be sent again (it is ``bytes`` or absent), e.g. for a retry."""
        return self.content is None or isinstance(self.content, bytes)

    @property
    def is_idempotent(self) -> bool:
        """Whether the method is idempotent (RFC 9110 section 9.2.2), so safe to retry."""
        return self.method in _IDEMPOTENT_METHODS

    def __repr__(self) -> str:
        return f"<Request [{self.method} {self.url}]>"


PrimitiveData = Union[str, int, float, bool, None]  # noqa: UP007 (runtime alias)
"""A query parameter or form field value: ``True``/``False`` are sent as ``true``/``false``
and ``None`` as an empty value, as httpx does."""

QueryParamTypes = Union[  # noqa: UP007 (runtime alias)
    Mapping[str, PrimitiveData | Sequence[PrimitiveData]],
    Sequence[tuple[str, PrimitiveData]],
    str,
]
"""What ``params=`` accepts: a mapping (a sequence value gives the name several times), a
sequence of ``(name, value)`` pairs, or a query string."""

RequestData = Mapping[str, PrimitiveData | Sequence[PrimitiveData]]
"""What ``data=`` accepts: form fields, sent form-encoded."""


def _primitive(value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value)
    raise TypeError(
        f"query parameters and form fields must be str, int, float, bool or None, "
        f"not {type(value).__name__}"
    )


def _pairs(fields: object, what: str) -> list[tuple[str, str]]:
    """``(name, value)`` text pairs of a mapping (sequence values repeat the name) or of a
    sequence of pairs."""
    pairs: list[tuple[str, str]] = []
    if isinstance(fields, Mapping):
        for name, value in cast("Mapping[object, object]", fields).items():
            if isinstance(value, (list, tuple)):
                pairs.extend((str(name), _primitive(item)) for item in cast("list[object]", value))
            else:
                pairs.append((str(name), _primitive(value)))
        return pairs
    if isinstance(fields, (list, tuple)):
        for pair in cast("list[object]", fields):
            if not isinstance(pair, tuple) or len(cast("tuple[object, ...]", pair)) != 2:
                raise TypeError(f"{what} must be (name, value) pairs, got {pair!r}")
            name, value = cast("tuple[object, object]", pair)
            pairs.append((str(name), _primitive(value)))
        return pairs
    raise TypeError(
        f"{what} must be a mapping or a list of (name, value) pairs, not {type(fields).__name__}"
    )


def merge_params(url: URL, params: QueryParamTypes) -> URL:
    """``url`` with ``params`` merged into its query, as httpx's ``URL.copy_merge_params``.

    A name given in ``params`` replaces every value of that name in the URL's query; the
    other names keep their values and places, and new names follow. The query is then
    encoded anew (``application/x-www-form-urlencoded`` style, spaces as ``+``), as httpx
    does; with nothing in it, the URL has no query.

    Raises:
        TypeError: ``params`` or one of its values is of an unsupported type.
    """
    if isinstance(params, str):
        given = parse_qsl(params, keep_blank_values=True)
    else:
        given = _pairs(params, "params")
    path, _, query = url.target.decode("ascii").partition("?")
    merged: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        merged.setdefault(name, []).append(value)
    replaced: dict[str, list[str]] = {}
    for name, value in given:
        replaced.setdefault(name, []).append(value)
    merged.update(replaced)
    text = urlencode([(name, value) for name, values in merged.items() for value in values])
    authority = format_authority(url.host, url.port, url.scheme)
    return URL(f"{url.scheme}://{authority}{path}{'?' if text else ''}{text}")


def encode_json(value: object) -> bytes:
    """``value`` as compact JSON in UTF-8, as httpx sends ``json=`` (NaN refused).

    Raises:
        TypeError: A value JSON cannot represent.
        ValueError: NaN or an infinity.
    """
    return jsonlib.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def encode_form(data: RequestData) -> bytes:
    """Form fields ``application/x-www-form-urlencoded``, as httpx sends ``data=``.

    Raises:
        TypeError: ``data`` is not a mapping, or a value is of an unsupported type.
    """
    if not isinstance(data, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(
            f"data must be a mapping of form fields, not {type(data).__name__} "
            "(send bytes or text with content=)"
        )
    return urlencode(_pairs(data, "data")).encode("ascii")


@attrs.frozen
class Timeouts:
    """Time limits for one request, in seconds; ``None`` means no limit.

    Every limit has a finite default (5 s, as httpx's), so nothing a server or a full pool
    does can keep a request waiting for ever unless a limit is set to ``None`` on purpose.

    Attributes:
        connect: Opening the TCP connection plus the TLS handshake.
        read: Each wait for bytes from the server (not the whole response).
        write: Each write of bytes to the server.
        pool: The whole wait for a connection from the pool, retries included; past it the
            request raises :class:`~trio_connpool.PoolTimeout`.

    Raises:
        ValueError: If a value is negative or NaN.
        TypeError: If a value is not a number.
    """

    connect: float | None = 5.0
    read: float | None = 5.0
    write: float | None = 5.0
    pool: float | None = 5.0

    def __attrs_post_init__(self) -> None:
        for name in ("connect", "read", "write", "pool"):
            check_duration(f"Timeouts.{name}", getattr(self, name))


class ResponseStream(Protocol):
    """The body of a response, as supplied by the connection that received it.

    Implementations must make both async methods checkpoints, keep `receive_some` returning
    ``b""`` once the body has ended, and make `aclose` idempotent and quick (it is also called,
    under a shield, after `receive_some` raised). A stream that wraps another forwards
    `receive_buffered` to it, or the fast path of reading a body is lost.
    """

    async def receive_some(self) -> bytes:
        """Return the next chunk of the body, or ``b""`` at its end."""
        ...

    def receive_buffered(self) -> bytes | None:
        """Synchronously, the next chunk if it is already at hand without I/O; ``b""`` if the
        body has ended *and the stream has released everything it held* (so `aclose` is not
        needed); or ``None`` if only `receive_some` can tell (always a correct answer).

        It must never raise: errors surface from `receive_some`.
        """
        ...

    async def aclose(self) -> None:
        """Release what the body holds (e.g. give the connection back, or close it)."""
        ...


@final
class _EmptyStream:
    async def receive_some(self) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    def receive_buffered(self) -> bytes | None:
        return None

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@final
class _BodyIterator:
    """What `Response.aiter_raw` returns (and `Response.aiter_bytes` for a body with no content
    coding): a plain async iterator, not an async generator.

    An abandoned async generator is finalized by the garbage collector in whatever task trio
    picks, outside every cancel scope; a plain iterator has nothing to finalize. The other
    body iterators here are plain ones for the same reason.
    """

    __slots__ = ("_response", "_started")

    def __init__(self, response: Response) -> None:
        self._response = response
        self._started = False

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        if not self._started:
            self._started = True
            self._response._claim_stream()  # pyright: ignore[reportPrivateUsage]
        chunk = await self._response._next_chunk()  # pyright: ignore[reportPrivateUsage]
        if not chunk:
            raise StopAsyncIteration
        return chunk


@final
class _DecodedIterator:
    """`Response.aiter_bytes` for a body with a content coding: decoded pieces of at most
    `MAX_DECODED_STEP` bytes each, however much one received chunk expands."""

    __slots__ = ("_decoder", "_ended", "_failed", "_response", "_started")

    def __init__(self, response: Response, decoder: ContentDecoder) -> None:
        self._response = response
        self._decoder = decoder
        self._started = False
        self._ended = False
        self._failed = False

    def __aiter__(self) -> _DecodedIterator:
        return self

    async def __anext__(self) -> bytes:
        response = self._response
        if self._failed:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            response._claim_stream()  # pyright: ignore[reportPrivateUsage]
        decoder = self._decoder
        waited = False
        try:
            while True:
                piece = decoder.read()
                if piece:
                    if not waited:
                        # Decoded from input already at hand (a small chunk may expand a
                        # lot): still a checkpoint, so others run during a long decode.
                        await trio.lowlevel.checkpoint()
                    return piece
                if self._ended:
                    decoder.check_end()
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    raise StopAsyncIteration
                chunk = await response._next_chunk()  # pyright: ignore[reportPrivateUsage]
                waited = True
                if chunk:
                    decoder.feed(chunk)
                else:
                    self._ended = True
                    decoder.finish()
        except DecodingError as exc:
            self._failed = True
            await response._decoding_failed(exc)  # pyright: ignore[reportPrivateUsage]
            raise


@final
class _TextIterator:
    """`Response.aiter_text`: the decoded body as text, decoded incrementally (a character
    cut between two chunks comes out whole)."""

    __slots__ = ("_decoder", "_done", "_source")

    def __init__(self, source: AsyncIterator[bytes], encoding: str) -> None:
        self._source = source
        self._decoder = text_decoder(encoding)
        self._done = False

    def __aiter__(self) -> _TextIterator:
        return self

    async def __anext__(self) -> str:
        if self._done:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        decoder = self._decoder
        while True:  # each turn awaits the source: a checkpoint
            try:
                chunk = await self._source.__anext__()
            except StopAsyncIteration:
                self._done = True
                text = decoder.decode(b"", True)
                if text:
                    return text
                raise
            text = decoder.decode(chunk)
            if text:
                return text


@final
class _LineIterator:
    """`Response.aiter_lines`: the text split into lines (see `LineDecoder`)."""

    __slots__ = ("_decoder", "_done", "_lines", "_response", "_source")

    def __init__(
        self, source: AsyncIterator[str], response: Response, max_line_size: int | None
    ) -> None:
        self._source = source
        self._response = response
        self._decoder = LineDecoder(max_line_size)
        self._lines: deque[str] = deque()
        self._done = False

    def __aiter__(self) -> _LineIterator:
        return self

    async def __anext__(self) -> str:
        lines = self._lines
        if lines or self._done:
            await trio.lowlevel.checkpoint()
            if lines:
                return lines.popleft()
            raise StopAsyncIteration
        while not lines:  # each turn awaits the source: a checkpoint
            if self._decoder.overflowed:
                # The lines before a line too long are out: fail now, not when (if ever)
                # more of the body arrives.
                self._done = True
                try:
                    self._decoder.flush()  # raises DecodingError
                except DecodingError as exc:
                    await self._response._decoding_failed(exc)  # pyright: ignore[reportPrivateUsage]
                    raise
            try:
                text = await self._source.__anext__()
            except StopAsyncIteration:
                self._done = True
                try:
                    lines.extend(self._decoder.flush())
                except DecodingError as exc:  # a last line, unended, longer than the bound
                    await self._response._decoding_failed(exc)  # pyright: ignore[reportPrivateUsage]
                    raise
                if lines:
                    return lines.popleft()
                raise
            try:
                lines.extend(self._decoder.decode(text))
            except DecodingError as exc:
                self._done = True
                await self._response._decoding_failed(exc)  # pyright: ignore[reportPrivateUsage]
                raise
        return lines.popleft()


@final
class Response:
    """An HTTP response whose head has arrived; the body is read on demand.

    Read the body with `aread` (all of it, kept in `content`) or chunk by chunk, nothing
    kept: `aiter_bytes`, `aiter_text`, `aiter_lines`, or `aiter_raw` for the bytes as they
    came. Reading the body to its end gives the connection back; if you stop early, call
    `aclose` (the client does it for you when its context manager exits).

    A body sent with ``Content-Encoding: gzip`` or ``deflate`` (one or several) is decoded
    by everything except `aiter_raw`; a streaming reader gets at most 64 KiB of decoded bytes
    per step, however much one received chunk expands (see the ``_decoders`` module). Codings
    we do not know (``br``, ``zstd``) are left as they are. A corrupt or truncated compressed
    body raises `DecodingError` and closes the response.

    Args:
        status_code: The status code.
        request: The request this responds to.
        headers: The header fields.
        reason_phrase: The reason phrase sent by the server (may be empty).
        http_version: ``"HTTP/1.1"`` or ``"HTTP/2"``.
        stream: Where the body comes from; ``None`` for an empty body.

    Attributes:
        status_code: The status code.
        reason_phrase: The reason phrase.
        headers: The `Headers`.
        http_version: The protocol version.
        request: The `Request`.
    """

    __slots__ = (
        "_closed",
        "_consumed",
        "_content",
        "_elapsed",
        "_encoding",
        "_started_at",
        "_stream",
        "_stream_claimed",
        "_text",
        "headers",
        "history",
        "http_version",
        "reason_phrase",
        "request",
        "status_code",
    )

    def __init__(
        self,
        status_code: int,
        *,
        request: Request,
        headers: HeaderTypes = None,
        reason_phrase: str = "",
        http_version: str = "HTTP/1.1",
        stream: ResponseStream | None = None,
    ) -> None:
        self.status_code: int = status_code
        self.request: Request = request
        self.headers: Headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.reason_phrase: str = reason_phrase
        self.http_version: str = http_version
        self._stream: ResponseStream = _EmptyStream() if stream is None else stream
        self._content: bytes | None = None
        self._stream_claimed = False
        self._consumed = False
        self._closed = False
        # When the request was sent (trio.current_time(); set by the sender) and how long the
        # exchange took once the body ended or was closed: see `elapsed`.
        self._started_at: float | None = None
        self._elapsed: float | None = None
        self._encoding: str | None = None
        self._text: str | None = None
        self.history: list[Response] = []  # the redirects followed to get here, oldest first

    @property
    def url(self) -> URL:
        """The URL of the request."""
        return self.request.url

    @property
    def is_closed(self) -> bool:
        """Whether the body has ended or `aclose` was called (the stream is released)."""
        return self._closed

    @property
    def stream(self) -> ResponseStream:
        """The `ResponseStream` the body comes from. Read the body through the response
        (`aread`, `aiter_bytes`), not from this."""
        return self._stream

    def replace_stream(self, stream: ResponseStream) -> None:
        """Read the body from ``stream`` from now on: a stream that wraps `stream`, say, to
        give a connection back or close it when the body ends. Synchronous.

        Raises:
            RuntimeError: If the body is already being read, or the response is closed.
        """
        if self._stream_claimed or self._closed:
            raise RuntimeError("the body is being read or closed: its stream cannot be replaced")
        self._stream = stream

    @property
    def content(self) -> bytes:
        """The whole body, once `aread` has read it.

        Raises:
            RuntimeError: If `aread` has not been called.
        """
        if self._content is None:
            raise RuntimeError("the body has not been read: call 'await response.aread()' first")
        return self._content

    @property
    def charset(self) -> str | None:
        """The ``charset`` parameter of ``Content-Type``, if any and a text encoding Python
        can decode with, incrementally (not ``zlib``, ``base64``, ``undefined``, ``idna``,
        ``utf-7``...)."""
        content_type = self.headers.get("content-type")
        if content_type is None:
            return None
        for param in content_type.split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset":
                value = value.strip().strip('"').strip()
                try:
                    info = codecs.lookup(value)
                except LookupError:
                    return None
                # Not a name for bytes to text (zlib, base64, rot13), or one we do not
                # decode with (see _UNDECODABLE): the server's mistake, not the reader's.
                if not info._is_text_encoding or info.name in _UNDECODABLE:  # pyright: ignore[reportPrivateUsage]
                    return None
                return info.name
        return None

    @property
    def encoding(self) -> str:
        """The text encoding of the body: the one set here, else the ``Content-Type``
        charset (if Python knows it), else ``"utf-8"``. Used by `text` and `aiter_text`.

        Settable (as httpx's), before `text` is read.

        Raises:
            ValueError: (when set) if `text` was already read.
            LookupError: (when set) if Python knows no such encoding, or it is not a text
                encoding (``zlib``, ``base64``).
        """
        encoding = self._encoding
        if encoding is None:
            encoding = self._encoding = self.charset or "utf-8"
        return encoding

    @encoding.setter
    def encoding(self, value: str) -> None:
        if self._text is not None:
            raise ValueError("the encoding cannot be set once the text has been read")
        if not codecs.lookup(value)._is_text_encoding:  # pyright: ignore[reportPrivateUsage]
            # zlib, base64, rot13: text would raise LookupError, aiter_text AssertionError.
            raise LookupError(f"{value!r} is not a text encoding")
        self._encoding = value

    @property
    def text(self) -> str:
        """The body decoded with `encoding` (invalid bytes replaced), once `aread` has read it.

        Raises:
            RuntimeError: If `aread` has not been called.
        """
        text = self._text
        if text is None:
            text = self._text = self.content.decode(self.encoding, errors="replace")
        return text

    def json(self, **kwargs: Any) -> Any:
        """The body parsed as JSON (`json.loads`, ``kwargs`` passed on), once `aread` has read
        it.

        Raises:
            RuntimeError: If `aread` has not been called.
            json.JSONDecodeError: If the body is not JSON.
        """
        return jsonlib.loads(self.content, **kwargs)

    # ---- the status ------------------------------------------------------------------------

    @property
    def is_informational(self) -> bool:
        """Whether the status is 1xx."""
        return 100 <= self.status_code <= 199

    @property
    def is_success(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status_code <= 299

    @property
    def is_redirect(self) -> bool:
        """Whether the status is 3xx (as httpx's; see `has_redirect_location` for the
        responses a client can follow)."""
        return 300 <= self.status_code <= 399

    @property
    def has_redirect_location(self) -> bool:
        """Whether this is a redirect to follow: status 301, 302, 303, 307 or 308 with a
        ``Location`` header."""
        return self.status_code in _REDIRECT_STATUSES and "location" in self.headers

    @property
    def is_client_error(self) -> bool:
        """Whether the status is 4xx."""
        return 400 <= self.status_code <= 499

    @property
    def is_server_error(self) -> bool:
        """Whether the status is 5xx."""
        return 500 <= self.status_code <= 599

    @property
    def is_error(self) -> bool:
        """Whether the status is 4xx or 5xx."""
        return 400 <= self.status_code <= 599

    def raise_for_status(self) -> Response:
        """Raise `HTTPStatusError` unless the status is 2xx (as httpx's: a 3xx raises too);
        otherwise return the response, so that calls can be chained.

        Raises:
            HTTPStatusError: For a status other than 2xx; it names the status, reason and URL.
        """
        if self.is_success:
            return self
        code = self.status_code
        kind = _STATUS_KINDS.get(code // 100, "Invalid status code")
        message = f"{kind} '{code} {self._reason()}' for url '{self.url}'"
        if self.has_redirect_location:
            message += f"\nRedirect location: '{self.headers['location']}'"
        message += (
            f"\nFor more information check: "
            f"https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/{code}"
        )
        raise HTTPStatusError(message, request=self.request, response=self)

    def _reason(self) -> str:
        """The reason phrase sent, else the standard one for the status (HTTP/2 sends none)."""
        reason = self.reason_phrase
        if not reason:
            try:
                reason = HTTPStatus(self.status_code).phrase
            except ValueError:
                reason = ""
        return reason

    @property
    def elapsed(self) -> datetime.timedelta:
        """The time from sending the request until the body ended or the response was closed
        (as httpx's), on trio's clock.

        Raises:
            RuntimeError: If the response is not closed yet (read its body or call `aclose`),
                or it was not timed (its sender set no start; the client's senders do).
        """
        elapsed = self._elapsed
        if elapsed is None:
            raise RuntimeError(
                "'elapsed' is known once the response has been read or closed"
                if not self._closed
                else "this response was not timed: its sender did not record a start"
            )
        return datetime.timedelta(seconds=elapsed)

    @elapsed.setter
    def elapsed(self, value: datetime.timedelta) -> None:
        self._elapsed = value.total_seconds()

    def _ended(self) -> None:
        """The stream was released: the end of what `elapsed` measures."""
        started = self._started_at
        if started is not None and self._elapsed is None:
            self._elapsed = trio.current_time() - started

    def _claim_stream(self) -> None:
        if self._stream_claimed:
            raise RuntimeError("the response body has already been read or is being read")
        if self._closed:
            raise RuntimeError("the response is closed: its body can no longer be read")
        self._stream_claimed = True

    async def _next_chunk(self) -> bytes:
        if self._consumed:
            await trio.lowlevel.checkpoint()
            return b""
        try:
            chunk = await self._stream.receive_some()
        except BaseException:
            self._consumed = self._closed = True
            self._ended()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
            raise
        if not chunk:
            self._consumed = True
            if not self._closed:
                self._closed = True
                self._ended()
                await self._stream.aclose()
        return chunk

    async def _decoding_failed(self, exc: DecodingError) -> None:
        """The body cannot be decoded: name the request in ``exc``, and close the response
        at once, without waiting for the rest of the body. An HTTP/1.1 connection is then
        closed, not given back, unless that rest had already arrived whole; an HTTP/2 stream
        is reset."""
        exc.key = self.request.url.origin
        exc.url = str(self.request.url)
        self._consumed = True
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._ended()
        with trio.CancelScope() as scope:
            scope.cancel()  # drain only what has arrived (see Client.stream)
            await self._stream.aclose()

    def _content_decoder(self) -> ContentDecoder | None:
        """The decoder for the body's ``Content-Encoding``, or None.

        One pass over the header names, most of them skipped by their length alone: cheaper
        than `Headers.get` for the one lookup every response makes.
        """
        for name, _ in self.headers._items:  # pyright: ignore[reportPrivateUsage]
            if len(name) == 16 and name.lower() == b"content-encoding":
                return content_decoder(self.headers["content-encoding"])
        return None

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """Iterate over the decoded body in non-empty chunks as they arrive, keeping nothing.

        Use it as ``async for chunk in response.aiter_bytes(): ...``; every step is a
        checkpoint. If `aread` already read the body, the stored content is yielded. A body
        with a content coding (gzip, deflate) comes out decoded, at most 64 KiB per chunk.

        Returns:
            An async iterator of ``bytes``.

        Raises:
            RuntimeError: (when iterated) if the body was already iterated over or the
                response was closed before its body was read.
            DecodingError: (when iterated) if the compressed body is corrupt or truncated.
        """
        if self._content is not None:
            return _StoredIterator(self._content)
        decoder = self._content_decoder()
        if decoder is None:
            return _BodyIterator(self)
        return _DecodedIterator(self, decoder)

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """Iterate over the body exactly as it was received: content codings not undone.

        Returns:
            An async iterator of ``bytes``; every step is a checkpoint.

        Raises:
            RuntimeError: (when iterated) if the body was already read or is being read (the
                raw bytes are not kept), or the response was closed before its body was read.
        """
        return _BodyIterator(self)

    def aiter_text(self) -> AsyncIterator[str]:
        """Iterate over the decoded body as text, decoded with `encoding` (invalid bytes
        replaced), incrementally: a character cut between two chunks comes out whole.

        Returns:
            An async iterator of non-empty ``str``; every step is a checkpoint.

        Raises:
            See `aiter_bytes`.
        """
        return _TextIterator(self.aiter_bytes(), self.encoding)

    def aiter_lines(self, *, max_line_size: int | None = MAX_LINE_SIZE) -> AsyncIterator[str]:
        """Iterate over the lines of the text (see `aiter_text`), without their endings.

        Lines end with ``\\n``, ``\\r\\n`` or ``\\r``, also when an ending is cut between two
        chunks; the last line needs no ending. The line being read is held until it ends.

        Args:
            max_line_size: The longest line accepted, in characters (default 1 MiB):
                the bound on what is held while a line's end has not arrived. None: no
                bound (a server that sends one endless line then takes all the memory
                there is).

        Returns:
            An async iterator of ``str``; every step is a checkpoint.

        Raises:
            DecodingError: A line is longer than ``max_line_size`` (raised as soon as the
                part of it received is; the response is closed).
            ValueError, TypeError: ``max_line_size`` is not a positive int or None, at once.
            See `aiter_bytes` for the rest.
        """
        if max_line_size is not None:
            if not isinstance(max_line_size, int) or isinstance(max_line_size, bool):
                raise TypeError(f"max_line_size must be an int or None, not {max_line_size!r}")
            if max_line_size < 1:
                raise ValueError(f"max_line_size must be at least 1, not {max_line_size}")
        return _LineIterator(self.aiter_text(), self, max_line_size)

    async def aread(self) -> bytes:
        """Read the whole body (once), store it in `content` and return it.

        Returns:
            The body.

        Raises:
            RuntimeError: If the body was already (partly) consumed by `aiter_bytes`, or the
                response was closed before its body was read.
        """
        if self._content is not None:
            await trio.lowlevel.checkpoint()
            return self._content
        await trio.lowlevel.checkpoint_if_cancelled()
        content, waited = await self._read_all()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return content

    async def _read_all(self) -> tuple[bytes, bool]:
        """Read the rest of the body into `content`; return it and whether I/O was awaited.

        Takes what the stream already holds without yielding (``receive_buffered``), so a
        small body that arrived with the head costs no extra trip through the scheduler. Not
        a checkpoint on its own when nothing had to be waited for: callers see to that.
        """
        decoder = self._content_decoder()
        if decoder is not None:
            return await self._read_all_decoded(decoder)
        self._claim_stream()
        chunks: list[bytes] = []
        # ResponseStream declares it; a stream written before it did is read without it.
        receive_buffered = getattr(self._stream, "receive_buffered", None)
        waited = False
        while True:
            chunk = receive_buffered() if receive_buffered is not None else None
            if chunk == b"":
                # The stream ended and released everything it held (see ResponseStream).
                self._consumed = self._closed = True
                started = self._started_at  # (what _ended does, without a call)
                if started is not None:
                    self._elapsed = trio.current_time() - started
                break
            if chunk is None:
                waited = True
                chunk = await self._next_chunk()
                if not chunk:
                    break
            chunks.append(chunk)
        content = self._content = b"".join(chunks)
        return content, waited

    async def _read_all_decoded(self, decoder: ContentDecoder) -> tuple[bytes, bool]:
        """`_read_all` for a body with a content coding: decoded chunk by chunk, so corrupt
        data stops the download at once. The whole decoded body is built (that is what
        reading it all means), plus at most one received chunk at a time."""
        self._claim_stream()
        pieces: list[bytes] = []
        receive_buffered = getattr(self._stream, "receive_buffered", None)
        waited = False
        try:
            while True:
                chunk = receive_buffered() if receive_buffered is not None else None
                if chunk == b"":
                    self._consumed = self._closed = True
                    self._ended()
                    break
                if chunk is None:
                    waited = True
                    chunk = await self._next_chunk()
                    if not chunk:
                        break
                pieces += decoder.decode_all(chunk)
            decoder.finish()
            while piece := decoder.read():
                pieces.append(piece)
            decoder.check_end()
        except DecodingError as exc:
            await self._decoding_failed(exc)
            raise
        content = self._content = b"".join(pieces)
        return content, waited

    async def aclose(self) -> None:
        """Release the body: give the connection back, or close it. Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._ended()
        await self._stream.aclose()

    def __repr__(self) -> str:
        reason = self._reason()
        text = f"{self.status_code} {reason}" if reason else str(self.status_code)
        return f"<Response [{text}]>"


@final
class _StoredIterator:
    __slots__ = ("_chunk",)

    def __init__(self, content: bytes) -> None:
        self._chunk = content

    def __aiter__(self) -> _StoredIterator:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        chunk, self._chunk = self._chunk, b""
        if not chunk:
            raise StopAsyncIteration
        return chunk
