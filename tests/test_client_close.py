"""Leaving ``open_client`` while HTTP/1.1 requests are in flight, and leaving a stream early.

Closing the client closes every connection, leased ones included, under the requests that use
them. Whatever stage a request is at (waiting for a connection, connecting, sending its body,
waiting for the head, reading or streaming the body), it must end with a `PoolError` that
says what happened, never with an internal error. The loop tests leave the client at many
points against hypercorn; the targeted ones park a request at one stage on a scripted server.

Leaving a ``client.stream()`` block before the body's end drains a small rest only if it
arrives quickly; the block never holds a cancellation (or the caller) for the read timeout.

House rules: loopback only, port 0, every loop bounded, no sleeps to wait for events.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import h11
import pytest
import trio
import trio.testing
from _servers import (
    CountingApp,
    ServerConnection,
    TLSFiles,
    assert_pool_balanced,
    run_fault_server,
    serve_hypercorn,
)

from trio_connpool import PoolClosed, PoolError, TransportError
from trio_connpool.http import Client, Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

ROUNDS = 30
REQUESTS = 12  # per round, all to one origin (up to 10 connections, 2 wait for one)


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        await trio.lowlevel.checkpoint()
        yield b"u" * size


async def _one_request(client: Client, base: str, kind: int) -> None:
    """A request of one of several shapes, so the client is left at many stages."""
    if kind == 0:
        await client.get(base + "/")
    elif kind == 1:
        await client.get(base + "/bytes/300000")
    elif kind == 2:
        async with client.stream("GET", base + "/bytes/300000") as response:
            async for _chunk in response.aiter_bytes():
                await trio.lowlevel.checkpoint()
    elif kind == 3:
        await client.get(base + "/slow/5")
    elif kind == 4:
        await client.request("POST", base + "/echo", content=_chunks(16, 16 * 1024))
    else:
        # Left early with a remainder small enough to drain.
        async with client.stream("GET", base + "/bytes/70000") as response:
            async for _chunk in response.aiter_bytes():
                break


def _check_errors(errors: list[Exception]) -> None:
    unexpected = [e for e in errors if not isinstance(e, PoolError) or not str(e)]
    assert not unexpected, [repr(e) for e in unexpected]


async def _leave_with_requests_in_flight(
    base: str, verify: bool | ssl.SSLContext, *, inside: bool, step: int = 2
) -> list[Exception]:
    """ROUNDS times: start REQUESTS requests, leave the client after ``step`` checkpoints
    more each round (from before the first connect to after most requests ended), and
    return every exception the requests raised.

    ``inside``: the requests run in a nursery within the client block, which closes the
    client's pool itself; otherwise they run in a nursery around the block, which is left.
    """
    errors: list[Exception] = []

    async def run(client: Client, kind: int) -> None:
        try:
            await _one_request(client, base, kind)
        except Exception as exc:  # collected and checked
            errors.append(exc)

    for round_ in range(ROUNDS):
        with trio.fail_after(10):
            async with trio.open_nursery() as outer:
                async with open_client(verify=verify) as client:
                    pool = client.pool
                    assert pool is not None
                    async with trio.open_nursery() as inner:
                        nursery = inner if inside else outer
                        for i in range(REQUESTS):
                            nursery.start_soon(run, client, (i + round_) % 6)
                        for _ in range(round_ * step):
                            await trio.lowlevel.checkpoint()
                        if inside:
                            await pool.aclose()
                assert pool.closed
    return errors


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
async def test_leaving_the_client_with_requests_in_flight_raises_pool_errors(
    inside: bool,
) -> None:
    app = CountingApp()
    async with serve_hypercorn(app) as base:
        errors = await _leave_with_requests_in_flight(base, True, inside=inside)
    _check_errors(errors)
    assert errors  # requests were in flight when the client closed


async def test_leaving_the_tls_client_with_requests_in_flight_raises_pool_errors(
    tmp_path: Path,
) -> None:
    app = CountingApp()
    tls = TLSFiles.create(tmp_path)
    async with serve_hypercorn(app, tls, alpn=["http/1.1"]) as base:
        # TLS handshakes take more steps: leave later each round.
        errors = await _leave_with_requests_in_flight(
            base, tls.client_context(), inside=False, step=3
        )
    _check_errors(errors)
    assert errors


# ---- one request at a known stage, then the client closes --------------------------------


async def _close_client_at(
    script: Callable[[ServerConnection], Awaitable[None]],
    request: Callable[[Client, str], Awaitable[object]],
) -> tuple[Exception, float]:
    """Run ``request`` in a task outside the client; once the server received it and
    everything is blocked, leave the client. Return what the request raised and how long
    leaving the client took."""
    caught: list[Exception] = []

    async def attempt(client: Client, url: str) -> None:
        try:
            await request(client, url)
        except Exception as exc:  # checked below
            caught.append(exc)

    async with run_fault_server(script) as server:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async with open_client() as client:
                    nursery.start_soon(attempt, client, server.url("/x"))
                    await server.wait_for(lambda: len(server.requests) == 1)
                    await trio.testing.wait_all_tasks_blocked()
                    start = trio.current_time()
                elapsed = trio.current_time() - start
            # Every socket the client opened is closed by the client.
            await server.wait_for(lambda: server.peer_closed == server.accepted)
    assert len(caught) == 1, caught
    _check_errors(caught)
    return caught[0], elapsed


async def _stall(conn: ServerConnection) -> None:
    await conn.receive_request()
    await conn.wait_peer_closed()


async def _head_and_part(conn: ServerConnection) -> None:
    await conn.receive_request()
    await conn.send_head(100_000)
    await conn.send_raw(b"x" * 1000)
    await conn.wait_peer_closed()


async def test_close_while_waiting_for_the_head() -> None:
    error, elapsed = await _close_client_at(_stall, lambda client, url: client.get(url))
    assert isinstance(error, TransportError)
    assert "closed locally" in str(error)
    assert elapsed < 1.0


async def test_close_while_reading_the_body() -> None:
    error, _ = await _close_client_at(_head_and_part, lambda client, url: client.get(url))
    assert isinstance(error, TransportError)
    assert "closed locally" in str(error)


async def test_close_while_a_stream_is_half_read() -> None:
    got_first = trio.Event()
    go_on = trio.Event()
    received: list[bytes] = []
    caught: list[Exception] = []

    async def attempt(client: Client, url: str) -> None:
        try:
            async with client.stream("GET", url) as response:
                async for chunk in response.aiter_bytes():
                    received.append(chunk)
                    got_first.set()
                    await go_on.wait()  # the caller's own work between chunks
        except Exception as exc:  # checked below
            caught.append(exc)

    # The client is left while the caller is between two chunks; then it reads on.
    async with run_fault_server(_head_and_part) as server:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async with open_client() as client:
                    nursery.start_soon(attempt, client, server.url("/x"))
                    await got_first.wait()
                    await trio.testing.wait_all_tasks_blocked()
                go_on.set()
            await server.wait_for(lambda: server.peer_closed == server.accepted == 1)
    assert b"".join(received) == b"x" * 1000
    assert len(caught) == 1, caught
    _check_errors(caught)
    assert isinstance(caught[0], TransportError)


async def test_close_while_sending_a_streamed_body() -> None:
    first_sent = trio.Event()
    go_on = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first part"
        first_sent.set()
        await go_on.wait()
        yield b"second part"  # the client is closed by now

    async def upload(client: Client, url: str) -> None:
        await client.request("POST", url, content=body())

    async def swallow(conn: ServerConnection) -> None:
        await conn.wait_peer_closed()  # reads the head and the first part

    caught: list[Exception] = []
    async with run_fault_server(swallow) as server:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def attempt(client: Client) -> None:
                    try:
                        await upload(client, server.url("/upload"))
                    except Exception as exc:  # checked below
                        caught.append(exc)

                async with open_client() as client:
                    nursery.start_soon(attempt, client)
                    await first_sent.wait()
                    await trio.testing.wait_all_tasks_blocked()
                go_on.set()
            await server.wait_for(lambda: server.peer_closed == server.accepted == 1)
    assert len(caught) == 1, caught
    _check_errors(caught)
    assert isinstance(caught[0], TransportError)


async def test_close_while_waiting_for_a_connection() -> None:
    held = trio.Event()
    caught: list[Exception] = []

    async def serve_head(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(10)
        await conn.wait_peer_closed()

    async def hold(client: Client, url: str) -> None:
        with trio.CancelScope() as holder:
            holders.append(holder)
            async with client.stream("GET", url):
                held.set()
                await trio.sleep_forever()

    async def attempt(client: Client, url: str) -> None:
        try:
            await client.get(url)
        except Exception as exc:  # checked below
            caught.append(exc)

    holders: list[trio.CancelScope] = []
    async with run_fault_server(serve_head) as server:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async with open_client(max_connections_per_key=1) as client:
                    pool = client.pool
                    assert pool is not None
                    nursery.start_soon(hold, client, server.url("/held"))
                    await held.wait()
                    nursery.start_soon(attempt, client, server.url("/waits"))
                    await trio.testing.wait_all_tasks_blocked()
                    assert pool.statistics().waiting == 1
                holders[0].cancel()
            await server.wait_for(lambda: server.peer_closed == server.accepted == 1)
    assert len(caught) == 1, caught
    _check_errors(caught)
    assert isinstance(caught[0], PoolClosed)


# ---- a stream left early ------------------------------------------------------------------


async def _part_then_stall(conn: ServerConnection) -> None:
    await conn.receive_request()
    await conn.send_head(1000)
    await conn.send_raw(b"x" * 100)  # then stall: the small rest never comes
    await conn.wait_peer_closed()


async def test_stream_left_early_does_not_wait_for_a_stalled_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A small rest that does not come: the block ends after the drain's short bound
    (0.1 s), not after the read timeout, and the connection is closed, not returned."""
    timeouts = Timeouts(read=3.0)
    async with (
        run_fault_server(_part_then_stall) as server,
        open_client(timeouts=timeouts) as client,
    ):
        with trio.move_on_after(0.3) as scope:
            start = trio.current_time()
            async with client.stream("GET", server.url("/x")) as response:
                async for chunk in response.aiter_bytes():
                    assert chunk == b"x" * 100
                    break
            left = trio.current_time()
        assert not scope.cancelled_caught
        assert left - start == pytest.approx(0.1, abs=1e-6)
        assert response.is_closed
        await server.wait_for(lambda: server.peer_closed == 1)
        assert_pool_balanced(client.pool, idle=0)
        assert client.pool is not None
        assert client.pool.statistics().connections == 0


async def test_stream_left_early_just_before_a_deadline_holds_it_at_most_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Left 0.05 s before the deadline: the deadline is held for at most the drain's bound,
    never for the read timeout."""
    timeouts = Timeouts(read=3.0)
    async with (
        run_fault_server(_part_then_stall) as server,
        open_client(timeouts=timeouts) as client,
    ):
        start = trio.current_time()
        with trio.move_on_after(0.3):
            async with client.stream("GET", server.url("/x")) as response:
                async for _chunk in response.aiter_bytes():
                    with trio.CancelScope(shield=True):
                        await trio.sleep(0.25)  # the caller's own work
                    break
        assert trio.current_time() - start <= 0.35 + 1e-6
        await server.wait_for(lambda: server.peer_closed == 1)
        assert_pool_balanced(client.pool, idle=0)


async def test_stream_left_early_with_the_rest_arrived_keeps_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rest_go = trio.Event()
    rest_sent = False

    async def script(conn: ServerConnection) -> None:
        nonlocal rest_sent
        await conn.receive_request()
        await conn.send_head(1000)
        await conn.send_raw(conn.h11.send(h11.Data(data=b"x" * 100)) or b"")
        await rest_go.wait()
        rest = (conn.h11.send(h11.Data(data=b"y" * 900)) or b"") + (
            conn.h11.send(h11.EndOfMessage()) or b""
        )
        await conn.send_raw(rest)
        rest_sent = True
        conn.server.changed()
        await conn.serve()

    async with run_fault_server(script) as server, open_client() as client:
        start = trio.current_time()
        async with client.stream("GET", server.url("/first")) as response:
            async for chunk in response.aiter_bytes():
                assert chunk == b"x" * 100
                rest_go.set()
                await server.wait_for(lambda: rest_sent)
                break
        assert trio.current_time() - start == 0  # nothing was waited for
        assert_pool_balanced(client.pool, idle=1)
        assert (await client.get(server.url("/second"))).content == b"ok"
        assert server.accepted == 1  # one connection for both requests
        assert [t for _, _, t in server.requests] == ["/first", "/second"]
        assert_pool_balanced(client.pool, idle=1)
