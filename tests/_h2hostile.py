"""Hostile HTTP/2 servers on real sockets, for tests of what a server can do to the client.

- `serve_h2` listens on 127.0.0.1 (port 0) and runs the test's script on each accepted
  connection, over an `H2Server` whose preface is already sent. The script may speak HTTP/2
  through h2 or write raw bytes that h2 would never send (`frame_header`). Connections are
  numbered from 1 in the order they were accepted; the listener and every connection are
  closed when the ``async with`` block ends.
- `open_h2_connection` opens a real TCP connection to such a server and runs an
  `HTTP2Connection` over it (its reader in a nursery of its own), with a `StateWatch` that
  wakes a test when the connection's readiness or closedness changes.
- `traced_memory` measures with tracemalloc how much the process's memory grew during a
  block, at its peak and now.

Every loop is bounded; nothing sleeps to wait for an event.
"""

from __future__ import annotations

import socket
import sys
import tracemalloc
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager, contextmanager
from typing import NoReturn

import attrs
import h2.events
import h2.exceptions
import h2.settings
import trio
from _h2server import ClientGone, H2Server

from trio_connpool.http import HTTP2Connection, Origin, Timeouts

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "Accepted",
    "HostileServer",
    "MemoryGrowth",
    "StateWatch",
    "drain_events",
    "frame_header",
    "open_h2_connection",
    "serve_h2",
    "traced_memory",
]

MiB = 1024 * 1024
_READ = 64 * 1024
_MAX_STEPS = 100_000


@attrs.define(eq=False)
class Accepted:
    """One connection the server accepted: its number (1 for the first) and its server."""

    index: int
    server: H2Server
    stream: trio.SocketStream


Script = Callable[[Accepted], Awaitable[None]]


@attrs.define(eq=False)
class HostileServer:
    """What `serve_h2` yields: the port, and every connection accepted so far."""

    port: int
    script: Script
    settings: dict[h2.settings.SettingCodes, int] | None
    start: bool
    connections: list[Accepted] = attrs.field(factory=list[Accepted])

    @property
    def base(self) -> str:
        """The h2c base URL (HTTP/2 with prior knowledge)."""
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        accepted = Accepted(
            len(self.connections) + 1, H2Server(stream, settings=self.settings), stream
        )
        self.connections.append(accepted)
        try:
            if self.start:
                await accepted.server.start()
            await self.script(accepted)
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serve_h2(
    script: Script,
    *,
    settings: dict[h2.settings.SettingCodes, int] | None = None,
    rcvbuf: int | None = None,
    start: bool = True,
) -> AsyncGenerator[HostileServer]:
    """Serve HTTP/2 (h2c) on 127.0.0.1, running ``script`` on every accepted connection.

    Args:
        script: Run once per connection, after the server preface (our SETTINGS) went out.
            ClientGone and broken or closed streams end it quietly.
        settings: Extra settings in the server preface.
        rcvbuf: SO_RCVBUF for accepted sockets (set on the listener, so that the TCP window
            is small from the handshake on).
        start: Send the server preface before the script runs; if False, the script
            speaks raw HTTP/2 from the start (the `H2Server` is then unused).
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if rcvbuf is not None:
        for listener in listeners:
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    port: int = listeners[0].socket.getsockname()[1]
    server = HostileServer(port, script, settings, start)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, server._handle, listeners)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one failure of a helper's nursery as itself (the test's own failure,
    usually), so that it reads as it was raised; several stay a group."""
    if len(group.exceptions) == 1:
        raise group.exceptions[0] from None
    raise group


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """The 9 bytes of an HTTP/2 frame header, with any length up to 2**24 - 1."""
    return (
        length.to_bytes(3, "big")
        + bytes([frame_type, flags])
        + (stream_id & 0x7FFF_FFFF).to_bytes(4, "big")
    )


async def drain_events(accepted: Accepted) -> list[h2.events.Event]:
    """Read what the client sent until it closed, and parse it without answering anything.

    For a server that stopped reading: what the client wrote meanwhile is still in the
    socket. Stops at EOF, a reset, or a frame h2 rejects.
    """
    events: list[h2.events.Event] = []
    for _ in range(_MAX_STEPS):
        try:
            data = await accepted.stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            break
        if not data:
            break
        try:
            events.extend(accepted.server.h2.receive_data(data))
        except h2.exceptions.ProtocolError:
            break
    return events


@attrs.define(eq=False)
class StateWatch:
    """Wakes a test when the connection calls its state callback (readiness, closedness)."""

    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def notify(self) -> None:
        self._changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, checking it after every state change."""
        for _ in range(_MAX_STEPS):
            if condition():
                return
            await self._changed.wait()
            self._changed = trio.Event()
        raise AssertionError("condition never became true")  # pragma: no cover


@asynccontextmanager
async def open_h2_connection(
    port: int,
    *,
    timeouts: Timeouts,
    ping_timeout: float = 5.0,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
) -> AsyncGenerator[tuple[HTTP2Connection, StateWatch]]:
    """An `HTTP2Connection` over a real TCP connection to 127.0.0.1:``port``, reader running.

    ``sndbuf`` and ``rcvbuf`` set the client socket's SO_SNDBUF and SO_RCVBUF. The
    connection is closed when the block ends.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if sndbuf is not None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf is not None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    connection = HTTP2Connection(
        stream, Origin("http", "127.0.0.1", port), timeouts=timeouts, ping_timeout=ping_timeout
    )
    watch = StateWatch()
    connection.set_state_callback(watch.notify)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await connection.start()
                nursery.start_soon(connection.run_background)
                yield connection, watch
            finally:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


@attrs.define(eq=False)
class MemoryGrowth:
    """Traced memory growth since the start of a `traced_memory` block, in bytes."""

    baseline: int
    peak: int = 0

    def now(self) -> int:
        """The growth at this moment."""
        return tracemalloc.get_traced_memory()[0] - self.baseline

    def peak_so_far(self) -> int:
        """The highest growth since the block started."""
        return tracemalloc.get_traced_memory()[1] - self.baseline


@contextmanager
def traced_memory() -> Generator[MemoryGrowth]:
    """Trace allocations during the block; ``peak`` is the highest growth, set at its end.

    Only allocations made inside the block count, so what was allocated before (a large
    request body, say) is not part of the growth.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        growth = MemoryGrowth(tracemalloc.get_traced_memory()[0])
        try:
            yield growth
        finally:
            growth.peak = growth.peak_so_far()
    finally:
        if started:
            tracemalloc.stop()
