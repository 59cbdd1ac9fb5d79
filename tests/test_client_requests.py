"""The client's request API as httpx has it: the verbs, ``params``, ``json``, ``data``, text
``content``, and ``timeout`` per request (HTTP/1.1, HTTP/2, the wait for a connection, and
the httpx transport), against real servers on 127.0.0.1.

The timeout tests use the real clock (sockets are involved) with generous margins: each
stalls a server and checks that a 0.5 s per-request limit ends the request long before the
client's 5 s defaults would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
import trio
from _servers import (
    WAIT,
    CountingApp,
    Receive,
    Scope,
    Send,
    ServerConnection,
    TLSFiles,
    assert_pool_balanced,
    run_fault_server,
    serve_hypercorn,
)

from trio_connpool import ConnectTimeout, PoolTimeout, ReadTimeout
from trio_connpool.contrib.httpx import AsyncPoolTransport
from trio_connpool.http import (
    USE_CLIENT_DEFAULT,
    Client,
    NoPoolSender,
    Request,
    RequestData,
    Timeouts,
    open_client,
)

if TYPE_CHECKING:
    from pathlib import Path

# The client's defaults in the timeout tests, and the per-request limit that must win.
DEFAULTS = Timeouts(connect=5.0, read=5.0, write=5.0, pool=5.0)
SHORT = 0.5
# "About 0.5 s": at least the limit (less a little for clock granularity), and far below
# the 5 s default even on a loaded machine.
EARLIEST, LATEST = 0.45, 3.0


class InspectApp(CountingApp):
    """Answers every request with JSON describing it: method, path, query, headers, body."""

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        for _ in range(10_000):  # bounded
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        described = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
            "body": b"".join(chunks).decode("latin-1"),
        }
        body = json.dumps(described).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _seen(content: bytes) -> dict[str, object]:
    seen: dict[str, object] = json.loads(content)
    return seen


def _header(seen: dict[str, object], name: str) -> list[str]:
    pairs = cast("list[list[str]]", seen["headers"])
    return [value for key, value in pairs if key == name]


@pytest.fixture
async def inspect() -> AsyncIterator[str]:
    async with serve_hypercorn(InspectApp()) as base:
        yield base


# ---- the verbs, params and bodies --------------------------------------------------------


async def test_verbs_send_their_methods(inspect: str) -> None:
    async with open_client() as client:
        url = inspect + "/x"
        assert _seen((await client.get(url)).content)["method"] == "GET"
        assert _seen((await client.options(url)).content)["method"] == "OPTIONS"
        assert _seen((await client.delete(url)).content)["method"] == "DELETE"
        head = await client.head(url)
        assert head.status_code == 200
        assert head.content == b""
        assert head.request.method == "HEAD"
        for verb, method in ((client.post, "POST"), (client.put, "PUT"), (client.patch, "PATCH")):
            seen = _seen((await verb(url, content=b"body")).content)
            assert (seen["method"], seen["body"]) == (method, "body")
        assert_pool_balanced(client.pool, idle=1)


async def test_params_are_merged_into_the_query(inspect: str) -> None:
    async with open_client() as client:
        url = inspect + "/p?a=1&b=x%20y&keep="

        async def query(params: object) -> object:
            response = await client.get(url, params=params)  # type: ignore[arg-type]
            return _seen(response.content)["query"]

        # A name given replaces that name's values; the others stay, new ones follow.
        assert await query({"a": "2", "c": "d e"}) == "a=2&b=x+y&keep=&c=d+e"
        assert await query([("a", 3), ("a", 4)]) == "a=3&a=4&b=x+y&keep="
        assert await query("z=1&a=9") == "a=9&b=x+y&keep=&z=1"
        assert await query({"x": [1, True, None, 1.5]}) == "a=1&b=x+y&keep=&x=1&x=true&x=&x=1.5"
        assert await query({"\u00e9": "\u00fc/&="}) == "a=1&b=x+y&keep=&%C3%A9=%C3%BC%2F%26%3D"
        response = await client.get(inspect + "/p", params={})
        assert _seen(response.content)["query"] == ""
        assert str(response.url) == inspect + "/p"
        # The same as httpx's own merge.
        merged = httpx.URL(url).copy_merge_params({"a": "2", "c": "d e"})
        built = client.build_request("GET", url, params={"a": "2", "c": "d e"})
        assert str(built.url) == str(merged)
        with pytest.raises(TypeError):
            client.build_request("GET", url, params={"a": object()})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            client.build_request("GET", url, params=42)  # type: ignore[arg-type]


async def test_json_body(inspect: str) -> None:
    async with open_client() as client:
        value = {"a": [1, 2.5, None, True], "t": "\u00e9t\u00e9"}
        seen = _seen((await client.post(inspect + "/j", json=value)).content)
        body = seen["body"]
        assert isinstance(body, str)
        # Compact, UTF-8, exactly as httpx encodes it.
        raw = body.encode("latin-1")
        assert raw == httpx.Request("POST", "http://h/", json=value).content
        assert json.loads(raw) == value
        assert _header(seen, "content-type") == ["application/json"]
        assert _header(seen, "content-length") == [str(len(raw))]
        # A Content-Type given wins.
        seen = _seen(
            (
                await client.put(
                    inspect + "/j", json=[1], headers={"Content-Type": "application/x+json"}
                )
            ).content
        )
        assert _header(seen, "content-type") == ["application/x+json"]
        assert seen["body"] == "[1]"
        with pytest.raises(ValueError):
            client.build_request("POST", inspect, json=float("nan"))
        with pytest.raises(TypeError):
            client.build_request("POST", inspect, json={"a": object()})


async def test_form_data_body(inspect: str) -> None:
    async with open_client() as client:
        data: RequestData = {"name": "a b&c", "many": ["1", "2"], "flag": True, "none": None}
        seen = _seen((await client.patch(inspect + "/f", data=data)).content)
        assert seen["body"] == "name=a+b%26c&many=1&many=2&flag=true&none="
        assert seen["body"] == httpx.Request("POST", "http://h/", data=data).content.decode()
        assert _header(seen, "content-type") == ["application/x-www-form-urlencoded"]
        with pytest.raises(TypeError, match="mapping"):
            client.build_request("POST", inspect, data=b"raw")  # type: ignore[arg-type]


async def test_text_content_is_sent_as_utf8(inspect: str) -> None:
    async with open_client() as client:
        response = await client.post(inspect + "/t", content="h\u00e9llo")
        seen = _seen(response.content)
        body = seen["body"]
        assert isinstance(body, str)
        assert body.encode("latin-1") == "h\u00e9llo".encode()
        assert _header(seen, "content-length") == ["6"]
        assert _header(seen, "content-type") == []  # as httpx: no type for text content


async def test_conflicting_bodies_raise_before_anything_is_sent(inspect: str) -> None:
    async with open_client() as client:
        cases: list[dict[str, Any]] = [
            {"content": b"x", "json": 1},
            {"content": b"x", "data": {"a": "b"}},
            {"data": {"a": "b"}, "json": 1},
            {"content": "x", "data": {"a": "b"}, "json": [1]},
        ]
        for kwargs in cases:
            with pytest.raises(TypeError, match="one request body"):
                await client.post(inspect + "/c", **kwargs)
            with pytest.raises(TypeError, match="one request body"):
                client.build_request("POST", inspect, **kwargs)
        assert_pool_balanced(client.pool, idle=0)  # nothing was even connected


async def test_timeout_argument_is_checked_at_once() -> None:
    client = Client(NoPoolSender())
    url = "http://127.0.0.1:1/"
    assert client.build_request("GET", url).timeouts is None
    assert client.build_request("GET", url, timeout=USE_CLIENT_DEFAULT).timeouts is None
    assert client.build_request("GET", url, timeout=2).timeouts == Timeouts(2, 2, 2, 2)
    assert client.build_request("GET", url, timeout=None).timeouts == Timeouts(
        None, None, None, None
    )
    given = Timeouts(connect=1.0, read=None)
    assert client.build_request("GET", url, timeout=given).timeouts is given
    for bad in ("1", True, [1]):
        with pytest.raises(TypeError):
            client.build_request("GET", url, timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.build_request("GET", url, timeout=-1)
    with pytest.raises(TypeError):
        Request("GET", url, timeouts=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Client(NoPoolSender(), follow_redirects=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Client(NoPoolSender(), max_redirects=-1)
    with pytest.raises(ValueError):
        async with open_client(max_redirects=True):
            pass  # pragma: no cover


# ---- per-request timeouts ----------------------------------------------------------------


async def _stall_after_request(conn: ServerConnection) -> None:
    """Take the request, then say nothing (until the client gives up)."""
    if await conn.receive_request() is not None:
        await conn.wait_peer_closed()


async def _stall_body(conn: ServerConnection) -> None:
    """Send a head announcing 10 bytes, 5 of them, then nothing."""
    if await conn.receive_request() is not None:
        await conn.send_head(10)
        await conn.send_raw(b"12345")
        await conn.wait_peer_closed()


async def test_per_request_timeout_bounds_the_response_wait_http11() -> None:
    async with (
        run_fault_server(_stall_after_request) as server,
        open_client(timeouts=DEFAULTS) as client,
    ):
        started = trio.current_time()
        with pytest.raises(ReadTimeout, match=r"0\.5 s"):
            await client.get(server.url(), timeout=SHORT)
        assert EARLIEST <= trio.current_time() - started <= LATEST
        assert_pool_balanced(client.pool, idle=0)
        await server.wait_peer_closed(1)


async def test_per_request_timeout_bounds_body_reads_when_streaming() -> None:
    async with (
        run_fault_server(_stall_body) as server,
        open_client(timeouts=DEFAULTS) as client,
    ):
        started = trio.current_time()
        with pytest.raises(ReadTimeout):
            async with client.stream("GET", server.url(), timeout=SHORT) as response:
                assert response.status_code == 200
                await response.aread()
        assert EARLIEST <= trio.current_time() - started <= LATEST
        assert_pool_balanced(client.pool, idle=0)


async def test_per_request_timeout_applies_to_its_exchange_only() -> None:
    """A longer limit than the client's wins for its request; the next request on the same
    connection is back to the client's limits."""

    async def slow_answers(conn: ServerConnection) -> None:
        for _ in range(2):
            if await conn.receive_request() is None:
                return
            await trio.sleep(0.6)
            await conn.send_response(200, b"late")
        await conn.wait_peer_closed()

    async with (
        run_fault_server(slow_answers) as server,
        open_client(timeouts=Timeouts(read=0.2)) as client,
    ):
        response = await client.get(server.url(), timeout=Timeouts(read=WAIT))
        assert response.content == b"late"
        assert_pool_balanced(client.pool, idle=1)
        with pytest.raises(ReadTimeout, match=r"0\.2 s"):
            await client.get(server.url())
        assert server.accepted == 1  # the same connection both times
        assert_pool_balanced(client.pool, idle=0)


async def test_per_request_timeout_bounds_the_response_wait_http2(tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path)
    async with serve_hypercorn(CountingApp(), tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True, timeouts=DEFAULTS) as client:
            assert (await client.get(base + "/")).http_version == "HTTP/2"
            started = trio.current_time()
            with pytest.raises(ReadTimeout, match=r"0\.5 s"):
                await client.get(base + "/slow/4000", timeout=SHORT)
            assert EARLIEST <= trio.current_time() - started <= LATEST
            # The stream was reset; the connection serves on, with the client's limits.
            response = await client.get(base + "/slow/300")
            assert response.content == b"slow"
            assert_pool_balanced(client.pool, idle=1)


class StallingBodyApp(CountingApp):
    """``/stall`` sends a head and 5 bytes, then nothing for 4 s; the rest as CountingApp."""

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/stall":
            await super()._route(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        await trio.sleep(4)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_per_request_timeout_bounds_body_reads_http2(tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path)
    async with serve_hypercorn(StallingBodyApp(), tls) as base:
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True, timeouts=DEFAULTS) as client:
            started = trio.current_time()
            received: list[bytes] = []
            with pytest.raises(ReadTimeout, match=r"0\.5 s"):
                async with client.stream("GET", base + "/stall", timeout=SHORT) as response:
                    assert response.http_version == "HTTP/2"
                    async for chunk in response.aiter_bytes():
                        received.append(chunk)
            assert b"".join(received) == b"12345"
            assert EARLIEST <= trio.current_time() - started <= LATEST
            assert (await client.get(base + "/")).status_code == 200
            assert_pool_balanced(client.pool, idle=1)


async def test_per_request_timeout_bounds_the_wait_for_a_connection() -> None:
    async with (
        run_fault_server() as server,
        open_client(timeouts=DEFAULTS, max_connections=1) as client,
    ):
        async with client.stream("GET", server.url()) as held:
            started = trio.current_time()
            with pytest.raises(PoolTimeout):
                await client.get(server.url(), timeout=SHORT)
            assert EARLIEST <= trio.current_time() - started <= LATEST
            await held.aread()
        assert_pool_balanced(client.pool, idle=1)


async def _silent_listener(
    *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Accept TCP connections and say nothing: a TLS handshake with it never ends."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    held: list[trio.SocketStream] = []
    try:
        async with listener:
            task_status.started(listener.socket.getsockname()[1])
            while True:
                held.append(await listener.accept())
    finally:
        for stream in held:
            stream.socket.close()


async def test_per_request_timeout_bounds_a_stalled_connect(tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(_silent_listener)
        url = f"https://127.0.0.1:{port}/"
        # Through a pool: the whole wait for the connection is bounded by the request's.
        async with open_client(verify=tls.client_context(), timeouts=DEFAULTS) as client:
            started = trio.current_time()
            with pytest.raises(PoolTimeout):
                await client.get(url, timeout=SHORT)
            assert EARLIEST <= trio.current_time() - started <= LATEST
        # A connect for the request alone: its connect limit applies as such.
        alone = Client(NoPoolSender(verify=tls.client_context(), timeouts=DEFAULTS))
        started = trio.current_time()
        with pytest.raises(ConnectTimeout):
            await alone.get(url, timeout=SHORT)
        assert EARLIEST <= trio.current_time() - started <= LATEST
        nursery.cancel_scope.cancel()


# ---- the httpx transport -----------------------------------------------------------------


async def _answer_late(conn: ServerConnection) -> None:
    """Answer each request 200 after 1.5 s (longer than the 0.5 s limits, shorter than the
    transport's 5 s defaults: with httpx's timeouts ignored, the request succeeds)."""
    for _ in range(10):
        if await conn.receive_request() is None:
            return
        await trio.sleep(1.5)
        await conn.send_response(200, b"late")


async def test_httpx_client_timeout_reaches_the_pool() -> None:
    async with (
        run_fault_server(_answer_late) as server,
        AsyncPoolTransport(timeouts=DEFAULTS) as transport,
        httpx.AsyncClient(transport=transport, timeout=SHORT) as client,
    ):
        started = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url())
        assert EARLIEST <= trio.current_time() - started < 1.4
        assert_pool_balanced(transport.pool, idle=0)


async def test_httpx_per_request_timeout_reaches_the_pool() -> None:
    async with (
        run_fault_server(_answer_late) as server,
        AsyncPoolTransport(timeouts=DEFAULTS) as transport,
        httpx.AsyncClient(transport=transport, timeout=DEFAULTS.read) as client,
    ):
        started = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url(), timeout=SHORT)
        assert EARLIEST <= trio.current_time() - started < 1.4
        # httpx's client-wide 5 s applies to the next request: it waits for the answer.
        response = await client.get(server.url())
        assert response.status_code == 200
        assert_pool_balanced(transport.pool, idle=1)
        # httpx gives a new dict per request; the transport converts each setting once.
        assert len(transport._timeouts_seen) == 2  # pyright: ignore[reportPrivateUsage]
