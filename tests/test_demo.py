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
