"""HTTP/2 through the client and its pool, over a fake transport: cancellation at the awaits
HTTP/2 adds to connect and request (the preface the connector writes, the PING health check
before a quiet connection is used), and the server changing its stream limit mid-flight.

The transport is faked below `open_stream` only: the client's real connector, pool and
HTTP/2 connection talk to a real h2 server object over trio's in-memory streams
(`lockstep_stream_pair` where a write must block until the server reads).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from _h2server import H2Server
from _servers import assert_pool_balanced

from trio_connpool import Instrument, PoolClosed
from trio_connpool.http import Client, Origin, Timeouts, _client, open_client
from trio_connpool.http._http2 import HTTP2Connection

URL = "https://example.com/"
WRITE = 3.0
TIMEOUTS = Timeouts(connect=10, read=5, write=WRITE)


class FakeNetwork:
    """`open_stream` for the client: each connect makes a stream pair, hands the server end
    to the test, and says ALPN chose h2."""

    def __init__(self, pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]) -> None:
        self._pair = pair
        self.send, self.servers = trio.open_memory_channel[trio.abc.Stream](10)
        self.connects = 0

    async def open_stream(
        self,
        origin: Origin,
        *,
        ssl_context: object,
        connect_timeout: float | None,
        uds: str | None = None,
    ) -> tuple[trio.abc.Stream, str | None]:
        assert uds is None  # TCP only here
        await trio.lowlevel.checkpoint()
        self.connects += 1
        client, server = self._pair()
        self.send.send_nowait(server)
        return client, "h2"


@asynccontextmanager
async def fake_client(
    monkeypatch: pytest.MonkeyPatch,
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    **options: object,
) -> AsyncIterator[tuple[Client, FakeNetwork]]:
    network = FakeNetwork(pair)
    monkeypatch.setattr(_client, "open_stream", network.open_stream)
    async with open_client(http2=True, timeouts=TIMEOUTS, **options) as client:  # type: ignore[arg-type]
        yield client, network


async def _eof(stream: trio.abc.Stream) -> bool:
    """Whether the peer closed ``stream`` (reading what is left first)."""
    for _ in range(10_000):
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        if not data:
            return True
    return False  # pragma: no cover


async def test_requester_cancelled_while_the_preface_write_blocks(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_client(monkeypatch, trio.testing.lockstep_stream_pair) as (client, network):
        pool = client.pool
        assert pool is not None
        with trio.move_on_after(1) as scope:
            await client.get(URL)
        assert scope.cancelled_caught
        # The connect goes on (late binding) and is stuck writing the preface.
        stats = pool.statistics()
        assert (stats.connecting, stats.waiting, stats.leases) == (1, 0, 0)
        server_stream = network.servers.receive_nowait()
        server = H2Server(server_stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            await trio.testing.wait_all_tasks_blocked()
            # The connect finished: its connection went idle, and it serves the next request.
            assert_pool_balanced(pool, idle=1)
            response = await client.get(URL)
            assert response.http_version == "HTTP/2"
            assert network.connects == 1
            assert_pool_balanced(pool, idle=1)
            nursery.cancel_scope.cancel()


async def test_pool_closed_while_the_preface_write_blocks(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    begun = trio.current_time()
    errors: list[PoolClosed] = []

    async def request(client: Client) -> None:
        try:
            await client.get(URL)
        except PoolClosed as exc:
            errors.append(exc)

    async with (
        trio.open_nursery() as nursery,
        fake_client(monkeypatch, trio.testing.lockstep_stream_pair) as (client, network),
    ):
        nursery.start_soon(request, client)
        await trio.testing.wait_all_tasks_blocked()
        pool = client.pool
        assert pool is not None
        assert pool.statistics().connecting == 1
        server_stream = network.servers.receive_nowait()
        # The block ends with the connect stuck in its (shielded) preface write.
    assert len(errors) == 1
    # The write is shielded (half a frame would break the connection) but bounded by the
    # write timeout; then the stream is closed, never leaked.
    assert trio.current_time() - begun <= WRITE + 1
    assert await _eof(server_stream)
    assert pool.closed
    stats = pool.statistics()
    assert (stats.connections, stats.connecting, stats.waiting, stats.leases) == (0, 0, 0, 0)


async def test_cancelled_during_the_health_check_ping(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_client(
        monkeypatch, trio.testing.memory_stream_pair, health_check_after=0.0
    ) as (client, network):
        pool = client.pool
        assert pool is not None
        served = trio.Event()

        async with trio.open_nursery() as nursery:

            async def serve_one(server: H2Server) -> None:
                await server.start()
                request = await server.wait_request()
                await server.respond(request.stream_id, body=b"first")
                served.set()  # then stop reading: the next PING gets no answer

            async def first() -> None:
                response = await client.get(URL)
                assert response.content == b"first"

            nursery.start_soon(first)
            server = H2Server(await network.servers.receive())
            nursery.start_soon(serve_one, server)
            await served.wait()
        assert_pool_balanced(pool, idle=1)
        await trio.sleep(1)  # the connection is quiet now: the next use PINGs it first
        with trio.move_on_after(1) as scope:
            await client.get(URL)
        assert scope.cancelled_caught
        # Cancelled waiting for the PING's answer: the lease came back, the connection is
        # still clean (nothing half-sent) and stays in the pool.
        assert_pool_balanced(pool, idle=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            response = await client.get(URL)
            assert response.content == b"ok"
            assert network.connects == 1
            # The health check did PING the quiet connection.
            assert any(isinstance(e, h2.events.PingReceived) for e in server.events)
            nursery.cancel_scope.cancel()
        assert_pool_balanced(pool, idle=1)


async def test_stream_limit_lowered_below_streams_in_flight_holds_new_leases(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    async with fake_client(monkeypatch, trio.testing.memory_stream_pair) as (client, network):
        pool = client.pool
        assert pool is not None
        results: list[bytes] = []

        async def one(n: int) -> None:
            response = await client.get(f"{URL}{n}")
            results.append(response.content)

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(one, n)
            server = H2Server(await network.servers.receive())
            await server.start()
            first = await server.wait_requests(5)
            await server.update_settings({limit: 2})
            await trio.testing.wait_all_tasks_blocked()
            # Five streams in flight on a connection that now takes two: new requests wait
            # in the pool (not on the connection, not on a second connection).
            for n in range(5, 8):
                nursery.start_soon(one, n)
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.waiting, stats.leases, stats.connections) == (3, 5, 1)
            assert len(server.streams) == 5
            for request in first:
                await server.respond(request.stream_id, body=b"done")
            for _ in range(3):
                (request,) = await server.wait_requests(1)
                open_streams = [s for s in server.streams.values() if not s.responded]
                assert len(open_streams) <= 2
                await server.respond(request.stream_id, body=b"late")
            # Raised again: waiters are served at once, on the same connection.
            await server.update_settings({limit: 50})
            for n in range(8, 20):
                nursery.start_soon(one, n)
            await server.wait_requests(12)
            assert len([s for s in server.streams.values() if not s.responded]) == 12
            for request in server.pending():
                await server.respond(request.stream_id, body=b"again")
        assert sorted(results) == sorted([b"done"] * 5 + [b"late"] * 3 + [b"again"] * 12)
        assert network.connects == 1
        assert_pool_balanced(pool, idle=1)


class _Connections(Instrument):
    def __init__(self) -> None:
        self.made: list[object] = []

    def connect_succeeded(self, key: object, connection: object) -> None:
        self.made.append(connection)


async def test_cancelled_while_its_batched_write_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    connections = _Connections()
    async with fake_client(
        monkeypatch, trio.testing.memory_stream_pair, instruments=[connections]
    ) as (client, network):
        pool = client.pool
        assert pool is not None
        scope = trio.CancelScope()

        async def cancelled() -> None:
            with scope:
                await client.get(URL + "due")
                raise AssertionError("not cancelled")  # pragma: no cover

        async def held() -> None:
            response = await client.get(URL + "held")
            assert response.content == b"held"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held)
            server = H2Server(await network.servers.receive())
            await server.start()
            await server.wait_request()  # alone on the connection: written at once
            (connection,) = connections.made
            assert isinstance(connection, HTTP2Connection)
            # Another stream is open (its response could start more requests): the next
            # request yields a few scheduler passes before it writes, for others to join.
            nursery.start_soon(cancelled)
            for _ in range(100):  # bounded: it yields at least twice
                if connection._flush_due:  # pyright: ignore[reportPrivateUsage]
                    break
                await trio.lowlevel.checkpoint()
            assert connection._flush_due  # pyright: ignore[reportPrivateUsage]
            # Cancelled there, it still writes (other requests may be in the batch), then
            # resets its stream; its lease comes back and the connection stays.
            scope.cancel()
            await server.wait_until(lambda: 3 in resets(server))
            await trio.testing.wait_all_tasks_blocked()
            assert scope.cancelled_caught
            assert server.streams[3].header(b":path") == b"/due"
            stats = pool.statistics()
            assert (stats.leases, stats.connections, stats.waiting) == (1, 1, 0)
            await server.respond(1, body=b"held")
        assert_pool_balanced(pool, idle=1)
        assert not connection._core.streams  # pyright: ignore[reportPrivateUsage]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            response = await client.get(URL)
            assert response.content == b"ok"
            nursery.cancel_scope.cancel()
        assert network.connects == 1
        assert_pool_balanced(pool, idle=1)


def resets(server: H2Server) -> dict[int, object]:
    """The RST_STREAM codes the client sent, by stream."""
    return {
        e.stream_id: e.error_code
        for e in server.events
        if isinstance(e, h2.events.StreamReset) and e.remote_reset
    }
