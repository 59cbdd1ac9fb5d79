"""``python -m trio_connpool demo``: the client against an embedded HTTP/1.1 and HTTP/2 server.

The server runs on 127.0.0.1 (a port from 0) in the same trio run as the client, so the demo
needs no network and nothing but the library's own dependencies. It speaks HTTP/1.1 itself (a
small keep-alive server for the demo's requests: Content-Length bodies, no chunked requests),
and HTTP/2 (h2) to a client that opens with the HTTP/2 preface (h2c with prior knowledge). It
counts the connections it accepts, so the demo can show what the pool saved: thousands of
requests over a handful of HTTP/1.1 connections, or over one multiplexed HTTP/2 connection.
"""

from __future__ import annotations

import math
import sys
from http import HTTPStatus
from typing import TextIO

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

from ._commands import percentile
from .http import open_client

__all__ = ["DemoServer", "run_demo"]


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_HEAD = 64 * 1024  # an HTTP/1.1 request head, up to its blank line
_MAX_BODY = 1024 * 1024  # an HTTP/1.1 request body (read and dropped)


class _BadRequest(Exception):
    """An HTTP/1.1 request the demo server answers with ``status`` and then closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


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
        except (trio.BrokenResourceError, h2.exceptions.ProtocolError):
            return

    async def _serve_h11(self, stream: trio.SocketStream, first: bytes) -> None:
        buffer = bytearray(first)
        for _ in range(1_000_000):  # bounded: one iteration per request
            try:
                request = await self._read_request(stream, buffer)
            except _BadRequest as exc:
                await stream.send_all(_response(exc.status, str(exc).encode(), close=True))
                return
            if request is None:
                return
            method, target, close = request
            self.requests += 1
            status, body = self._route(target)
            await stream.send_all(_response(status, body, close=close, head=method == b"HEAD"))
            if close:
                return

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
        stream: trio.SocketStream, buffer: bytearray
    ) -> tuple[bytes, bytes, bool] | None:
        """Read one request from ``buffer`` and the stream: (method, target, close after it).

        None when the peer closed between requests. The body, if any, is read and dropped.
        """
        searched = 0
        end = buffer.find(b"\r\n\r\n")
        while end < 0:  # bounded: the head may grow to _MAX_HEAD only
            if len(buffer) > _MAX_HEAD:
                raise _BadRequest(431, "request head too large")
            searched = max(0, len(buffer) - 3)
            data = await stream.receive_some(65536)
            if not data:
                if buffer:
                    raise _BadRequest(400, "incomplete request")
                return None
            buffer += data
            end = buffer.find(b"\r\n\r\n", searched)
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith(b"/"):
            raise _BadRequest(400, "bad request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _BadRequest(505, "HTTP/1.1 only")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or name.lower() in headers:
                raise _BadRequest(400, "bad or repeated header")
            headers[name.lower()] = value.strip()
        if b"transfer-encoding" in headers:
            raise _BadRequest(501, "no request bodies but Content-Length ones")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > _MAX_BODY:
            raise _BadRequest(400, "bad or too large Content-Length")
        for _ in range(int(length) + 1):  # bounded: each read brings at least one byte
            if len(buffer) >= int(length):
                break
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer += data
        del buffer[: int(length)]
        tokens = {token.strip().lower() for token in headers.get(b"connection", b"").split(b",")}
        close = version == b"HTTP/1.0" or b"close" in tokens
        return method, target, close

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


def _response(status: int, body: bytes, *, close: bool, head: bool = False) -> bytes:
    """An HTTP/1.1 response with a Content-Length body (none for HEAD)."""
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"content-length: {len(body)}",
        "content-type: text/plain",
        *(["connection: close"] if close else []),
    ]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if head else body)


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
