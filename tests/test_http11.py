"""Tests of HTTP11Connection against a real h11 server on the far end of a memory stream.

House rules: every server is a scripted coroutine in the test's own nursery, every loop is
bounded, timeouts run on the autojump clock (virtual time, asserted exactly), and each test
checks what the server received and the state the connection ends in.
"""

from __future__ import annotations

import select
import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import h11
import pytest
import trio
import trio.testing
import trustme
from _servers import serving

from trio_connpool._exceptions import (
    InvalidHeader,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    ServerDisconnected,
    TransportError,
    WriteTimeout,
)
from trio_connpool.http import (
    HTTP11Connection,
    Origin,
    Request,
    Timeouts,
    create_ssl_context,
    open_stream,
)
from trio_connpool.http._h1 import LocalViolation, RemoteViolation

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

ORIGIN = Origin("http", "example.com", 80)
URL = "http://example.com/path?q=1"
TIMEOUTS = Timeouts(read=2.5, write=1.5)


class ClientGone(Exception):
    """The client closed the connection."""


class Server:
    """A scripted HTTP/1.1 server: a real `h11.Connection(h11.SERVER)` over a stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        self.requests: list[tuple[h11.Request, bytes]] = []

    async def receive_head(self) -> h11.Request:
        for _ in range(1000):
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(bytes(await self.stream.receive_some()))
            elif isinstance(event, h11.Request):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone
            else:  # pragma: no cover
                raise AssertionError(f"unexpected {event!r}")
        raise AssertionError("no request head")  # pragma: no cover

    async def receive_request(self) -> tuple[h11.Request, bytes]:
        head = await self.receive_head()
        body = bytearray()
        for _ in range(100_000):
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(bytes(await self.stream.receive_some()))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.requests.append((head, bytes(body)))
                return head, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone
            else:  # pragma: no cover
                raise AssertionError(f"unexpected {event!r}")
        raise AssertionError("no end of request")  # pragma: no cover

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.h11.send(event)
            if data:
                await self.stream.send_all(data)

    async def respond(
        self,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        next_cycle: bool = True,
    ) -> None:
        all_headers = list(headers)
        if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
            all_headers.append(("Content-Length", str(len(body))))
        await self.send(h11.Response(status_code=status, headers=all_headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        if next_cycle and self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()

    async def reply(
        self, status: int = 200, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        """The plain exchange: read one request, then answer it."""
        await self.receive_request()
        await self.respond(status, headers, body)

    async def reply_partly(self, length: int, part: bytes) -> None:
        """Read one request, then send a head declaring ``length`` bytes and only ``part``."""
        await self.receive_request()
        await self.send(
            h11.Response(status_code=200, headers=[("Content-Length", str(length))]),
            h11.Data(data=part),
        )

    async def receive_until_eof(self) -> bytes:
        """Everything the client sends until it closes the connection."""
        received = bytearray()
        for _ in range(10_000):
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
        return bytes(received)


def header(request: h11.Request, name: bytes) -> list[bytes]:
    return [value for key, value in request.headers if key == name]


@asynccontextmanager
async def connected(
    origin: Origin = ORIGIN, timeouts: Timeouts = TIMEOUTS
) -> AsyncIterator[tuple[HTTP11Connection, Server]]:
    """A connection and its scripted server at the two ends of a memory stream."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    connection = HTTP11Connection(client_stream, origin, timeouts=timeouts)
    try:
        yield connection, Server(server_stream)
    finally:
        await connection.aclose()
        await server_stream.aclose()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[HTTP11Connection, Server]]:
    async with connected() as (connection, server):
        yield connection, server


async def test_get_round_trip(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair
    assert connection.capacity == 1
    assert connection.http_version == "HTTP/1.1"
    assert connection.origin == ORIGIN

    async with serving(
        lambda: server.reply(200, [("Content-Type", "text/plain"), ("X-A", "1")], b"hello")
    ):
        with trio.testing.assert_checkpoints():
            response = await connection.send_request(
                Request("GET", URL, headers={"Accept": "*/*"})
            )
        assert not connection.is_ready()
        assert not connection.is_clean()
        assert not connection.is_closed()
        assert response.status_code == 200
        assert response.reason_phrase == ""
        assert response.http_version == "HTTP/1.1"
        assert response.headers["x-a"] == "1"
        assert await response.aread() == b"hello"
    request, body = server.requests[0]
    assert (request.method, request.target, body) == (b"GET", b"/path?q=1", b"")
    assert header(request, b"host") == [b"example.com"]
    assert header(request, b"accept") == [b"*/*"]
    assert header(request, b"content-length") == []
    assert header(request, b"transfer-encoding") == []
    assert connection.is_ready()
    assert connection.is_clean()
    assert not connection.is_closed()
    assert repr(connection) == (
        "<HTTP11Connection [http://example.com:80, IDLE, 1 requests completed]>"
    )


async def test_keep_alive(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def serve() -> None:
        for index in range(2):
            await server.receive_request()
            await server.respond(200, body=f"reply {index}".encode())

    async with serving(serve):
        for index in range(2):
            response = await connection.send_request(Request("GET", f"http://example.com/{index}"))
            assert await response.aread() == f"reply {index}".encode()
            assert connection.is_ready()
    assert [request.target for request, _ in server.requests] == [b"/0", b"/1"]
    assert "2 requests completed" in repr(connection)


@pytest.mark.parametrize(
    ("origin", "url", "headers", "expected"),
    [
        (Origin("http", "example.com", 8080), "http://example.com:8080/", {}, b"example.com:8080"),
        (Origin("https", "example.com", 443), "https://example.com/", {}, b"example.com"),
        (Origin("http", "::1", 80), "http://[::1]/", {}, b"[::1]"),
        (ORIGIN, URL, {"Host": "virtual.example"}, b"virtual.example"),
    ],
)
async def test_host_header(
    origin: Origin, url: str, headers: dict[str, str], expected: bytes
) -> None:
    async with connected(origin, Timeouts()) as (connection, server), serving(server.reply):
        response = await connection.send_request(Request("GET", url, headers=headers))
        await response.aread()
    assert header(server.requests[0][0], b"host") == [expected]


@pytest.mark.parametrize(
    "headers", [[("Host", "a.example"), ("host", "b.example")], [("HOST", "a"), ("Host", "a")]]
)
async def test_two_host_headers_are_refused(
    pair: tuple[HTTP11Connection, Server], headers: list[tuple[str, str]]
) -> None:
    """Two Host fields could be read one way by a proxy and another by the server."""
    connection, server = pair
    with pytest.raises(InvalidHeader, match="more than one Host") as info:
        await connection.send_request(Request("GET", URL, headers=headers))
    assert info.value.url == URL
    assert connection.is_ready()  # nothing was sent: the connection is still usable
    await connection.aclose()
    assert await server.receive_until_eof() == b""


async def test_stray_bytes_refuse_the_next_request_unsent(
    pair: tuple[HTTP11Connection, Server],
) -> None:
    """Bytes after a complete response are never read as the next request's response."""
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n" + b"HTTP/1.1 200 OK\r\n")

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        assert response.status_code == 204
        assert await response.aread() == b""
    # The stray bytes were there when the body ended: the connection closed at once.
    assert connection.is_closed()
    with pytest.raises(TransportError, match="sent data after the last response"):
        await connection.send_request(Request("POST", URL, content=b"once"))
    assert await server.receive_until_eof() == b""


async def test_streamed_body_reaching_its_length_is_held_until_the_end(
    pair: tuple[HTTP11Connection, Server],
) -> None:
    """The bytes that complete a Content-Length go out only once the body has ended, so a
    body that then goes on is refused before the server has a complete request."""
    connection, server = pair
    sent_first = trio.Event()
    go_on = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cde"
        sent_first.set()
        await go_on.wait()
        yield b"f"

    async with trio.open_nursery() as nursery:

        async def send() -> None:
            with pytest.raises(LocalProtocolError, match="Too much data"):
                await connection.send_request(
                    Request("POST", URL, headers={"Content-Length": "5"}, content=body())
                )

        nursery.start_soon(send)
        await sent_first.wait()
        await trio.testing.wait_all_tasks_blocked()
        received = await server.stream.receive_some()
        assert received.endswith(b"\r\n\r\nab")  # the head and "ab"; "cde" waits
        go_on.set()
    assert connection.is_closed()
    assert await server.receive_until_eof() == b""


@pytest.mark.parametrize("size", [0, 10, 200_000])
async def test_post_bytes(pair: tuple[HTTP11Connection, Server], size: int) -> None:
    connection, server = pair
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async with serving(lambda: server.reply(201, body=b"created")):
        response = await connection.send_request(Request("POST", URL, content=payload))
        assert response.status_code == 201
        assert await response.aread() == b"created"
    request, body = server.requests[0]
    assert body == payload
    assert header(request, b"content-length") == [str(size).encode()]
    assert header(request, b"transfer-encoding") == []
    assert connection.is_ready()


@pytest.mark.parametrize(
    ("method", "content_length"), [("POST", [b"0"]), ("PUT", [b"0"]), ("DELETE", [])]
)
async def test_no_content(
    pair: tuple[HTTP11Connection, Server], method: str, content_length: list[bytes]
) -> None:
    connection, server = pair

    async with serving(server.reply):
        response = await connection.send_request(Request(method, URL))
        await response.aread()
    assert header(server.requests[0][0], b"content-length") == content_length


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def test_post_streamed_chunked(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async with serving(lambda: server.reply(body=b"ok")):
        content = chunks(b"one,", b"", bytearray(b"two,"), b"three")  # type: ignore[arg-type]
        response = await connection.send_request(Request("POST", URL, content=content))
        assert await response.aread() == b"ok"
    request, body = server.requests[0]
    assert body == b"one,two,three"
    assert header(request, b"transfer-encoding") == [b"chunked"]
    assert header(request, b"content-length") == []
    assert connection.is_ready()


@pytest.mark.parametrize(
    ("headers", "te", "length"),
    [
        ({"Content-Length": "6"}, [], [b"6"]),
        ({"Transfer-Encoding": "chunked"}, [b"chunked"], []),
        ({"Content-Length": "6, 6"}, [], [b"6"]),  # h11 reads the list as one value
        ({"content-length": "6", "Connection": "keep-alive"}, [], [b"6"]),
    ],
)
async def test_post_streamed_with_framing_of_its_own(
    pair: tuple[HTTP11Connection, Server],
    headers: dict[str, str],
    te: list[bytes],
    length: list[bytes],
) -> None:
    connection, server = pair

    async with serving(server.reply):
        request = Request("PUT", URL, headers=headers, content=chunks(b"abc", b"def"))
        await (await connection.send_request(request)).aread()
    received, body = server.requests[0]
    assert body == b"abcdef"
    assert header(received, b"transfer-encoding") == te
    assert header(received, b"content-length") == length
    assert connection.is_ready()


async def test_streamed_body_with_connection_header_only_declares_none(
    pair: tuple[HTTP11Connection, Server],
) -> None:
    """Framing headers of the caller's own (Connection) and no length: the body must be
    empty, and a first chunk is refused before any of it is sent."""
    connection, server = pair
    request = Request("PUT", URL, headers={"Connection": "keep-alive"}, content=chunks(b"abc"))
    with pytest.raises(LocalProtocolError, match="Too much data"):
        await connection.send_request(request)
    assert connection.is_closed()
    received = await server.receive_until_eof()
    assert received.endswith(b"\r\n\r\n")  # the head alone


@pytest.mark.parametrize(
    ("headers", "content"),
    [({"Content-Length": "2"}, b"abc"), ({"Content-Length": "5"}, b"abc")],
)
async def test_content_length_mismatch_is_local_error(
    pair: tuple[HTTP11Connection, Server], headers: dict[str, str], content: bytes
) -> None:
    connection, _ = pair
    with pytest.raises(LocalProtocolError) as info:
        await connection.send_request(Request("POST", URL, headers=headers, content=content))
    assert isinstance(info.value.__cause__, LocalViolation)
    assert "Content-Length" in str(info.value)
    assert info.value.url == "http://example.com/path?q=1"
    assert connection.is_closed()


async def test_bad_chunk_type_closes(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, _ = pair

    async def bad() -> AsyncIterator[bytes]:
        yield "text"  # type: ignore[misc]

    with pytest.raises(TypeError, match="bytes"):
        await connection.send_request(Request("POST", URL, content=bad()))
    assert connection.is_closed()


async def test_streamed_large_response(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair
    size = 4 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB

    async def serve() -> None:
        await server.receive_request()
        await server.send(h11.Response(status_code=200, headers=[("Content-Length", str(size))]))
        for _ in range(size // len(piece)):
            await server.send(h11.Data(data=piece))
        await server.send(h11.EndOfMessage())

    received = 0
    reads = 0
    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        async for chunk in response.aiter_bytes():
            assert chunk
            assert chunk == piece[: len(chunk)] or len(chunk) % 256 == 0
            received += len(chunk)
            reads += 1
    assert received == size
    assert reads >= size // (64 * 1024)
    assert response.is_closed
    assert connection.is_ready()


@pytest.mark.parametrize(
    ("method", "status", "headers"),
    [
        ("HEAD", 200, [("Content-Length", "1000")]),
        ("GET", 204, []),
        ("GET", 304, [("Content-Length", "1000")]),
    ],
)
async def test_no_body_responses(
    pair: tuple[HTTP11Connection, Server],
    method: str,
    status: int,
    headers: list[tuple[str, str]],
) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.send(h11.Response(status_code=status, headers=headers), h11.EndOfMessage())
        server.h11.start_next_cycle()
        await server.receive_request()
        await server.respond(body=b"next")

    async with serving(serve):
        response = await connection.send_request(Request(method, URL))
        assert response.status_code == status
        assert await response.aread() == b""
        assert connection.is_ready()
        second = await connection.send_request(Request("GET", URL))
        assert await second.aread() == b"next"
    assert len(server.requests) == 2


async def test_informational_responses_skipped(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.send(
            h11.InformationalResponse(status_code=100, headers=[]),
            h11.InformationalResponse(status_code=103, headers=[("Link", "</a.css>")]),
        )
        await server.respond(200, body=b"final")

    async with serving(serve):
        response = await connection.send_request(Request("POST", URL, content=b"x"))
        assert response.status_code == 200
        assert "link" not in response.headers
        assert await response.aread() == b"final"
    assert connection.is_ready()


async def test_server_connection_close(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair
    rest = b""

    async def serve() -> None:
        nonlocal rest
        await server.receive_request()
        await server.respond(200, [("Connection", "close")], b"bye")
        rest = await server.receive_until_eof()

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        assert not connection.is_closed()
        assert await response.aread() == b"bye"
        assert connection.is_closed()
        assert not connection.is_ready()
    assert rest == b""  # the server saw EOF: the transport was closed
    with pytest.raises(TransportError, match="connection is closed"):
        await connection.send_request(Request("GET", URL))


async def test_client_connection_close(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async with serving(lambda: server.reply(body=b"ok")):
        request = Request("GET", URL, headers={"Connection": "close"})
        await (await connection.send_request(request)).aread()
    assert connection.is_closed()


async def test_truncated_body(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.reply_partly(10, b"12345")
        await server.stream.aclose()

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        with pytest.raises(RemoteProtocolError) as info:
            await response.aread()
    assert type(info.value) is RemoteProtocolError  # not ServerDisconnected: bytes came
    assert connection.is_closed()
    assert not connection.is_clean()
    assert response.is_closed


@pytest.mark.parametrize(
    "junk",
    [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01"],
)
async def test_garbage_response(pair: tuple[HTTP11Connection, Server], junk: bytes) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_head()
        await server.stream.send_all(junk)
        await server.stream.aclose()

    async with serving(serve):
        with pytest.raises(RemoteProtocolError) as info:
            await connection.send_request(Request("GET", URL))
    assert type(info.value) is RemoteProtocolError
    assert connection.is_closed()


@pytest.mark.parametrize("with_head", [True, False], ids=["with-head", "later"])
async def test_invalid_chunk_in_the_body(
    pair: tuple[HTTP11Connection, Server], with_head: bool
) -> None:
    # An invalid chunk that came with the head is met by the buffered read (which must not
    # raise) and reported by the next read; one that comes later by the read itself.
    connection, server = pair
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    body = b"zz\r\nmore"

    async def serve() -> None:
        await server.receive_head()
        if with_head:
            await server.stream.send_all(head + body)
        else:
            await server.stream.send_all(head)
            await trio.sleep(0.01)
            await server.stream.send_all(body)

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        with pytest.raises(RemoteProtocolError, match="illegal chunk header") as info:
            await response.aread()
    assert type(info.value) is RemoteProtocolError
    assert isinstance(info.value.__cause__, RemoteViolation)
    assert info.value.url == "http://example.com/path?q=1"
    assert connection.is_closed()
    assert response.is_closed


async def test_head_too_large(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_head()
        await server.stream.send_all(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000)

    async with serving(serve):
        with pytest.raises(RemoteProtocolError):
            await connection.send_request(Request("GET", URL))
    assert connection.is_closed()


async def test_truncated_head_is_not_disconnect(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_head()
        await server.stream.send_all(b"HTTP/1.1 200 OK\r\n")
        await server.stream.aclose()

    async with serving(serve):
        with pytest.raises(RemoteProtocolError) as info:
            await connection.send_request(Request("GET", URL))
    assert type(info.value) is RemoteProtocolError


@pytest.mark.parametrize("when", ["after_request", "before_request"])
async def test_server_disconnected(pair: tuple[HTTP11Connection, Server], when: str) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.stream.aclose()

    async with trio.open_nursery() as nursery:
        if when == "after_request":
            nursery.start_soon(serve)
        else:
            await server.stream.aclose()  # a keep-alive connection the server timed out
        with pytest.raises(ServerDisconnected) as info:
            await connection.send_request(Request("POST", URL, content=b"data"))
    assert info.value.url == "http://example.com/path?q=1"
    assert info.value.key == ORIGIN
    assert connection.is_closed()
    assert not connection.is_clean()


async def test_server_reset_before_response() -> None:
    """A broken stream (reset) while waiting for the head is a disconnect too."""
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def broken_receive(max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("connection reset")

    client_stream.receive_stream.receive_some = broken_receive  # type: ignore[method-assign, assignment]
    connection = HTTP11Connection(client_stream, ORIGIN)
    with pytest.raises(ServerDisconnected) as info:
        await connection.send_request(Request("GET", URL))
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)
    assert connection.is_closed()
    await connection.aclose()
    await server_stream.aclose()


async def test_early_response_while_uploading(pair: tuple[HTTP11Connection, Server]) -> None:
    """The server answers 413 and closes while the body is still being sent."""
    connection, server = pair
    closed = trio.Event()

    async def serve() -> None:
        await server.receive_head()
        await server.send(
            h11.Response(
                status_code=413, headers=[("Content-Length", "8"), ("Connection", "close")]
            ),
            h11.Data(data=b"too big!"),
            h11.EndOfMessage(),
        )
        await server.stream.aclose()
        closed.set()

    async def upload() -> AsyncIterator[bytes]:
        yield b"first"
        await closed.wait()
        yield b"second"
        yield b"third"  # pragma: no cover (the write of "second" fails)

    async with serving(serve):
        response = await connection.send_request(Request("POST", URL, content=upload()))
        assert response.status_code == 413
        assert await response.aread() == b"too big!"
    assert connection.is_closed()


async def test_read_timeout_waiting_for_head(
    pair: tuple[HTTP11Connection, Server], autojump_clock: trio.testing.MockClock
) -> None:
    connection, server = pair

    async with serving(server.receive_request, hold=True):
        start = trio.current_time()
        with pytest.raises(ReadTimeout) as info:
            await connection.send_request(Request("GET", URL))
        assert trio.current_time() - start == pytest.approx(2.5, abs=1e-9)
    assert info.value.url == "http://example.com/path?q=1"
    assert connection.is_closed()


async def test_read_timeout_in_body(
    pair: tuple[HTTP11Connection, Server], autojump_clock: trio.testing.MockClock
) -> None:
    connection, server = pair

    async with serving(lambda: server.reply_partly(10, b"123"), hold=True):
        response = await connection.send_request(Request("GET", URL))
        iterator = response.aiter_bytes()
        assert await iterator.__anext__() == b"123"
        start = trio.current_time()
        with pytest.raises(ReadTimeout):
            await iterator.__anext__()
        assert trio.current_time() - start == pytest.approx(2.5, abs=1e-9)
    assert connection.is_closed()
    assert response.is_closed


async def test_write_timeout(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    connection = HTTP11Connection(client_stream, ORIGIN, timeouts=TIMEOUTS)
    start = trio.current_time()
    with pytest.raises(WriteTimeout):  # the server never reads
        await connection.send_request(Request("GET", URL))
    assert trio.current_time() - start == pytest.approx(1.5, abs=1e-9)
    assert connection.is_closed()
    await connection.aclose()
    await server_stream.aclose()


async def test_timeouts_bound_each_operation_not_the_exchange(
    pair: tuple[HTTP11Connection, Server], autojump_clock: trio.testing.MockClock
) -> None:
    # read=2.5 and write=1.5 bound each read and write: a body iterator that takes 2 s per
    # chunk, a head after 2 s and body pieces 2 s apart all pass, 10 s in all.
    connection, server = pair

    async def upload() -> AsyncIterator[bytes]:
        for piece in (b"ab", b"cd"):
            await trio.sleep(2)
            yield piece

    async def serve() -> None:
        _, body = await server.receive_request()
        assert body == b"abcd"
        await trio.sleep(2)
        await server.send(h11.Response(status_code=200, headers=[("Content-Length", "2")]))
        for piece in (b"x", b"y"):
            await trio.sleep(2)
            await server.send(h11.Data(data=piece))
        await server.send(h11.EndOfMessage())
        server.h11.start_next_cycle()

    async with serving(serve):
        start = trio.current_time()
        response = await connection.send_request(Request("POST", URL, content=upload()))
        assert await response.aread() == b"xy"
        assert trio.current_time() - start == pytest.approx(10, abs=1e-9)
    assert connection.is_ready()


async def test_no_timeouts() -> None:
    async with (
        connected(timeouts=Timeouts(read=None, write=None)) as (connection, server),
        serving(lambda: server.reply(body=b"ok")),
    ):
        assert await (await connection.send_request(Request("GET", URL))).aread() == b"ok"


async def test_early_close_small_remainder_drains(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair
    first_read = trio.Event()

    async def serve() -> None:
        await server.reply_partly(10000, b"a" * 1000)
        await first_read.wait()
        await server.send(h11.Data(data=b"b" * 9000), h11.EndOfMessage())
        server.h11.start_next_cycle()
        await server.receive_request()
        await server.respond(body=b"second")

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        iterator = response.aiter_bytes()
        assert await iterator.__anext__() == b"a" * 1000
        first_read.set()
        await response.aclose()
        assert connection.is_ready()
        assert connection.is_clean()
        second = await connection.send_request(Request("GET", "http://example.com/2"))
        assert await second.aread() == b"second"
    assert [request.target for request, _ in server.requests] == [b"/path?q=1", b"/2"]


@pytest.mark.parametrize("framing", ["large", "chunked"])
async def test_early_close_large_or_unknown_remainder_closes(
    pair: tuple[HTTP11Connection, Server], framing: str
) -> None:
    connection, server = pair
    rest = b"?"

    async def serve() -> None:
        nonlocal rest
        await server.receive_request()
        headers = (
            [("Content-Length", str(1024 * 1024))]
            if framing == "large"
            else [("Transfer-Encoding", "chunked")]
        )
        await server.send(h11.Response(status_code=200, headers=headers), h11.Data(data=b"a"))
        rest = await server.receive_until_eof()

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        with trio.testing.assert_checkpoints():
            await response.aclose()
        assert connection.is_closed()
        assert response.is_closed
    assert rest == b""


async def test_early_close_drain_timeout_closes(
    pair: tuple[HTTP11Connection, Server], autojump_clock: trio.testing.MockClock
) -> None:
    connection, server = pair

    async with serving(lambda: server.reply_partly(100, b"a"), hold=True):
        response = await connection.send_request(Request("GET", URL))
        start = trio.current_time()
        await response.aclose()  # does not raise
        # A short bound (0.1 s), not the read timeout (2.5 s): aclose() often runs shielded.
        assert trio.current_time() - start == pytest.approx(0.1, abs=1e-9)
        assert connection.is_closed()


async def test_early_close_drain_hits_garbage(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        await server.stream.aclose()  # truncated: the drain fails

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        await response.aclose()
    assert connection.is_closed()


async def test_cancel_during_drain(
    pair: tuple[HTTP11Connection, Server], autojump_clock: trio.testing.MockClock
) -> None:
    connection, server = pair

    async with serving(lambda: server.reply_partly(100, b"a"), hold=True):
        response = await connection.send_request(Request("GET", URL))
        with trio.move_on_after(0.05) as scope:  # within the drain's own 0.1 s
            await response.aclose()
        assert scope.cancelled_caught
        assert connection.is_closed()


async def test_busy_and_closed_refuse(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async with serving(lambda: server.reply(body=b"x")):
        response = await connection.send_request(Request("GET", URL))
        with pytest.raises(RuntimeError, match="not ready"):
            await connection.send_request(Request("GET", URL))
        await response.aread()
    await connection.aclose()
    with trio.testing.assert_checkpoints():
        await connection.aclose()  # idempotent
    assert connection.is_closed()
    with pytest.raises(TransportError, match="connection is closed"):
        await connection.send_request(Request("GET", URL))


async def test_stale_response_object(pair: tuple[HTTP11Connection, Server]) -> None:
    """A response whose connection was closed under it reports it, not a silent end."""
    connection, server = pair

    async with serving(lambda: server.reply_partly(10, b"a")):
        response = await connection.send_request(Request("GET", URL))
    await connection.aclose()
    with pytest.raises(TransportError, match="closed locally"):
        await response.aread()
    await response.aclose()


async def test_trailing_junk_after_response_marks_closed(
    pair: tuple[HTTP11Connection, Server],
) -> None:
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK")

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        assert await response.aread() == b"ok"
    with trio.testing.assert_no_checkpoints():
        assert connection.is_closed()
    assert not connection.is_ready()


async def test_body_reads_are_checkpoints(pair: tuple[HTTP11Connection, Server]) -> None:
    """Every step of the body is a checkpoint, also when the bytes are already buffered."""
    connection, server = pair

    async def serve() -> None:
        await server.receive_request()
        await server.send(
            h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]),
            h11.Data(data=b"a"),
            h11.Data(data=b"b"),
            h11.EndOfMessage(),
        )

    async with serving(serve):
        response = await connection.send_request(Request("GET", URL))
        await trio.testing.wait_all_tasks_blocked()
    iterator = response.aiter_bytes()
    chunks = []
    for _ in range(10):
        with trio.testing.assert_checkpoints():
            try:
                chunks.append(await iterator.__anext__())
            except StopAsyncIteration:
                break
    assert b"".join(chunks) == b"ab"
    assert connection.is_ready()


async def test_aclose_on_broken_transport() -> None:
    class Broken(trio.abc.Stream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            raise AssertionError  # pragma: no cover

        async def wait_send_all_might_not_block(self) -> None:
            raise AssertionError  # pragma: no cover

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            raise AssertionError  # pragma: no cover

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("already broken")

    connection = HTTP11Connection(Broken(), ORIGIN)
    await connection.aclose()
    assert connection.is_closed()


# ---- cancellation at every await -------------------------------------------------------


class CancellingStream(trio.abc.Stream):
    """Wraps a stream; cancels ``scope`` when the ``at``-th send or receive starts."""

    def __init__(self, inner: trio.abc.Stream, at: int, scope: trio.CancelScope) -> None:
        self.inner = inner
        self.at = at
        self.scope = scope
        self.operations = 0
        self.closed = False

    def _tick(self) -> None:
        self.operations += 1
        if self.operations == self.at:
            self.scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._tick()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:  # pragma: no cover
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._tick()
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


async def test_cancel_at_every_stream_operation() -> None:
    """Cancel the exchange at its 1st, 2nd, ... read or write until it runs to the end.

    Each cancelled exchange must leave the connection closed and not clean, with its
    transport closed and no task left behind.
    """
    cancelled_at: list[int] = []
    for at in range(1, 100):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server = Server(server_stream)
        scope = trio.CancelScope()
        wrapped = CancellingStream(client_stream, at, scope)
        connection = HTTP11Connection(wrapped, ORIGIN, timeouts=TIMEOUTS)
        body = b""

        async def serve(server: Server) -> None:
            try:
                await server.receive_request()
                await server.send(
                    h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
                )
                for part in (b"x" * 10, b"y" * 10, b"z" * 10):
                    await trio.testing.wait_all_tasks_blocked()
                    await server.send(h11.Data(data=part))
                await trio.testing.wait_all_tasks_blocked()
                await server.send(h11.EndOfMessage())
            except (ClientGone, trio.BrokenResourceError, h11.RemoteProtocolError):
                pass  # the client was cancelled and closed the connection

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server)
            with scope:
                content = chunks(b"p1", b"p2", b"p3")
                response = await connection.send_request(Request("POST", URL, content=content))
                async for chunk in response.aiter_bytes():
                    body += chunk
            nursery.cancel_scope.cancel()
        await server_stream.aclose()
        if scope.cancelled_caught:
            cancelled_at.append(at)
            assert connection.is_closed()
            assert not connection.is_clean()
            assert not connection.is_ready()
            assert wrapped.closed
        else:
            assert body == b"x" * 10 + b"y" * 10 + b"z" * 10
            assert connection.is_ready()
            await connection.aclose()
            break
    else:  # pragma: no cover
        raise AssertionError("the exchange never completed")
    # 1 head + 3 body chunks + end written, then at least 4 reads.
    assert len(cancelled_at) >= 8
    assert cancelled_at == list(range(1, len(cancelled_at) + 1))


async def test_cancel_while_waiting_for_head(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async with serving(server.receive_request, hold=True) as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(_cancel_when_blocked, scope)
            await connection.send_request(Request("GET", URL))
        assert scope.cancelled_caught
        assert connection.is_closed()


async def test_cancel_while_uploading(pair: tuple[HTTP11Connection, Server]) -> None:
    connection, server = pair

    async def forever() -> AsyncIterator[bytes]:
        yield b"start"
        await trio.sleep_forever()

    async with serving(server.receive_head) as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(_cancel_when_blocked, scope)
            await connection.send_request(Request("POST", URL, content=forever()))
        assert scope.cancelled_caught
        assert connection.is_closed()
        assert not connection.is_clean()


async def _cancel_when_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


# ---- is_closed() on a real socket ------------------------------------------------------


async def test_is_closed_when_the_socket_was_closed_under_it() -> None:
    async with over_loopback() as (connection, _):
        assert not connection.is_closed()
        client = connection._stream  # pyright: ignore[reportPrivateUsage]
        assert isinstance(client, trio.SocketStream)
        client.socket.close()
        assert connection.is_closed()
        # Built on a socket that is closed already.
        assert HTTP11Connection(client, Origin("http", "127.0.0.1", 80)).is_closed()


async def test_is_closed_without_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where select.poll is missing (Windows), select.select does the same check."""
    monkeypatch.delattr(select, "poll")
    async with over_loopback() as (connection, server):
        assert not connection.is_closed()
        await server.send_all(b"junk")
        assert await _wait_closed(connection)


@asynccontextmanager
async def over_loopback() -> AsyncIterator[tuple[HTTP11Connection, trio.SocketStream]]:
    """A connection over a real TCP socket on 127.0.0.1, and the server's end of it."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    connection = HTTP11Connection(client, Origin("http", "127.0.0.1", 80))
    try:
        yield connection, server
    finally:
        await connection.aclose()
        await server.aclose()
        await listener.aclose()


async def _wait_closed(connection: HTTP11Connection) -> bool:
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(200):  # up to 1 s of real time; it usually takes one round
        if connection.is_closed():
            return True
        await trio.sleep(0.005)
    return False  # pragma: no cover


async def test_is_closed_sees_server_close_on_socket() -> None:
    async with over_loopback() as (connection, server):
        with trio.testing.assert_no_checkpoints():
            assert not connection.is_closed()
        await server.aclose()
        assert await _wait_closed(connection)
        assert not connection.is_ready()


async def test_is_closed_after_exchange_on_socket() -> None:
    async with over_loopback() as (connection, server_stream):
        server = Server(server_stream)
        async with serving(lambda: server.reply(body=b"ok")):
            await (await connection.send_request(Request("GET", "http://127.0.0.1/"))).aread()
        await trio.sleep(0.02)
        assert not connection.is_closed()  # idle and quiet: still usable
        assert connection.is_ready()
        await server_stream.send_all(b"junk")
        assert await _wait_closed(connection)


async def test_is_closed_over_tls() -> None:
    """Over TLS: open while idle and quiet, closed once the server closes after an exchange."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = create_ssl_context()
    ca.configure_trust(client_context)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    listener = trio.SSLListener(listeners[0], server_context, https_compatible=True)
    origin = Origin("https", "127.0.0.1", port)
    close_now = trio.Event()

    async def serve() -> None:
        stream = await listener.accept()
        try:
            server = Server(stream)
            await server.receive_request()
            await server.respond(body=b"secure")
            await close_now.wait()
        finally:
            await stream.aclose()

    try:
        async with serving(serve):
            stream, _ = await open_stream(origin, ssl_context=client_context, connect_timeout=5)
            connection = HTTP11Connection(stream, origin)
            try:
                await trio.sleep(0.02)
                assert not connection.is_closed()
                response = await connection.send_request(
                    Request("GET", f"https://127.0.0.1:{port}/")
                )
                assert await response.aread() == b"secure"
                await trio.sleep(0.02)
                assert not connection.is_closed()
                close_now.set()
                assert await _wait_closed(connection)
            finally:
                await connection.aclose()
    finally:
        await listener.aclose()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Content-Length": "abc"}, "bad Content-Length"),
        ({"Transfer-Encoding": "gzip"}, "chunked is supported"),
        # Both at once: a proxy on the way could frame the body the other way (smuggling).
        ({"Content-Length": "3", "Transfer-Encoding": "chunked"}, "both given"),
    ],
)
async def test_bad_framing_header_is_local_error(
    pair: tuple[HTTP11Connection, Server], headers: dict[str, str], message: str
) -> None:
    connection, server = pair
    with pytest.raises(LocalProtocolError, match=message) as info:
        await connection.send_request(Request("POST", URL, headers=headers, content=b"abc"))
    assert isinstance(info.value.__cause__, LocalViolation)
    assert connection.is_closed()
    assert await server.receive_until_eof() == b""  # nothing was sent


async def test_reset_in_the_middle_of_the_body() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    replies = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"]

    async def receive(max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if replies:
            return replies.pop()
        raise trio.BrokenResourceError("connection reset")

    client_stream.receive_stream.receive_some = receive  # type: ignore[method-assign, assignment]
    connection = HTTP11Connection(client_stream, ORIGIN)
    response = await connection.send_request(Request("GET", URL))
    with pytest.raises(RemoteProtocolError) as info:
        await response.aread()
    assert type(info.value) is RemoteProtocolError
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)
    assert connection.is_closed()
    await connection.aclose()
    await server_stream.aclose()


async def test_closed_locally_while_waiting(pair: tuple[HTTP11Connection, Server]) -> None:
    """The pool closing a connection that a request task is using ends that request."""
    connection, server = pair
    async with serving(server.receive_request) as nursery:

        async def close_when_blocked() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await connection.aclose()

        nursery.start_soon(close_when_blocked)
        with pytest.raises(TransportError, match="closed locally"):
            await connection.send_request(Request("GET", URL))
    assert connection.is_closed()
