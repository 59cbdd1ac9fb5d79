"""``python -m trio_connpool demo``: the client against an embedded HTTP/1.1 server.

The server is a small h11 server run by :func:`trio.serve_tcp` on 127.0.0.1 (a port from 0) in
the same trio run as the client, so the demo needs no network and nothing but the library's
own dependencies. It counts the connections it accepts, so the demo can show what the pool
saved: thousands of requests over a handful of connections.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import h11
import trio

from .http import open_client

__all__ = ["DemoServer", "run_demo"]


class DemoServer:
    """A keep-alive HTTP/1.1 server for demos and tests.

    ``GET /`` answers ``hello``; ``GET /bytes/N`` answers N bytes. Anything else is a 404.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(port)``."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        connection = h11.Connection(h11.SERVER)
        try:
            async with stream:
                for _ in range(1_000_000):  # bounded: one iteration per request
                    request = await self._read_request(stream, connection)
                    if request is None:
                        return
                    self.requests += 1
                    status, body = self._route(request)
                    headers = [("content-length", str(len(body))), ("content-type", "text/plain")]
                    data = connection.send(h11.Response(status_code=status, headers=headers))
                    assert data is not None
                    data += connection.send(h11.Data(data=body)) or b""
                    data += connection.send(h11.EndOfMessage()) or b""
                    await stream.send_all(data)
                    if connection.our_state is not h11.DONE:
                        return
                    connection.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return

    @staticmethod
    async def _read_request(
        stream: trio.SocketStream, connection: h11.Connection
    ) -> h11.Request | None:
        request: h11.Request | None = None
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    @staticmethod
    def _route(request: h11.Request) -> tuple[int, bytes]:
        target = request.target.decode("ascii", "replace")
        if target == "/":
            return 200, b"hello"
        if target.startswith("/bytes/"):
            try:
                size = int(target.removeprefix("/bytes/"))
            except ValueError:
                return 400, b"bad size"
            if 0 <= size <= 64 * 1024 * 1024:
                return 200, b"x" * size
        return 404, b"not found"


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def run_demo(
    *, requests: int = 3000, concurrency: int = 200, quiet: bool = False, out: TextIO | None = None
) -> int:
    """Run the demo; return the process exit code (0 when every request succeeded)."""
    stream: TextIO = out if out is not None else sys.stdout
    interactive = not quiet and stream.isatty()
    server = DemoServer()
    latencies: list[float] = []
    failures = 0
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve)
        url = f"http://127.0.0.1:{port}/"
        print(f"embedded HTTP/1.1 server on 127.0.0.1:{port}", file=stream)
        print(f"{requests} requests from {concurrency} concurrent tasks", file=stream)
        async with open_client(max_connections=32, max_connections_per_key=32) as client:
            remaining = requests
            start = time.perf_counter()

            async def worker() -> None:
                nonlocal remaining, failures
                while remaining > 0:
                    remaining -= 1
                    began = time.perf_counter()
                    try:
                        response = await client.request("GET", url)
                        if response.status_code != 200 or response.content != b"hello":
                            failures += 1
                    except Exception:
                        failures += 1
                    latencies.append(time.perf_counter() - began)
                    done = len(latencies)
                    if interactive and done % 250 == 0:
                        print(f"\r  {done}/{requests} done", end="", file=stream, flush=True)

            async with trio.open_nursery() as workers:
                for _ in range(concurrency):
                    workers.start_soon(worker)
            elapsed = time.perf_counter() - start
            if interactive:
                print("\r" + " " * 40 + "\r", end="", file=stream)
            stats = client.pool.statistics() if client.pool is not None else None
        nursery.cancel_scope.cancel()
    latencies.sort()
    print(
        f"done: {len(latencies) - failures} ok, {failures} failed in {elapsed:.2f} s "
        f"({len(latencies) / elapsed:,.0f} requests/s)",
        file=stream,
    )
    print(
        "latency ms: p50 {:.2f}  p90 {:.2f}  p99 {:.2f}  max {:.2f}".format(
            *(1000 * _percentile(latencies, f) for f in (0.5, 0.9, 0.99, 1.0))
        ),
        file=stream,
    )
    print(
        f"server saw {server.connections} connections for {server.requests} requests", file=stream
    )
    if stats is not None:
        print(
            f"pool at the end: idle={stats.idle} in_use={stats.in_use} "
            f"connecting={stats.connecting} waiting={stats.waiting}",
            file=stream,
        )
    return 0 if failures == 0 and len(latencies) == requests else 1
