"""A hostile HTTP/2 server, stream by stream: malformed ``:status``, stream ids running out,
bodies that do not add up to their content-length, a complete response in the middle of an
upload, and GOAWAY, REFUSED_STREAM and connection errors around complete responses.

Real sockets on 127.0.0.1 (port 0). The server is the scripted `H2Server` (a real h2 server
connection) on the accepted socket, with raw frames where the attack needs bytes h2 would not
send. Either the test drives one `HTTP2Connection` on a connected socket (where the pool is
not the point), or a listener runs a script per accepted connection behind `open_client`
(h2c with prior knowledge). Every wait is bounded with `trio.fail_after`; nothing sleeps.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager

import h2.events
import h2.settings
import pytest
import trio
from _h2server import ClientGone, H2Server, ServerStream
from h2.errors import ErrorCodes
from hyperframe.frame import WindowUpdateFrame

from trio_connpool import PoolError, RemoteProtocolError, open_pool
from trio_connpool.http import (
    HTTP2Connection,
    HTTPConnection,
    HTTPConnector,
    HTTPKey,
    Origin,
    Request,
    Response,
    Timeouts,
    open_client,
)

LAST_STREAM_ID = 2**31 - 1


def leave_stream_ids(connection: HTTP2Connection, left: int) -> None:
    """Let ``connection`` open only ``left`` more streams: its next ids end at 2**31 - 1.

    The one place that reaches inside the connection (no server could make it open two
    thousand million streams in a test); adapt it when the connection's internals move.
    """
    connection._core.h2.highest_outbound_stream_id = LAST_STREAM_ID - 2 * left


# Far above what loopback needs; each test's whole run is bounded by it.
WAIT = 5.0
TIMEOUTS = Timeouts(connect=0.5, read=0.5, write=0.5, pool=0.5)
MiB = 1024 * 1024
_MAX_STEPS = 10_000


def public_error(exc: BaseException) -> None:
    """``exc`` is what the library may raise: a public `PoolError` class."""
    assert isinstance(exc, PoolError), repr(exc)
    assert not type(exc).__name__.startswith("_"), type(exc).__name__


def resets(server: H2Server) -> dict[int, ErrorCodes | int]:
    """The RST_STREAM codes the client sent, by stream."""
    return {
        e.stream_id: e.error_code
        for e in server.events
        if isinstance(e, h2.events.StreamReset) and e.remote_reset
    }


# ---- one connection on a connected socket ---------------------------------------------------


@asynccontextmanager
async def connected(
    *, timeouts: Timeouts = TIMEOUTS, auto_ack: bool = True
) -> AsyncGenerator[tuple[HTTP2Connection, H2Server], None]:
    """A started client connection on a real socket, its reader running, and the scripted
    server on the other end; both prefaces exchanged (the client acknowledged our SETTINGS)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        client_stream = await trio.open_tcp_stream("127.0.0.1", port)
        server_stream = await listener.accept()
    origin = Origin("http", "127.0.0.1", port)
    client = HTTP2Connection(client_stream, origin, timeouts=timeouts)
    server = H2Server(server_stream, auto_ack=auto_ack)
    # The attacks send what h2 would refuse to send (a :status of "abc", say).
    server.h2.config.validate_outbound_headers = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await client.start()
                nursery.start_soon(client.run_background)
                await server.start()
                await server.wait_until(
                    lambda: any(
                        isinstance(e, h2.events.SettingsAcknowledged) for e in server.events
                    )
                )
            try:
                yield client, server
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(server_stream)


def url_of(client: HTTP2Connection, path: str) -> str:
    return f"http://127.0.0.1:{client.origin.port}{path}"


async def get(client: HTTP2Connection, path: str, method: str = "GET") -> Response:
    return await client.send_request(Request(method, url_of(client, path)))


def by_path(streams: list[ServerStream], path: bytes) -> ServerStream:
    (stream,) = [s for s in streams if s.header(b":path") == path]
    return stream


async def assert_usable(client: HTTP2Connection, server: H2Server) -> None:
    """The connection is intact and serves one more request."""
    assert client.is_clean() and client.is_ready() and not client.is_closed()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                request = await server.wait_request()
                await server.respond(request.stream_id, body=b"again")

            nursery.start_soon(answer)
            response = await get(client, "/again")
            assert await response.aread() == b"again"
    assert client.is_clean() and client.is_ready()


async def expect_stream_error(client: HTTP2Connection, path: str, method: str = "GET") -> None:
    """The request fails, at its head or in its body, with a public `RemoteProtocolError`."""
    with pytest.raises(RemoteProtocolError) as info:
        response = await get(client, path, method)
        await response.aread()
    public_error(info.value)


# ---- a listener with a script per connection, behind open_client ---------------------------


Script = Callable[[H2Server, int], Awaitable[None]]


class Listener:
    """Accepts h2c connections on 127.0.0.1 and runs ``script(server, index)`` on each."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.servers: list[H2Server] = []
        self.port = 0

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> int:
        """How many streams the client opened, on every connection."""
        return sum(len(server.streams) for server in self.servers)

    async def handle(self, stream: trio.SocketStream) -> None:
        index = len(self.servers)
        server = H2Server(stream)
        self.servers.append(server)
        try:
            await self.script(server, index)
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def listening(script: Script) -> AsyncGenerator[Listener, None]:
    listener = Listener(script)
    async with trio.open_nursery() as nursery:
        (socket_listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, listener.handle, 0, host="127.0.0.1")
        )
        listener.port = socket_listener.socket.getsockname()[1]
        try:
            yield listener
        finally:
            nursery.cancel_scope.cancel()


async def serve_with_index(server: H2Server, index: int) -> None:
    """Answer every request with 200 and a body naming the connection."""
    await server.start()
    await server.serve(lambda _: f"connection {index}".encode())


# ---- 6: a malformed :status fails its stream only -------------------------------------------


@pytest.mark.parametrize(
    "status", [b"abc", b"-1", b"+200", b"2_00", b"0", b"99999", b"099", b"20", b"2000"]
)
async def test_malformed_status_fails_its_stream_only(status: bytes) -> None:
    async with connected() as (client, server):
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_stream_error, client, "/bad")

                async def good() -> None:
                    response = await get(client, "/good")
                    assert response.status_code == 200
                    assert await response.aread() == b"good"

                nursery.start_soon(good)
                streams = await server.wait_requests(2)
                bad, other = by_path(streams, b"/bad"), by_path(streams, b"/good")
                bad.responded = True
                server.h2.send_headers(bad.stream_id, [(b":status", status)])
                await server.flush()
                await server.respond(other.stream_id, body=b"good")
                await server.wait_until(lambda: bad.reset is not None)
        assert resets(server) == {bad.stream_id: ErrorCodes.PROTOCOL_ERROR}
        await assert_usable(client, server)


# ---- 7: stream ids running out --------------------------------------------------------------


class _ScarceIdsConnector(HTTPConnector):
    """An `HTTPConnector` whose first HTTP/2 connection has only ``left`` stream ids left."""

    def __init__(self, left: int) -> None:
        super().__init__(timeouts=TIMEOUTS, http2_weight=10)
        self.left = left
        self.made: list[HTTPConnection] = []

    async def __call__(self, key: HTTPKey) -> HTTPConnection:
        connection = await super().__call__(key)
        if not self.made:
            assert isinstance(connection, HTTP2Connection)
            leave_stream_ids(connection, self.left)
        self.made.append(connection)
        return connection


@pytest.mark.parametrize("concurrent", [False, True])
async def test_requests_go_on_when_stream_ids_run_out(concurrent: bool) -> None:
    left = 3
    connector = _ScarceIdsConnector(left)
    bodies: list[bytes] = []

    async def one(client_get: Callable[[str], Awaitable[Response]], n: int) -> None:
        response = await client_get(listener.url(f"/{n}"))
        assert response.status_code == 200
        bodies.append(response.content)

    async with (
        listening(serve_with_index) as listener,
        open_pool(connector, max_connections_per_key=10, reserve=connector.reserve) as pool,
        open_client(pool=pool, http1=False, http2=True, timeouts=TIMEOUTS) as client,
    ):
        with trio.fail_after(WAIT):
            if concurrent:
                async with trio.open_nursery() as nursery:
                    for n in range(4 * left):
                        nursery.start_soon(one, client.get, n)
            for n in range(4 * left):
                await one(client.get, n)
    # Every request succeeded; the first connection took no more than its ids allowed.
    assert len(bodies) == (8 if concurrent else 4) * left
    assert 0 < bodies.count(b"connection 0") <= left
    assert len(listener.servers) >= 2
    assert all(stream_id <= LAST_STREAM_ID for stream_id in listener.servers[0].streams)


# ---- 8: content-length --------------------------------------------------------------------


async def _send_body(server: H2Server, stream_id: int, body: bytes, *, end: bool) -> None:
    if body:
        server.h2.send_data(stream_id, body, end_stream=end)
    elif end:
        server.h2.end_stream(stream_id)
    await server.flush()


@pytest.mark.parametrize(
    ("body", "end_with_head", "end_after_body"),
    [
        pytest.param(b"", True, False, id="end-stream-on-the-head"),
        pytest.param(b"x" * 50, False, True, id="fewer"),
        pytest.param(b"x" * 150, False, True, id="more"),
        pytest.param(b"x" * 101, False, False, id="more-before-end-stream"),
    ],
)
async def test_body_not_matching_content_length_fails_its_stream_only(
    body: bytes, end_with_head: bool, end_after_body: bool
) -> None:
    async with connected() as (client, server):
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_stream_error, client, "/bad")

                async def good() -> None:
                    response = await get(client, "/good")
                    assert await response.aread() == b"y" * 100

                nursery.start_soon(good)
                streams = await server.wait_requests(2)
                bad, other = by_path(streams, b"/bad"), by_path(streams, b"/good")
                await server.send_headers(
                    bad.stream_id, 200, [(b"content-length", b"100")], end_stream=end_with_head
                )
                if not end_with_head:
                    await _send_body(server, bad.stream_id, body, end=end_after_body)
                # The other stream is answered after the bad one went wrong.
                await server.send_headers(other.stream_id, 200, [(b"content-length", b"100")])
                await server.send_data(other.stream_id, b"y" * 100, end_stream=True)
        await assert_usable(client, server)


@pytest.mark.parametrize("end_with_head", [True, False], ids=["on-the-head", "empty-data"])
@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_no_content_responses_may_announce_a_content_length(
    method: str, status: int, end_with_head: bool
) -> None:
    async with connected() as (client, server):
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:

                async def answer() -> None:
                    request = await server.wait_request()
                    await server.send_headers(
                        request.stream_id,
                        status,
                        [(b"content-length", b"100")],
                        end_stream=end_with_head,
                    )
                    if not end_with_head:
                        await _send_body(server, request.stream_id, b"", end=True)

                nursery.start_soon(answer)
                response = await get(client, "/empty", method)
                assert response.status_code == status
                assert await response.aread() == b""
        await assert_usable(client, server)


# ---- 9: a complete response in the middle of an upload -----------------------------------


async def test_complete_response_during_the_upload_is_the_response() -> None:
    write_timeout = TIMEOUTS.write
    assert write_timeout is not None
    async with connected(auto_ack=False) as (client, server):
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:

                async def answer() -> None:
                    request = await server.wait_request(complete=False)
                    # The default windows, never raised: the client is stuck at 65535 bytes.
                    await server.wait_until(lambda: len(request.body) == 65535)
                    await server.respond(request.stream_id, 413, body=b"too big")
                    await server.wait_until(lambda: request.reset is not None)

                nursery.start_soon(answer)
                start = trio.current_time()
                response = await client.send_request(
                    Request("POST", url_of(client, "/upload"), content=b"u" * MiB)
                )
                assert response.status_code == 413
                assert await response.aread() == b"too big"
                assert trio.current_time() - start < write_timeout
        assert 1 in resets(server)  # the client stopped the upload
        assert len(server.streams[1].body) == 65535
        assert not server.streams[1].ended
        await assert_usable(client, server)


# ---- 10: complete responses around GOAWAY, REFUSED_STREAM and connection errors -----------


async def test_goaway_below_a_completed_stream_delivers_its_response() -> None:
    async with connected() as (client, server):
        bodies: dict[str, bytes] = {}

        async def one(path: str) -> None:
            response = await get(client, path)
            bodies[path] = await response.aread()

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "/first")
                await server.wait_requests(1)
                nursery.start_soon(one, "/second")
                streams = await server.wait_requests(2)
                first, second = by_path(streams, b"/first"), by_path(streams, b"/second")
                assert first.stream_id < second.stream_id
                # The second stream's whole response, then a GOAWAY below it: one write.
                second.responded = True
                server.h2.send_headers(second.stream_id, [(b":status", b"200")])
                server.h2.send_data(second.stream_id, b"complete", end_stream=True)
                await server.send_goaway(last_stream_id=first.stream_id)
                # The first stream is below the GOAWAY: the server still answers it.
                await server.respond(first.stream_id, body=b"below")
        assert bodies == {"/first": b"below", "/second": b"complete"}


@pytest.mark.parametrize("same_write", [False, True], ids=["later", "same-write"])
async def test_refused_stream_after_the_head_is_not_retryable(same_write: bool) -> None:
    async with connected() as (client, server):
        head_returned = trio.Event()

        async def request() -> None:
            with pytest.raises(RemoteProtocolError) as info:
                response = await get(client, "/refused")
                head_returned.set()
                await response.aread()
            public_error(info.value)
            assert getattr(info.value, "retryable", False) is False

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request)
                stream = await server.wait_request()
                stream.responded = True
                server.h2.send_headers(stream.stream_id, [(b":status", b"200")])
                if not same_write:
                    await server.flush()
                    await head_returned.wait()
                server.h2.reset_stream(stream.stream_id, ErrorCodes.REFUSED_STREAM)
                await server.flush()
        await assert_usable(client, server)


async def test_refused_stream_after_the_head_is_not_sent_again_by_the_client() -> None:
    async def script(server: H2Server, index: int) -> None:
        await server.start()
        if index > 0:
            await server.serve()
            return
        stream = await server.wait_request()
        stream.responded = True
        server.h2.send_headers(stream.stream_id, [(b":status", b"200")])
        server.h2.reset_stream(stream.stream_id, ErrorCodes.REFUSED_STREAM)
        await server.flush()
        await server.receive_until_gone()

    async with (
        listening(script) as listener,
        open_client(http1=False, http2=True, timeouts=TIMEOUTS) as client,
    ):
        with trio.fail_after(WAIT), pytest.raises(RemoteProtocolError) as info:
            await client.get(listener.url("/once"))
        public_error(info.value)
        assert getattr(info.value, "retryable", False) is False
        assert listener.requests == 1


async def test_goaway_on_every_connection_ends_the_request() -> None:
    async def script(server: H2Server, index: int) -> None:
        await server.start()
        await server.wait_request()
        await server.send_goaway(last_stream_id=0)
        await server.receive_until_gone()

    # The pool timeout is not what ends this: the retries are bounded by themselves.
    timeouts = Timeouts(connect=0.5, read=0.5, write=0.5, pool=2 * WAIT)
    async with (
        listening(script) as listener,
        open_client(http1=False, http2=True, timeouts=timeouts) as client,
    ):
        with trio.fail_after(WAIT), pytest.raises(RemoteProtocolError) as info:
            await client.get(listener.url("/never"))
        public_error(info.value)
        assert 1 <= len(listener.servers) <= 20
        assert listener.requests <= 20


async def _no_streams_ever(server: H2Server) -> tuple[int, int]:
    """Announce SETTINGS_MAX_CONCURRENT_STREAMS 0 and never raise it; refuse the streams the
    client opened before it knew. Returns (streams refused before, streams opened after the
    client acknowledged the setting), once the client closes."""
    announced = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0}
    server.h2.local_settings = h2.settings.Settings(client=False, initial_values=announced)
    await server.start()
    # Our h2 would fail the whole connection for a stream that crossed the SETTINGS in
    # flight; refusing that stream is our script's job.
    server.h2.local_settings = h2.settings.Settings(client=False)
    acked_at: int | None = None
    with pytest.raises(ClientGone):
        for _ in range(_MAX_STEPS):
            for stream in server.streams.values():
                if not stream.responded and stream.reset is None:
                    await server.reset(stream.stream_id, ErrorCodes.REFUSED_STREAM)
            await server.receive()
            if acked_at is None:
                for position, event in enumerate(server.events):
                    if isinstance(event, h2.events.SettingsAcknowledged):
                        acked_at = position
                        break
    after = server.events[acked_at:] if acked_at is not None else []
    opened_after = sum(isinstance(e, h2.events.RequestReceived) for e in after)
    return len(server.streams), opened_after


async def test_max_concurrent_streams_zero_for_ever_moves_to_a_new_connection() -> None:
    outcome: dict[str, tuple[int, int]] = {}
    first_done = trio.Event()

    async def script(server: H2Server, index: int) -> None:
        if index == 0:
            outcome["first"] = await _no_streams_ever(server)
            first_done.set()
        else:
            await serve_with_index(server, index)

    timeouts = Timeouts(connect=0.5, read=0.5, write=0.5, pool=3.0)
    async with listening(script) as listener:
        async with open_client(http1=False, http2=True, timeouts=timeouts) as client:
            with trio.fail_after(WAIT):
                response = await client.get(listener.url("/somewhere"))
        assert response.content == b"connection 1"
        with trio.fail_after(WAIT):
            await first_done.wait()  # the first connection was closed with the client
    refused, opened_after = outcome["first"]
    assert refused <= 1  # at most the stream that crossed the SETTINGS
    assert opened_after == 0  # the client never opened a stream the server did not allow


BAD_CONNECTION_FRAMES = {
    # DATA on stream 0.
    "data-on-stream-0": struct.pack(">I", 4)[1:] + b"\x00\x00" + struct.pack(">I", 0) + b"junk",
    # WINDOW_UPDATE of 0 on the connection.
    "window-update-0": WindowUpdateFrame(0, window_increment=0).serialize(),
}


@pytest.mark.parametrize("frame", list(BAD_CONNECTION_FRAMES.values()), ids=BAD_CONNECTION_FRAMES)
async def test_complete_response_before_a_connection_error_is_delivered(frame: bytes) -> None:
    async with connected() as (client, server):
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:

                async def complete() -> None:
                    response = await get(client, "/complete")
                    assert response.status_code == 200
                    assert await response.aread() == b"whole"

                nursery.start_soon(complete)
                nursery.start_soon(expect_stream_error, client, "/open")
                streams = await server.wait_requests(2)
                done = by_path(streams, b"/complete")
                done.responded = True
                server.h2.send_headers(done.stream_id, [(b":status", b"200")])
                server.h2.send_data(done.stream_id, b"whole", end_stream=True)
                await server.send_raw(frame)  # one write: the response, then the bad frame
        assert client.is_closed() and not client.is_ready()
