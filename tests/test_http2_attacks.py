"""Attacks on the HTTP/2 client beyond the first list of hostile servers, and what it does.

Each test is one attack by a hostile (or faulty) server over real sockets on 127.0.0.1
(port 0), or on the core without an event loop, and states what the connection should do.
Every wait is bounded with `trio.fail_after`, every loop is bounded, nothing sleeps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import h2.settings
import hpack
import pytest
import trio
import trio.testing
from _h2hostile import Accepted, frame_header, open_h2_connection, serve_h2, traced_memory
from hyperframe.frame import PingFrame, SettingsFrame

from trio_connpool import PoolError
from trio_connpool.http import Origin, Request, Timeouts
from trio_connpool.http._h2core import ZERO_CAPACITY_GRACE, H2Core

READ = 0.5
TIMEOUTS = Timeouts(connect=2.0, read=READ, write=2.0, pool=5.0)
WAIT = 10.0
_SLOW_READS = Timeouts(connect=2.0, read=5.0, write=5.0, pool=5.0)
_DATA, _HEADERS, _PING = 0x0, 0x1, 0x6
_END_STREAM, _END_HEADERS = 0x1, 0x4
MiB = 1024 * 1024


def _gated_body(gate: trio.Event, *, more: bool) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 10
        await gate.wait()
        if more:
            yield b"b" * 10

    return body()


# ---- a complete response, then the connection ends, while the upload goes on -----------------


@pytest.mark.parametrize("more", [True, False], ids=["next-chunk", "end-of-body"])
@pytest.mark.parametrize("end", ["protocol error", "closed locally"])
async def test_upload_after_a_complete_response_on_a_closed_connection(
    end: str, *, more: bool
) -> None:
    """The server answers a POST in full while its streamed body is still being produced;
    then the connection ends (a frame that breaks the protocol, or `aclose`). When the body
    yields its next chunk (or ends) the upload must stop (StopSending) and the complete response be
    returned (or at worst a PoolError): h2 refuses to send DATA or END_STREAM on a closed
    connection, and its ProtocolError must not escape."""
    gate = trio.Event()
    answered = trio.Event()

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        request = await server.wait_request(complete=False)
        server.streams[request.stream_id].responded = True
        server.h2.send_headers(request.stream_id, [(b":status", b"200")])
        server.h2.send_data(request.stream_id, b"done", end_stream=True)
        if end == "protocol error":
            # One write: the whole response, then a PING on a stream (a connection error).
            await server.send_raw(frame_header(8, _PING, 0, 1) + bytes(8))
        else:
            await server.ping(b"answered")
            await server.wait_until(lambda: b"answered" in server.pings_acked)
            answered.set()  # the client read the response before it acknowledged the PING
        await server.receive_until_gone()

    outcome: list[object] = []
    with trio.fail_after(WAIT):
        async with (
            serve_h2(script) as server,
            open_h2_connection(server.port, timeouts=TIMEOUTS) as (connection, watch),
        ):

            async def post() -> None:
                request = Request(
                    "POST", f"{server.base}/upload", content=_gated_body(gate, more=more)
                )
                try:
                    response = await connection.send_request(request)
                    outcome.append((response.status_code, await response.aread()))
                except Exception as exc:  # (what escapes is the point)
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                if end == "protocol error":
                    await watch.wait_for(connection.is_closed)
                else:
                    await answered.wait()
                    await connection.aclose()
                gate.set()
    (result,) = outcome
    assert result == (200, b"done") or isinstance(result, PoolError), repr(result)


# ---- 1xx responses that decode to 60 KiB of headers from 17 bytes each -----------------------


def _amplified_1xx_flood(stream_id: int, size: int) -> bytes:
    """103 responses whose header lists are 16 references to one 4 KiB HPACK table entry:
    17 bytes each on the wire, 64 KiB of header bytes (within the header list size we
    announce) for h2 to validate byte by byte."""
    encoder = hpack.Encoder()
    headers = [(b":status", b"103")] + [(b"x-big", b"v" * 3990)] * 16
    first = encoder.encode(headers, huffman=False)
    repeat = encoder.encode(headers, huffman=False)
    assert len(repeat) < 20
    frame = frame_header(len(repeat), _HEADERS, _END_HEADERS, stream_id) + repeat
    flood = frame * (size // len(frame))
    return frame_header(len(first), _HEADERS, _END_HEADERS, stream_id) + first + flood


def test_informational_flood_costs_bounded_cpu_per_byte_at_the_core() -> None:
    """64 KiB of 1xx responses (about 2,500 header blocks that refer to the HPACK table)
    must not cost seconds of CPU in one `receive`: the event loop is blocked meanwhile
    (no timeout fires, every other connection stalls). A bound of 0.5 s for 64 KiB is
    generous: a plain 64 KiB response body takes well under a millisecond."""
    core = H2Core(Origin("https", "example.com", 443))
    core.initiate(0.0)
    core.data_to_send()
    core.receive(SettingsFrame(0).serialize(), 0.0)
    stream = core.open_stream(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"e"), (b":path", b"/")],
        end_stream=True,
        url="https://example.com/",
        head_only=False,
    )
    flood = _amplified_1xx_flood(stream.stream_id, 64 * 1024)
    started = time.process_time()
    core.receive(flood, 1.0)
    spent = time.process_time() - started
    assert spent < 0.5, f"{spent:.1f} s of CPU for 64 KiB of 1xx responses"


async def test_informational_flood_does_not_stall_the_event_loop() -> None:
    """Over a socket: the server answers a GET with 128 KiB of amplified 103 responses and
    nothing else. The request must end (ReadTimeout, or the connection failing as flooded)
    near its read timeout, and the event loop must not be blocked for seconds by one read."""

    async def script(accepted: Accepted) -> None:
        request = await accepted.server.wait_request()
        await accepted.server.send_raw(_amplified_1xx_flood(request.stream_id, 128 * 1024))
        await accepted.server.receive_until_gone()

    with trio.fail_after(60):  # the failure mode blocks the loop; the assertion is below
        async with (
            serve_h2(script) as server,
            open_h2_connection(server.port, timeouts=TIMEOUTS) as (connection, _),
        ):
            started = time.perf_counter()
            with pytest.raises(PoolError):
                await connection.send_request(Request("GET", f"{server.base}/"))
            spent = time.perf_counter() - started
    assert spent < READ + 2.0, f"a {READ} s read timeout ended after {spent:.1f} s"


# ---- a response body in one-byte DATA frames, not read yet --------------------------------------


async def test_unread_body_of_one_byte_frames_is_held_within_its_window() -> None:
    """The server sends a response body as 16,384 DATA frames of one byte each (10 bytes on
    the wire per payload byte); the client does not read it yet. What the connection holds
    should stay near the 16 KiB received (the README: "1 MiB of unread DATA per stream and
    16 MiB per connection"); one `bytes` object and deque slot per frame make it about 40
    times that (a full 16 MiB connection window: about 650 MiB)."""
    frames = 16 * 1024
    received = trio.Event()

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        request = await server.wait_request()
        server.streams[request.stream_id].responded = True
        server.h2.send_headers(request.stream_id, [(b":status", b"200")])
        one = frame_header(1, _DATA, 0, request.stream_id) + b"x"
        end = frame_header(0, _DATA, _END_STREAM, request.stream_id)
        await server.send_raw(one * frames + end)
        await server.ping(b"received")
        await server.wait_until(lambda: b"received" in server.pings_acked)
        received.set()
        await server.receive_until_gone()

    with trio.fail_after(3 * WAIT):  # tiny frames under tracemalloc are slow
        async with (
            serve_h2(script) as server,
            open_h2_connection(server.port, timeouts=TIMEOUTS) as (connection, _),
        ):
            with traced_memory() as growth:
                response = await connection.send_request(Request("GET", f"{server.base}/"))
                await received.wait()
                held = growth.now()
            assert await response.aread() == b"x" * frames
    assert held < 4 * frames + 256 * 1024, (
        f"{held / MiB:.1f} MiB held for {frames // 1024} KiB of unread body"
    )


# ---- a request waiting for a stream slot on a connection that retires --------------------------


async def test_a_request_waiting_for_a_slot_learns_at_once_that_the_connection_retired() -> None:
    """One stream is in flight when the server lowers SETTINGS_MAX_CONCURRENT_STREAMS to 0;
    a second request waits for a slot. After the grace period the connection retires (it
    takes no new stream): the waiting request should end then with a retryable error (the
    pool sends it elsewhere), not sit until its write timeout and end with a WriteTimeout
    that is not retryable."""
    timeouts = Timeouts(connect=2.0, read=4.0, write=4.0, pool=5.0)
    waited = trio.Event()

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        first = await server.wait_request()
        await server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
        with trio.move_on_after(WAIT):
            await waited.wait()
        await server.respond(first.stream_id, body=b"first")
        await server.receive_until_gone()

    outcome: list[object] = []
    with trio.fail_after(WAIT):
        async with (
            serve_h2(script) as server,
            open_h2_connection(server.port, timeouts=timeouts) as (connection, watch),
            trio.open_nursery() as nursery,
        ):

            async def first() -> None:
                with contextlib.suppress(PoolError):
                    response = await connection.send_request(Request("GET", f"{server.base}/1"))
                    await response.aread()

            nursery.start_soon(first)
            await watch.wait_for(lambda: connection.capacity == 0)
            started = trio.current_time()
            try:
                await connection.send_request(Request("GET", f"{server.base}/2"))
            except PoolError as exc:
                outcome.append(exc)
            spent = trio.current_time() - started
            waited.set()
    (error,) = outcome
    assert getattr(error, "retryable", False), f"{error!r} after {spent:.1f} s"
    assert spent < ZERO_CAPACITY_GRACE + 1.0, f"{error!r} after {spent:.1f} s"


# ---- small DATA frames still in flight when the client resets a stream ------------------------


async def test_small_frames_in_flight_after_a_reset_are_no_flood() -> None:
    """A server streams a response in small DATA frames (32 bytes: server-sent events, gRPC
    messages); the client closes the response early (RST_STREAM) while another request is in
    flight on the connection. What the server had sent before it saw the reset still arrives,
    up to the stream's 1 MiB window; here 256 KiB of it, sent after the server saw the
    reset (from the client's side the same bytes). h2 answers every frame on the reset
    stream with an RST_STREAM of its own, 13 bytes per 41-byte frame, about 20 KiB per
    64 KiB read: past `MAX_UNSENT_REPLIES` within one read, although the server reads all
    the while. The other request must still get its response."""

    async def script(accepted: Accepted) -> None:
        server = accepted.server
        streams = await server.wait_requests(2)
        (stream,) = [s for s in streams if s.header(b":path") == b"/stream"]
        (other,) = [s for s in streams if s.header(b":path") == b"/other"]
        await server.send_headers(stream.stream_id)
        await server.wait_until(lambda: stream.reset is not None)
        small = frame_header(32, _DATA, 0, stream.stream_id) + b"e" * 32
        await server.send_raw(small * (256 * 1024 // len(small)))
        await server.respond(other.stream_id, body=b"other")
        await server.receive_until_gone()

    outcome: list[object] = []
    with trio.fail_after(WAIT):
        async with (
            serve_h2(script) as server,
            # 256 KiB of tiny frames take h2 a while on a busy machine: the timeouts are
            # generous, the flood check is what is under test.
            open_h2_connection(server.port, timeouts=_SLOW_READS) as (connection, _),
            trio.open_nursery() as nursery,
        ):

            async def other() -> None:
                try:
                    response = await connection.send_request(
                        Request("GET", f"{server.base}/other")
                    )
                    outcome.append(await response.aread())
                except PoolError as exc:
                    outcome.append(exc)

            nursery.start_soon(other)
            response = await connection.send_request(Request("GET", f"{server.base}/stream"))
            await response.aclose()
    assert outcome == [b"other"], outcome


# ---- a server that stops reading while the reader owes it acknowledgements --------------------


async def test_a_suspect_connection_is_resolved_even_without_a_write_timeout() -> None:
    """With ``Timeouts(write=None)``: the server sends PINGs in batches small enough not to
    count as a flood, and stops reading, until the reader blocks writing their
    acknowledgements (a shielded write without a deadline); then it goes silent. A request's
    read timeout makes the connection suspect; its PING cannot go out, and ``ping_timeout``
    later the connection must be closed (the module's rule 1: "unanswered, it fails"). The
    reader's timer cannot fire while it is stuck in the write, so the connection stays
    suspect, neither usable nor closed, for ever."""
    timeouts = Timeouts(connect=2.0, read=READ, write=None, pool=5.0)
    stalled = trio.Event()
    release = trio.Event()

    async def script(accepted: Accepted) -> None:
        batch = b"".join(
            PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(500)
        )
        try:
            for _ in range(2_000):
                with trio.move_on_after(0.5) as scope:
                    await accepted.stream.send_all(batch)
                if scope.cancelled_caught:
                    break  # the client stopped reading: its reader is stuck writing to us
                await trio.testing.wait_all_tasks_blocked()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client gave up on the blocked write first and closed: also an end
        finally:
            stalled.set()
        await release.wait()

    with trio.fail_after(WAIT + 5):
        async with (
            serve_h2(script, rcvbuf=4096) as server,
            open_h2_connection(server.port, timeouts=timeouts, ping_timeout=READ, sndbuf=4096) as (
                connection,
                watch,
            ),
        ):
            await stalled.wait()
            with pytest.raises(PoolError):
                await connection.send_request(Request("GET", f"{server.base}/"))
            with trio.move_on_after(READ + 3.0):
                await watch.wait_for(connection.is_closed)
            closed = connection.is_closed()
            release.set()
    assert closed, "the suspect connection was neither answered nor closed"


# ---- frames that carry nothing (the 2019 "empty frames flood", CVE-2019-9518) -------------------


def _core_with_a_response_head() -> tuple[H2Core, int]:
    core = H2Core(Origin("https", "example.com", 443))
    core.initiate(0.0)
    core.data_to_send()
    core.receive(SettingsFrame(0).serialize(), 0.0)
    stream = core.open_stream(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"e"), (b":path", b"/")],
        end_stream=True,
        url="https://example.com/",
        head_only=False,
    )
    head = hpack.Encoder().encode([(b":status", b"200")])
    core.receive(frame_header(len(head), _HEADERS, _END_HEADERS, stream.stream_id) + head, 0.0)
    return core, stream.stream_id


@pytest.mark.parametrize("kind", ["empty DATA", "unknown type"])
def test_a_flood_of_frames_that_carry_nothing_fails_the_connection(kind: str) -> None:
    """Empty DATA frames without END_STREAM (or frames of an unknown type, which must be
    ignored) need no reply, so `MAX_UNSENT_REPLIES` never sees them, and each costs h2 and
    the core about 15 microseconds: about 0.5 MB/s of them keep the client's event loop
    fully busy, for as long as the server likes. nghttp2 and Go count such frames and fail
    the connection past a budget; here 1 MiB of them (116,000 frames) is taken in silence."""
    core, stream_id = _core_with_a_response_head()
    if kind == "empty DATA":
        frame = frame_header(0, _DATA, 0, stream_id)
    else:
        frame = frame_header(0, 0x20, 0, 0)
    read = frame * (64 * 1024 // len(frame))
    started = time.process_time()
    for _ in range(16):
        core.receive(read, 1.0)
        core.data_to_send()
        if core.is_closed():
            break
    spent = time.process_time() - started
    assert core.is_closed(), f"1 MiB of {kind} frames taken in silence: {core!r}"
    # Timed by size: the flood ends within a couple of 64 KiB reads, not after 1 MiB.
    assert spent < 1.0, f"{spent:.1f} s of CPU before a flood of {kind} frames was refused"


# ---- GOAWAY for a stream whose upload is stuck in a write ------------------------------------


async def test_goaway_during_a_blocked_upload_is_retryable() -> None:
    """The server reads a POST's head, sends GOAWAY with last_stream_id 0 (the request will
    not be processed) and stops reading while the upload is blocked in a write. The stream
    already holds its retryable GOAWAY error; the request should end with it (the pooled
    client then sends it again elsewhere). Instead the drained connection closes itself
    under the blocked write, and the request ends with "the connection was closed locally
    while in use", a TransportError that is not retryable."""
    release = trio.Event()

    async def script(accepted: Accepted) -> None:
        await accepted.server.wait_request(complete=False)
        await accepted.server.send_goaway(0)
        await release.wait()  # reads nothing more

    outcome: list[PoolError] = []
    with trio.fail_after(WAIT):
        async with (
            serve_h2(script, rcvbuf=4096) as server,
            open_h2_connection(server.port, timeouts=TIMEOUTS, sndbuf=4096) as (connection, _),
        ):
            request = Request("POST", f"{server.base}/upload", content=b"u" * (4 * MiB))
            try:
                await connection.send_request(request)
            except PoolError as exc:
                outcome.append(exc)
            release.set()
    (error,) = outcome
    assert getattr(error, "retryable", False), repr(error)
