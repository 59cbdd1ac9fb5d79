"""A hostile HTTP/2 server against the client, on real sockets (127.0.0.1, h2c).

What a server can do to an HTTP/2 client connection, and the bound the client keeps:

1. Refuse every stream (REFUSED_STREAM) for ever after one answer: the request ends after a
   bounded number of attempts, and the next request goes to a new connection.
2. Go silent: a read timeout with nothing received makes the connection suspect; it is
   PINGed, and closed and replaced when no acknowledgement comes. A slow server that is
   alive (it answers the PING, or sends frames meanwhile) keeps its connection.
3. Flood PING or SETTINGS frames while a request body holds the write side: the
   acknowledgements the client queues are bounded; past the bound the connection fails.
4. Announce a huge HPACK table (SETTINGS_HEADER_TABLE_SIZE 2**32-1): the client's encoder
   table stays at 4,096 bytes at most, however many distinct header values it sends.
5. Announce a frame larger than the client's SETTINGS_MAX_FRAME_SIZE: the connection fails
   at once, without waiting for (or buffering) the frame's body.

Only the public surface of the client and the connection is used, plus what the server
observes on the wire (its own h2 state, including its HPACK decoder, which mirrors the
client's encoder). Memory bounds are measured with tracemalloc over the whole process (the
server's side included). Every loop is bounded and every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.events
import h2.settings
import hpack
import pytest
import trio
from _h2hostile import (
    Accepted,
    MemoryGrowth,
    drain_events,
    frame_header,
    open_h2_connection,
    serve_h2,
    traced_memory,
)
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, HeadersFrame, PingFrame, SettingsFrame

from trio_connpool import PoolError, ReadTimeout, RemoteProtocolError
from trio_connpool.http import HTTP2Connection, Request, Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import Iterable

MiB = 1024 * 1024
# Short timeouts, so that the waits under test are short too.
READ = 0.5
TIMEOUTS = Timeouts(connect=2.0, read=READ, write=2.0, pool=5.0)
_STEPS = 100_000  # the bound of every server loop

_DATA = 0x0


def _connection_number(body: bytes) -> int:
    """Which connection (numbered by the server from 1) answered: bodies say ``conn N``."""
    word, number = body.split()
    assert word == b"conn", body
    return int(number)


def _body_of(accepted: Accepted) -> bytes:
    return f"conn {accepted.index}".encode()


# ---- 1. REFUSED_STREAM for ever ----------------------------------------------------------


async def test_a_server_that_refuses_every_stream_after_one_answer() -> None:
    """The server answers the first request, then refuses every stream on every connection.

    The refused request ends within a few seconds with a retryable RemoteProtocolError
    after at most 20 attempts; the next request ends up on a new connection (here one that
    answers): a refusing connection still in service sees it fewer than 5 times in all (then
    it retires).
    """
    refusals: dict[int, int] = {}  # refused streams, by connection
    answered: list[int] = []  # the connection of every answered request
    healthy_from = 0  # connections numbered from here on answer everything

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        answers = healthy_from != 0 and accepted.index >= healthy_from
        refusals[accepted.index] = 0
        for _ in range(_STEPS):
            for request in server.pending():
                if answers or not answered:
                    answered.append(accepted.index)
                    await server.respond(request.stream_id, body=_body_of(accepted))
                else:
                    refusals[accepted.index] += 1
                    await server.reset(request.stream_id, ErrorCodes.REFUSED_STREAM)
            await server.receive()

    with trio.fail_after(15):
        async with (
            serve_h2(script) as server,
            open_client(http2=True, http1=False, timeouts=TIMEOUTS) as client,
        ):
            first = await client.get(f"{server.base}/first")
            assert _connection_number(first.content) == 1

            with trio.move_on_after(5) as scope, pytest.raises(RemoteProtocolError) as caught:
                await client.get(f"{server.base}/refused")
            assert not scope.cancelled_caught, (
                f"still retrying after 5 s; refused streams by connection: {refusals}"
            )
            error = caught.value
            assert getattr(error, "retryable", False) is True
            assert not type(error).__name__.startswith("_"), type(error)
            refused = sum(refusals.values())
            assert 1 <= refused <= 20, refusals

            healthy_from = len(server.connections) + 1
            after = await client.get(f"{server.base}/after")
            assert after.status_code == 200
            assert _connection_number(after.content) >= healthy_from
            # Refusing connections still in service retire after 5 refusals in a row.
            assert sum(refusals.values()) - refused < 5, refusals
            assert answered == [1, _connection_number(after.content)]


# ---- 2. a silent server, and a slow one that is alive ---------------------------------------


async def test_a_silent_connection_is_suspect_after_a_read_timeout_then_closed() -> None:
    """The server answers one request, then stops reading and sends nothing (no close).

    The second request's ReadTimeout makes the connection suspect at once (it takes no new
    request); it sends a PING, and with no acknowledgement within ping_timeout it closes.
    """
    release = trio.Event()
    seen_after_silence: list[h2.events.Event] = []
    drained = trio.Event()

    async def script(accepted: Accepted) -> None:
        request = await accepted.server.wait_request()
        await accepted.server.respond(request.stream_id, body=b"first")
        # Silence: no read, no write, no close, until the client has gone.
        await release.wait()
        seen_after_silence.extend(await drain_events(accepted))
        drained.set()

    with trio.fail_after(10):
        async with serve_h2(script) as server:
            async with open_h2_connection(server.port, timeouts=TIMEOUTS, ping_timeout=READ) as (
                connection,
                watch,
            ):
                first = await connection.send_request(Request("GET", f"{server.base}/first"))
                assert await first.aread() == b"first"
                with pytest.raises(ReadTimeout):
                    await connection.send_request(Request("GET", f"{server.base}/silent"))
                assert not connection.is_ready(), (
                    "a connection that timed out with nothing received still takes requests"
                )
                assert not connection.is_closed()  # not yet: it waits for the PING's answer
                with trio.fail_after(READ + 2):
                    await watch.wait_for(connection.is_closed)
                assert not connection.is_ready()
            release.set()
            await drained.wait()
    pings = [e for e in seen_after_silence if isinstance(e, h2.events.PingReceived)]
    assert pings, f"the client never PINGed the silent server: {seen_after_silence}"


async def test_a_silent_connection_is_replaced_in_the_pool() -> None:
    """Through the client: after the ReadTimeout the next request is served by a second
    connection, which the server accepted."""

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        if accepted.index == 1:
            request = await server.wait_request()
            await server.respond(request.stream_id, body=_body_of(accepted))
            await trio.sleep_forever()  # silent until the test ends
        await server.serve(lambda request: _body_of(accepted))

    with trio.fail_after(10):
        async with (
            serve_h2(script) as server,
            open_client(http2=True, http1=False, timeouts=TIMEOUTS) as client,
        ):
            assert _connection_number((await client.get(f"{server.base}/a")).content) == 1
            with pytest.raises(ReadTimeout):
                await client.get(f"{server.base}/silent")
            response = None
            with trio.move_on_after(READ + 3):
                try:
                    response = await client.get(f"{server.base}/next")
                except PoolError as exc:
                    pytest.fail(f"the next request failed: {exc!r}")
            assert response is not None, "the next request was still waiting"
            assert _connection_number(response.content) == 2
            assert len(server.connections) == 2


@pytest.mark.parametrize("server_pings", [False, True], ids=["quiet", "server-pings"])
async def test_a_slow_but_alive_server_keeps_its_connection(server_pings: bool) -> None:
    """The server never answers ``/slow`` but is alive: it answers PINGs (``quiet``: the
    client's PING after the ReadTimeout) or sends PINGs of its own meanwhile
    (``server-pings``: frames arrived while the request waited). The ReadTimeout leaves the
    connection in the pool: the next request goes to the same connection."""
    slow_requests: list[int] = []  # the index in server.events of each /slow request

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        for _ in range(_STEPS):
            for request in server.pending():
                if request.header(b":path") == b"/slow":
                    request.responded = True  # never answered
                    slow_requests.append(len(server.events))
                    if server_pings:
                        await server.ping()
                else:
                    await server.respond(request.stream_id, body=_body_of(accepted))
            await server.receive()

    with trio.fail_after(10):
        async with (
            serve_h2(script) as server,
            open_client(http2=True, http1=False, timeouts=TIMEOUTS) as client,
        ):
            assert _connection_number((await client.get(f"{server.base}/a")).content) == 1
            with pytest.raises(ReadTimeout):
                await client.get(f"{server.base}/slow")
            response = await client.get(f"{server.base}/next")
            assert _connection_number(response.content) == 1
            assert len(server.connections) == 1
            if not server_pings:
                # Nothing arrived while /slow waited: the client checked the connection
                # with a PING, which the server answered, before using it again.
                events = server.connections[0].server.events
                (slow,) = slow_requests
                assert any(isinstance(e, h2.events.PingReceived) for e in events[slow:]), (
                    "the client used a connection that timed out with nothing received "
                    "without PINGing it"
                )


# ---- 3. a control-frame flood while an upload holds the write side --------------------------

FLOOD_BOUND = 2 * MiB  # the peak memory growth allowed during the flood
FLOOD_OFFERED = 8 * MiB  # what the server is ready to send: far more than the bound
SMALL_BUFFER = 16 * 1024  # SO_SNDBUF/SO_RCVBUF: the upload blocks after a few frames
UPLOAD = 16 * MiB  # never fits in the buffers: the upload cannot finish
FLOOD_WRITE_TIMEOUT = 5.0


def _flood_chunk(kind: str) -> bytes:
    """About 64 KiB of PING or (empty) SETTINGS frames: each asks for an acknowledgement."""
    if kind == "PING":
        ping = PingFrame(0)
        ping.opaque_data = b"floodpng"
        frame = ping.serialize()
    else:
        frame = SettingsFrame(0).serialize()
    return frame * (64 * 1024 // len(frame))


@pytest.mark.parametrize("kind", ["PING", "SETTINGS"])
async def test_a_control_frame_flood_during_an_upload_is_bounded(kind: str) -> None:
    """The server opens large windows, takes the first 256 KiB of a 16 MiB upload, then never
    reads again (so the client's write blocks and holds the write side) and floods PING or
    SETTINGS frames, each of which asks for an acknowledgement that cannot be written.

    The client bounds what it queues: the connection fails with a RemoteProtocolError that
    says "flood", and memory grows by less than 2 MiB at its peak while the server stood
    ready to send 8 MiB of frames (an acknowledgement is as large as the PING it answers).
    """
    chunk = _flood_chunk(kind)
    body = bytes(UPLOAD)
    request_scope = trio.CancelScope()
    flood_done = trio.Event()
    offered = 0  # flood bytes the server sent
    exceeded = ""  # why the server stopped the request early, if it did
    growths: list[MemoryGrowth] = []

    async def script(accepted: Accepted) -> None:
        nonlocal offered, exceeded
        server = accepted.server
        server.h2.increment_flow_control_window(2**31 - 1 - 65535)
        await server.flush()
        # The upload runs (the windows are open) ...
        await server.wait_until(
            lambda: sum(len(s.body) for s in server.streams.values()) >= 256 * 1024
        )
        (upload,) = server.streams.values()
        assert not upload.ended  # (16 MiB cannot have arrived: the upload is under way)
        # ... and from here on the server never reads: the client's writes block.
        try:
            with traced_memory() as growth:
                growths.append(growth)
                for _ in range(FLOOD_OFFERED // len(chunk)):
                    await accepted.stream.send_all(chunk)
                    offered += len(chunk)
                    if growth.peak_so_far() >= FLOOD_BOUND:
                        exceeded = (
                            f"memory grew by {growth.peak_so_far() / MiB:.1f} MiB (bound "
                            f"{FLOOD_BOUND / MiB:.0f} MiB) once the client had read "
                            f"{offered / MiB:.1f} MiB of {kind} frames"
                        )
                        request_scope.cancel()
                        return
        finally:
            flood_done.set()
        await trio.sleep_forever()  # (still not reading) until the client goes

    with trio.fail_after(FLOOD_WRITE_TIMEOUT + 10):
        async with (
            serve_h2(
                script,
                settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1},
                rcvbuf=SMALL_BUFFER,
            ) as server,
            open_h2_connection(
                server.port,
                timeouts=Timeouts(read=FLOOD_WRITE_TIMEOUT, write=FLOOD_WRITE_TIMEOUT),
                sndbuf=SMALL_BUFFER,
                rcvbuf=SMALL_BUFFER,
            ) as (connection, _),
        ):
            outcome: object = None
            with request_scope:
                try:
                    await connection.send_request(
                        Request("POST", f"{server.base}/upload", content=body)
                    )
                    outcome = "a response"
                except PoolError as exc:
                    outcome = exc
            await flood_done.wait()
            assert not exceeded, exceeded
            (growth,) = growths
            assert growth.peak < FLOOD_BOUND, (
                f"peak growth {growth.peak / MiB:.1f} MiB with {offered / MiB:.1f} MiB of "
                f"{kind} frames sent"
            )
            assert isinstance(outcome, RemoteProtocolError), (
                f"the flood ended in {outcome!r} after {offered / MiB:.1f} MiB of {kind} "
                f"frames, peak growth {growth.peak / MiB:.1f} MiB"
            )
            assert "flood" in str(outcome).lower(), outcome
            assert connection.is_closed()


# ---- 4. a server that announces a 4 GiB HPACK table ---------------------------------------

HPACK_REQUESTS = 3000
HPACK_BATCH = 50  # requests in flight at once
HPACK_VALUE = 200  # bytes of each distinct header value
HPACK_TABLE_BOUND = 4096
HPACK_MEMORY_BOUND = 2 * MiB
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _dynamic_table_size(entries: Iterable[tuple[bytes, bytes]]) -> int:
    """RFC 7541 section 4.1: each entry costs its name and value lengths plus 32."""
    return sum(32 + len(name) + len(value) for name, value in entries)


class _HpackMirror:
    """A raw HTTP/2 server that announces SETTINGS_HEADER_TABLE_SIZE 2**32-1, decodes every
    request head with its own HPACK decoder (which accepts a table that large) and answers
    204. It keeps nothing per request, so that only HPACK tables can grow with the requests.

    Its decoder's dynamic table mirrors the client's encoder table entry for entry.
    """

    def __init__(self) -> None:
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 2**32 - 1
        self.largest_table = 0
        self.requests = 0

    async def run(self, accepted: Accepted) -> None:
        stream = accepted.stream
        settings = SettingsFrame(0)
        settings.settings = {
            SettingsFrame.HEADER_TABLE_SIZE: 2**32 - 1,
            SettingsFrame.MAX_CONCURRENT_STREAMS: 100,
        }
        await stream.send_all(settings.serialize())
        buffer = bytearray()
        preface = False
        for _ in range(_STEPS):
            data = await stream.receive_some(64 * 1024)
            if not data:
                return
            buffer += data
            if not preface:
                if len(buffer) < len(_PREFACE):
                    continue
                assert buffer.startswith(_PREFACE)
                del buffer[: len(_PREFACE)]
                preface = True
            out = bytearray()
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                del buffer[: 9 + length]
                out += self._answer(frame)
            self.largest_table = max(
                self.largest_table, _dynamic_table_size(self.decoder.header_table.dynamic_entries)
            )
            if out:
                await stream.send_all(out)

    def _answer(self, frame: Frame) -> bytes:
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            return SettingsFrame(0, flags=["ACK"]).serialize()
        if isinstance(frame, HeadersFrame):
            assert "END_HEADERS" in frame.flags  # (small heads: no CONTINUATION)
            headers = self.decoder.decode(frame.data, raw=True)
            assert any(name == b"x-token" for name, _ in headers)
            self.requests += 1
            # 0x89: ":status: 204" from the static table; no dynamic table on our side.
            answer = HeadersFrame(
                frame.stream_id, data=b"\x89", flags=["END_HEADERS", "END_STREAM"]
            )
            return answer.serialize()
        return b""


async def test_a_huge_hpack_table_setting_keeps_our_encoder_table_at_4096_bytes() -> None:
    """The server announces SETTINGS_HEADER_TABLE_SIZE 2**32-1 and the client sends 3,000
    requests, each with a distinct header value.

    The server's HPACK decoder table mirrors the client's encoder table: it never holds
    more than 4,096 bytes, and memory grows by less than 1 MiB at its peak (tables that kept
    every value would hold 3,000 entries of about 230 bytes on each side).
    """
    mirror = _HpackMirror()

    async def one(connection: HTTP2Connection, base: str, n: int) -> None:
        value = f"{n:08d}".encode() * (HPACK_VALUE // 8)
        response = await connection.send_request(
            Request("GET", f"{base}/", headers=[(b"x-token", value)])
        )
        assert response.status_code == 204
        await response.aread()

    with trio.fail_after(60):
        async with serve_h2(mirror.run, start=False) as server:
            # (A generous read timeout: this test is about memory, not time.)
            timeouts = Timeouts(read=10.0, write=10.0)
            async with open_h2_connection(server.port, timeouts=timeouts) as (connection, _):
                with traced_memory() as growth:
                    for batch in range(0, HPACK_REQUESTS, HPACK_BATCH):
                        async with trio.open_nursery() as nursery:
                            for n in range(batch, batch + HPACK_BATCH):
                                nursery.start_soon(one, connection, server.base, n)
                        assert mirror.largest_table <= HPACK_TABLE_BOUND, (
                            f"after {batch + HPACK_BATCH} requests the server's decoder table "
                            f"(the client's encoder table) holds {mirror.largest_table} bytes"
                        )
                assert mirror.requests == HPACK_REQUESTS
                assert growth.peak < HPACK_MEMORY_BOUND, (
                    f"peak memory growth {growth.peak / MiB:.2f} MiB, {HPACK_REQUESTS} requests"
                )


# ---- 5. a frame larger than our SETTINGS_MAX_FRAME_SIZE ------------------------------------

OVERSIZED_READ = 2.0  # the read timeout: the failure must come long before it
BIG_FRAME_BOUND = 2 * MiB


async def test_an_oversized_frame_header_fails_the_connection_at_once() -> None:
    """For the second request the server sends only the 9-byte header of a DATA frame that
    announces 4 MiB (our SETTINGS_MAX_FRAME_SIZE is 16,384), then stays silent.

    The request fails well before the read timeout with a RemoteProtocolError that names
    the frame (not a ReadTimeout: the body is never waited for), and the next request goes
    to a new connection.
    """

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        if accepted.index == 1:
            request = await server.wait_request()
            await server.respond(request.stream_id, body=_body_of(accepted))
            request = await server.wait_request()
            await server.send_raw(frame_header(4 * MiB, _DATA, 0, request.stream_id))
            await trio.sleep_forever()  # the announced body never comes
        await server.serve(lambda request: _body_of(accepted))

    timeouts = Timeouts(connect=2.0, read=OVERSIZED_READ, write=2.0, pool=5.0)
    with trio.fail_after(10):
        async with (
            serve_h2(script) as server,
            # (No retry of a GET that broke a reused connection: a protocol error is not a
            # stale connection, but this test is about the failure, not about that choice.)
            open_client(http2=True, http1=False, timeouts=timeouts, retry_stale=False) as client,
        ):
            assert _connection_number((await client.get(f"{server.base}/a")).content) == 1
            started = trio.current_time()
            with pytest.raises(PoolError) as caught:
                await client.get(f"{server.base}/oversized")
            elapsed = trio.current_time() - started
            assert isinstance(caught.value, RemoteProtocolError), repr(caught.value)
            assert "frame" in str(caught.value).lower(), caught.value
            assert elapsed < OVERSIZED_READ / 2, elapsed
            response = await client.get(f"{server.base}/next")
            assert _connection_number(response.content) == 2
            assert len(server.connections) == 2


async def test_a_16_mib_data_frame_is_not_buffered() -> None:
    """The server answers a request with one real DATA frame of 2**24-1 bytes (the largest
    a frame header can announce), sent in 64 KiB writes.

    The connection fails with a RemoteProtocolError, and memory grows by less than 2 MiB at
    its peak: the frame is refused on its header, never gathered.
    """
    payload = bytes(64 * 1024)  # sent again and again, so the server allocates nothing
    length = 2**24 - 1
    done = trio.Event()
    sent = 0

    async def script(accepted: Accepted) -> None:
        nonlocal sent
        request = await accepted.server.wait_request()
        try:
            await accepted.server.send_raw(frame_header(length, _DATA, 0, request.stream_id))
            for _ in range(-(-length // len(payload))):
                piece = payload[: length - sent]
                await accepted.stream.send_all(piece)
                sent += len(piece)
        finally:
            done.set()
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with serve_h2(script) as server:
            timeouts = Timeouts(read=10.0, write=10.0)
            async with open_h2_connection(server.port, timeouts=timeouts) as (connection, _):
                with traced_memory() as growth:
                    with pytest.raises(PoolError) as caught:
                        response = await connection.send_request(
                            Request("GET", f"{server.base}/huge")
                        )
                        await response.aread()
                    await done.wait()
                assert growth.peak < BIG_FRAME_BOUND, (
                    f"peak memory growth {growth.peak / MiB:.1f} MiB while the server sent "
                    f"{sent / MiB:.1f} MiB of one DATA frame"
                )
                assert isinstance(caught.value, RemoteProtocolError), repr(caught.value)
                assert connection.is_closed()
