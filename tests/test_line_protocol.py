"""The generic pool core with a connection type of its own: a line protocol over TCP.

Nothing here is HTTP. A tiny trio server speaks one line per request and one line per
response (``PING`` -> ``PONG``, ``ECHO text`` -> ``text``, ``HANG`` -> no answer), and
:class:`LineConnection` is a client connection written the way a user would write one for a
database or a cache: ``request(line) -> line`` over ``trio.open_tcp_stream`` with a buffered
line reader, ``is_closed()`` and ``aclose()``. The pool learns everything it needs from those
two methods (see ``trio_connpool.Connection``).

House rules: loopback only, port 0, the server runs in the test's own trio run and counts
what it sees (connections accepted, requests, EOFs), every loop and wait is bounded.
"""

from __future__ import annotations

import select
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from _fakes import assert_pool_closed
from _servers import assert_pool_balanced

from trio_connpool import Pool, open_pool

Key = tuple[str, int]
WAIT = 5.0  # the bound on every wait for the server: far above what loopback needs
_MAX_LINE = 64 * 1024


class LineProtocolError(Exception):
    """The peer broke the line protocol (closed mid-exchange, or a line too long)."""


class LineReader:
    """Reads ``\\n``-terminated lines from a stream, keeping what arrived past the line."""

    def __init__(self, stream: trio.abc.ReceiveStream, *, max_line: int = _MAX_LINE) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max_line = max_line

    @property
    def buffered(self) -> int:
        """Bytes received and not handed out yet."""
        return len(self._buffer)

    async def readline(self) -> bytes | None:
        """The next line without its line ending; None if the stream ended between lines.

        Raises:
            LineProtocolError: The stream ended inside a line, or the line is too long.
        """
        searched = 0
        # Bounded: every turn adds at least one byte, and max_line bytes end it.
        while True:
            end = self._buffer.find(b"\n", searched)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.removesuffix(b"\r")
            if len(self._buffer) > self._max_line:
                raise LineProtocolError(f"line longer than {self._max_line} bytes")
            searched = len(self._buffer)
            data = await self._stream.receive_some(self._max_line)
            if not data:
                if self._buffer:
                    raise LineProtocolError("the stream ended inside a line")
                return None
            self._buffer += data


def _readable(sock: trio.socket.SocketType) -> bool:
    """Whether ``sock`` has something to read right now (data or EOF): one select() call."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class LineConnection:
    """One client connection of the line protocol; made by :func:`connect`.

    Leased to one task at a time (capacity 1, the pool's default). An exchange that did not
    finish (an error, a cancellation) leaves the stream out of step, so the connection then
    counts as closed and the pool discards it.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._reader = LineReader(stream)
        self._busy = False
        self._broken = False
        self.aclose_calls = 0

    @property
    def socket(self) -> trio.socket.SocketType:
        """The underlying socket (for tests that wait for the server's FIN)."""
        return self._stream.socket

    async def request(self, line: str) -> str:
        """Send one request line and return the response line.

        Raises:
            trio.BusyResourceError: Another task is in an exchange on this connection.
            LineProtocolError: The connection is closed, or the server closed it.
        """
        if self._busy:
            raise trio.BusyResourceError("another task is using this connection")
        if self._broken:
            raise LineProtocolError("the connection is closed")
        self._busy = True
        try:
            await self._stream.send_all(line.encode() + b"\n")
            answer = await self._reader.readline()
        except BaseException:
            self._broken = True
            raise
        finally:
            self._busy = False
        if answer is None:
            self._broken = True
            raise LineProtocolError("the server closed the connection")
        return answer.decode()

    def is_closed(self) -> bool:
        """Whether the connection is unusable. The pool asks only before handing it out.

        An idle connection has nothing to read: if its socket is readable, the server
        closed it (EOF) or sent bytes nobody asked for, and either way it is done. The check
        is one non-blocking select() on this one connection (httpcore does the same).
        """
        if not self._broken and not self._busy:
            self._broken = bool(self._reader.buffered) or _readable(self._stream.socket)
        return self._broken

    async def aclose(self) -> None:
        """Close the socket (the server reads EOF)."""
        self._broken = True
        self.aclose_calls += 1
        await self._stream.aclose()


async def connect(key: Key) -> LineConnection:
    """The pool's connector: ``await connect((host, port))``."""
    host, port = key
    return LineConnection(await trio.open_tcp_stream(host, port))


LinePool = Pool[Key, LineConnection]


class LineServer:
    """The server side: answers lines, and counts what it sees.

    Counters: ``accepted`` connections, ``requests`` per connection (by accept order),
    ``eof``: connections whose client closed them, ``server_closed``: connections whose
    handler ended, ``hanging``: ``HANG`` requests received (never answered).
    """

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.requests: list[int] = []
        self.eof = 0
        self.server_closed = 0
        self.hanging = 0
        self._scopes: list[trio.CancelScope] = []
        self._changed = trio.Event()

    @property
    def key(self) -> Key:
        return ("127.0.0.1", self.port)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked on every server event."""
        with trio.fail_after(WAIT):
            while not predicate():
                await self._changed.wait()

    def drop(self, index: int) -> None:
        """Close connection ``index`` from the server side (a restart, an idle timeout)."""
        self._scopes[index].cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                scope = trio.CancelScope()
                self._scopes.append(scope)
                self.requests.append(0)
                nursery.start_soon(self._handle, stream, self.accepted, scope)
                self.accepted += 1
                self._notify()

    async def _handle(
        self, stream: trio.SocketStream, index: int, scope: trio.CancelScope
    ) -> None:
        reader = LineReader(stream)
        try:
            with scope:
                for _ in range(100_000):  # bounded: one turn per request
                    line = await reader.readline()
                    if line is None:
                        self.eof += 1
                        return
                    self.requests[index] += 1
                    command, _, argument = line.decode().partition(" ")
                    if command == "HANG":
                        self.hanging += 1
                        self._notify()
                        continue  # no answer; the next read sees the client's EOF
                    answer = {"PING": "PONG", "ECHO": argument}.get(command, "ERR unknown")
                    await stream.send_all(answer.encode() + b"\n")
        except (trio.BrokenResourceError, LineProtocolError):
            self.eof += 1
        finally:
            await trio.aclose_forcefully(stream)
            self.server_closed += 1
            self._notify()


@asynccontextmanager
async def run_line_server() -> AsyncGenerator[LineServer, None]:
    server = LineServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


async def test_many_tasks_share_few_connections() -> None:
    tasks, rounds, limit = 40, 5, 3
    answers: list[str] = []
    with trio.fail_after(WAIT):
        async with run_line_server() as server:
            pool: LinePool
            async with open_pool(connect, max_connections_per_key=limit) as pool:

                async def client(number: int) -> None:
                    for step in range(rounds):
                        async with pool.lease(server.key) as connection:
                            answers.append(await connection.request(f"ECHO {number}.{step}"))

                async with trio.open_nursery() as nursery:
                    for number in range(tasks):
                        nursery.start_soon(client, number)
                assert_pool_balanced(pool, idle=limit)
                assert pool.statistics().keys[server.key].idle == limit
            assert_pool_closed(pool)
            await server.wait_for(lambda: server.eof == limit)
    assert sorted(answers) == sorted(f"{n}.{s}" for n in range(tasks) for s in range(rounds))
    assert server.accepted == limit
    assert sum(server.requests) == tasks * rounds
    assert all(count > 0 for count in server.requests), server.requests


async def test_server_closed_connection_is_dropped() -> None:
    with trio.fail_after(WAIT):
        async with run_line_server() as server:
            pool: LinePool
            async with open_pool(connect, max_connections_per_key=1) as pool:
                async with pool.lease(server.key) as first:
                    assert await first.request("PING") == "PONG"
                assert_pool_balanced(pool, idle=1)
                assert not first.is_closed()

                server.drop(0)
                await server.wait_for(lambda: server.server_closed == 1)
                await trio.lowlevel.wait_readable(first.socket)  # the server's FIN is here
                assert first.is_closed()

                async with pool.lease(server.key) as second:
                    assert second is not first
                    assert await second.request("PING") == "PONG"
                await trio.testing.wait_all_tasks_blocked()
                assert first.aclose_calls == 1  # the pool closed the dead one
                assert server.accepted == 2
                assert_pool_balanced(pool, idle=1)
            assert_pool_closed(pool)
            assert second.aclose_calls == 1
            await server.wait_for(lambda: server.eof == 1)


async def test_server_closing_mid_lease_discards_the_connection() -> None:
    with trio.fail_after(WAIT):
        async with run_line_server() as server:
            pool: LinePool
            async with open_pool(connect) as pool:
                leased: list[LineConnection] = []
                with pytest.raises((LineProtocolError, trio.BrokenResourceError)):
                    async with pool.lease(server.key) as connection:
                        leased.append(connection)
                        assert await connection.request("PING") == "PONG"
                        server.drop(0)
                        await server.wait_for(lambda: server.server_closed == 1)
                        await connection.request("PING")
                await trio.testing.wait_all_tasks_blocked()
                assert leased[0].aclose_calls == 1
                assert_pool_balanced(pool, idle=0)
            assert_pool_closed(pool)


async def test_pool_exit_closes_every_connection() -> None:
    count = 4
    with trio.fail_after(WAIT):
        async with run_line_server() as server:
            held: list[LineConnection] = []
            pool: LinePool
            async with open_pool(connect, max_connections_per_key=count) as pool:
                all_leased = trio.Event()

                async def hold() -> None:
                    async with pool.lease(server.key) as connection:
                        assert await connection.request("PING") == "PONG"
                        held.append(connection)
                        if len(held) == count:
                            all_leased.set()
                        await all_leased.wait()

                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(hold)
                assert_pool_balanced(pool, idle=count)
                assert server.eof == 0
            assert_pool_closed(pool)
            await server.wait_for(lambda: server.eof == count)
    assert len({id(connection) for connection in held}) == count
    assert [connection.aclose_calls for connection in held] == [1] * count
    assert server.accepted == count


async def test_cancelled_request_closes_its_connection() -> None:
    with trio.fail_after(WAIT):
        async with run_line_server() as server:
            pool: LinePool
            async with open_pool(connect) as pool:
                leased: list[LineConnection] = []

                async def hang() -> None:
                    async with pool.lease(server.key) as connection:
                        leased.append(connection)
                        await connection.request("HANG")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hang)
                    await server.wait_for(lambda: server.hanging == 1)
                    nursery.cancel_scope.cancel()
                # The answer may still come: the connection must not be reused.
                await server.wait_for(lambda: server.eof == 1)
                assert leased[0].aclose_calls == 1
                assert_pool_balanced(pool, idle=0)
                async with pool.lease(server.key) as fresh:
                    assert fresh is not leased[0]
                    assert await fresh.request("PING") == "PONG"
                assert server.accepted == 2
            assert_pool_closed(pool)
