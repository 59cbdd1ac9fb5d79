"""The client over HTTP/2, end to end: hypercorn (ALPN h2, HTTP/1.1 only, and h2c), a scripted
h2 server that rotates connections with GOAWAY, and nginx with ``keepalive_requests 3``.

Loopback only, ports from 0 (nginx: a port found free just before), every loop bounded.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from _h2server import ClientGone, H2Server
from _servers import WAIT, CountingApp, TLSFiles, assert_pool_balanced, serve_hypercorn

from trio_connpool import InvalidHeader, Pool, RemoteProtocolError, open_pool
from trio_connpool.http import (
    URL,
    HTTP2Connection,
    HTTPConnection,
    HTTPConnector,
    HTTPKey,
    PoolSender,
    Timeouts,
    open_client,
)

if TYPE_CHECKING:
    from pathlib import Path


# For bursts that queue behind connection rotations; each test bounds itself with fail_after.
UNBOUNDED_POOL = Timeouts(pool=None)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls-h2"))


def _pool(client_pool: Pool[HTTPKey, HTTPConnection] | None) -> Pool[HTTPKey, HTTPConnection]:
    assert client_pool is not None
    return client_pool


# ---- hypercorn: ALPN h2 ----------------------------------------------------------------------


async def test_alpn_h2_100_concurrent_requests_on_one_connection(tls: TLSFiles) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True) as client:
            pool = _pool(client.pool)
            versions: list[str] = []

            async def one(n: int) -> None:
                response = await client.get(f"{base}/slow/50?n={n}")
                assert response.status_code == 200
                assert response.content == b"slow"
                versions.append(response.http_version)

            with trio.fail_after(WAIT * 5):
                async with trio.open_nursery() as nursery:
                    for n in range(100):
                        nursery.start_soon(one, n)
            assert versions == ["HTTP/2"] * 100
            # A cold burst opened exactly one connection and multiplexed on it.
            assert app.connections == 1
            assert app.max_active > 10
            assert_pool_balanced(pool, idle=1)
            assert pool.statistics().connections == 1
    assert app.requests == 100


async def test_alpn_fallback_to_http11_spreads_over_the_per_key_limit(tls: TLSFiles) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls, alpn=["http/1.1"]) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True, max_connections_per_key=4) as client:
            pool = _pool(client.pool)
            versions: list[str] = []

            async def one(n: int) -> None:
                response = await client.get(f"{base}/slow/20?n={n}")
                versions.append(response.http_version)

            with trio.fail_after(WAIT * 5):
                async with trio.open_nursery() as nursery:
                    for n in range(20):
                        nursery.start_soon(one, n)
            assert versions == ["HTTP/1.1"] * 20
            assert app.connections == 4  # the reservation was corrected: four, not one
            assert app.max_active <= 4
            assert_pool_balanced(pool, idle=4)
            sender = client.sender
            assert isinstance(sender, PoolSender)
            key = sender.key_for(URL(base).origin)
            assert key.http_version == "HTTP/2,HTTP/1.1"
            # The origin's choice is remembered: the next connect reserves as HTTP/1.1.
            connector = pool._connector
            assert isinstance(connector, HTTPConnector)
            assert connector.protocol_chosen(key) == "HTTP/1.1"
            assert connector.reserve(key).capacity == 1


async def test_h2_only_against_an_http11_only_server_is_a_connect_error(tls: TLSFiles) -> None:
    from trio_connpool import ConnectError

    app = CountingApp()
    async with serve_hypercorn(app, tls, alpn=["http/1.1"]) as base:
        context = tls.client_context(["h2"])
        async with open_client(verify=context, http2=True, http1=False) as client:
            with pytest.raises(ConnectError, match="did not choose h2"):
                await client.get(f"{base}/")
            assert_pool_balanced(client.pool, idle=0)


async def test_an_h2_context_on_an_http11_client_is_refused(tls: TLSFiles) -> None:
    from trio_connpool import ConnectError

    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2"])
        async with open_client(verify=context) as client:
            with pytest.raises(ConnectError, match="HTTP/2 is off"):
                await client.get(f"{base}/")
            assert_pool_balanced(client.pool, idle=0)
    assert app.requests == 0


async def test_h2c_with_prior_knowledge() -> None:
    app = CountingApp()
    async with serve_hypercorn(app) as base, open_client(http2=True, http1=False) as client:
        assert base.startswith("http://")
        with trio.fail_after(WAIT * 5):
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(client.get, f"{base}/slow/20?n={n}")
        response = await client.get(f"{base}/")
        assert response.http_version == "HTTP/2"
        assert response.headers["x-custom"] == "Yes"
        assert app.connections == 1
        assert_pool_balanced(client.pool, idle=1)


@pytest.mark.parametrize("streamed", [False, True])
async def test_multi_megabyte_bodies_both_ways(tls: TLSFiles, streamed: bool) -> None:
    size = 5 * 1024 * 1024
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True) as client:
            with trio.fail_after(WAIT * 10):
                async with client.stream("GET", f"{base}/bytes/{size}") as response:
                    assert response.http_version == "HTTP/2"
                    received = 0
                    async for chunk in response.aiter_bytes():
                        received += len(chunk)
                assert received == size
                payload = bytes(range(256)) * (3 * 1024 * 1024 // 256)

                async def pieces() -> AsyncIterator[bytes]:
                    for start in range(0, len(payload), 100_000):
                        yield payload[start : start + 100_000]

                content = pieces() if streamed else payload
                echoed = await client.request("POST", f"{base}/echo", content=content)
                assert echoed.http_version == "HTTP/2"
                assert echoed.content == payload
            assert app.connections == 1
            assert_pool_balanced(client.pool, idle=1)


async def test_cancelled_request_resets_its_stream_and_the_connection_serves_on(
    tls: TLSFiles,
) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True) as client:
            pool = _pool(client.pool)
            await client.get(f"{base}/")
            with trio.move_on_after(0.05) as scope:
                await client.get(f"{base}/slow/5000")
            assert scope.cancelled_caught
            with trio.move_on_after(0.05) as scope:
                async with client.stream("GET", f"{base}/bytes/{8 * 1024 * 1024}") as response:
                    async for _ in response.aiter_bytes():
                        await trio.sleep(1)
            assert scope.cancelled_caught
            # Both streams were reset; the one connection stays in service.
            assert_pool_balanced(pool, idle=1)
            response = await client.get(f"{base}/")
            assert response.content == b"hello, world"
            assert app.connections == 1
            (connection,) = _open_connections(pool)
            assert isinstance(connection, HTTP2Connection)
            assert not connection._core.streams


def _open_connections(pool: Pool[HTTPKey, HTTPConnection]) -> list[HTTPConnection]:
    state = pool._state
    return [record.connection for record in state._idle if record.connection is not None]


async def test_extra_connections_open_when_every_stream_is_busy(tls: TLSFiles) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(
            verify=context, http2=True, max_concurrent_streams=10, http2_extra_connections=True
        ) as client:
            with trio.fail_after(WAIT * 5):
                async with trio.open_nursery() as nursery:
                    for n in range(30):
                        nursery.start_soon(client.get, f"{base}/slow/100?n={n}")
            assert app.connections == 3  # 30 requests, 10 streams each
            assert_pool_balanced(client.pool, idle=3)


async def test_busy_streams_wait_by_default(tls: TLSFiles) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True, max_concurrent_streams=10) as client:
            with trio.fail_after(WAIT * 5):
                async with trio.open_nursery() as nursery:
                    for n in range(30):
                        nursery.start_soon(client.get, f"{base}/slow/20?n={n}")
            assert app.connections == 1
            assert app.max_active <= 10
            assert_pool_balanced(client.pool, idle=1)


async def test_health_check_pings_a_quiet_connection(tls: TLSFiles) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True, health_check_after=0.0) as client:
            for _ in range(3):
                assert (await client.get(f"{base}/")).status_code == 200
            assert app.connections == 1
            assert_pool_balanced(client.pool, idle=1)


# ---- a scripted server that rotates connections with GOAWAY (nginx's keepalive_requests) ----


class RotatingServer:
    """h2 over TCP on 127.0.0.1: answers ``per_connection`` requests on each connection, sends
    GOAWAY with the last of them as ``last_stream_id`` *before* answering it (as nginx does),
    and never processes the streams above it."""

    def __init__(self, per_connection: int) -> None:
        self.per_connection = per_connection
        self.connections = 0
        self.processed: list[bytes] = []
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        server = H2Server(stream)
        last: int | None = None
        answered = 0
        try:
            await server.start()
            for _ in range(10_000):
                for request in server.pending():
                    if last is not None and request.stream_id > last:
                        request.responded = True  # not processed
                        continue
                    path = request.header(b":path")
                    assert path is not None
                    self.processed.append(path)
                    answered += 1
                    if answered == self.per_connection:
                        last = request.stream_id
                        await server.send_goaway(last_stream_id=last)
                    await server.respond(request.stream_id, body=path)
                await server.receive()
        except (ClientGone, trio.BrokenResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def test_goaway_rotation_every_request_succeeds_once() -> None:
    server = RotatingServer(per_connection=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        base = f"http://127.0.0.1:{server.port}"
        # 200 requests queue for connections that serve 3 each: on a busy machine the last
        # wait longer than the default pool timeout. The test's own bound is fail_after.
        async with open_client(http2=True, http1=False, timeouts=UNBOUNDED_POOL) as client:
            bodies: list[bytes] = []

            async def one(n: int) -> None:
                response = await client.get(f"{base}/n/{n}")
                bodies.append(response.content)

            with trio.fail_after(WAIT * 10):
                async with trio.open_nursery() as inner:
                    for n in range(200):
                        inner.start_soon(one, n)
            expected = sorted(f"/n/{n}".encode() for n in range(200))
            assert sorted(bodies) == expected
            # Each request was processed by the server exactly once: retries only re-sent
            # what the server had not processed.
            assert sorted(server.processed) == expected
            assert server.connections >= 200 // 3
            assert_pool_balanced(client.pool)
        nursery.cancel_scope.cancel()


async def test_a_server_that_refuses_everything_ends_with_an_error() -> None:
    refused = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal refused
        server = H2Server(stream)
        try:
            await server.start()
            await server.wait_request()
            refused += 1
            await server.send_goaway(last_stream_id=0)
            await server.receive_until_gone()
        except (ClientGone, trio.BrokenResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        async with open_client(http2=True, http1=False) as client:
            with trio.fail_after(WAIT), pytest.raises(RemoteProtocolError, match="GOAWAY"):
                await client.get(f"http://127.0.0.1:{port}/")
            assert refused == 6  # the first try and five retries
            assert_pool_balanced(client.pool)
        nursery.cancel_scope.cancel()


# ---- a custom pool over memory streams: capacity and weight through the real connector -----


async def test_custom_pool_uses_the_connectors_reservation() -> None:
    """``open_pool(HTTPConnector(...))`` reserves for HTTP/2 without being told."""
    app = CountingApp()
    async with serve_hypercorn(app) as base:
        connector = HTTPConnector(http2_weight=4)
        async with (
            open_pool(connector, max_connections_per_key=4) as pool,
            open_client(pool=pool, http2=True, http1=False) as client,
        ):
            with trio.fail_after(WAIT * 5):
                async with trio.open_nursery() as nursery:
                    for n in range(40):
                        nursery.start_soon(client.get, f"{base}/slow/20?n={n}")
            assert app.connections == 1
            (connection,) = _open_connections(pool)
            assert isinstance(connection, HTTP2Connection)
            assert connection.weight == 4
            assert pool.statistics().weight == 4
            assert_pool_balanced(pool, idle=1)


# ---- nginx with keepalive_requests 3 over HTTP/2 and TLS -----------------------------------

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
    keepalive_requests 3;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{ return 200 "nginx $request_uri"; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def _nginx(tmp_path: Path, tls: TLSFiles) -> AsyncIterator[int]:
    # Debian puts nginx in /usr/sbin, which a non-root PATH may lack.
    nginx = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if nginx is None:
        if os.environ.get("TRIO_CONNPOOL_REQUIRE_NGINX"):
            pytest.fail("nginx is required here (TRIO_CONNPOOL_REQUIRE_NGINX) but not found")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    shutil.copy(tls.certfile, tmp_path / "cert.pem")
    shutil.copy(tls.keyfile, tmp_path / "key.pem")
    port = _free_port()
    (tmp_path / "nginx.conf").write_text(_NGINX_CONF.format(dir=tmp_path, port=port))
    process = await trio.lowlevel.open_process(
        [nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)]
    )
    try:
        with trio.fail_after(10):
            for _ in range(1000):
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    assert process.poll() is None, (tmp_path / "error.log").read_text()
                    await trio.sleep(0.01)
                    continue
                await stream.aclose()
                break
        yield port
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.poll() is None:  # pragma: no cover
            process.kill()


async def test_nginx_keepalive_requests_3_over_http2(tmp_path: Path, tls: TLSFiles) -> None:
    async with _nginx(tmp_path, tls) as port:
        context = tls.client_context(["h2", "http/1.1"])
        base = f"https://127.0.0.1:{port}"
        # As above: 300 requests queue behind connections that serve 3 each.
        async with open_client(verify=context, http2=True, timeouts=UNBOUNDED_POOL) as client:
            bodies: list[bytes] = []
            versions: set[str] = set()

            async def one(n: int) -> None:
                response = await client.get(f"{base}/n/{n}")
                assert response.status_code == 200
                versions.add(response.http_version)
                bodies.append(response.content)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for n in range(300):
                        nursery.start_soon(one, n)
            assert versions == {"HTTP/2"}
            assert sorted(bodies) == sorted(f"nginx /n/{n}".encode() for n in range(300))
            assert_pool_balanced(client.pool)


async def test_two_host_headers_are_refused_before_anything_is_sent() -> None:
    """Over HTTP/2 as over HTTP/1.1: two Host values were joined into one ``:authority``,
    which a proxy and the server could each read another way."""
    app = CountingApp()
    async with serve_hypercorn(app) as base, open_client(http2=True, http1=False) as client:
        with trio.fail_after(WAIT), pytest.raises(InvalidHeader, match="more than one Host"):
            await client.get(f"{base}/", headers=[("Host", "a.example"), ("Host", "b.example")])
        assert app.requests == 0
        response = await client.get(f"{base}/")  # the connection serves on
        assert response.http_version == "HTTP/2"
        assert app.requests == 1
        assert_pool_balanced(client.pool)
