"""httpx on our pool: `AsyncPoolTransport` driven through httpx's public API, end to end.

House rules: loopback only, port 0 (hypercorn and the scripted fault server), every loop
bounded, the servers run in the test's own trio run; connections are counted on the server
side; after every scenario the pool holds no lease, no waiter and no connect in flight. The
error-mapping table is checked with a fake sender (no network), every row of it.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

import pytest

pytest.importorskip("httpx")

import attrs
import h11
import httpx
import trio
import trio.testing
from _servers import (
    WAIT,
    CountingApp,
    ServerConnection,
    TLSFiles,
    assert_pool_balanced,
    cancel_when,
    run_fault_server,
    serve_hypercorn,
)

from trio_connpool import (
    ConnectError,
    ConnectTimeout,
    InvalidHeader,
    InvalidURL,
    LocalProtocolError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    ServerDisconnected,
    TooManyWaiters,
    TransportError,
    WriteTimeout,
)
from trio_connpool.contrib.httpx import AsyncPoolTransport, PoolClosedError, PoolResponseStream
from trio_connpool.http import Request, Response, Timeouts, open_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

MiB = 1024 * 1024
SHORT = Timeouts(connect=2.0, read=0.2, write=2.0)
HTTPX_SHORT = httpx.Timeout(2.0, read=0.2)


@attrs.frozen
class Served:
    """A running hypercorn: its base URL, its app (the counters) and what the client trusts."""

    base: str
    app: CountingApp
    verify: bool | ssl.SSLContext


@pytest.fixture(params=["plain", "tls"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    app = CountingApp()
    tls = TLSFiles.create(tmp_path) if request.param == "tls" else None
    async with serve_hypercorn(app, tls) as base:
        verify: bool | ssl.SSLContext = True if tls is None else tls.client_context()
        yield Served(base, app, verify)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await trio.lowlevel.checkpoint()


# ---- round trips against hypercorn ---------------------------------------------------------


async def test_get_round_trip(served: Served) -> None:
    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        response = await client.get(served.base + "/")
        assert response.status_code == 200
        assert response.http_version == "HTTP/1.1"
        # Passed through as sent: hypercorn sends an empty reason phrase.
        assert response.extensions["reason_phrase"] == b""
        assert response.headers["x-custom"] == "Yes"
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.text == "hello, world"
        assert response.content == b"hello, world"
        assert response.is_closed
        assert str(response.request.url) == served.base + "/"
        assert_pool_balanced(transport.pool, idle=1)
    assert served.app.requests == 1


async def test_post_bytes_and_json_round_trip(served: Served) -> None:
    data = bytes(range(256)) * (2 * MiB // 256) + b"tail"
    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        response = await client.post(served.base + "/echo", content=data)
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["x-request-te"] == "-"  # httpx's Content-Length was used
        assert int(response.headers["x-request-chunks"]) > 1  # it did arrive in pieces
        response = await client.post(served.base + "/echo", json={"a": [1, 2]})
        assert response.json() == {"a": [1, 2]}
        response = await client.post(served.base + "/echo", data={"k": "v w"})
        assert response.text == "k=v+w"
        assert_pool_balanced(transport.pool, idle=1)
    assert served.app.connections == 1


async def test_streamed_upload_from_an_async_generator(served: Served) -> None:
    data = b"0123456789abcdef" * (MiB // 16)
    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        response = await client.post(served.base + "/echo", content=_chunks(data, 50_000))
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["x-request-te"] == "chunked"
        assert_pool_balanced(transport.pool, idle=1)
    assert served.app.connections == 1


async def test_streamed_response(served: Served) -> None:
    size = 4 * MiB
    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        total = 0
        chunks = 0
        async with client.stream("GET", served.base + f"/bytes/{size}") as response:
            assert response.status_code == 200
            assert isinstance(response.stream, httpx.AsyncByteStream)
            assert_pool_balanced_busy(transport, leases=1)
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                chunks += 1
        assert total == size
        assert chunks > 1
        assert response.is_closed
        assert_pool_balanced(transport.pool, idle=1)
        # Returned clean: the next request reuses the connection.
        assert (await client.get(served.base + "/")).status_code == 200
        # Closing a stream early, with a large body unread, closes its connection.
        async with client.stream("GET", served.base + f"/bytes/{size}") as response:
            assert response.status_code == 200
        assert_pool_balanced(transport.pool, idle=0)
        assert (await client.get(served.base + "/")).text == "hello, world"
        assert_pool_balanced(transport.pool, idle=1)
    assert served.app.connections == 2


def assert_pool_balanced_busy(transport: AsyncPoolTransport, *, leases: int) -> None:
    pool = transport.pool
    assert pool is not None
    stats = pool.statistics()
    assert (stats.leases, stats.waiting, stats.connecting) == (leases, 0, 0), stats


async def test_keep_alive_reuses_one_connection(served: Served) -> None:
    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        for i in range(20):
            response = await client.get(served.base + f"/?i={i}")
            assert response.status_code == 200, i
            assert_pool_balanced(transport.pool, idle=1)
    assert served.app.requests == 20
    assert served.app.connections == 1


async def test_concurrency_is_bounded_by_the_per_key_limit(served: Served) -> None:
    statuses: list[int] = []
    async with (
        AsyncPoolTransport(verify=served.verify, max_connections_per_key=4) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):

        async def one(n: int) -> None:
            response = await client.get(served.base + f"/slow/5?n={n}")
            statuses.append(response.status_code)

        with trio.fail_after(WAIT * 5):
            async with trio.open_nursery() as nursery:
                for n in range(30):
                    nursery.start_soon(one, n)
        assert_pool_balanced(transport.pool)
    assert statuses == [200] * 30
    assert 1 <= served.app.connections <= 4
    assert served.app.max_active <= 4


async def test_http2_over_tls_multiplexes_on_one_connection(tmp_path: Path) -> None:
    app = CountingApp()
    tls = TLSFiles.create(tmp_path)
    async with serve_hypercorn(app, tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with (
            AsyncPoolTransport(verify=context, http2=True) as transport,
            httpx.AsyncClient(transport=transport) as client,
        ):
            versions: list[str] = []

            async def one(n: int) -> None:
                response = await client.get(f"{base}/slow/20?n={n}")
                assert response.text == "slow"
                assert response.reason_phrase == "OK"  # httpx's: HTTP/2 sends none
                versions.append(response.http_version)

            with trio.fail_after(WAIT * 5):
                async with trio.open_nursery() as nursery:
                    for n in range(20):
                        nursery.start_soon(one, n)
            assert versions == ["HTTP/2"] * 20
            upload = await client.post(base + "/echo", content=_chunks(b"x" * 100_000, 7_000))
            assert upload.content == b"x" * 100_000
            assert upload.http_version == "HTTP/2"
            assert_pool_balanced(transport.pool, idle=1)
    assert app.connections == 1
    assert app.max_active > 1


# ---- what reaches the server ---------------------------------------------------------------


async def test_headers_url_and_framing_reach_the_server_as_httpx_built_them() -> None:
    seen: list[h11.Request] = []

    async def script(conn: ServerConnection) -> None:
        for _ in range(100):  # bounded: a few requests per test
            received = await conn.receive_request()
            if received is None:
                return
            seen.append(received[0])
            await conn.send_response(200, received[1] or b"empty")

    def headers(index: int) -> list[tuple[bytes, bytes]]:
        return [(name.lower(), value) for name, value in seen[index].headers]

    async with run_fault_server(script) as server:
        transport = AsyncPoolTransport(headers={"X-Default": "1", "User-Agent": "ours"})
        async with transport, httpx.AsyncClient(transport=transport) as client:
            url = f"http://user:secret@127.0.0.1:{server.port}/p%20a/th?q=1&q=2#fragment"
            response = await client.get(url, headers=[("X-Dup", "a"), ("X-Dup", "b")])
            assert response.text == "empty"
            assert seen[0].target == b"/p%20a/th?q=1&q=2"
            sent = headers(0)
            assert [v for n, v in sent if n == b"x-dup"] == [b"a", b"b"]
            assert [v for n, v in sent if n == b"x-default"] == [b"1"]
            assert [v for n, v in sent if n == b"user-agent"] == [
                f"python-httpx/{httpx.__version__}".encode()
            ]
            assert [v for n, v in sent if n == b"host"] == [f"127.0.0.1:{server.port}".encode()]
            assert (b"authorization", b"Basic dXNlcjpzZWNyZXQ=") in sent
            assert not any(n in (b"content-length", b"transfer-encoding") for n, _ in sent)
            # A DELETE without a body gets no framing header; a POST gets httpx's one.
            assert (await client.delete(server.url("/d"))).text == "empty"
            assert not any(n == b"content-length" for n, _ in headers(1))
            assert (await client.post(server.url("/p"))).text == "empty"
            assert (b"content-length", b"0") in headers(2)
            assert (await client.post(server.url("/p"), content=b"body")).text == "body"
            assert [v for n, v in headers(3) if n == b"content-length"] == [b"4"]
            assert_pool_balanced(transport.pool, idle=1)
        assert server.accepted == 1


# ---- lifecycle -----------------------------------------------------------------------------


async def test_a_transport_that_was_not_entered_raises_runtime_error() -> None:
    transport = AsyncPoolTransport()
    assert repr(transport) == "<AsyncPoolTransport [not open, owns its client]>"
    client = httpx.AsyncClient(transport=transport)
    with pytest.raises(RuntimeError, match="not open"):
        await client.get("http://127.0.0.1:1/")
    with pytest.raises(RuntimeError, match="not open"):
        assert transport.pool is None
    with pytest.raises(RuntimeError, match="without a matching"):
        await transport.__aexit__(None, None, None)
    await client.aclose()


async def test_an_httpx_client_alone_opens_and_closes_the_transport(served: Served) -> None:
    transport = AsyncPoolTransport(verify=served.verify)
    async with httpx.AsyncClient(transport=transport) as client:
        assert repr(transport) == "<AsyncPoolTransport [open, owns its client]>"
        pool = transport.pool
        assert pool is not None
        assert (await client.get(served.base + "/")).status_code == 200
        assert_pool_balanced(pool, idle=1)
    assert pool.closed
    assert pool.statistics().connections == 0
    assert repr(transport) == "<AsyncPoolTransport [closed, owns its client]>"
    with pytest.raises(RuntimeError, match="closed"):
        assert transport.pool is None
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", served.base + "/"))
    with pytest.raises(RuntimeError, match="closed"):
        async with transport:
            raise AssertionError("unreachable")  # pragma: no cover


async def test_entries_nest_and_only_the_outermost_closes(served: Served) -> None:
    async with AsyncPoolTransport(verify=served.verify) as transport:
        pool = transport.pool
        assert pool is not None
        for _ in range(3):  # one httpx client after another, on the same pool
            async with httpx.AsyncClient(transport=transport) as client:
                assert (await client.get(served.base + "/")).status_code == 200
            assert not pool.closed
            assert_pool_balanced(pool, idle=1)
        # An httpx client closed with aclose() (not entered) leaves the transport open too.
        loose = httpx.AsyncClient(transport=transport)
        assert (await loose.get(served.base + "/")).status_code == 200
        with trio.testing.assert_checkpoints():
            await loose.aclose()
        assert not pool.closed
        with trio.testing.assert_checkpoints():
            async with transport:
                pass
        assert not pool.closed
    assert pool.statistics().closed
    assert served.app.connections == 1
    assert served.app.requests == 4


async def test_from_client_shares_one_pool_between_httpx_clients(served: Served) -> None:
    async with open_client(verify=served.verify, max_connections_per_key=2) as ours:
        transport = AsyncPoolTransport.from_client(ours)
        assert transport.client is ours
        assert repr(transport) == "<AsyncPoolTransport [open, shares a client]>"
        other = AsyncPoolTransport.from_client(ours)
        async with (
            httpx.AsyncClient(transport=transport) as first,
            httpx.AsyncClient(transport=other, base_url=served.base) as second,
        ):
            for _ in range(3):
                assert (await first.get(served.base + "/")).status_code == 200
                assert (await second.get("/")).status_code == 200
        assert transport.pool is ours.pool
        assert_pool_balanced(ours.pool, idle=1)
        # Leaving the httpx clients closed nothing: our client still works.
        assert (await ours.get(served.base + "/")).status_code == 200
        # And the transport still works without being entered.
        async with httpx.AsyncClient(transport=transport) as third:
            assert (await third.get(served.base + "/")).status_code == 200
    assert served.app.connections == 1
    # Our client's block is over: its pool is closed, which httpx sees as a TransportError.
    with pytest.raises(PoolClosedError) as caught:
        async with httpx.AsyncClient(transport=transport) as late:
            await late.get(served.base + "/")
    assert isinstance(caught.value, httpx.TransportError)
    assert isinstance(caught.value.__cause__, PoolClosed)
    with pytest.raises(TypeError):
        AsyncPoolTransport.from_client(object())  # type: ignore[arg-type]


async def test_invalid_options_raise_when_entered() -> None:
    transport = AsyncPoolTransport(http1=False, http2=False)
    with pytest.raises(ValueError, match="no protocol"):
        async with transport:
            raise AssertionError("unreachable")  # pragma: no cover
    assert repr(transport) == "<AsyncPoolTransport [not open, owns its client]>"


async def test_entering_while_another_task_opens_it_is_refused() -> None:
    transport = AsyncPoolTransport()
    release = trio.Event()
    seen_opening = False

    async def hold() -> None:
        async with transport:
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        # Opening the pool takes a few scheduling rounds (its nursery starts a task), so
        # this task runs while the other one is still opening it.
        for _ in range(100):  # bounded
            await trio.lowlevel.checkpoint()
            if "opening" in repr(transport):
                seen_opening = True
                with pytest.raises(RuntimeError, match="another task"):
                    async with transport:
                        raise AssertionError("unreachable")  # pragma: no cover
                break
        await trio.testing.wait_all_tasks_blocked()
        assert repr(transport) == "<AsyncPoolTransport [open, owns its client]>"
        release.set()
    assert seen_opening


async def test_an_exception_in_the_block_comes_out_as_itself(served: Served) -> None:
    class Boom(Exception):
        pass

    transport = AsyncPoolTransport(verify=served.verify)
    with pytest.raises(Boom):
        async with transport, httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(served.base + "/")).status_code == 200
            raise Boom
    assert repr(transport) == "<AsyncPoolTransport [closed, owns its client]>"


# ---- errors against real servers ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_connection_raises_connect_error() -> None:
    port = _free_port()
    async with (
        AsyncPoolTransport() as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get(url)
        assert type(caught.value) is httpx.ConnectError
        assert isinstance(caught.value.__cause__, ConnectError)
        assert str(caught.value.request.url) == url
        assert_pool_balanced(transport.pool, idle=0)


async def test_stalled_head_raises_read_timeout() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.wait_peer_closed()  # and never answer

    async with run_fault_server(script) as server:
        async with (
            AsyncPoolTransport(timeouts=SHORT) as transport,
            # httpx's timeouts are the request's: the read limit is SHORT's.
            httpx.AsyncClient(transport=transport, timeout=HTTPX_SHORT) as client,
        ):
            start = trio.current_time()
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.get(server.url("/"))
            assert 0.2 <= trio.current_time() - start < 1.0
            assert isinstance(caught.value.__cause__, ReadTimeout)
            await server.wait_for(lambda: server.peer_closed == 1)
            assert_pool_balanced(transport.pool, idle=0)
        assert server.accepted == 1


async def test_stalled_body_raises_read_timeout_while_streaming() -> None:
    async def script(conn: ServerConnection) -> None:
        if conn.index == 0:
            await conn.receive_request()
            await conn.send_head(1000)
            await conn.send_raw(b"x" * 100)
            await conn.wait_peer_closed()
        await conn.serve()

    async with run_fault_server(script) as server:
        async with (
            AsyncPoolTransport(timeouts=SHORT) as transport,
            # httpx's timeouts are the request's: the read limit is SHORT's.
            httpx.AsyncClient(transport=transport, timeout=HTTPX_SHORT) as client,
        ):
            received: list[bytes] = []
            with pytest.raises(httpx.ReadTimeout) as caught:
                async with client.stream("GET", server.url("/")) as response:
                    async for chunk in response.aiter_bytes():
                        received.append(chunk)
            assert b"".join(received) == b"x" * 100
            assert isinstance(caught.value.__cause__, ReadTimeout)
            await server.wait_for(lambda: server.peer_closed == 1)
            assert_pool_balanced(transport.pool, idle=0)
            assert (await client.get(server.url("/next"))).content == b"ok"
            assert_pool_balanced(transport.pool, idle=1)
        assert server.accepted == 2


async def test_garbage_raises_remote_protocol_error() -> None:
    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_raw(b"this is not HTTP\r\n\r\n")
        await conn.wait_peer_closed()

    async with (
        run_fault_server(script) as server,
        AsyncPoolTransport() as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get(server.url("/"))
        assert isinstance(caught.value.__cause__, RemoteProtocolError)
        await server.wait_for(lambda: server.peer_closed == 1)
        assert_pool_balanced(transport.pool, idle=0)


async def test_waiting_too_long_for_a_connection_raises_pool_timeout(served: Served) -> None:
    timeouts = Timeouts(pool=0.1)
    async with (
        AsyncPoolTransport(verify=served.verify, max_connections=1, timeouts=timeouts) as t,
        # httpx's timeouts are the request's: its pool limit is the one that applies.
        httpx.AsyncClient(transport=t, timeout=httpx.Timeout(5.0, pool=0.1)) as client,
    ):
        async with client.stream("GET", served.base + "/bytes/1000") as held:
            with pytest.raises(httpx.PoolTimeout) as caught:
                await client.get(served.base + "/")
            assert isinstance(caught.value.__cause__, PoolTimeout)
            assert len(await held.aread()) == 1000
        assert_pool_balanced(t.pool, idle=1)
    assert served.app.requests == 1


async def test_bad_requests_fail_before_anything_is_sent(served: Served) -> None:
    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("ftp://127.0.0.1/")
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await client.get(served.base + "/", headers={"X-A": "a\r\nInjected: yes"})
        assert isinstance(caught.value.__cause__, InvalidHeader)
        # httpx refuses a synchronous body itself; the transport does too, when called
        # directly.
        sync = httpx.Request("POST", served.base + "/echo", content=iter([b"sync"]))
        with pytest.raises(RuntimeError, match="synchronous"):
            await transport.handle_async_request(sync)
        assert transport.pool is not None
        assert transport.pool.statistics().connections == 0
    assert served.app.requests == 0


async def test_errors_of_a_request_body_pass_through(served: Served) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"first part"
        await trio.lowlevel.checkpoint()
        raise ValueError("the body's own error")

    async with (
        AsyncPoolTransport(verify=served.verify) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        with pytest.raises(ValueError, match="the body's own error"):
            await client.post(served.base + "/echo", content=failing())
        assert_pool_balanced(transport.pool, idle=0)  # half a request: closed, not reused
        assert (await client.get(served.base + "/")).status_code == 200


# ---- cancellation --------------------------------------------------------------------------


async def test_cancel_while_waiting_for_the_head_leaks_nothing() -> None:
    async def script(conn: ServerConnection) -> None:
        if conn.index == 0:
            await conn.serve(1)
            await conn.receive_request()
            await conn.wait_peer_closed()  # never answers the second request
        await conn.serve()

    async with run_fault_server(script) as server:
        async with (
            AsyncPoolTransport() as transport,
            httpx.AsyncClient(transport=transport) as client,
        ):
            assert (await client.get(server.url("/warm"))).content == b"ok"

            async def ready() -> None:
                await server.wait_for(lambda: len(server.requests) == 2)

            await cancel_when(lambda: client.get(server.url("/stalled")), ready)
            assert_pool_balanced(transport.pool, idle=0)
            await server.wait_for(lambda: server.peer_closed == 1)  # closed, not reused
            assert (await client.get(server.url("/next"))).content == b"ok"
            assert_pool_balanced(transport.pool, idle=1)
        await server.wait_for(lambda: server.peer_closed == server.accepted)
        assert server.accepted == 2
        assert [target for _, _, target in server.requests] == ["/warm", "/stalled", "/next"]


async def test_cancel_while_reading_a_streamed_body_leaks_nothing() -> None:
    got_part = trio.Event()

    async def script(conn: ServerConnection) -> None:
        if conn.index == 0:
            await conn.receive_request()
            await conn.send_head(1000)
            await conn.send_raw(b"x" * 100)
            await conn.wait_peer_closed()
        await conn.serve()

    async with run_fault_server(script) as server:
        async with (
            AsyncPoolTransport() as transport,
            httpx.AsyncClient(transport=transport) as client,
        ):

            async def read_body() -> None:
                async with client.stream("GET", server.url("/")) as response:
                    async for _ in response.aiter_bytes():
                        got_part.set()

            await cancel_when(read_body, got_part.wait)
            assert_pool_balanced(transport.pool, idle=0)
            await server.wait_for(lambda: server.peer_closed == 1)
            assert (await client.get(server.url("/next"))).content == b"ok"
        await server.wait_for(lambda: server.peer_closed == server.accepted)
        assert server.accepted == 2


async def test_cancel_while_waiting_for_a_connection_leaks_nothing(served: Served) -> None:
    async with (
        AsyncPoolTransport(verify=served.verify, max_connections=1) as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        pool = transport.pool
        assert pool is not None
        async with client.stream("GET", served.base + "/bytes/1000") as held:

            async def ready() -> None:
                for _ in range(1000):  # bounded: the waiter parks within a few steps
                    if pool.statistics().waiting == 1:
                        return
                    await trio.testing.wait_all_tasks_blocked()
                raise AssertionError("the request never waited")  # pragma: no cover

            await cancel_when(lambda: client.get(served.base + "/"), ready)
            assert pool.statistics().waiting == 0
            assert len(await held.aread()) == 1000
        assert_pool_balanced(pool, idle=1)
    assert served.app.requests == 1


# ---- the error table, row by row (a fake sender: no network) -------------------------------


class _RaisingSender:
    """A `RequestSender` whose every request fails with ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def send_request(self, request: Request) -> Response:
        await trio.lowlevel.checkpoint()
        raise self.error


_TABLE: list[tuple[PoolError, type[httpx.TransportError]]] = [
    (ConnectTimeout("connect took too long"), httpx.ConnectTimeout),
    (ConnectError("refused"), httpx.ConnectError),
    (ReadTimeout("read took too long"), httpx.ReadTimeout),
    (WriteTimeout("write took too long"), httpx.WriteTimeout),
    (PoolTimeout("no connection"), httpx.PoolTimeout),
    (PoolClosed("closed"), PoolClosedError),
    (ServerDisconnected("gone"), httpx.RemoteProtocolError),
    (RemoteProtocolError("garbage"), httpx.RemoteProtocolError),
    (InvalidURL("bad url"), httpx.LocalProtocolError),
    (InvalidHeader("bad header"), httpx.LocalProtocolError),
    (LocalProtocolError("illegal"), httpx.LocalProtocolError),
    (TransportError("broken"), httpx.TransportError),
    (TooManyWaiters("queue full"), httpx.TransportError),
    (PoolError("internal"), httpx.TransportError),
]


@pytest.mark.parametrize(("error", "expected"), _TABLE, ids=lambda v: type(v).__name__)
async def test_error_table(error: PoolError, expected: type[httpx.TransportError]) -> None:
    url = "http://127.0.0.1:1/x"
    transport = AsyncPoolTransport(pool=_RaisingSender(error))
    async with transport, httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.TransportError) as caught:
            await client.get(url)
    assert type(caught.value) is expected
    assert caught.value.__cause__ is error
    assert str(caught.value) == str(error)
    assert str(caught.value.request.url) == url


@attrs.define
class _Body:
    """A response body that sends ``parts``, then fails with ``error`` (or ends)."""

    parts: list[bytes]
    error: PoolError | None = None
    close_error: PoolError | None = None
    closed: int = 0

    async def receive_some(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.parts:
            return self.parts.pop(0)
        if self.error is not None:
            raise self.error
        return b""

    def receive_buffered(self) -> bytes | None:
        return None  # Only receive_some tells: every part is read through it.

    async def aclose(self) -> None:
        self.closed += 1
        await trio.lowlevel.checkpoint()
        if self.close_error is not None:
            raise self.close_error


class _BodySender:
    def __init__(self, body: _Body, *, http_version: str = "HTTP/1.1") -> None:
        self.body = body
        self.http_version = http_version

    async def send_request(self, request: Request) -> Response:
        await trio.lowlevel.checkpoint()
        return Response(
            201,
            request=request,
            headers=[("X-A", "1"), ("X-A", "2")],
            reason_phrase="Made",
            http_version=self.http_version,
            stream=self.body,
        )


async def test_errors_while_reading_the_body_are_mapped() -> None:
    body = _Body([b"a", b"b"], error=RemoteProtocolError("truncated"))
    transport = AsyncPoolTransport(pool=_BodySender(body))
    async with transport, httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get("http://127.0.0.1:1/")
        assert isinstance(caught.value.__cause__, RemoteProtocolError)
        assert str(caught.value.request.url) == "http://127.0.0.1:1/"
        assert body.closed == 1


async def test_errors_while_closing_the_body_are_mapped() -> None:
    body = _Body([b"a", b"b"], close_error=ReadTimeout("drain took too long"))
    transport = AsyncPoolTransport(pool=_BodySender(body))
    async with transport, httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ReadTimeout):
            async with client.stream("GET", "http://127.0.0.1:1/") as response:
                assert response.status_code == 201
        assert body.closed == 1


async def test_the_response_head_and_extensions() -> None:
    for version, reason in (("HTTP/1.1", b"Made"), ("HTTP/2", None)):
        body = _Body([b"a", b"b"])
        transport = AsyncPoolTransport(pool=_BodySender(body, http_version=version))
        async with transport, httpx.AsyncClient(transport=transport) as client:
            response = await client.get("http://127.0.0.1:1/")
            assert response.status_code == 201
            assert response.headers.get_list("x-a") == ["1", "2"]
            assert response.extensions["http_version"] == version.encode()
            assert response.extensions.get("reason_phrase") == reason
            assert response.http_version == version
            assert response.reason_phrase == ("Made" if reason else "Created")
            assert response.content == b"ab"
            assert body.closed == 1


async def test_the_transport_called_directly_returns_a_pool_response_stream() -> None:
    body = _Body([b"a", b"b"])
    async with AsyncPoolTransport(pool=_BodySender(body)) as transport:
        response = await transport.handle_async_request(httpx.Request("GET", "http://h/"))
        stream = response.stream
        assert isinstance(stream, PoolResponseStream)
        assert stream.response.status_code == 201
        chunks = aiter(stream)
        assert aiter(chunks) is chunks
        assert [chunk async for chunk in chunks] == [b"a", b"b"]
        assert stream.response.is_closed
        with trio.testing.assert_checkpoints():
            await stream.aclose()  # idempotent
        assert body.closed == 1


class _EmptySender:
    """Answers every request with an empty 204 (and remembers the URLs it saw)."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    async def send_request(self, request: Request) -> Response:
        await trio.lowlevel.checkpoint()
        self.urls.append(str(request.url))
        return Response(204, request=request)


async def test_many_distinct_urls() -> None:
    # More URLs than the transport keeps parsed: it starts over and goes on working.
    sender = _EmptySender()
    transport = AsyncPoolTransport(pool=sender)
    async with transport, httpx.AsyncClient(transport=transport) as client:
        for n in range(600):
            assert (await client.get(f"http://h/{n}")).status_code == 204
        assert (await client.get("http://h/0")).status_code == 204
    assert sender.urls == [f"http://h/{n}" for n in range(600)] + ["http://h/0"]
