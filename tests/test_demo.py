"""The demo and its embedded server: both protocols, real sockets on 127.0.0.1."""

from __future__ import annotations

import io

import pytest
import trio

from trio_connpool._demo import DemoServer, run_demo
from trio_connpool.http import open_client


async def test_run_demo_reports_both_protocols() -> None:
    out = io.StringIO()
    with trio.fail_after(20):
        code = await run_demo(requests=120, concurrency=12, quiet=True, out=out)
    assert code == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("embedded HTTP/1.1 and HTTP/2 (h2c) server on 127.0.0.1:")
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("HTTP/")}
    assert rows["HTTP/1.1"][1:3] == ["120", "0"]  # ok, failed
    assert rows["HTTP/2"][1:3] == ["120", "0"]
    assert rows["HTTP/2"][-1] == "1"  # one multiplexed connection
    assert 1 <= int(rows["HTTP/1.1"][-1]) <= 12
    assert "server saw" in out.getvalue() and "for 240 requests" in out.getvalue()
    assert "pool at the end (HTTP/2): idle=1 in_use=0 connecting=0 waiting=0" in lines


@pytest.mark.parametrize("http2", [False, True])
async def test_demo_server_routes_and_large_bodies(http2: bool) -> None:
    server = DemoServer()
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve)
        base = f"http://127.0.0.1:{port}"
        async with open_client(http1=not http2, http2=http2) as client:
            with trio.fail_after(10):
                hello = await client.get(f"{base}/")
                big = await client.get(f"{base}/bytes/3000000")  # beyond the 1 MiB stream window
                missing = await client.get(f"{base}/nowhere")
                bad = await client.get(f"{base}/bytes/x")
        assert (hello.status_code, hello.content) == (200, b"hello")
        assert hello.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert big.content == b"x" * 3000000
        assert missing.status_code == 404
        assert bad.status_code == 400
        assert server.requests == 4
        assert server.by_protocol == {"HTTP/1.1": 0 if http2 else 1, "HTTP/2": 1 if http2 else 0}
        nursery.cancel_scope.cancel()


async def _exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data`` to the demo server and read until it closes the connection.

    The requests are sent whole, so the server has read them all when it closes (a close with
    unread bytes could reset the connection before its answer is read).
    """
    received = b""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
            for _ in range(10_000):  # bounded: each read brings bytes or ends the loop
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    return received


GET_CLOSE = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
HELLO_CLOSE = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n"
    b"connection: close\r\n\r\nhello"
)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(GET_CLOSE, HELLO_CLOSE, id="connection-close"),
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", HELLO_CLOSE, id="http-1.0-closes"),
        pytest.param(
            b"GET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /nowhere HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody" + GET_CLOSE,
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\n\r\nxxx"
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\ncontent-type: text/plain\r\n"
            b"\r\nnot found" + HELLO_CLOSE,
            id="keep-alive-pipelined-with-a-body",
        ),
        pytest.param(
            b"HEAD / HTTP/1.1\r\nconnection: keep-alive, close\r\n\r\n",
            HELLO_CLOSE.removesuffix(b"hello"),
            id="head-has-no-body",
        ),
    ],
)
async def test_demo_server_speaks_http11_itself(sent: bytes, expected: bytes) -> None:
    server = DemoServer()
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve)
        received = await _exchange(port, sent)
        nursery.cancel_scope.cancel()
    assert received == expected


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n x: folded\r\n\r\n", 400),
        (b"hello there\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        # one byte past the limit, and no blank line: refused once all of it has been read
        (b"GET / HTTP/1.1\r\nx: ".ljust(64 * 1024 + 1, b"y"), 431),
        (b"GET / HTTP/1.1\r\nhost", 400),  # the peer half-closes in the middle of a head
    ],
)
async def test_demo_server_refuses_what_it_does_not_speak(sent: bytes, status: int) -> None:
    server = DemoServer()
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve)
        received = await _exchange(port, sent, half_close=sent.endswith(b"host"))
        nursery.cancel_scope.cancel()
    assert received.startswith(f"HTTP/1.1 {status} ".encode()), received[:80]
    assert b"\r\nconnection: close\r\n" in received
    assert server.requests == 0
