"""End-to-end tests of the HTTP/1.1 client against hypercorn, a real server, plain and TLS.

House rules: loopback only, port 0, the server runs in the test's own trio run; every
connection is counted on the server side; every loop is bounded; after every scenario the
pool holds no lease, no waiter and no connect in flight.
"""

from __future__ import annotations

import ssl
import tracemalloc
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing
from _servers import (
    CountingApp,
    TLSFiles,
    assert_pool_balanced,
    run_fault_server,
    serve_hypercorn,
)

from trio_connpool import (
    ConnectError,
    InvalidHeader,
    InvalidURL,
    LocalProtocolError,
    open_pool,
)
from trio_connpool.http import (
    URL,
    Client,
    HTTPConnector,
    HTTPKey,
    NoPoolSender,
    Timeouts,
    open_client,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_connpool.http import HeaderTypes, RequestContent

MiB = 1024 * 1024


@attrs.frozen
class Served:
    """A running hypercorn: its base URL, its app (the counters) and what the client trusts."""

    base: str
    app: CountingApp
    verify: bool | ssl.SSLContext
    tls: TLSFiles | None


@pytest.fixture(params=["plain", "tls"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    app = CountingApp()
    tls = TLSFiles.create(tmp_path) if request.param == "tls" else None
    async with serve_hypercorn(app, tls) as base:
        verify: bool | ssl.SSLContext = True if tls is None else tls.client_context()
        yield Served(base, app, verify, tls)


async def test_round_trip(served: Served) -> None:
    async with open_client(verify=served.verify) as client:
        response = await client.request("GET", served.base + "/")
        assert response.status_code == 200
        assert response.http_version == "HTTP/1.1"
        assert response.headers["x-custom"] == "Yes"
        assert response.headers["X-CUSTOM"] == "Yes"
        assert response.headers.get("Content-Type") == "text/plain; charset=utf-8"
        assert response.charset == "utf-8"
        assert response.text == "hello, world"
        assert response.content == b"hello, world"
        assert str(response.url) == served.base + "/"
        assert response.is_closed
        assert_pool_balanced(client.pool, idle=1)
    assert served.app.requests == 1


async def test_keep_alive_reuses_one_connection(served: Served) -> None:
    async with open_client(verify=served.verify) as client:
        for i in range(20):
            response = await client.get(served.base + "/")
            assert response.status_code == 200, i
            assert response.content == b"hello, world"
            assert_pool_balanced(client.pool, idle=1)
    assert served.app.requests == 20
    assert served.app.connections == 1


async def test_concurrency_is_bounded_by_the_per_key_limit(served: Served) -> None:
    seen_in_pool = 0
    seen_waiting = 0
    statuses: list[int] = []
    done = trio.Event()

    async with open_client(verify=served.verify, max_connections_per_key=4) as client:
        pool = client.pool
        assert pool is not None

        async def one() -> None:
            response = await client.get(served.base + "/slow/5")
            statuses.append(response.status_code)

        async def monitor() -> None:
            nonlocal seen_in_pool, seen_waiting
            for _ in range(100_000):  # bounded; ends when the requests are done
                stats = pool.statistics()
                seen_in_pool = max(seen_in_pool, stats.in_use + stats.idle + stats.connecting)
                seen_waiting = max(seen_waiting, stats.waiting)
                assert stats.leases <= 4
                if done.is_set():
                    return
                await trio.sleep(0.001)

        async with trio.open_nursery() as outer:
            outer.start_soon(monitor)
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(one)
            done.set()
        assert_pool_balanced(pool)
        assert pool.statistics().idle <= 4

    assert statuses == [200] * 50
    assert served.app.requests == 50
    assert 1 <= served.app.connections <= 4
    assert served.app.max_active <= 4
    assert 1 <= seen_in_pool <= 4
    assert seen_waiting > 0  # the limit did hold tasks back


async def test_stream_a_large_body_in_chunks(served: Served) -> None:
    size = 8 * MiB
    async with open_client(verify=served.verify) as client:
        tracemalloc.start()
        try:
            total = 0
            chunks = 0
            biggest = 0
            async with client.stream("GET", served.base + f"/bytes/{size}") as response:
                assert response.status_code == 200
                assert response.headers["content-length"] == str(size)
                async for chunk in response.aiter_bytes():
                    assert chunk
                    total += len(chunk)
                    biggest = max(biggest, len(chunk))
                    chunks += 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == size
        assert chunks > 1
        assert biggest <= 256 * 1024
        # Nothing accumulated: the peak (server included) stays far below the body's size.
        assert peak < size // 4, peak
        assert response.is_closed
        assert_pool_balanced(client.pool, idle=1)
        # The connection was returned clean: the next request reuses it.
        assert (await client.get(served.base + "/")).status_code == 200
    assert served.app.connections == 1


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("kind", ["async-iterable", "bytes"])
async def test_upload_a_large_body(served: Served, kind: str) -> None:
    data = bytes(range(256)) * (3 * MiB // 256) + b"tail"
    content: RequestContent = _chunks(data, 100_000) if kind == "async-iterable" else data
    async with open_client(verify=served.verify) as client:
        response = await client.request("POST", served.base + "/echo", content=content)
        assert response.status_code == 200
        assert len(response.content) == len(data)
        assert response.content == data
        if kind == "async-iterable":
            assert response.headers["x-request-te"] == "chunked"
        else:
            assert response.headers["x-request-te"] == "-"  # sent with a Content-Length
        assert int(response.headers["x-request-chunks"]) > 1  # it did arrive in pieces
        assert_pool_balanced(client.pool, idle=1)
    assert served.app.connections == 1


async def test_tls_with_an_unknown_ca_fails_to_connect(tmp_path: Path) -> None:
    app = CountingApp()
    tls = TLSFiles.create(tmp_path)
    (tmp_path / "other").mkdir()
    other = TLSFiles.create(tmp_path / "other")  # a CA that did not sign the server's cert
    async with serve_hypercorn(app, tls) as base:
        for verify in (other.client_context(), True):
            async with open_client(verify=verify) as client:
                with pytest.raises(ConnectError) as caught:
                    await client.get(base + "/")
                chain: list[BaseException] = []
                error: BaseException | None = caught.value
                for _ in range(10):  # bounded walk down the cause chain
                    if error is None:
                        break
                    chain.append(error)
                    error = error.__cause__
                assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain
                assert_pool_balanced(client.pool, idle=0)
                assert client.pool is not None
                assert client.pool.statistics().keys == {}
    assert app.requests == 0


async def test_no_pool_sender_opens_a_connection_per_request(served: Served) -> None:
    async with open_client(pool=NoPoolSender(verify=served.verify)) as client:
        assert client.pool is None
        for _ in range(5):
            response = await client.get(served.base + "/")
            assert response.text == "hello, world"
        async with client.stream("GET", served.base + "/bytes/1000") as response:
            assert len(await response.aread()) == 1000
    assert served.app.requests == 6
    assert served.app.connections == 6


async def test_no_pool_sender_leaves_nothing_open() -> None:
    # The fault server sees the client's side of each socket close.
    async with run_fault_server() as server:
        async with open_client(pool=NoPoolSender()) as client:
            for n in range(1, 4):
                assert (await client.get(server.url("/"))).content == b"ok"
                await server.wait_peer_closed(n)
            # Closing a streamed response early also closes its connection.
            async with client.stream("GET", server.url("/")) as response:
                assert response.status_code == 200
            await server.wait_for(lambda: server.peer_closed == 4)
        assert server.accepted == 4
        assert len(server.requests) == 4


async def test_custom_pool_shared_by_two_clients(served: Served) -> None:
    connector = HTTPConnector(timeouts=Timeouts(connect=2, read=2, write=2))
    async with open_pool(connector, max_connections_per_key=2) as pool:
        async with (
            open_client(pool=pool, verify=served.verify) as first,
            open_client(pool=pool, verify=served.verify) as second,
        ):
            assert first.pool is pool
            assert second.pool is pool
            for _ in range(3):
                assert (await first.get(served.base + "/")).status_code == 200
                assert (await second.get(served.base + "/")).status_code == 200
            assert_pool_balanced(pool, idle=1)
            keys = list(pool.statistics().keys)
            assert len(keys) == 1
            assert isinstance(keys[0], HTTPKey)
        # The clients are gone; the pool they borrowed is still open and still has the
        # connection.
        assert not pool.closed
        assert_pool_balanced(pool, idle=1)
        async with open_client(pool=pool, verify=served.verify) as third:
            assert (await third.get(served.base + "/")).status_code == 200
    final = pool.statistics()
    assert final.closed
    assert final.connections == 0
    assert served.app.requests == 7
    assert served.app.connections == 1


def _bad_requests(base: str) -> list[tuple[str, str, HeaderTypes, object, type[Exception]]]:
    port = base.rsplit(":", 1)[1]
    return [
        ("GET", "http://exa mple.com/", None, None, InvalidURL),
        ("GET", "http://[::1/", None, None, InvalidURL),
        ("GET", "not a url", None, None, InvalidURL),
        ("GET", f"ftp://127.0.0.1:{port}/", None, None, InvalidURL),
        ("GET", "http://127.0.0.1:0/", None, None, InvalidURL),
        ("GET", "http://127.0.0.1:70000/", None, None, InvalidURL),
        ("GET", base + "/", {"X-A": "a\r\nInjected: yes"}, None, InvalidHeader),
        ("GET", base + "/", {"X-A": "a\nb"}, None, InvalidHeader),
        ("GET", base + "/", {"X-A": "a\x00b"}, None, InvalidHeader),
        ("GET", base + "/", {"X-A\r\n": "a"}, None, InvalidHeader),
        ("POST", base + "/echo", None, 12, TypeError),
        ("GE T", base + "/", None, None, LocalProtocolError),
    ]


async def test_bad_input_raises_before_anything_is_sent(served: Served) -> None:
    async with open_client(verify=served.verify) as client:
        for method, url, headers, content, expected in _bad_requests(served.base):
            with pytest.raises(expected):
                await client.request(method, url, headers=headers, content=content)  # type: ignore[arg-type]
            with pytest.raises(expected):
                async with client.stream(method, url, headers=headers, content=content):  # type: ignore[arg-type]
                    raise AssertionError("unreachable")  # pragma: no cover
        assert client.pool is not None
        stats = client.pool.statistics()
        assert stats.keys == {}
        assert stats.connections == 0
    assert served.app.requests == 0
    assert served.app.connections == 0


async def test_invalid_timeouts_and_options_raise_at_once() -> None:
    for field in ("connect", "read", "write", "pool"):
        with pytest.raises(ValueError, match=field):
            Timeouts(**{field: -1})
        with pytest.raises(ValueError, match=field):
            Timeouts(**{field: float("nan")})
    with pytest.raises(TypeError):
        Timeouts(read="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        async with open_client(timeouts=5):  # type: ignore[arg-type]
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(ValueError, match="no protocol"):
        async with open_client(http1=False, http2=False):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        async with open_client(http2=True, max_concurrent_streams=0):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(ValueError, match="health_check_after"):
        async with open_client(http2=True, health_check_after=-1):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(TypeError):
        async with open_client(pool=object()):  # type: ignore[arg-type]
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(TypeError):
        async with open_client(verify=1):  # type: ignore[arg-type]
            raise AssertionError("unreachable")  # pragma: no cover


async def test_head_and_204_have_no_body(served: Served) -> None:
    async with open_client(verify=served.verify) as client:
        head = await client.request("HEAD", served.base + "/bytes/1000")
        assert head.status_code == 200
        assert head.headers["content-length"] == "1000"
        assert head.content == b""
        no_content = await client.get(served.base + "/status/204")
        assert no_content.status_code == 204
        assert no_content.content == b""
        async with client.stream("HEAD", served.base + "/bytes/5") as response:
            assert [chunk async for chunk in response.aiter_bytes()] == []
        # The framing was right: the same connection carries the next request.
        assert (await client.get(served.base + "/")).text == "hello, world"
        assert_pool_balanced(client.pool, idle=1)
    assert served.app.connections == 1


async def test_default_headers_and_client_type(served: Served) -> None:
    async with open_client(verify=served.verify, headers={"X-Default": "1"}) as client:
        assert isinstance(client, Client)
        request = client.build_request("GET", served.base + "/", headers={"x-default": "2"})
        assert request.headers.get_list("x-default") == ["2"]
        assert request.headers["user-agent"] == "trio-connpool"
        # The request's headers are its own: changing them leaves the defaults alone.
        request.headers["X-Default"] = "3"
        del request.headers["user-agent"]
        assert client.headers.get_list("x-default") == ["1"]
        assert client.headers["user-agent"] == "trio-connpool"
        plain = client.build_request("POST", URL(served.base + "/"), content=bytearray(b"ab"))  # type: ignore[arg-type]
        assert plain.headers == {"x-default": "1", "user-agent": "trio-connpool"}
        assert plain.content == b"ab"
        with pytest.raises(InvalidURL):
            client.build_request("GET", b"http://h/")  # type: ignore[arg-type]
        assert (await client.get(served.base + "/")).status_code == 200


async def test_wrapped_bodies_keep_the_buffered_fast_path() -> None:
    """The body a sender wraps (to give the lease back, or close its connection, at the end)
    still hands over what arrived with the head without a checkpoint."""
    async with run_fault_server() as server:
        async with open_client() as client, client.stream("GET", server.url("/")) as response:
            stream = response.stream
            with trio.testing.assert_no_checkpoints():
                assert stream.receive_buffered() == b"ok"  # Came in the head's packet.
                assert stream.receive_buffered() == b""  # The end: the lease is back.
            assert_pool_balanced(client.pool, idle=1)
        async with (
            open_client(pool=NoPoolSender()) as client,
            client.stream("GET", server.url("/")) as response,
        ):
            stream = response.stream
            with trio.testing.assert_no_checkpoints():
                assert stream.receive_buffered() == b"ok"
                # Closing the connection takes an await: the end is receive_some's.
                assert stream.receive_buffered() is None
            assert await stream.receive_some() == b""
            await server.wait_peer_closed(2)
