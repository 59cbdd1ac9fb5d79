"""The HTTP client against a scripted server that misbehaves (trio + h11 on loopback).

Each test gives the server a script per connection, drives the client, and checks three
things: the error type (or the transparent recovery), what reached the server (connections
accepted, requests received), and that the pool is balanced afterwards (no lease, no waiter,
no connect in flight). Timeouts are short real ones (0.2 s): the server does real socket I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
from _servers import ServerConnection, assert_pool_balanced, run_fault_server

from trio_connpool import PoolTimeout, ReadTimeout, RemoteProtocolError, ServerDisconnected
from trio_connpool.http import Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SHORT = Timeouts(connect=2.0, read=0.2, write=2.0)


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.serve(1)  # then close it while the client holds it idle

    async with run_fault_server(script) as server, open_client() as client:
        assert (await client.get(server.url("/a"))).content == b"ok"
        await server.wait_for(lambda: server.server_closed == 1)
        assert_pool_balanced(client.pool, idle=1)  # the pool does not know yet
        assert (await client.get(server.url("/b"))).content == b"ok"
        assert_pool_balanced(client.pool, idle=1)
        assert server.accepted == 2
        assert server.requests == [(0, "GET", "/a"), (1, "GET", "/b")]


async def test_server_closing_after_three_requests_is_transparent() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.serve(3)  # no "Connection: close": it just closes

    async with run_fault_server(script) as server, open_client() as client:
        for i in range(10):
            response = await client.get(server.url(f"/{i}"))
            assert response.status_code == 200, i
            assert_pool_balanced(client.pool)
        # Each request reached the server once; the retries never replayed a served request.
        assert [target for _, _, target in server.requests] == [f"/{i}" for i in range(10)]
        assert server.accepted == 4


async def _answer_one_then_swallow_the_next(conn: ServerConnection) -> None:
    """Answer the first request; read the second in full, then close without answering.

    The connection is healthy when the client reuses it (the stale check sees nothing), so
    only the retry logic can recover.
    """
    await conn.serve(1)
    await conn.receive_request()


async def test_idempotent_request_is_retried_once_on_a_fresh_connection() -> None:
    async with (
        run_fault_server(_answer_one_then_swallow_the_next) as server,
        open_client() as client,
    ):
        assert (await client.get(server.url("/first"))).content == b"ok"
        response = await client.request("PUT", server.url("/again"), content=b"data")
        assert response.content == b"ok"
        assert server.requests == [
            (0, "GET", "/first"),
            (0, "PUT", "/again"),
            (1, "PUT", "/again"),
        ]
        assert server.accepted == 2
        assert_pool_balanced(client.pool, idle=1)


async def _body() -> AsyncIterator[bytes]:
    yield b"part"


@pytest.mark.parametrize("kind", ["post", "streamed-put", "retry_stale=False"])
async def test_unsafe_request_on_a_stale_connection_is_not_retried(kind: str) -> None:
    async with (
        run_fault_server(_answer_one_then_swallow_the_next) as server,
        open_client(retry_stale=kind != "retry_stale=False") as client,
    ):
        assert (await client.get(server.url("/first"))).content == b"ok"
        method = "POST" if kind == "post" else "PUT" if kind == "streamed-put" else "GET"
        content = _body() if kind == "streamed-put" else None
        with pytest.raises(ServerDisconnected) as caught:
            await client.request(method, server.url("/once"), content=content)
        assert isinstance(caught.value, RemoteProtocolError)
        assert caught.value.url == server.url("/once")
        await server.wait_for(lambda: server.server_closed == 1)
        assert server.requests == [(0, "GET", "/first"), (0, method, "/once")]
        assert server.accepted == 1  # no second attempt
        assert_pool_balanced(client.pool, idle=0)


async def test_fresh_connection_disconnect_is_not_retried() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()

    async with run_fault_server(script) as server, open_client() as client:
        with pytest.raises(ServerDisconnected):
            await client.get(server.url("/"))
        assert server.accepted == 1
        assert_pool_balanced(client.pool, idle=0)


async def test_reset_in_the_middle_of_the_body() -> None:
    client_has_head = trio.Event()

    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(100_000)
        await conn.send_raw(b"x" * 1000)
        await client_has_head.wait()
        conn.reset()

    async with run_fault_server(script) as server, open_client() as client:
        received = 0

        async def read_body() -> None:
            nonlocal received
            async with client.stream("GET", server.url("/")) as response:
                assert response.status_code == 200
                client_has_head.set()
                async for chunk in response.aiter_bytes():
                    received += len(chunk)

        with pytest.raises(RemoteProtocolError) as caught:
            await read_body()
        assert not isinstance(caught.value, ServerDisconnected)
        assert received <= 1000
        assert_pool_balanced(client.pool, idle=0)
        assert server.accepted == 1


async def test_reset_while_reading_the_whole_body() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(100_000)
        await conn.send_raw(b"x" * 1000)
        conn.reset()

    async with run_fault_server(script) as server, open_client() as client:
        with pytest.raises(RemoteProtocolError):
            await client.get(server.url("/"))
        assert_pool_balanced(client.pool, idle=0)
        assert server.accepted == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"\x00\x01\x02\x03" * 8 + b"\r\n\r\n",
    ],
)
async def test_garbage_instead_of_a_response(garbage: bytes) -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_raw(garbage)
        await conn.wait_peer_closed()

    async with run_fault_server(script) as server, open_client() as client:
        with pytest.raises(RemoteProtocolError) as caught:
            await client.get(server.url("/"))
        assert not isinstance(caught.value, ServerDisconnected)
        await server.wait_for(lambda: server.peer_closed == 1)  # the client closed it
        assert_pool_balanced(client.pool, idle=0)
        assert server.accepted == 1


async def test_stalled_headers_raise_read_timeout() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.wait_peer_closed()  # and never answer

    async with run_fault_server(script) as server, open_client(timeouts=SHORT) as client:
        start = trio.current_time()
        with pytest.raises(ReadTimeout):
            await client.get(server.url("/"))
        assert 0.2 <= trio.current_time() - start < 1.0
        await server.wait_for(lambda: server.peer_closed == 1)
        assert_pool_balanced(client.pool, idle=0)
        assert server.accepted == 1


async def test_stalled_body_raises_read_timeout_while_streaming() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(1000)
        await conn.send_raw(b"x" * 100)
        await conn.wait_peer_closed()

    async with run_fault_server(script) as server, open_client(timeouts=SHORT) as client:
        chunks: list[bytes] = []

        async def read_body() -> None:
            async with client.stream("GET", server.url("/")) as response:
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)

        with pytest.raises(ReadTimeout):
            await read_body()
        assert b"".join(chunks) == b"x" * 100
        await server.wait_for(lambda: server.peer_closed == 1)
        assert_pool_balanced(client.pool, idle=0)
        # The next request gets a fresh connection.
        async with client.stream("GET", server.url("/")) as response:
            assert response.status_code == 200
        assert server.accepted == 2


async def test_connection_close_from_the_server_is_honoured() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_response(200, b"bye", headers=[("Connection", "close")])
        await conn.wait_peer_closed()

    async with run_fault_server(script) as server, open_client() as client:
        for n in range(1, 4):
            response = await client.get(server.url("/"))
            assert response.content == b"bye"
            assert response.headers["connection"] == "close"
            assert_pool_balanced(client.pool, idle=0)
            await server.wait_peer_closed(n)
        assert server.accepted == 3
        assert len(server.requests) == 3


async def test_close_after_n_requests_with_connection_close() -> None:
    async def script(conn: ServerConnection) -> None:
        for _ in range(2):
            await conn.receive_request()
            await conn.send_response(200, b"ok")
        await conn.receive_request()
        await conn.send_response(200, b"last", headers=[("Connection", "close")])

    async with run_fault_server(script) as server, open_client() as client:
        bodies = [(await client.get(server.url("/"))).content for _ in range(6)]
        assert bodies == [b"ok", b"ok", b"last"] * 2
        assert server.accepted == 2
        assert_pool_balanced(client.pool, idle=0)


@pytest.mark.parametrize("timeout", [0.1, 0.25])
async def test_acquire_timeout_bounds_the_whole_wait(timeout: float) -> None:
    async with (
        run_fault_server() as server,
        open_client(
            max_connections_per_key=1, timeouts=Timeouts(pool=timeout, read=2.0)
        ) as client,
    ):
        async with client.stream("GET", server.url("/held")) as held:
            assert held.status_code == 200
            start = trio.current_time()
            with pytest.raises(PoolTimeout):
                await client.get(server.url("/blocked"))
            elapsed = trio.current_time() - start
            assert timeout <= elapsed < timeout * 1.8, elapsed
            stats = client.pool.statistics() if client.pool else None
            assert stats is not None
            assert (stats.leases, stats.waiting, stats.connecting) == (1, 0, 0)
        assert_pool_balanced(client.pool, idle=1)
        assert (await client.get(server.url("/after"))).content == b"ok"
        assert server.accepted == 1
        assert [target for _, _, target in server.requests] == ["/held", "/after"]


async def test_acquire_timeout_covers_a_retry() -> None:
    """A stale-connection retry waits for the pool again, within what is left of the bound.

    The first attempt reuses connection A; the server keeps it busy for a while and then
    drops it. Meanwhile another task holds the only other slot, so the retry has to wait:
    the PoolTimeout comes ``pool`` seconds after the start, not after the first attempt.
    """
    swallowed = trio.Event()
    release_held = trio.Event()

    async def script(conn: ServerConnection) -> None:
        if conn.index == 0:
            await conn.serve(1)
            await conn.receive_request()
            swallowed.set()
            await trio.sleep(0.25)  # the first attempt eats most of the budget
            return  # then close without answering
        await conn.serve()

    timeouts = Timeouts(pool=0.3, read=2.0)
    async with (
        run_fault_server(script) as server,
        open_client(max_connections_per_key=1, timeouts=timeouts) as client,
    ):
        assert (await client.get(server.url("/warm"))).content == b"ok"
        pool = client.pool
        assert pool is not None

        async def hold() -> None:
            # Queue behind the first attempt; get the slot the failed attempt frees, keep it.
            async with client.stream("GET", server.url("/held")) as held:
                assert held.status_code == 200
                await release_held.wait()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                with pytest.raises(PoolTimeout):
                    await client.get(server.url("/retried"))
                release_held.set()

            nursery.start_soon(first)
            await swallowed.wait()
            nursery.start_soon(hold)
        elapsed = trio.current_time() - start
        # Not 0.25 + 0.3: the retry only had what was left of the 0.3 s.
        assert 0.3 <= elapsed < 0.48, elapsed
        assert_pool_balanced(pool)
        targets = [target for _, _, target in server.requests]
        assert targets == ["/warm", "/retried", "/held"]
