"""Tests of HTTP2Connection against a real h2 server on the far end of a memory stream.

House rules (as in test_http11.py): the server is a scripted coroutine (`tests/_h2server.py`)
in the test's own nursery, the client's `run_background` runs in the same nursery (exactly
what the pool does), every loop is bounded, timeouts run on the autojump clock and are
asserted at exact virtual times, and each test checks what the server received and the
state the connection ends in.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
import trio
import trio.testing
from _h2server import ClientGone, H2Server, ServerStream
from _servers import WAIT, serving
from h2.errors import ErrorCodes

from trio_connpool._exceptions import (
    ReadTimeout,
    RemoteProtocolError,
    ServerDisconnected,
    TransportError,
    WriteTimeout,
)
from trio_connpool.http import Origin, Request, Response, Timeouts, _h2patches
from trio_connpool.http._h2core import H2Core
from trio_connpool.http._http2 import HTTP2Connection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

ORIGIN = Origin("https", "example.com", 443)
URL = "https://example.com/path?q=1"
TIMEOUTS = Timeouts(read=2.5, write=1.5)
MiB = 1024 * 1024


class Harness:
    """A client connection, its scripted server, the nursery both run in, and a log."""

    def __init__(self, client: HTTP2Connection, server: H2Server, nursery: trio.Nursery) -> None:
        self.client = client
        self.server = server
        self.nursery = nursery
        self.callbacks = 0
        self.reader_done = trio.Event()
        client.set_state_callback(self._on_state)

    def _on_state(self) -> None:
        self.callbacks += 1

    async def run_reader(self) -> None:
        try:
            await self.client.run_background()
        finally:
            self.reader_done.set()


@asynccontextmanager
async def connected(
    *,
    settings: dict[h2.settings.SettingCodes, int] | None = None,
    auto_ack: bool = True,
    handshake: bool = True,
    timeouts: Timeouts = TIMEOUTS,
    **options: float | None,
) -> AsyncIterator[Harness]:
    """A started connection with its reader running, and the server's preface exchanged."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = HTTP2Connection(client_stream, ORIGIN, timeouts=timeouts, **options)  # type: ignore[arg-type]
    server = H2Server(server_stream, settings=settings, auto_ack=auto_ack)
    async with trio.open_nursery() as nursery:
        harness = Harness(client, server, nursery)
        await client.start()
        nursery.start_soon(harness.run_reader)
        if handshake:
            await server.start()
            # The client's preface and SETTINGS, then its ACK of ours.
            await server.wait_until(lambda: _settings_acked(server))
            await trio.testing.wait_all_tasks_blocked()
        try:
            yield harness
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
            nursery.cancel_scope.cancel()


def _settings_acked(server: H2Server) -> bool:
    return any(isinstance(e, h2.events.SettingsAcknowledged) for e in server.events)


def resets(server: H2Server) -> dict[int, ErrorCodes | int]:
    """The RST_STREAM codes the client sent, by stream."""
    return {
        e.stream_id: e.error_code
        for e in server.events
        if isinstance(e, h2.events.StreamReset) and e.remote_reset
    }


async def get(client: HTTP2Connection, url: str = URL, **kwargs: object) -> Response:
    return await client.send_request(Request("GET", url, **kwargs))  # type: ignore[arg-type]


async def assert_usable(harness: Harness) -> None:
    """The connection is clean and serves one more request."""
    client, server = harness.client, harness.server
    assert client.is_clean()
    assert client.is_ready()
    assert not client._core.streams  # pyright: ignore[reportPrivateUsage]

    async with serving(lambda: server.reply(body=b"again")):
        response = await get(client)
        assert await response.aread() == b"again"
    assert client.is_clean()
    assert not client._core.streams  # pyright: ignore[reportPrivateUsage]


# ---- basics --------------------------------------------------------------------------------


async def test_get_round_trip() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        assert client.http_version == "HTTP/2"
        assert client.origin == ORIGIN
        assert client.weight == 1
        assert client.capacity == 100

        async with serving(
            lambda: server.reply(headers=[(b"content-type", b"text/plain")], body=b"hi")
        ):
            with trio.testing.assert_checkpoints():
                response = await get(
                    client,
                    headers={
                        "X-Custom": "Value",
                        "Connection": "keep-alive",
                        "Keep-Alive": "5",
                        "TE": "gzip",
                    },
                )
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert response.headers["content-type"] == "text/plain"
        assert await response.aread() == b"hi"
        (request,) = server.streams.values()
        assert request.headers[:4] == [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"example.com"),
            (b":path", b"/path?q=1"),
        ]
        names = [name for name, _ in request.headers]
        assert b"x-custom" in names
        assert not {b"connection", b"keep-alive", b"te", b"host"} & set(names)
        assert request.ended and request.body == b""
        assert client.is_clean() and client.is_ready() and not client.is_closed()
        assert not client._core.streams  # pyright: ignore[reportPrivateUsage]
        assert "1 requests completed" in repr(client)


async def test_host_header_becomes_authority_and_post_body() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.wait_request()
            await server.respond(request.stream_id, status=201, body=bytes(request.body))

        async with serving(answer):
            response = await client.send_request(
                Request("POST", URL, headers={"Host": "other:8443"}, content=b"payload")
            )
        assert response.status_code == 201
        assert await response.aread() == b"payload"
        (request,) = server.streams.values()
        assert request.header(b":authority") == b"other:8443"
        assert request.header(b"content-length") == b"7"
        assert request.header(b"host") is None


async def test_credentials_are_never_indexed_and_headers_lower_cased() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async with serving(server.reply):
            headers = {"Authorization": "Bearer secret", "Cookie": "a=1", "X-Plain": "yes"}
            response = await client.send_request(Request("GET", URL, headers=headers))
            await response.aread()
        (event,) = [e for e in server.events if isinstance(e, h2.events.RequestReceived)]
        assert event.headers is not None
        kinds = {bytes(h[0]): type(h) for h in event.headers}
        assert kinds[b"authorization"] is hpack.NeverIndexedHeaderTuple
        assert kinds[b"cookie"] is hpack.NeverIndexedHeaderTuple
        assert kinds[b"x-plain"] is not hpack.NeverIndexedHeaderTuple
        assert set(kinds) >= {b":method", b":path", b"authorization", b"x-plain"}


async def test_capacity_before_settings_and_callback_on_settings() -> None:
    async with connected(handshake=False, max_concurrent_streams=50) as harness:
        client, server = harness.client, harness.server
        assert client.capacity == 50  # 100 assumed, capped
        server.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10}
        )
        await server.start()
        await server.wait_until(lambda: _settings_acked(server))
        assert client.capacity == 10
        assert harness.callbacks == 1


async def test_interim_responses_are_skipped_and_receive_buffered() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.wait_request()
            server.h2.send_headers(request.stream_id, [(b":status", b"103")])
            await server.respond(request.stream_id, body=b"abc")

        async with serving(answer):
            response = await get(client)
        await trio.testing.wait_all_tasks_blocked()
        assert response.status_code == 200
        stream = response._stream
        receive_buffered = stream.receive_buffered
        with trio.testing.assert_no_checkpoints():
            assert receive_buffered() == b"abc"
            assert receive_buffered() == b""
            assert receive_buffered() == b""
        assert not client._core.streams  # pyright: ignore[reportPrivateUsage]
        await assert_usable(harness)


# ---- multiplexing and flow control --------------------------------------------------------


async def test_100_concurrent_requests_on_one_connection() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            response = await get(client, f"https://example.com/{i}")
            results[i] = await response.aread()

        async def answer_all_at_once() -> None:
            # All 100 requests are open at the same time before any response.
            requests = await server.wait_requests(100)
            for request in requests:
                path = request.header(b":path")
                assert path is not None
                await server.respond(request.stream_id, body=b"r" + path)

        async with serving(answer_all_at_once) as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert results == {i: f"r/{i}".encode() for i in range(100)}
        assert len(server.streams) == 100
        assert sorted(server.streams) == list(range(1, 200, 2))
        assert not client._core.streams  # pyright: ignore[reportPrivateUsage]
        assert client.is_clean()


async def _upload_chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 100_000):
        yield data[start : start + 100_000]


@pytest.mark.parametrize("streamed", [False, True])
async def test_large_bodies_both_ways(streamed: bool) -> None:
    upload = bytes(range(256)) * (4 * MiB // 256)
    download = bytes(reversed(range(256))) * (5 * MiB // 256)
    async with connected() as harness:
        client, server = harness.client, harness.server

        async with serving(lambda: server.reply(body=download)):
            content = _upload_chunks(upload) if streamed else upload
            response = await client.send_request(Request("PUT", URL, content=content))
            received = await response.aread()
        assert received == download
        (request,) = server.streams.values()
        assert bytes(request.body) == upload
        # The server kept its 65535-byte windows, so the 4 MiB upload needed its
        # WINDOW_UPDATEs; the 5 MiB download needed ours (1 MiB stream window).
        updates = [
            e for e in server.events if isinstance(e, h2.events.WindowUpdated) and e.stream_id
        ]
        assert len(updates) >= 4
        assert client.is_clean()


async def test_slow_consumer_does_not_stall_another_stream() -> None:
    big = b"x" * (3 * MiB)
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            slow = await server.wait_request()
            await server.send_headers(slow.stream_id)
            sent = await server.send_available(slow.stream_id, big)
            assert sent == 1 * MiB  # the slow stream's whole window
            fast = await server.wait_request()
            await server.send_headers(fast.stream_id)
            await server.send_data(fast.stream_id, big, end_stream=True)
            # Only now, with the fast response done, does the slow one go on.
            await server.send_data(slow.stream_id, big[sent:], end_stream=True)

        async with serving(answer):
            slow_response = await get(client, "https://example.com/slow")
            fast_response = await get(client, "https://example.com/fast")
            assert await fast_response.aread() == big  # while nobody reads the slow one
            assert await slow_response.aread() == big
        assert client.is_clean()


# ---- cancellation --------------------------------------------------------------------------


async def _cancel_when_blocked(harness: Harness, coro_fn: object) -> None:
    """Run ``coro_fn`` until everything blocks, then cancel it."""
    with trio.CancelScope() as scope:

        async def cancel_later() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

        harness.nursery.start_soon(cancel_later)
        await coro_fn()  # type: ignore[operator]
        raise AssertionError("not cancelled")  # pragma: no cover
    assert scope.cancelled_caught


async def test_cancel_waiting_for_the_head_resets_the_stream() -> None:
    async with connected() as harness:
        await _cancel_when_blocked(harness, lambda: get(harness.client))
        await harness.server.wait_until(lambda: 1 in resets(harness.server))
        assert resets(harness.server) == {1: ErrorCodes.CANCEL}
        await assert_usable(harness)


async def test_cancel_waiting_for_window_resets_the_stream() -> None:
    async with connected(auto_ack=False) as harness:
        request = Request("POST", URL, content=b"x" * 100_000)  # more than the 65535 window
        await _cancel_when_blocked(harness, lambda: harness.client.send_request(request))
        server = harness.server
        await server.wait_until(lambda: 1 in resets(server))
        assert resets(server) == {1: ErrorCodes.CANCEL}
        assert len(server.streams[1].body) == 65535
        # The windows are the server's: open them again for the next request.
        server.h2.acknowledge_received_data(65535, 1)
        await server.flush()
        await assert_usable(harness)


async def test_cancel_waiting_for_a_stream_slot() -> None:
    async with connected(settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}) as h:
        client, server = h.client, h.server
        assert client.capacity == 1
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                response = await get(client)
                assert await response.aread() == b"first"

            nursery.start_soon(first)
            request = await server.wait_request()
            # A second request waits for the slot (the pool would not lease it; a direct
            # caller may): cancel it there, nothing was sent.
            await _cancel_when_blocked(h, lambda: get(client))
            assert len(server.streams) == 1
            await server.respond(request.stream_id, body=b"first")
        assert resets(server) == {}
        await assert_usable(h)


async def test_cancel_in_the_streamed_request_body() -> None:
    never = trio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        yield b"start"
        await never.wait()
        yield b"never"  # pragma: no cover

    async with connected() as harness:
        request = Request("POST", URL, content=stalled_body())
        await _cancel_when_blocked(harness, lambda: harness.client.send_request(request))
        await harness.server.wait_until(lambda: 1 in resets(harness.server))
        assert resets(harness.server) == {1: ErrorCodes.CANCEL}
        assert harness.server.streams[1].body == b"start"
        await assert_usable(harness)


async def test_cancel_while_the_batched_write_is_due() -> None:
    """The first request of a batch writes the batch's frames after a few scheduler passes
    (while another stream is open, whose response could start more requests); cancelled
    meanwhile, it still writes them (the others rely on it), then resets its own stream; the
    request that joined the batch is served."""
    async with connected() as harness:
        client, server = harness.client, harness.server
        scope = trio.CancelScope()
        joined: list[bytes] = []
        held: list[bytes] = []

        async def open_stream() -> None:
            response = await get(client, "https://example.com/held")
            held.append(await response.aread())

        async def due_writer() -> None:
            with scope:
                await get(client, "https://example.com/due")
                raise AssertionError("not cancelled")  # pragma: no cover

        async def joiner() -> None:
            response = await get(client, "https://example.com/joined")
            joined.append(await response.aread())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_stream)
            await server.wait_request()  # alone on the connection, written at once
            nursery.start_soon(due_writer)
            for _ in range(100):  # bounded: the due writer yields at least twice
                if client._flush_due:  # pyright: ignore[reportPrivateUsage]
                    break
                await trio.lowlevel.checkpoint()
            assert client._flush_due  # pyright: ignore[reportPrivateUsage]
            nursery.start_soon(joiner)
            await trio.lowlevel.checkpoint()  # the joiner queues its HEADERS and parks
            scope.cancel()
            # The reset may come in the same read as the batch: wait for both.
            await server.wait_until(lambda: 3 in resets(server) and 5 in server.streams)
            paths = {i: s.header(b":path") for i, s in server.streams.items()}
            assert paths == {1: b"/held", 3: b"/due", 5: b"/joined"}
            await server.respond(5, body=b"joined")
            await server.respond(1, body=b"held")
        assert scope.cancelled_caught
        assert (joined, held) == ([b"joined"], [b"held"])
        assert resets(server) == {3: ErrorCodes.CANCEL}
        await assert_usable(harness)


async def test_cancel_reading_the_body_resets_the_stream() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async with serving(lambda: server.reply_partly(b"part")):
            response = await get(client)
        chunks = response.aiter_bytes()
        assert await chunks.__anext__() == b"part"
        await _cancel_when_blocked(harness, chunks.__anext__)
        await server.wait_until(lambda: 1 in resets(server))
        assert resets(server) == {1: ErrorCodes.CANCEL}
        assert response.is_closed
        await assert_usable(harness)


async def test_response_aclose_before_the_end_resets_and_returns_the_window() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async with serving(lambda: server.reply_partly(b"y" * 200_000)):
            response = await get(client)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_checkpoints():
            await response.aclose()
        await server.wait_until(lambda: 1 in resets(server))
        assert resets(server) == {1: ErrorCodes.CANCEL}
        # The unread bytes were handed back to the connection window.
        window = client._core.h2._inbound_flow_control_window_manager  # pyright: ignore[reportPrivateUsage]
        assert window.current_window_size + window._bytes_processed == 16 * MiB  # pyright: ignore[reportPrivateUsage]
        await assert_usable(harness)


# ---- stream and connection errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retryable"),
    [(ErrorCodes.INTERNAL_ERROR, False), (ErrorCodes.REFUSED_STREAM, True)],
)
async def test_server_reset_raises_remote_protocol_error(
    code: ErrorCodes, retryable: bool
) -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.wait_request()
            await server.reset(request.stream_id, code)

        async with serving(answer):
            with pytest.raises(RemoteProtocolError, match=code.name) as info:
                await get(client)
        assert getattr(info.value, "retryable", False) is retryable
        assert not isinstance(info.value, ServerDisconnected)
        assert info.value.url == URL
        assert resets(server) == {}  # nothing to reset back
        await assert_usable(harness)


async def test_server_reset_in_the_body() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.reply_partly(b"part")
            await trio.testing.wait_all_tasks_blocked()
            await server.reset(request.stream_id)

        async with serving(answer):
            response = await get(client)
            with pytest.raises(RemoteProtocolError, match="INTERNAL_ERROR"):
                await response.aread()
        await assert_usable(harness)


async def test_connection_error_fails_every_stream_at_once(autojump_clock: object) -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        failures: list[tuple[int, BaseException, float]] = []

        async def one(i: int) -> None:
            try:
                response = await get(client, f"https://example.com/{i}")
                await response.aread()
            except RemoteProtocolError as exc:
                failures.append((i, exc, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
            requests = await server.wait_requests(3)
            await server.send_headers(requests[0].stream_id)
            await server.send_data(requests[0].stream_id, b"partial")
            await trio.sleep(1)
            await server.stream.aclose()  # EOF in the middle of everything
        assert len(failures) == 3
        assert {t for _, _, t in failures} == {1.0}  # all at once, no timeout involved
        kinds = sorted(type(exc).__name__ for _, exc, _ in failures)
        # The one that had its head: broken off; the others had nothing yet.
        assert kinds == ["RemoteProtocolError", "ServerDisconnected", "ServerDisconnected"]
        await harness.reader_done.wait()
        assert client.is_closed() and not client.is_clean() and not client.is_ready()
        assert harness.callbacks >= 1
        with pytest.raises(RemoteProtocolError) as info:
            await get(client)
        assert getattr(info.value, "retryable", False)


async def test_protocol_error_fails_every_stream() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            await server.wait_requests(2)
            await server.send_raw(b"\x00\x00\x04\x09\x00\x00\x00\x00\x01junk")

        async def one() -> None:
            with pytest.raises(RemoteProtocolError, match="protocol"):
                await get(client)

        async with serving(answer) as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        await harness.reader_done.wait()
        assert client.is_closed() and not client.is_clean()
        # h2's GOAWAY(PROTOCOL_ERROR) went out before the transport closed.
        await server.receive_until_gone()
        assert server.goaway is not None
        assert server.goaway.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_aclose_fails_open_streams_and_sends_goaway() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                await get(client)
            except TransportError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
            await server.wait_requests(2)
            await trio.testing.wait_all_tasks_blocked()
            with trio.testing.assert_checkpoints():
                await client.aclose()
        assert len(errors) == 2
        assert all(type(e) is TransportError for e in errors)
        assert client.is_closed() and not client.is_ready()
        await client.aclose()  # idempotent
        await server.receive_until_gone()
        assert server.goaway is not None and server.goaway.error_code == ErrorCodes.NO_ERROR
        await harness.reader_done.wait()


# ---- GOAWAY ---------------------------------------------------------------------------------


async def _goaway_scenario(harness: Harness) -> tuple[list[object], list[bool]]:
    """Streams 1 and 3 in flight; GOAWAY(last_stream_id=1), then stream 1's response."""
    client, server = harness.client, harness.server
    outcomes: list[object] = [None, None]
    ready_after_goaway: list[bool] = []

    async def one(i: int) -> None:
        try:
            response = await get(client, f"https://example.com/{i}")
            outcomes[i] = await response.aread()
        except RemoteProtocolError as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0)
        await server.wait_requests(1)
        nursery.start_soon(one, 1)
        await server.wait_requests(2)
        # The bug's shape: GOAWAY first, then the response for a stream it still covers, all
        # in one write (so in one read, one receive_data call, by the client).
        server.streams[1].responded = True
        server.h2.send_headers(1, [(b":status", b"200")])
        server.h2.send_data(1, b"last response", end_stream=True)
        await server.send_goaway(last_stream_id=1, ahead_of_queued=True)
        await trio.testing.wait_all_tasks_blocked()
        ready_after_goaway.append(client.is_ready())
    return outcomes, ready_after_goaway


async def test_goaway_then_last_response_succeeds_1181() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        outcomes, ready = await _goaway_scenario(harness)
        assert outcomes[0] == b"last response"
        error = outcomes[1]
        assert isinstance(error, RemoteProtocolError)
        assert getattr(error, "retryable", False) is True
        assert "GOAWAY" in str(error)
        assert ready == [False]
        # Drained: the connection closed itself (reader returned, GOAWAY sent back).
        await harness.reader_done.wait()
        assert client.is_closed() and not client.is_ready()
        assert harness.callbacks >= 2  # not ready, then closed
        await server.receive_until_gone()
        assert server.goaway is not None


async def test_goaway_workaround_is_needed_1181(monkeypatch: pytest.MonkeyPatch) -> None:
    """With h2's own state machine the last response fails: python-hyper/h2 issue 1181.

    If this test starts failing, h2 has fixed the issue and the workaround can go.
    """
    monkeypatch.setattr(
        _h2patches, "_GracefulStateMachine", h2.connection.H2ConnectionStateMachine
    )
    async with connected() as harness:
        outcomes, _ = await _goaway_scenario(harness)
        assert isinstance(outcomes[0], RemoteProtocolError)


async def test_goaway_lets_open_streams_finish_then_closes() -> None:
    go = trio.Event()
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.wait_request()
            await server.send_goaway(last_stream_id=request.stream_id)
            await server.send_headers(request.stream_id)
            await server.send_data(request.stream_id, b"a" * 100_000)
            await go.wait()
            await server.send_data(request.stream_id, b"b" * 100_000, end_stream=True)

        async with serving(answer):
            response = await get(client)
            await trio.testing.wait_all_tasks_blocked()
            assert not client.is_ready()
            assert not client.is_closed()  # still draining
            with pytest.raises(RemoteProtocolError, match="GOAWAY") as info:
                await get(client)  # no new stream after GOAWAY
            assert getattr(info.value, "retryable", False)
            go.set()
            body = await response.aread()
        assert body == b"a" * 100_000 + b"b" * 100_000
        await harness.reader_done.wait()
        assert client.is_closed()


async def test_goaway_with_nothing_open_closes_at_once() -> None:
    async with connected() as harness:
        await harness.server.send_goaway(last_stream_id=0)
        await harness.reader_done.wait()
        assert harness.client.is_closed()


# ---- SETTINGS and PING ----------------------------------------------------------------------


async def test_settings_lowering_concurrency_below_in_flight() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        results: list[bytes] = []

        async def one(i: int) -> None:
            response = await get(client, f"https://example.com/{i}")
            results.append(await response.aread())

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
            requests = await server.wait_requests(5)
            callbacks = harness.callbacks
            await server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
            await server.wait_until(lambda: client.capacity == 2)
            assert harness.callbacks == callbacks + 1
            # A sixth request waits for a slot while the five in flight finish.
            nursery.start_soon(one, 5)
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.streams) == 5
            for request in requests:
                await server.respond(request.stream_id, body=b"done")
            (late,) = await server.wait_requests(1)
            await server.respond(late.stream_id, body=b"done")
            await server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 50})
            await server.wait_until(lambda: client.capacity == 50)
            assert harness.callbacks == callbacks + 2
        assert results == [b"done"] * 6
        assert client.is_clean()


async def test_server_ping_is_answered() -> None:
    async with connected() as harness:
        await harness.server.ping(b"12345678")
        await harness.server.wait_until(lambda: bool(harness.server.pings_acked))
        assert harness.server.pings_acked == [b"12345678"]


async def test_ping_measures_the_round_trip(autojump_clock: object) -> None:
    async with connected() as harness:

        async def slow_server() -> None:
            await trio.sleep(0.25)
            await harness.server.receive()

        async with serving(slow_server):
            assert await harness.client.ping() == 0.25


async def test_ping_without_answer_times_out(autojump_clock: object) -> None:
    async with connected() as harness:
        with pytest.raises(ReadTimeout):
            await harness.client.ping()
        assert trio.current_time() == 2.5


async def test_keepalive_ping_keeps_a_live_connection(autojump_clock: object) -> None:
    async with connected(ping_interval=10.0, ping_timeout=5.0) as harness:
        with trio.move_on_after(105):
            await harness.server.receive_until_gone()
        assert not harness.client.is_closed()
        pings = [e for e in harness.server.events if isinstance(e, h2.events.PingReceived)]
        assert len(pings) == 10  # one every 10 s of silence


async def test_keepalive_ping_timeout_closes_the_connection(autojump_clock: object) -> None:
    timeouts = Timeouts(read=None, write=1.5)
    async with connected(ping_interval=10.0, ping_timeout=5.0, timeouts=timeouts) as harness:
        client = harness.client
        start = trio.current_time()
        with pytest.raises(ServerDisconnected, match="PING"):
            await get(client)  # the server never reads again
        assert trio.current_time() - start == 15.0
        await harness.reader_done.wait()
        assert client.is_closed() and not client.is_clean()


# ---- timeouts -------------------------------------------------------------------------------


async def test_read_timeout_waiting_for_the_head(autojump_clock: object) -> None:
    async with connected() as harness:
        start = trio.current_time()
        with pytest.raises(ReadTimeout):
            await get(harness.client)
        assert trio.current_time() - start == 2.5
        await harness.server.wait_until(lambda: 1 in resets(harness.server))
        await assert_usable(harness)


async def test_read_timeout_between_body_chunks(autojump_clock: object) -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.wait_request()
            await server.send_headers(request.stream_id)
            await trio.sleep(2)
            await server.send_data(request.stream_id, b"chunk")

        async with serving(answer):
            response = await get(client)
            chunks = response.aiter_bytes()
            assert await chunks.__anext__() == b"chunk"
            got_chunk = trio.current_time()
            with pytest.raises(ReadTimeout):
                await chunks.__anext__()
            assert trio.current_time() - got_chunk == 2.5
        await server.wait_until(lambda: 1 in resets(server))
        await assert_usable(harness)


async def test_write_timeout_waiting_for_window(autojump_clock: object) -> None:
    async with connected(auto_ack=False) as harness:
        client, server = harness.client, harness.server
        start = trio.current_time()
        with pytest.raises(WriteTimeout, match="window"):
            await client.send_request(Request("POST", URL, content=b"z" * 70_000))
        assert trio.current_time() - start == 1.5
        await server.wait_until(lambda: 1 in resets(server))
        server.h2.acknowledge_received_data(65535, 1)
        await server.flush()
        await assert_usable(harness)


async def test_server_complete_response_then_reset_stops_the_upload() -> None:
    """RFC 9113 8.1: a full response followed by RST_STREAM(NO_ERROR) ends the upload."""
    async with connected(auto_ack=False) as harness:
        client, server = harness.client, harness.server

        async def answer() -> None:
            request = await server.wait_request(complete=False)
            await server.wait_until(lambda: len(request.body) == 65535)
            await server.respond(request.stream_id, status=413, body=b"too big")
            await server.reset(request.stream_id, ErrorCodes.NO_ERROR)

        async with serving(answer):
            response = await client.send_request(Request("POST", URL, content=b"q" * 200_000))
        assert response.status_code == 413
        assert await response.aread() == b"too big"
        assert client.is_clean()


async def test_response_stream_ends_with_state_callback_untouched() -> None:
    """Ordinary requests never fire the state callback (only SETTINGS, GOAWAY, close do)."""
    async with connected() as harness:
        before = harness.callbacks
        await assert_usable(harness)
        assert harness.callbacks == before


async def test_server_sees_client_stream_ids_in_order_with_serve() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        async with serving(lambda: server.serve(lambda s: bytes(s.body) or b"empty")):
            for i in range(3):
                response = await client.send_request(Request("POST", URL, content=str(i).encode()))
                assert await response.aread() == str(i).encode()
            await client.aclose()
        assert sorted(server.streams) == [1, 3, 5]
        assert server.client_gone


def test_server_stream_header_helper() -> None:
    stream = ServerStream(1, [(b":path", b"/")])
    assert stream.header(b":path") == b"/"
    assert stream.header(b"x") is None


async def test_client_gone_is_raised_by_the_server() -> None:
    async with connected() as harness:
        await harness.client.aclose()
        with pytest.raises(ClientGone):
            await harness.server.wait_until(lambda: False)


# ---- writes that fail, argument checks --------------------------------------------------------


def _client_send_stream(harness: Harness) -> trio.testing.MemorySendStream:
    stapled = harness.client._stream  # pyright: ignore[reportPrivateUsage]
    assert isinstance(stapled, trio.StapledStream)
    send_stream = stapled.send_stream
    assert isinstance(send_stream, trio.testing.MemorySendStream)
    return send_stream


async def test_write_timeout_breaks_the_connection(autojump_clock: object) -> None:
    async with connected() as harness:
        client = harness.client
        others: list[BaseException] = []

        async def waiting() -> None:
            try:
                await get(client)
            except RemoteProtocolError as exc:
                others.append(exc)

        harness.nursery.start_soon(waiting)
        await harness.server.wait_request()

        async def stall() -> None:
            await trio.sleep_forever()

        _client_send_stream(harness).send_all_hook = stall
        start = trio.current_time()
        with pytest.raises(WriteTimeout):
            await get(client)
        assert trio.current_time() - start == 1.5
        await trio.testing.wait_all_tasks_blocked()
        assert len(others) == 1  # the other stream failed with the connection
        assert not client.is_clean() and client.is_closed()


async def test_broken_write_fails_the_request() -> None:
    async with connected() as harness:

        async def broken() -> None:
            raise trio.BrokenResourceError("peer reset")

        _client_send_stream(harness).send_all_hook = broken
        with pytest.raises(RemoteProtocolError, match="broke while sending"):
            await get(harness.client)
        assert not harness.client.is_clean()
        with pytest.raises(RemoteProtocolError, match="closed"):
            await harness.client.ping()


async def test_post_without_content_and_bad_streamed_chunks() -> None:
    async def bad_body() -> AsyncIterator[bytes]:
        yield "text"  # type: ignore[misc]

    async with connected() as harness:
        client, server = harness.client, harness.server
        with pytest.raises(TypeError, match="bytes"):
            await client.send_request(Request("POST", URL, content=bad_body()))
        await server.wait_until(lambda: 1 in resets(server))

        async def answer() -> None:
            request = await server.wait_request()
            assert request.header(b"content-length") == b"0"
            await server.respond(request.stream_id, status=204)

        async with serving(answer):
            response = await client.send_request(Request("POST", URL))
        assert response.status_code == 204
        assert await response.aread() == b""
        await assert_usable(harness)


async def test_waiting_for_a_stream_slot_times_out(autojump_clock: object) -> None:
    settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}
    async with connected(settings=settings) as harness:
        client = harness.client

        async def occupy_the_slot() -> None:
            with pytest.raises(TransportError):
                await get(client)  # until the connection closes at the end

        harness.nursery.start_soon(occupy_the_slot)
        await harness.server.wait_request()
        start = trio.current_time()
        with pytest.raises(WriteTimeout, match="slot"):
            await get(client)
        assert trio.current_time() - start == 1.5


async def test_misuse_and_repr() -> None:
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        HTTP2Connection(trio.testing.memory_stream_pair()[0], ORIGIN, max_concurrent_streams=0)
    async with connected() as harness:
        client = harness.client
        assert "ACTIVE" in repr(client)
        with pytest.raises(RuntimeError, match="run_background"):
            await client.run_background()
        await harness.server.send_goaway(last_stream_id=0)
        await harness.reader_done.wait()
        assert "CLOSED" in repr(client)


async def test_frames_queued_before_goaway_still_go_out_1181() -> None:
    """h2 drops its outbound buffer on GOAWAY; the PING ACK before it must still be sent."""
    async with connected() as harness:
        server = harness.server
        server.h2.ping(b"pre-away")  # queued, written together with the GOAWAY
        await server.send_goaway(last_stream_id=0)
        await server.receive_until_gone()
        assert server.pings_acked == [b"pre-away"]
        assert server.goaway is not None


# ---- the header-block memories and the cheap stream count -----------------------------------


# Hand-made HPACK (RFC 7541): a literal field with incremental indexing and a new name, and
# an indexed field naming the newest dynamic table entry (index 62).
def _literal_indexed(name: bytes, value: bytes) -> bytes:
    return bytes([0x40, len(name)]) + name + bytes([len(value)]) + value


_NEWEST = b"\xbe"


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    original = hpack.Decoder.decode

    def decode(self: hpack.Decoder, data: bytes, raw: bool = False) -> object:
        calls.append(bytes(data))
        return original(self, data, raw)

    monkeypatch.setattr(hpack.Decoder, "decode", decode)
    return calls


def test_decoder_reuses_a_repeated_block_that_leaves_the_table_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_decodes(monkeypatch)
    decoder = _h2patches._RepeatingBlockDecoder(65536)  # pyright: ignore[reportPrivateUsage]
    # nginx's way: literals (Huffman-coded) that it never indexes, and a static reference.
    encoder = hpack.Encoder()
    encoder.header_table_size = 0
    head = [(b":status", b"200"), (b"server", b"nginx"), (b"date", b"Thu, 01 Jan 2026")]
    block = encoder.encode(head)
    assert decoder.decode(block, raw=True) == head  # the size update to 0: decoded
    block = encoder.encode(head)
    first = decoder.decode(block, raw=True)
    second = decoder.decode(block, raw=True)
    assert first == second == head
    assert first is not second  # h2 may keep or change the list it gets
    assert len(calls) == 2
    # Another block, then the first one again: decoded again (one block is remembered).
    other = encoder.encode([(b":status", b"404")])
    assert decoder.decode(other, raw=True) == [(b":status", b"404")]
    assert decoder.decode(block, raw=True) == head
    assert len(calls) == 4
    # raw=False decodes to str: not the remembered result.
    as_text: list[object] = list(decoder.decode(block))
    assert as_text == [(k.decode(), v.decode()) for k, v in head]
    assert len(calls) == 5


def test_decoder_decodes_again_once_the_table_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    decoder = _h2patches._RepeatingBlockDecoder(65536)  # pyright: ignore[reportPrivateUsage]
    # A block that inserts is decoded every time (and inserts every time).
    insert_a = _literal_indexed(b"x-a", b"1")
    assert decoder.decode(insert_a, raw=True) == [(b"x-a", b"1")]
    assert decoder.decode(insert_a, raw=True) == [(b"x-a", b"1")]
    assert len(decoder.header_table.dynamic_entries) == 2
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-a", b"1")]
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-a", b"1")]
    assert len(calls) == 3  # the second reference was remembered
    # A new entry (more entries): the same reference now names it.
    decoder.decode(_literal_indexed(b"x-b", b"2"), raw=True)
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-b", b"2")]
    # A table of room for one entry: each insertion evicts the last one, so the number of
    # entries stays 1 while the newest entry changes. Identity tells them apart, even when
    # the table is changed behind the decoder's back (decoding forgets the remembered block
    # anyway whenever it decodes another one).
    decoder.decode(b"\x3f\x09", raw=True)  # a size update to 40 octets (RFC 7541 6.3)
    decoder.decode(_literal_indexed(b"x-c", b"3"), raw=True)
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-c", b"3")]
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-c", b"3")]
    decoder.header_table.add(b"x-c", b"4")
    assert len(decoder.header_table.dynamic_entries) == 1
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-c", b"4")]
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-c", b"4")]
    # Same contents, new entry: still decoded again (the entries may have moved).
    decoder.header_table.add(b"x-c", b"4")
    calls.clear()
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-c", b"4")]
    assert len(calls) == 1


def test_decoder_checks_the_limits_of_the_moment() -> None:
    decoder = _h2patches._RepeatingBlockDecoder(65536)  # pyright: ignore[reportPrivateUsage]
    decoder.decode(_literal_indexed(b"x-a", b"1"), raw=True)
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-a", b"1")]
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-a", b"1")]
    decoder.max_header_list_size = 10
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(_NEWEST, raw=True)
    decoder.max_header_list_size = 65536
    assert decoder.decode(_NEWEST, raw=True) == [(b"x-a", b"1")]
    decoder.max_allowed_table_size = 100  # below the table's 4096: the encoder must shrink it
    with pytest.raises(hpack.InvalidTableSizeError):
        decoder.decode(_NEWEST, raw=True)


def _open_streams_in(client: HTTP2Connection) -> tuple[int, int, int]:
    """(streams h2 holds, what send_headers reads, h2's exact count of the open ones)."""
    h2_conn = client._core.h2  # pyright: ignore[reportPrivateUsage]
    return (
        len(h2_conn.streams),
        h2_conn.open_outbound_streams,
        h2_conn.count_open_outbound_streams(),
    )


def _received(request: ServerStream, size: int) -> Callable[[], bool]:
    return lambda: len(request.body) >= size


def _all_reset(requests: list[ServerStream]) -> Callable[[], bool]:
    return lambda: all(request.reset is not None for request in requests)


@pytest.mark.parametrize("way", ["end", "server_reset", "cancel", "aclose", "stop_sending"])
async def test_stream_count_is_right_however_streams_close(way: str) -> None:
    """At the server's limit of 2, streams closed each way free their slot in h2's count.

    If h2's count kept a closed stream, the next pair of requests would exceed the limit.
    """
    settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
    async with connected(settings=settings) as harness:
        client, server = harness.client, harness.server
        closed_by = {
            "end": h2.stream.StreamClosedBy.RECV_END_STREAM,
            "server_reset": h2.stream.StreamClosedBy.RECV_RST_STREAM,
            "cancel": h2.stream.StreamClosedBy.SEND_RST_STREAM,
            "aclose": h2.stream.StreamClosedBy.SEND_RST_STREAM,
            "stop_sending": h2.stream.StreamClosedBy.RECV_RST_STREAM,
        }[way]
        for round_ in range(3):

            async def one(i: int) -> None:
                url = f"https://example.com/{i}"
                if way == "stop_sending":
                    request = Request("POST", url, content=b"q" * (4 * MiB))
                    response = await client.send_request(request)
                    assert await response.aread() == b"too big"
                elif way == "server_reset":
                    with pytest.raises(RemoteProtocolError):
                        await get(client, url)
                elif way == "aclose":
                    response = await get(client, url)
                    await response.aclose()
                else:
                    response = await get(client, url)
                    assert await response.aread() == b"done"

            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(one, i)
                requests = await server.wait_requests(2, complete=way != "stop_sending")
                assert _open_streams_in(client) == (2, 2, 2)  # both slots taken
                for request in requests:
                    if way == "end":
                        await server.respond(request.stream_id, body=b"done")
                    elif way == "server_reset":
                        await server.reset(request.stream_id)
                    elif way == "cancel":
                        pass
                    elif way == "aclose":
                        await server.send_headers(request.stream_id)
                        await server.send_data(request.stream_id, b"partial")
                    else:
                        await server.wait_until(_received(request, 32_768))
                        # The complete response and the reset in one write: the client
                        # stops its upload for the reset, not for a window that ran out.
                        stream_id = request.stream_id
                        server.h2.send_headers(stream_id, [(b":status", b"413")])
                        server.h2.send_data(stream_id, b"too big", end_stream=True)
                        server.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
                        request.responded = True
                        await server.flush()
                if way == "cancel":
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()
            if way in ("cancel", "aclose"):
                await server.wait_until(_all_reset(requests))
            # Forgotten at once, as h2's own count would have done, how each closed kept.
            assert _open_streams_in(client) == (0, 0, 0)
            h2_conn = client._core.h2  # pyright: ignore[reportPrivateUsage]
            for request in requests:
                assert h2_conn._stream_closed_by(request.stream_id) == closed_by  # pyright: ignore[reportPrivateUsage]
            assert len(server.streams) == 2 * (round_ + 1)
        assert client.is_clean()
        await assert_usable(harness)


async def test_goaway_streams_leave_no_count_behind() -> None:
    async with connected() as harness:
        client, server = harness.client, harness.server
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                response = await get(client, f"https://example.com/{i}")
                outcomes.append((await response.aread()).decode())
            except RemoteProtocolError as exc:
                assert getattr(exc, "retryable", False)
                outcomes.append("retry")

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
            requests = await server.wait_requests(3)
            await server.send_goaway(last_stream_id=requests[0].stream_id)
            await server.respond(requests[0].stream_id, body=b"done")
        assert sorted(outcomes) == ["done", "retry", "retry"]
        assert _open_streams_in(client) == (0, 0, 0)
        await harness.reader_done.wait()
        assert client.is_closed()


def _h2_pair(limit: int) -> tuple[_h2patches.PatchedH2Connection, h2.connection.H2Connection]:  # pyright: ignore[reportPrivateUsage]
    """Our h2 connection and an h2 server allowing ``limit`` streams, settings exchanged."""
    client = H2Core(ORIGIN).h2
    server = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit}
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def _request(client: h2.connection.H2Connection, server: h2.connection.H2Connection) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")],
        end_stream=True,
    )
    server.receive_data(client.data_to_send())
    return stream_id


def test_open_outbound_streams_counts_exactly_at_the_limit() -> None:
    client, server = _h2_pair(limit=3)
    first, second = _request(client, server), _request(client, server)
    # Below the limit: the number of streams held, which are both open.
    assert client.open_outbound_streams == 2
    server.send_headers(first, [(b":status", b"200")], end_stream=True)
    client.receive_data(server.data_to_send())
    # Still below the limit: an upper bound (one of the two is closed), h2 keeps both.
    assert client.open_outbound_streams == 2
    assert client.count_open_outbound_streams() == 1
    assert set(client.streams) == {second}  # h2's own count forgot the closed one
    third = _request(client, server)
    server.send_headers(third, [(b":status", b"200")], end_stream=True)
    client.receive_data(server.data_to_send())
    fourth = _request(client, server)
    assert set(client.streams) == {second, third, fourth}
    # At the limit h2 walks: exact, and the closed stream is forgotten as h2 does it.
    assert client.open_outbound_streams == 2
    assert set(client.streams) == {second, fourth}
    assert client._stream_closed_by(third) == h2.stream.StreamClosedBy.RECV_END_STREAM  # pyright: ignore[reportPrivateUsage]
    fifth = _request(client, server)  # fits: two open plus this one
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        _request(client, server)
    assert set(client.streams) == {second, fourth, fifth}
    # forget_closed_stream leaves open and unknown streams alone.
    client.forget_closed_stream(second)
    client.forget_closed_stream(999)
    assert set(client.streams) == {second, fourth, fifth}


def _count_encodes(monkeypatch: pytest.MonkeyPatch, watched: hpack.Encoder) -> list[object]:
    """Record the lists ``watched`` really encodes (hpack's encode, not a remembered block)."""
    calls: list[object] = []
    original = hpack.Encoder.encode

    def encode(self: hpack.Encoder, headers: object, huffman: bool = True) -> bytes:
        if self is watched:
            calls.append(headers)
        return original(self, headers, huffman)  # type: ignore[arg-type]

    monkeypatch.setattr(hpack.Encoder, "encode", encode)
    return calls


def test_encoder_reuses_a_repeated_block_that_leaves_the_table_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder = _h2patches._CappedRepeatingBlockEncoder()  # pyright: ignore[reportPrivateUsage]
    calls = _count_encodes(monkeypatch, encoder)
    reference = hpack.Encoder()  # what every block must be
    fields = [(b":method", b"GET"), (b":authority", b"example.com"), (b"x-a", b"1")]
    for _ in range(4):
        assert encoder.encode(list(fields)) == reference.encode(list(fields))
    # The first one inserted, the second left the table alone, the others were reused.
    assert len(calls) == 2
    # Another list in between inserts: the references move, so the block is encoded again.
    other = [(b"x-b", b"2")]
    assert encoder.encode(list(other)) == reference.encode(list(other))
    assert encoder.encode(list(fields)) == reference.encode(list(fields))
    assert len(calls) == 4
    # The table changed behind the encoder's back: the same number of entries (the table
    # has room for one), another newest entry. Encoded again.
    small = [(b":method", b"GET"), (b"x-a", b"1")]
    encoder.header_table_size = reference.header_table_size = 50
    for _ in range(3):
        assert encoder.encode(list(small)) == reference.encode(list(small))
    assert len(encoder.header_table.dynamic_entries) == 1
    calls.clear()
    for table in (encoder.header_table, reference.header_table):
        table.add(b"x-b", b"2")
    assert encoder.encode(list(small)) == reference.encode(list(small))
    assert len(calls) == 1
    calls.clear()
    # No Huffman coding: another block.
    assert encoder.encode(list(small), huffman=False) == reference.encode(small, False)
    assert len(calls) == 1


def test_encoder_encodes_what_is_not_plain_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _h2patches._CappedRepeatingBlockEncoder()  # pyright: ignore[reportPrivateUsage]
    calls = _count_encodes(monkeypatch, encoder)
    reference = hpack.Encoder()
    secret = [(b":method", b"GET"), hpack.NeverIndexedHeaderTuple(b"authorization", b"x")]
    text = [(":method", "GET"), ("x-a", "1")]
    three = [(b"x-a", b"1", True)]
    for fields in (secret, secret, text, text, three, three, {b"x-a": b"1"}):
        assert encoder.encode(fields) == reference.encode(fields)  # type: ignore[arg-type]
    assert len(calls) == 7
    plain = [(b"x-c", b"3")]
    assert encoder.encode(list(plain)) == reference.encode(list(plain))
    assert encoder.encode(list(plain)) == reference.encode(list(plain))
    # A never-indexed field equal to a remembered plain one is not served from memory.
    marked = [hpack.NeverIndexedHeaderTuple(b"x-c", b"3")]
    assert encoder.encode(marked) == reference.encode(marked)
    # A table size change still to announce goes out first: not the remembered block.
    encoder.header_table_size = reference.header_table_size = 2048
    assert encoder.encode(list(plain)) == reference.encode(list(plain))
    assert encoder.encode(list(plain)) == reference.encode(list(plain))
    assert encoder.encode(list(plain)) == reference.encode(list(plain))
    assert len(calls) == 7 + 2 + 1 + 2


class _CancelAtStep(trio.abc.Instrument):
    """Cancels ``scope`` when ``task`` is about to run its ``at``-th step."""

    def __init__(self, task: trio.lowlevel.Task, at: int, scope: trio.CancelScope) -> None:
        self.task, self.at, self.scope, self.steps = task, at, scope, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            if self.steps == self.at:
                self.scope.cancel()


async def _request_cancelled_at_step(kind: str, at: int) -> bool:
    """One request on a fresh connection, cancelled at its ``at``-th step: whether it was.

    Either way the connection must be left clean, with no stream behind, and serve on.
    """
    async with connected() as harness:
        client, server = harness.client, harness.server

        async def script() -> None:
            request = await server.wait_request(complete=False)
            if kind == "get":
                await server.respond(request.stream_id, body=b"ok")
            else:
                await server.respond(request.stream_id, status=413, body=b"too big")

        scope = trio.CancelScope()
        body = b""
        canceller = _CancelAtStep(trio.lowlevel.current_task(), at, scope)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                trio.lowlevel.add_instrument(canceller)
                response: Response | None = None
                try:
                    with scope:
                        if kind == "get":
                            response = await get(client)
                        else:
                            content = b"u" * (200 * 1024)
                            response = await client.send_request(
                                Request("POST", URL, content=content)
                            )
                        body = await response.aread()
                finally:
                    trio.lowlevel.remove_instrument(canceller)
                    if response is not None:  # as `async with` or `client.request` would
                        with trio.CancelScope(shield=True):
                            await response.aclose()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()  # a script still waiting for the request
        if not scope.cancelled_caught:
            assert body == (b"ok" if kind == "get" else b"too big")
        await trio.testing.wait_all_tasks_blocked()
        await assert_usable(harness)
        return scope.cancelled_caught


@pytest.mark.parametrize("kind", ["get", "upload-answered-early"])
async def test_cancel_at_every_step_of_a_request_leaks_nothing(kind: str) -> None:
    """Cancel a request at its 1st, 2nd, ... scheduling step until it runs to the end.

    Every await of sending, uploading (stopped by a complete early response), waiting for
    the head and reading the body is a point where the cancellation lands. Each cancelled
    request (its response closed, as `async with` would) must leave no stream behind and the
    connection clean and serving.
    """
    cancelled = 0
    for at in range(1, 400):
        if not await _request_cancelled_at_step(kind, at):
            break
        cancelled += 1
    else:  # pragma: no cover
        raise AssertionError("the request never completed")
    assert cancelled >= 3, cancelled
