"""Cancelling a request at each of its awaits, against a scripted loopback server.

The points: connecting (a TLS handshake the server never answers), sending the request body,
waiting for the response head, reading the body (``stream`` and ``request``), waiting for a
pool slot. Each test cancels once the request is parked at that point (the server tells us
it got there), then checks that no lease, waiter or busy connection is left, that the
interrupted connection is not reused (the server accepts a new one), and that after the client
exits the server has seen every one of its sockets closed by the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from _servers import (
    ServerConnection,
    TLSFiles,
    assert_pool_balanced,
    cancel_when,
    run_fault_server,
)

from trio_connpool import ConnectError, ConnectTimeout
from trio_connpool.http import NoPoolSender, Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from _servers import FaultServer


async def _all_closed_by_client(server: FaultServer) -> None:
    await server.wait_for(lambda: server.peer_closed == server.accepted)


async def test_cancel_while_connecting(tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path)

    async def script(conn: ServerConnection) -> None:
        await conn.wait_peer_closed()  # read the ClientHello and never answer it

    async with run_fault_server(script) as server:
        start = trio.current_time()
        async with open_client(verify=tls.client_context()) as client:
            pool = client.pool
            assert pool is not None

            async def ready() -> None:
                await server.wait_for(lambda: server.accepted == 1)

            await cancel_when(lambda: client.get(server.url("/", scheme="https")), ready)
            stats = pool.statistics()
            assert (stats.leases, stats.waiting, stats.connections) == (0, 0, 0)
            # The connect itself goes on in the pool's nursery (late binding: it would go
            # idle for the next request); closing the client stops it.
            assert stats.connecting == 1
        assert trio.current_time() - start < 1.0  # not the 5 s connect timeout
        assert pool.statistics().connecting == 0
        await _all_closed_by_client(server)
        assert server.accepted == 1


async def _connect_with_a_stalled_handshake(tmp_path: Path) -> ConnectError:
    tls = TLSFiles.create(tmp_path)

    async def script(conn: ServerConnection) -> None:
        await conn.wait_peer_closed()

    async with run_fault_server(script) as server:
        timeouts = Timeouts(connect=0.2)
        async with open_client(verify=tls.client_context(), timeouts=timeouts) as client:
            start = trio.current_time()
            with pytest.raises(ConnectError) as caught:
                await client.get(server.url("/", scheme="https"))
            assert 0.2 <= trio.current_time() - start < 1.0
            assert_pool_balanced(client.pool, idle=0)
            await _all_closed_by_client(server)
    return caught.value


async def test_connect_timeout_with_a_stalled_handshake(tmp_path: Path) -> None:
    error = await _connect_with_a_stalled_handshake(tmp_path)
    chain: list[BaseException] = []
    cause: BaseException | None = error
    for _ in range(10):  # bounded walk down the cause chain
        if cause is None:
            break
        chain.append(cause)
        cause = cause.__cause__
    assert any(isinstance(e, ConnectTimeout) for e in chain), chain


async def test_connect_timeout_is_raised_as_connect_timeout(tmp_path: Path) -> None:
    error = await _connect_with_a_stalled_handshake(tmp_path)
    assert isinstance(error, ConnectTimeout), repr(error)


def _warm_then(
    second: Callable[[ServerConnection], Awaitable[None]],
) -> Callable[[ServerConnection], Awaitable[None]]:
    """A script: the first connection answers one request, then runs ``second``; later
    connections answer everything."""

    async def script(conn: ServerConnection) -> None:
        if conn.index == 0:
            await conn.serve(1)
            await second(conn)
        await conn.serve()

    return script


async def _check_not_reused(
    server: FaultServer, client_get: Callable[[], Awaitable[object]]
) -> None:
    await server.wait_for(lambda: server.peer_closed == 1)  # the client closed connection 0
    await client_get()
    assert server.accepted == 2


async def test_cancel_while_sending_the_body() -> None:
    blocked = trio.Event()
    body_closed = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"first part"
            blocked.set()
            await trio.sleep_forever()
        finally:
            body_closed.set()

    async def swallow(conn: ServerConnection) -> None:
        await conn.wait_peer_closed()  # reads the head and the first part

    async with run_fault_server(_warm_then(swallow)) as server:
        async with open_client() as client:
            assert (await client.get(server.url("/warm"))).status_code == 200

            async def ready() -> None:
                await blocked.wait()

            await cancel_when(
                lambda: client.request("POST", server.url("/upload"), content=body()), ready
            )
            assert body_closed.is_set()  # the client ended the iteration it started
            assert_pool_balanced(client.pool, idle=0)
            await _check_not_reused(server, lambda: client.get(server.url("/next")))
            assert_pool_balanced(client.pool, idle=1)
        await _all_closed_by_client(server)


async def test_cancel_while_waiting_for_the_response_head() -> None:
    async def read_and_stall(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.wait_peer_closed()

    async with run_fault_server(_warm_then(read_and_stall)) as server:
        async with open_client() as client:
            assert (await client.get(server.url("/warm"))).status_code == 200

            async def ready() -> None:
                await server.wait_for(lambda: len(server.requests) == 2)

            elapsed = await cancel_when(lambda: client.get(server.url("/stalled")), ready)
            assert elapsed < 0.5
            assert_pool_balanced(client.pool, idle=0)
            await _check_not_reused(server, lambda: client.get(server.url("/next")))
        await _all_closed_by_client(server)
        assert [t for _, _, t in server.requests] == ["/warm", "/stalled", "/next"]


async def _head_and_part(conn: ServerConnection) -> None:
    await conn.receive_request()
    await conn.send_head(1000)  # small enough that closing early would drain it
    await conn.send_raw(b"x" * 100)
    await conn.wait_peer_closed()


async def test_cancel_while_reading_a_streamed_body() -> None:
    got_first = trio.Event()

    async def read_body() -> None:
        async with client.stream("GET", server.url("/body")) as response:
            async for _chunk in response.aiter_bytes():
                got_first.set()

    async with run_fault_server(_warm_then(_head_and_part)) as server:
        async with open_client() as client:
            assert (await client.get(server.url("/warm"))).status_code == 200
            elapsed = await cancel_when(read_body, got_first.wait)
            assert elapsed < 0.5
            assert_pool_balanced(client.pool, idle=0)
            await _check_not_reused(server, lambda: client.get(server.url("/next")))
        await _all_closed_by_client(server)


async def test_cancel_inside_the_stream_block_does_not_drain() -> None:
    """Cancelled in the caller's own code, the block's exit must not wait for the rest of the
    body (under a shield, up to the read timeout): it closes the connection at once."""
    got_head = trio.Event()

    async def read_head_only() -> None:
        async with client.stream("GET", server.url("/body")) as response:
            assert response.status_code == 200
            got_head.set()
            await trio.sleep_forever()

    async with run_fault_server(_warm_then(_head_and_part)) as server:
        async with open_client() as client:  # read timeout: the default 5 s
            assert (await client.get(server.url("/warm"))).status_code == 200
            elapsed = await cancel_when(read_head_only, got_head.wait)
            assert elapsed < 0.5
            assert_pool_balanced(client.pool, idle=0)
            await _check_not_reused(server, lambda: client.get(server.url("/next")))
        await _all_closed_by_client(server)


async def test_cancel_while_request_reads_the_body() -> None:
    async with run_fault_server(_warm_then(_head_and_part)) as server:
        async with open_client() as client:
            assert (await client.get(server.url("/warm"))).status_code == 200

            async def ready() -> None:
                await server.wait_for(lambda: len(server.requests) == 2)

            await cancel_when(lambda: client.get(server.url("/body")), ready)
            assert_pool_balanced(client.pool, idle=0)
            await _check_not_reused(server, lambda: client.get(server.url("/next")))
        await _all_closed_by_client(server)


async def test_cancel_while_waiting_for_a_pool_slot() -> None:
    release = trio.Event()

    async with run_fault_server() as server:
        async with open_client(max_connections_per_key=1) as client:
            pool = client.pool
            assert pool is not None

            async def hold() -> None:
                async with client.stream("GET", server.url("/held")) as response:
                    await release.wait()
                    assert await response.aread() == b"ok"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await server.wait_for(lambda: len(server.requests) == 1)

                async def ready() -> None:
                    for _ in range(1000):  # bounded: the waiter parks within a few steps
                        if pool.statistics().waiting == 1:
                            return
                        await trio.lowlevel.checkpoint()
                    raise AssertionError("the request never waited")

                await cancel_when(lambda: client.get(server.url("/waiting")), ready)
                stats = pool.statistics()
                assert (stats.waiting, stats.leases, stats.connecting) == (0, 1, 0)
                release.set()
            assert_pool_balanced(pool, idle=1)
            # The connection the waiter never got is fine and reused.
            assert (await client.get(server.url("/next"))).content == b"ok"
            assert server.accepted == 1
        await _all_closed_by_client(server)
        assert [t for _, _, t in server.requests] == ["/held", "/next"]


async def test_no_pool_sender_cancelled_inside_the_stream_block_closes_at_once() -> None:
    got_head = trio.Event()

    async def read_head_only() -> None:
        async with client.stream("GET", server.url("/body")) as response:
            assert response.status_code == 200
            got_head.set()
            await trio.sleep_forever()

    async with run_fault_server(_head_and_part) as server:
        async with open_client(pool=NoPoolSender()) as client:
            elapsed = await cancel_when(read_head_only, got_head.wait)
            assert elapsed < 0.5
            await _all_closed_by_client(server)
        assert server.accepted == 1


async def test_no_pool_sender_leaving_the_stream_block_early_does_not_wait() -> None:
    async with run_fault_server(_head_and_part) as server:
        async with open_client(pool=NoPoolSender()) as client:  # read timeout: 5 s
            start = trio.current_time()
            async with client.stream("GET", server.url("/body")) as response:
                assert response.status_code == 200
            assert trio.current_time() - start < 0.5  # no drain of a connection we close
            assert response.is_closed
            await _all_closed_by_client(server)
        assert server.accepted == 1
