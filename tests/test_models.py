"""Tests of the HTTP value types: URL, Origin, Headers, Request, Timeouts, Response."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trio_connpool._exceptions import InvalidHeader, InvalidURL, LocalProtocolError
from trio_connpool.http import URL, Headers, Origin, Request, Response, Timeouts, _models

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


# ---- URL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "target", "normalised"),
    [
        ("http://example.com", "http", "example.com", 80, b"/", "http://example.com/"),
        ("HTTPS://EXAMPLE.com/", "https", "example.com", 443, b"/", "https://example.com/"),
        ("http://example.com:80/a", "http", "example.com", 80, b"/a", "http://example.com/a"),
        (
            "https://example.com:8443/a/b?x=1&y=2#frag",
            "https",
            "example.com",
            8443,
            b"/a/b?x=1&y=2",
            "https://example.com:8443/a/b?x=1&y=2",
        ),
        ("http://example.com?q", "http", "example.com", 80, b"/?q", "http://example.com/?q"),
        ("http://[::1]:8080/x", "http", "::1", 8080, b"/x", "http://[::1]:8080/x"),
        ("https://[2001:DB8::1]/", "https", "2001:db8::1", 443, b"/", "https://[2001:db8::1]/"),
        ("http://127.0.0.1:1/", "http", "127.0.0.1", 1, b"/", "http://127.0.0.1:1/"),
        ("http://h:65535/", "http", "h", 65535, b"/", "http://h:65535/"),
        (
            "http://bücher.example/",
            "http",
            "xn--bcher-kva.example",
            80,
            b"/",
            "http://xn--bcher-kva.example/",
        ),
        ("http://h/caf\u00e9", "http", "h", 80, b"/caf%C3%A9", "http://h/caf%C3%A9"),
    ],
)
def test_url_parses(
    text: str, scheme: str, host: str, port: int, target: bytes, normalised: str
) -> None:
    url = URL(text)
    assert (url.scheme, url.host, url.port, url.target) == (scheme, host, port, target)
    assert str(url) == normalised
    assert url.is_secure is (scheme == "https")
    assert url.origin == Origin(scheme, host, port)
    assert URL(str(url)) == url


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com/path",
        "ftp://example.com/",
        "http:///path",
        "http://",
        "http://user:pass@example.com/",
        "http://user@example.com/",
        "http://example.com:0/",
        "http://example.com:65536/",
        "http://example.com:http/",
        "http://example.com:-1/",
        "http://exa mple.com/",
        "http://example.com/a b",
        " http://example.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://example.com/\x00",
        "http://example.com/\t",
        "http://example.com/\x7f",
        "http://[::1/",
        "http://[not-ipv6]/",
        "http://exa<mple.com/",
        "http://\u2603\u2603..example/",
    ],
)
def test_url_rejects(text: str) -> None:
    with pytest.raises(InvalidURL):
        URL(text)


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1/\udc80",
        "http://127.0.0.1/a\ud800b",
        "http://127.0.0.1/?q=\udc80",
        "http://127.0.0.1/?\udfff=1",
        "http://127.0.0.1/#\udc80",
        "http://\udc80@127.0.0.1/",
        "http://ex\udc80ample.com/",
        "http://127.0.0.1/caf\u00e9/\udc80",
    ],
)
def test_url_rejects_lone_surrogates(text: str) -> None:
    """A lone surrogate is not text: refused as InvalidURL, never a UnicodeEncodeError."""
    with pytest.raises(InvalidURL, match="surrogate"):
        URL(text)


def test_url_rejects_non_str() -> None:
    with pytest.raises(InvalidURL):
        URL(b"http://example.com/")  # type: ignore[arg-type]
    assert issubclass(InvalidURL, ValueError)


def test_url_equality_and_hash() -> None:
    a = URL("http://Example.com:80/p?q=1#x")
    b = URL("http://example.com/p?q=1")
    assert a == b
    assert hash(a) == hash(b)
    assert a != URL("https://example.com/p?q=1")
    assert a != "http://example.com/p?q=1"
    assert {a, b} == {a}
    assert repr(a) == "URL('http://example.com/p?q=1')"


def test_origin() -> None:
    origin = URL("https://example.com/").origin
    assert origin == Origin("https", "example.com", 443)
    assert origin.is_secure
    assert str(origin) == "https://example.com:443"
    assert str(Origin("http", "::1", 8080)) == "http://[::1]:8080"
    assert not Origin("http", "a", 80).is_secure
    assert hash(origin) == hash(Origin("https", "example.com", 443))


# ---- Headers -----------------------------------------------------------------------------


def test_headers_case_insensitive_multi_valued() -> None:
    headers = Headers(
        [("Set-Cookie", "a=1"), ("Content-Type", "text/plain"), ("set-cookie", "b=2")]
    )
    assert headers.get("SET-COOKIE") == "a=1, b=2"
    assert headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert headers["content-type"] == "text/plain"
    assert headers[b"Content-Type"] == "text/plain"
    assert "CONTENT-TYPE" in headers
    assert b"content-type" in headers
    assert "missing" not in headers
    assert 42 not in headers
    assert headers.get("missing") is None
    assert headers.get("missing", "x") == "x"
    assert headers.get_list("missing") == []
    with pytest.raises(KeyError):
        headers["missing"]
    assert list(headers) == ["set-cookie", "content-type"]
    assert headers.keys() == ["set-cookie", "content-type"]
    assert len(headers) == 2
    assert headers.items() == [
        ("Set-Cookie", "a=1"),
        ("Content-Type", "text/plain"),
        ("set-cookie", "b=2"),
    ]
    assert headers.raw == [
        (b"Set-Cookie", b"a=1"),
        (b"Content-Type", b"text/plain"),
        (b"set-cookie", b"b=2"),
    ]


def test_headers_constructors() -> None:
    mixed: dict[str | bytes, str | bytes] = {"A": "1", b"B": b"2"}
    from_mapping = Headers(mixed)
    assert from_mapping.raw == [(b"A", b"1"), (b"B", b"2")]
    assert Headers(None).raw == []
    assert Headers().raw == []
    copied = Headers(from_mapping)
    copied.add("C", "3")
    assert "c" not in from_mapping
    assert Headers([(b"x", "y")]).raw == [(b"x", b"y")]


def test_headers_mutation() -> None:
    headers = Headers([("A", "1"), ("B", "2"), ("a", "3")])
    headers["a"] = "9"
    assert headers.raw == [(b"a", b"9"), (b"B", b"2")]
    headers["New"] = b"x"
    assert headers.raw == [(b"a", b"9"), (b"B", b"2"), (b"New", b"x")]
    headers.add("b", "4")
    assert headers.get("B") == "2, 4"
    del headers["b"]
    assert "b" not in headers
    with pytest.raises(KeyError):
        del headers["b"]
    copy = headers.copy()
    copy.add("Z", "1")
    assert "z" not in headers


def test_headers_lookups_follow_every_change() -> None:
    # Lookups use the lowercased names, remembered between changes: each change must show.
    headers = Headers([("A", "1")])
    assert "b" not in headers
    headers.add("B", "2")
    assert "b" in headers
    assert headers.get("b") == "2"
    headers["C"] = "3"
    assert headers.get_list("c") == ["3"]
    del headers["a"]
    assert "a" not in headers
    assert headers.get("A") is None
    copied = headers.copy()
    also_copied = Headers(headers)
    copied.add("D", "4")
    also_copied["E"] = "5"
    assert "d" in copied
    assert "e" in also_copied
    assert "d" not in headers
    assert "e" not in headers
    assert headers.keys() == ["b", "c"]
    # The lowercased forms of the names asked for are remembered, within a bound.
    many = Headers([(f"X-{i}", "v") for i in range(0, 600, 2)])
    for i in range(600):
        assert (f"x-{i}" in many) is (i % 2 == 0)
        assert (f"X-{i}" in many) is (i % 2 == 0)
    assert len(_models._LOWERED) <= _models._MAX_LOWERED  # pyright: ignore[reportPrivateUsage]


def test_headers_strip_and_latin1() -> None:
    headers = Headers({"A": " \tvalue \t", "B": "caf\u00e9", "C": "x\ty"})
    assert headers.raw == [(b"A", b"value"), (b"B", b"caf\xe9"), (b"C", b"x\ty")]
    assert headers["B"] == "caf\u00e9"


@pytest.mark.parametrize(
    "value",
    ["a\rb", "a\nb", "a\r\nX-Injected: 1", "a\x00b", b"a\nb", b"\x00", "a\x01", "a\x7f", "end\n"],
)
def test_headers_reject_bad_values(value: str | bytes) -> None:
    with pytest.raises(InvalidHeader):
        Headers([("X", value)])
    headers = Headers()
    with pytest.raises(InvalidHeader):
        headers.add("X", value)
    with pytest.raises(InvalidHeader):
        headers["X"] = value
    assert headers.raw == []


@pytest.mark.parametrize("name", ["", "a b", "a:b", "a\r\nb", "caf\u00e9", b"x\x00", "(x)", "a/b"])
def test_headers_reject_bad_names(name: str | bytes) -> None:
    with pytest.raises(InvalidHeader):
        Headers({name: "v"})


def test_headers_reject_non_latin1_and_wrong_types() -> None:
    with pytest.raises(InvalidHeader):
        Headers({"X": "\u2603"})
    with pytest.raises(TypeError):
        Headers({"X": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Headers({1: "x"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Headers([("a", "b", "c")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Headers(["ab"])  # type: ignore[list-item]


def test_headers_equality_and_repr() -> None:
    a = Headers([("A", "1"), ("B", "2"), ("a", "3")])
    assert a == Headers([("b", "2"), ("a", "1"), ("A", "3")])
    assert a != Headers([("a", "3"), ("B", "2"), ("A", "1")])  # order of one name's values
    assert a == [("A", "1"), ("B", "2"), ("a", "3")]
    assert Headers({"X": "1"}) == {"x": "1"}
    assert a != 42
    secret = Headers({"Authorization": "Bearer s3cret", "Accept": "*/*"})
    assert repr(secret) == "Headers([('Authorization', '[secret]'), ('Accept', '*/*')])"


# ---- Request -----------------------------------------------------------------------------


def test_request_basics() -> None:
    request = Request("GET", "https://example.com/x", headers={"Accept": "*/*"})
    assert request.method == "GET"
    assert request.url == URL("https://example.com/x")
    assert request.headers == {"accept": "*/*"}
    assert request.content is None
    assert request.is_replayable
    assert request.is_idempotent
    assert repr(request) == "<Request [GET https://example.com/x]>"
    url = URL("http://h/")
    assert Request("PATCH", url).url is url
    assert Request("custom-Method", url).method == "custom-Method"


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [
        ("GET", True),
        ("HEAD", True),
        ("OPTIONS", True),
        ("TRACE", True),
        ("PUT", True),
        ("DELETE", True),
        ("POST", False),
        ("PATCH", False),
        ("get", False),
    ],
)
def test_request_idempotent(method: str, idempotent: bool) -> None:
    assert Request(method, "http://h/").is_idempotent is idempotent


async def test_request_content_kinds() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"x"  # pragma: no cover (never iterated)

    assert Request("POST", "http://h/", content=b"abc").is_replayable
    from_bytearray = Request("POST", "http://h/", content=bytearray(b"ab"))  # type: ignore[arg-type]
    assert from_bytearray.content == b"ab"
    gen = body()
    streamed = Request("POST", "http://h/", content=gen)
    assert not streamed.is_replayable
    assert streamed.content is gen
    # A str is sent as UTF-8, as httpx sends it.
    assert Request("POST", "http://h/", content="t\u00e9xt").content == b"t\xc3\xa9xt"
    with pytest.raises(TypeError):
        Request("POST", "http://h/", content=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["", "GE T", "GET\r\n", "G\u00c9T", "GET/", "(GET)"])
def test_request_rejects_bad_method(method: str) -> None:
    with pytest.raises(LocalProtocolError):
        Request(method, "http://h/")


def test_request_method_check_is_remembered_but_never_skipped() -> None:
    url = URL("http://h/")
    for i in range(100):  # more methods than are remembered
        assert Request(f"X-{i}", url).method == f"X-{i}"
        assert Request(f"X-{i}", url).method == f"X-{i}"
    assert len(_models._VALID_METHODS) <= _models._MAX_VALID_METHODS  # pyright: ignore[reportPrivateUsage]
    with pytest.raises(LocalProtocolError):
        Request("GE T", url)

    class Method(str):
        __slots__ = ()

    assert Request(Method("GET"), url).method == "GET"
    assert all(type(m) is str for m in _models._VALID_METHODS)  # pyright: ignore[reportPrivateUsage]


def test_request_rejects_bad_url_and_headers() -> None:
    with pytest.raises(TypeError):
        Request(b"GET", "http://h/")  # type: ignore[arg-type]
    with pytest.raises(InvalidURL):
        Request("GET", "ftp://h/")
    with pytest.raises(InvalidHeader):
        Request("GET", "http://h/", headers={"X": "a\r\nb"})


# ---- Timeouts ----------------------------------------------------------------------------


def test_timeouts() -> None:
    default = Timeouts()
    assert (default.connect, default.read, default.write, default.pool) == (5.0, 5.0, 5.0, 5.0)
    custom = Timeouts(connect=None, read=0, write=1, pool=math.inf)
    assert custom.read == 0
    assert custom == Timeouts(None, 0, 1, math.inf)


@pytest.mark.parametrize("field", ["connect", "read", "write", "pool"])
@pytest.mark.parametrize("bad", [-1, -0.001, math.nan])
def test_timeouts_reject(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=field):
        Timeouts(**{field: bad})


def test_timeouts_reject_types() -> None:
    with pytest.raises(TypeError):
        Timeouts(read="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Timeouts(read=True)


# ---- Response ----------------------------------------------------------------------------


class ChunkStream:
    """A `ResponseStream` over a list of chunks that records how it was used."""

    def __init__(self, *chunks: bytes, fail_at: int | None = None) -> None:
        self.chunks = list(chunks)
        self.fail_at = fail_at
        self.reads = 0
        self.closes = 0

    async def receive_some(self) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        if self.fail_at is not None and self.reads == self.fail_at:
            raise OSError("boom")
        return self.chunks.pop(0) if self.chunks else b""

    def receive_buffered(self) -> bytes | None:
        return None  # Only receive_some tells: every chunk is read through it.

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closes += 1


REQUEST = Request("GET", "http://example.com/")


def is_closed(response: Response) -> bool:
    return response.is_closed


async def test_response_aread() -> None:
    stream = ChunkStream(b"hel", b"lo")
    response = Response(200, request=REQUEST, headers={"Content-Length": "5"}, stream=stream)
    assert repr(response) == "<Response [200 OK]>"
    assert response.url == REQUEST.url
    assert response.http_version == "HTTP/1.1"
    with pytest.raises(RuntimeError, match="aread"):
        response.content  # noqa: B018
    assert not is_closed(response)
    with trio.testing.assert_checkpoints():
        assert await response.aread() == b"hello"
    assert response.is_closed
    assert stream.closes == 1
    with trio.testing.assert_checkpoints():
        assert await response.aread() == b"hello"  # stored: idempotent
    assert response.content == b"hello"
    assert response.text == "hello"
    with trio.testing.assert_checkpoints():
        await response.aclose()
    assert stream.closes == 1
    # aread() stored the body, so iterating yields it again.
    assert [chunk async for chunk in response.aiter_bytes()] == [b"hello"]


async def test_response_aiter_bytes() -> None:
    stream = ChunkStream(b"a", b"bc", b"d")
    response = Response(200, request=REQUEST, stream=stream)
    chunks = []
    iterator = response.aiter_bytes()
    for _ in range(10):
        with trio.testing.assert_checkpoints():
            try:
                chunks.append(await iterator.__anext__())
            except StopAsyncIteration:
                break
    assert chunks == [b"a", b"bc", b"d"]
    assert stream.closes == 1
    assert response.is_closed
    with pytest.raises(RuntimeError):
        async for _ in response.aiter_bytes():
            pass  # pragma: no cover
    with pytest.raises(RuntimeError):
        await response.aread()


async def test_response_aclose_before_reading() -> None:
    stream = ChunkStream(b"data")
    response = Response(404, request=REQUEST, reason_phrase="Nope", stream=stream)
    assert repr(response) == "<Response [404 Nope]>"
    await response.aclose()
    await response.aclose()
    assert stream.closes == 1
    assert stream.reads == 0
    assert response.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        await response.aread()


async def test_response_stream_error_closes() -> None:
    stream = ChunkStream(b"a", b"b", fail_at=2)
    response = Response(200, request=REQUEST, stream=stream)
    with pytest.raises(OSError, match="boom"):
        await response.aread()
    assert response.is_closed
    assert stream.closes == 1


async def test_response_empty_and_repr() -> None:
    response = Response(204, request=REQUEST)
    assert await response.aread() == b""
    assert repr(response) == "<Response [204 No Content]>"
    assert repr(Response(599, request=REQUEST)) == "<Response [599]>"


@pytest.mark.parametrize(
    ("content_type", "body", "text"),
    [
        (None, "caf\u00e9".encode(), "caf\u00e9"),
        ("text/plain; charset=latin-1", b"caf\xe9", "caf\u00e9"),
        ('text/plain; charset="ISO-8859-1"', b"caf\xe9", "caf\u00e9"),
        ("text/plain; charset=unknown-codec", "caf\u00e9".encode(), "caf\u00e9"),
        ("text/plain", b"caf\xe9", "caf\ufffd"),
        ("text/html; q=1; CHARSET=utf-16-le", "hi".encode("utf-16-le"), "hi"),
    ],
)
async def test_response_text(content_type: str | None, body: bytes, text: str) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = Response(200, request=REQUEST, headers=headers, stream=ChunkStream(body))
    await response.aread()
    assert response.text == text


async def test_response_replace_stream_wraps_the_body_until_it_is_read() -> None:
    inner = ChunkStream(b"ab")
    response = Response(200, request=REQUEST, stream=inner)
    before: object = response.stream
    assert before is inner

    class Upper:
        async def receive_some(self) -> bytes:
            return (await inner.receive_some()).upper()

        def receive_buffered(self) -> bytes | None:
            return inner.receive_buffered()

        async def aclose(self) -> None:
            await inner.aclose()

    wrapper = Upper()
    with trio.testing.assert_no_checkpoints():
        response.replace_stream(wrapper)
    after: object = response.stream
    assert after is wrapper
    assert await response.aread() == b"AB"
    assert inner.closes == 1
    with pytest.raises(RuntimeError, match="cannot be replaced"):
        response.replace_stream(inner)
    closed = Response(200, request=REQUEST, stream=ChunkStream(b"x"))
    await closed.aclose()
    with pytest.raises(RuntimeError, match="cannot be replaced"):
        closed.replace_stream(inner)
