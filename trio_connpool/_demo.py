"""``python -m trio_connpool demo``: the client against an embedded HTTP/1.1 and HTTP/2 server.

The server runs on 127.0.0.1 (a port from 0) in the same trio run as the client, so the demo
needs no network and nothing but the library's own dependencies. It speaks HTTP/1.1 (h11),
and HTTP/2 (h2) to a client that opens with the HTTP/2 preface (h2c with prior knowledge). It
counts the connections it accepts, so the demo can show what the pool saved: thousands of
requests over a handful of HTTP/1.1 connections, or over one multiplexed HTTP/2 connection.
"""

from __future__ import annotations

import math
import sys
from typing import TextIO

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
import trio

from ._commands import percentile
from .http import open_client

__all__ = ["DemoServer", "run_demo"]


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class DemoServer:
    """A keep-alive HTTP/1.1 and HTTP/2 (h2c, prior knowledge) server for demos and tests.

    ``GET /`` answers ``hello``; ``GET /bytes/N`` answers N bytes. Anything else is a 404.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.port = 0
        self.by_protocol = {"HTTP/1.1": 0, "HTTP/2": 0}  # connections per protocol

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(port)``."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async with stream:
                first = b""
                while len(first) < len(_PREFACE) and _PREFACE.startswith(first):
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    first += data
                if first.startswith(_PREFACE):
                    self.by_protocol["HTTP/2"] += 1
                    await self._serve_h2(stream, first)
                else:
                    self.by_protocol["HTTP/1.1"] += 1
                    await self._serve_h11(stream, first)
        except (trio.BrokenResourceError, h11.RemoteProtocolError, h2.exceptions.ProtocolError):
            return

    async def _serve_h11(self, stream: trio.SocketStream, first: bytes) -> None:
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(first)
        for _ in range(1_000_000):  # bounded: one iteration per request
            request = await self._read_request(stream, connection)
            if request is None:
                return
            self.requests += 1
            status, body = self._route(request.target)
            headers = [("content-length", str(len(body))), ("content-type", "text/plain")]
            data = connection.send(h11.Response(status_code=status, headers=headers))
            assert data is not None
            data += connection.send(h11.Data(data=body)) or b""
            data += connection.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if connection.our_state is not h11.DONE:
                return
            connection.start_next_cycle()

    async def _serve_h2(self, stream: trio.SocketStream, first: bytes) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        connection = h2.connection.H2Connection(config=config)
        connection.initiate_connection()
        targets: dict[int, bytes] = {}
        unsent: dict[int, memoryview] = {}  # response bodies waiting for flow-control window
        data = first
        for _ in range(10_000_000):  # bounded: one iteration per read
            if not data:
                return
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    targets[event.stream_id] = dict(event.headers or []).get(b":path", b"/")
                elif isinstance(event, h2.events.DataReceived):
                    size = event.flow_controlled_length or 0
                    connection.acknowledge_received_data(size, event.stream_id or 0)
                elif isinstance(event, h2.events.StreamReset):
                    targets.pop(event.stream_id or 0, None)
                    unsent.pop(event.stream_id or 0, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    await stream.send_all(connection.data_to_send())
                    return
                if isinstance(event, h2.events.StreamEnded | h2.events.RequestReceived):
                    stream_id = event.stream_id or 0
                    ended = isinstance(event, h2.events.StreamEnded) or (
                        isinstance(event, h2.events.RequestReceived)
                        and event.stream_ended is not None
                    )
                    if ended and stream_id in targets:
                        self.requests += 1
                        status, body = self._route(targets.pop(stream_id))
                        headers = [
                            (b":status", str(status).encode()),
                            (b"content-length", str(len(body)).encode()),
                            (b"content-type", b"text/plain"),
                        ]
                        connection.send_headers(stream_id, headers)
                        unsent[stream_id] = memoryview(body)
            for stream_id in list(unsent):
                self._send_some(connection, stream_id, unsent)
            await stream.send_all(connection.data_to_send())
            data = await stream.receive_some(65536)

    @staticmethod
    def _send_some(
        connection: h2.connection.H2Connection, stream_id: int, unsent: dict[int, memoryview]
    ) -> None:
        """Send as much of a response body as the windows allow; end it when all is sent."""
        body = unsent[stream_id]
        room = min(connection.local_flow_control_window(stream_id), len(body))
        step = connection.max_outbound_frame_size
        for start in range(0, room, step):
            connection.send_data(stream_id, bytes(body[start : min(room, start + step)]))
        rest = body[room:]
        if rest:
            unsent[stream_id] = rest
        else:
            del unsent[stream_id]
            connection.end_stream(stream_id)

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
    def _route(raw_target: bytes) -> tuple[int, bytes]:
        target = raw_target.decode("ascii", "replace")
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


class _Phase:
    """The figures of one protocol's run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.failures = 0
        self.elapsed = math.nan
        self.connections = 0
        self.pool_line = ""


async def _drive(
    phase: _Phase,
    *,
    url: str,
    requests: int,
    concurrency: int,
    http2: bool,
    progress: TextIO | None,
) -> None:
    """Send ``requests`` GETs from ``concurrency`` tasks through one client."""
    async with open_client(
        http1=not http2, http2=http2, max_connections=32, max_connections_per_key=32
    ) as client:
        remaining = requests
        start = trio.current_time()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                began = trio.current_time()
                try:
                    response = await client.request("GET", url)
                    if response.status_code != 200 or response.content != b"hello":
                        phase.failures += 1
                except Exception:
                    phase.failures += 1
                phase.latencies.append(trio.current_time() - began)
                done = len(phase.latencies)
                if progress is not None and done % 250 == 0:
                    line = f"\r  {phase.name}: {done}/{requests} done"
                    print(line, end="", file=progress, flush=True)

        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        phase.elapsed = trio.current_time() - start
        if progress is not None:
            print("\r" + " " * 40 + "\r", end="", file=progress)
        assert client.pool is not None
        stats = client.pool.statistics()
        phase.pool_line = (
            f"idle={stats.idle} in_use={stats.in_use} connecting={stats.connecting} "
            f"waiting={stats.waiting}"
        )
    phase.latencies.sort()


async def run_demo(
    *, requests: int = 3000, concurrency: int = 200, quiet: bool = False, out: TextIO | None = None
) -> int:
    """Run the demo; return the process exit code (0 when every request succeeded).

    The same load runs twice through the client against the embedded server: over HTTP/1.1
    (a pool of keep-alive connections) and over HTTP/2 (one multiplexed connection).
    """
    stream: TextIO = out if out is not None else sys.stdout
    progress = stream if not quiet and stream.isatty() else None
    server = DemoServer()
    phases = [_Phase("HTTP/1.1"), _Phase("HTTP/2")]
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve)
        url = f"http://127.0.0.1:{port}/"
        print(f"embedded HTTP/1.1 and HTTP/2 (h2c) server on 127.0.0.1:{port}", file=stream)
        print(
            f"{requests} requests from {concurrency} concurrent tasks, per protocol", file=stream
        )
        for phase in phases:
            before = server.by_protocol[phase.name]
            await _drive(
                phase,
                url=url,
                requests=requests,
                concurrency=concurrency,
                http2=phase.name == "HTTP/2",
                progress=progress,
            )
            phase.connections = server.by_protocol[phase.name] - before
        nursery.cancel_scope.cancel()
    print(
        f"{'':9} {'ok':>6} {'failed':>6} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'connections':>11}",
        file=stream,
    )
    for phase in phases:
        done = len(phase.latencies)
        p50, p90, p99, top = (1000 * percentile(phase.latencies, f) for f in (0.5, 0.9, 0.99, 1))
        print(
            f"{phase.name:9} {done - phase.failures:>6} {phase.failures:>6} "
            f"{done / phase.elapsed:>8,.0f} {p50:>7.2f} {p90:>7.2f} {p99:>7.2f} {top:>7.2f} "
            f"{phase.connections:>11}",
            file=stream,
        )
    print(
        f"server saw {server.connections} connections for {server.requests} requests", file=stream
    )
    for phase in phases:
        print(f"pool at the end ({phase.name}): {phase.pool_line}", file=stream)
    ok = all(p.failures == 0 and len(p.latencies) == requests for p in phases)
    return 0 if ok else 1
