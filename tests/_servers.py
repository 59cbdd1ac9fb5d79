"""Real servers for the HTTP client's end-to-end tests: loopback only, port 0, no sleeps.

- `serve_hypercorn` runs hypercorn (a real HTTP server, its trio worker) in the test's own
  trio run, plain or TLS, around a `CountingApp`: a small ASGI app that records which client
  sockets (``scope["client"]``) sent requests and how many requests ran at once.
- `FaultServer` is a scripted HTTP/1.1 server made of trio + h11: each accepted connection
  runs the test's script (answer, stall, reset, send garbage, close...). It counts accepted
  connections, requests, and the sockets the *client* closed (EOF or reset seen by the server),
  and lets a test wait for any condition on those counters without sleeping.
- `TLSFiles`: a trustme CA with a certificate for 127.0.0.1/localhost, as PEM files and as
  client/server `ssl.SSLContext` objects.
- `serve_nginx` runs nginx (in the foreground, its own config and prefix in a temporary
  directory) with the test's ``server`` blocks; the test skips loudly when nginx is missing,
  and fails then when TRIO_CONNPOOL_REQUIRE_NGINX is set (as CI sets it).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import h11
import pytest
import trio
import trio.testing
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve

from trio_connpool import Pool

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "WAIT",
    "CountingApp",
    "FaultServer",
    "ServerConnection",
    "TLSFiles",
    "assert_pool_balanced",
    "cancel_when",
    "run_fault_server",
    "serve_hypercorn",
    "serve_nginx",
]

# The bound on every wait for a server-side condition: far above what loopback needs.
WAIT = 2.0
_READ = 64 * 1024
_CHUNK = 64 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# ---- TLS ---------------------------------------------------------------------------------


@attrs.define
class TLSFiles:
    """A trustme CA and a server certificate for ``127.0.0.1`` and ``localhost``."""

    ca: trustme.CA
    cert: trustme.LeafCert
    certfile: Path
    keyfile: Path

    @classmethod
    def create(cls, directory: Path) -> TLSFiles:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        certfile = directory / "server.pem"
        keyfile = directory / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(certfile))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(certfile), append=True)
        cert.private_key_pem.write_to_path(str(keyfile))
        return cls(ca, cert, certfile, keyfile)

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A verifying client context that trusts this CA (ALPN ``alpn``; none: HTTP/1.1)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context


# ---- hypercorn ----------------------------------------------------------------------------


class CountingApp:
    """An ASGI app that knows which connections it served.

    Routes: ``/`` a small body; ``/bytes/{n}`` n bytes (Content-Length, sent in 64 KiB
    pieces); ``/echo`` the request body back, once it has all arrived (with ``x-request-te``
    and ``x-request-chunks`` saying how it came); ``/slow/{ms}`` waits ms milliseconds;
    ``/status/{code}`` an empty response with that status.
    """

    def __init__(self) -> None:
        self.clients: set[tuple[str, int]] = set()  # one per TCP connection that sent requests
        self.requests = 0
        self.active = 0
        self.max_active = 0

    @property
    def connections(self) -> int:
        return len(self.clients)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            for _ in range(2):  # startup, then shutdown
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
            return
        client = scope["client"]
        self.clients.add((client[0], client[1]))
        self.requests += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._route(scope, receive, send)
        finally:
            self.active -= 1

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if path == "/echo":
            chunks: list[bytes] = []
            messages = 0
            more = True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                messages += 1
                more = message.get("more_body", False)
            body = b"".join(chunks)
            te = dict(scope["headers"]).get(b"transfer-encoding", b"-")
            headers += [(b"x-request-te", te), (b"x-request-chunks", str(messages).encode())]
            await _respond(send, 200, headers, body)
            return
        await _drain(receive)
        if path == "/":
            await _respond(send, 200, [*headers, (b"X-Custom", b"Yes")], b"hello, world")
        elif path.startswith("/bytes/"):
            size = int(path.removeprefix("/bytes/"))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(size).encode())],
                }
            )
            piece = b"x" * _CHUNK
            sent = 0
            while sent < size:
                part = piece[: size - sent]
                sent += len(part)
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path.startswith("/slow/"):
            await trio.sleep(int(path.removeprefix("/slow/")) / 1000)
            await _respond(send, 200, headers, b"slow")
        elif path.startswith("/status/"):
            await _respond(send, int(path.removeprefix("/status/")), [], b"")
        else:
            await _respond(send, 404, headers, b"not found")


async def _drain(receive: Receive) -> None:
    for _ in range(10_000):  # bounded: our requests to these routes carry no body
        message = await receive()
        if not message.get("more_body", False):
            return
    raise AssertionError("request body too long")


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serve_hypercorn(
    app: CountingApp, tls: TLSFiles | None = None, *, alpn: list[str] | None = None
) -> AsyncIterator[str]:
    """Run hypercorn with ``app`` on 127.0.0.1 (a free port) and yield its base URL.

    Over TLS it offers ALPN ``alpn`` (default ``h2`` and ``http/1.1``); over plain TCP it
    speaks HTTP/1.1, and HTTP/2 to a client that starts with the HTTP/2 preface.
    """
    config = Config()
    if alpn is not None:
        config.alpn_protocols = alpn
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    if tls is not None:
        config.certfile = str(tls.certfile)
        config.keyfile = str(tls.keyfile)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, app, config)
        assert len(binds) == 1, binds
        base = binds[0]
        if tls is not None:
            assert base.startswith("https://"), base
        yield base
        nursery.cancel_scope.cancel()


# ---- the scripted fault server -----------------------------------------------------------


class ServerConnection:
    """The server side of one accepted connection, for a script to drive."""

    def __init__(self, server: FaultServer, stream: trio.SocketStream, index: int) -> None:
        self.server = server
        self.stream = stream
        self.index = index  # 0 for the first connection the server accepted
        self.h11 = h11.Connection(h11.SERVER)
        self.requests = 0
        self.peer_closed = False

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._mark_peer_closed()
        return data

    def _mark_peer_closed(self) -> None:
        if not self.peer_closed:
            self.peer_closed = True
            self.server.peer_closed += 1
            self.server.changed()

    async def receive_request(self) -> tuple[h11.Request, bytes] | None:
        """The next complete request and its body, or None if the client closed first."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        request: h11.Request | None = None
        body: list[bytes] = []
        for _ in range(100_000):  # bounded: each step consumes data or ends
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self._receive()
                if not data and request is None and not self.h11.trailing_data[0]:
                    return None
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                self.requests += 1
                self.server.requests.append(
                    (self.index, request.method.decode(), request.target.decode())
                )
                self.server.changed()
                return request, b"".join(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover
                raise AssertionError(f"unexpected event {event!r}")
        raise AssertionError("request never ended")

    async def send_response(
        self,
        status: int = 200,
        body: bytes = b"ok",
        *,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Send a whole response with a Content-Length."""
        fields = [("Content-Length", str(len(body))), *(headers or [])]
        data = self.h11.send(h11.Response(status_code=status, headers=fields))
        assert data is not None
        data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def send_head(self, content_length: int, status: int = 200) -> None:
        data = self.h11.send(
            h11.Response(status_code=status, headers=[("Content-Length", str(content_length))])
        )
        assert data is not None
        await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def serve(self, count: int | None = None, body: bytes = b"ok") -> None:
        """Answer ``count`` requests (None: until the client closes) with 200 ``body``."""
        limit = 10_000 if count is None else count
        for _ in range(limit):
            if await self.receive_request() is None:
                return
            await self.send_response(200, body)

    async def wait_peer_closed(self) -> None:
        """Read (and drop) whatever comes until the client closes the connection."""
        for _ in range(100_000):  # bounded: each step reads data or ends
            if self.peer_closed or not await self._receive():
                return
        raise AssertionError("the client never closed")

    def reset(self) -> None:
        """Abort the connection: SO_LINGER 0 then close, so the client sees a reset."""
        sock = self.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


Script = Callable[[ServerConnection], Awaitable[None]]


async def _keep_alive(conn: ServerConnection) -> None:
    await conn.serve()


class FaultServer:
    """A scripted HTTP/1.1 server on 127.0.0.1.

    ``script(conn)`` runs for every accepted connection; when it returns, the server closes
    the connection (and counts it in ``server_closed``). The default script answers every
    request with ``200 ok`` until the client closes. Start it with ``nursery.start``.

    Counters: ``accepted`` connections; ``peer_closed``: connections the client closed (EOF or
    reset read by the server); ``server_closed``: connections the server's script ended;
    ``requests``: (connection index, method, target) of every complete request.
    """

    def __init__(self, script: Script = _keep_alive) -> None:
        self.script = script
        self.port = 0
        self.accepted = 0
        self.peer_closed = 0
        self.server_closed = 0
        self.requests: list[tuple[int, str, str]] = []
        self.connections: list[ServerConnection] = []
        self._changed = trio.Event()

    def url(self, path: str = "/", *, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Wait until ``predicate()`` holds; re-checked on every server event."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_peer_closed(self, count: int, timeout: float = WAIT) -> None:
        """Wait until the client has closed ``count`` connections."""
        await self.wait_for(lambda: self.peer_closed >= count, timeout)
        assert self.peer_closed == count, (self.peer_closed, count)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        assert len(listeners) == 1
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._handle, stream, self.accepted)
                self.accepted += 1
                self.changed()

    async def _handle(self, stream: trio.SocketStream, index: int) -> None:
        conn = ServerConnection(self, stream, index)
        self.connections.append(conn)
        try:
            await self.script(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn._mark_peer_closed()
        finally:
            if stream.socket.fileno() >= 0:
                await trio.aclose_forcefully(stream)
            self.server_closed += 1
            self.changed()


@asynccontextmanager
async def run_fault_server(script: Script = _keep_alive) -> AsyncIterator[FaultServer]:
    """Run a `FaultServer` for the block; cancelled when the block ends."""
    server = FaultServer(script)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


def assert_pool_balanced(pool: Pool[Any, Any] | None, *, idle: int | None = None) -> None:
    """No lease, waiter, connect or busy connection left; optionally exactly ``idle`` idle."""
    assert pool is not None
    stats = pool.statistics()
    assert (stats.leases, stats.in_use, stats.waiting, stats.connecting) == (0, 0, 0, 0), stats
    for key_stats in stats.keys.values():
        assert (key_stats.leases, key_stats.waiting, key_stats.connecting) == (0, 0, 0)
    if idle is not None:
        assert stats.idle == idle, stats


async def cancel_when(
    request: Callable[[], Awaitable[object]], ready: Callable[[], Awaitable[None]]
) -> float:
    """Run ``request`` in a task; once ``ready()`` returns and everything is blocked, cancel
    it. Return how long the cancellation took to complete. The request must not finish."""
    scope = trio.CancelScope()
    finished = False

    async def attempt() -> None:
        nonlocal finished
        with scope:
            await request()
            finished = True

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt)
            await ready()
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            scope.cancel()
    assert not finished
    assert scope.cancelled_caught
    return trio.current_time() - start


@asynccontextmanager
async def serving(
    script: Callable[[], Awaitable[object]], *, hold: bool = False
) -> AsyncIterator[trio.Nursery]:
    """Run a scripted server's ``script`` beside the block, in a nursery of its own.

    Leaving the block waits for the script to end, so what it asserts is checked and what it
    records is complete. With ``hold`` the server says nothing more once the script is done
    and keeps the connection open until the block ends; leaving the block then cancels it.
    """

    async def run() -> None:
        await script()
        if hold:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield nursery
        if hold:
            nursery.cancel_scope.cancel()


# ---- nginx ----------------------------------------------------------------------------------

_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{servers}
}}
"""


def nginx_or_skip() -> str:
    """The nginx binary; skip the test (fail under TRIO_CONNPOOL_REQUIRE_NGINX) without it."""
    # Debian puts nginx in /usr/sbin, which a non-root PATH may lack.
    nginx = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if nginx is None:
        if os.environ.get("TRIO_CONNPOOL_REQUIRE_NGINX"):
            pytest.fail("nginx is required here (TRIO_CONNPOOL_REQUIRE_NGINX) but not found")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return nginx


@asynccontextmanager
async def serve_nginx(
    directory: Path, servers: str, *, unix_sockets: Sequence[Path] = (), ports: Sequence[int] = ()
) -> AsyncIterator[None]:
    """Run nginx with the ``server`` blocks ``servers`` (``{dir}`` stands for ``directory``)
    until the block ends; ready once each of ``unix_sockets`` and ``ports`` accepts."""
    nginx = nginx_or_skip()
    conf = directory / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(dir=directory, servers=servers.replace("{dir}", str(directory)))
    )
    process = await trio.lowlevel.open_process([nginx, "-c", str(conf), "-p", str(directory)])
    try:
        with trio.fail_after(10):
            probes: list[Callable[[], Awaitable[trio.SocketStream]]] = [
                *(partial(trio.open_unix_socket, str(path)) for path in unix_sockets),
                *(partial(trio.open_tcp_stream, "127.0.0.1", port) for port in ports),
            ]
            for probe in probes:
                for _ in range(1000):
                    try:
                        stream = await probe()
                    except OSError:
                        error_log = directory / "error.log"
                        assert process.poll() is None, error_log.read_text()
                        await trio.sleep(0.01)
                        continue
                    await stream.aclose()
                    break
        yield
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.poll() is None:  # pragma: no cover
            process.kill()
