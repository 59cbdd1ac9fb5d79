"""Unix domain sockets: every request over one socket, the URL still giving Host and scheme.

Against nginx listening on Unix sockets: plain HTTP/1.1, h2c (HTTP/2 with prior knowledge)
and TLS with HTTP/2 over the socket, checked against the URL's host name.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from _servers import TLSFiles, serve_nginx

from trio_connpool import ConnectError, open_pool
from trio_connpool.contrib.httpx import AsyncPoolTransport
from trio_connpool.http import (
    HTTPConnector,
    HTTPKey,
    NoPoolSender,
    Origin,
    Response,
    open_client,
)

_SERVERS = """
    server {
        listen unix:{dir}/plain.sock;
        location / { return 200 "plain $host $request_uri $server_protocol"; }
    }
    server {
        listen unix:{dir}/h2c.sock http2;
        location / { return 200 "h2c $host $request_uri $server_protocol"; }
    }
    server {
        listen unix:{dir}/tls.sock ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / { return 200 "tls $host $request_uri $server_protocol $https"; }
    }
"""


class Sockets:
    def __init__(self, directory: Path, tls: TLSFiles) -> None:
        self.plain = directory / "plain.sock"
        self.h2c = directory / "h2c.sock"
        self.tls = directory / "tls.sock"
        self.ca = directory / "ca.pem"
        tls.ca.cert_pem.write_to_path(str(self.ca))


@pytest.fixture
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


@asynccontextmanager
async def _nginx(directory: Path, tls: TLSFiles) -> AsyncIterator[Sockets]:
    shutil.copy(tls.certfile, directory / "cert.pem")
    shutil.copy(tls.keyfile, directory / "key.pem")
    sockets = Sockets(directory, tls)
    async with serve_nginx(
        directory, _SERVERS, unix_sockets=[sockets.plain, sockets.h2c, sockets.tls]
    ):
        yield sockets


@pytest.fixture
async def nginx(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> AsyncIterator[Sockets]:
    # A short directory: a Unix socket's path is limited to about 100 bytes.
    async with _nginx(tmp_path_factory.mktemp("u"), tls) as sockets:
        yield sockets


async def test_http_over_a_unix_socket_keeps_the_urls_host(nginx: Sockets) -> None:
    async with open_client(uds=nginx.plain) as client:  # a Path, as well as a str
        first = await client.get("http://example.com/a?b=1")
        second = await client.get("http://docker/v1.45/info")
        assert first.status_code == 200
        assert first.text == "plain example.com /a?b=1 HTTP/1.1"
        assert second.text == "plain docker /v1.45/info HTTP/1.1"
        assert client.pool is not None
        keys = client.pool.statistics().keys
        assert [getattr(key, "uds", None) for key in keys] == [str(nginx.plain)] * 2


async def test_h2c_over_a_unix_socket(nginx: Sockets) -> None:
    async with open_client(uds=str(nginx.h2c), http2=True, http1=False) as client:
        responses = await _gather(client.get, [f"http://example.com/{n}" for n in range(5)])
    assert [r.http_version for r in responses] == ["HTTP/2"] * 5
    assert [r.text for r in responses] == [f"h2c example.com /{n} HTTP/2.0" for n in range(5)]


async def test_https_over_a_unix_socket_checks_the_urls_host(nginx: Sockets) -> None:
    async with open_client(uds=nginx.tls, verify=nginx.ca, http2=True) as client:
        response = await client.get("https://localhost/x")
        assert response.http_version == "HTTP/2"
        assert response.text == "tls localhost /x HTTP/2.0 on"
        # The server name comes from the URL: the certificate is not example.com's.
        with pytest.raises(ConnectError) as caught:
            await client.get("https://example.com/")
        assert "over the Unix socket" in str(caught.value)
        assert "certificate verify failed" in str(caught.value)


async def test_connector_uds_serves_a_custom_pool(nginx: Sockets) -> None:
    async with (
        open_pool(HTTPConnector(uds=nginx.plain)) as pool,
        open_client(pool=pool) as client,
    ):
        response = await client.get("http://example.org/pooled")
        assert response.text == "plain example.org /pooled HTTP/1.1"


async def test_no_pool_sender_over_a_unix_socket(nginx: Sockets) -> None:
    async with open_client(pool=NoPoolSender(uds=nginx.plain)) as client:
        response = await client.get("http://example.net/once")
        assert response.text == "plain example.net /once HTTP/1.1"


async def test_httpx_transport_over_a_unix_socket(nginx: Sockets) -> None:
    async with httpx.AsyncClient(transport=AsyncPoolTransport(uds=nginx.plain)) as client:
        response = await client.get("http://example.com/httpx")
        assert response.text == "plain example.com /httpx HTTP/1.1"


async def test_cli_unix_socket(nginx: Sockets) -> None:
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "trio_connpool",
            "get",
            "--unix-socket",
            str(nginx.plain),
            "http://example.com/cli",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"plain example.com /cli HTTP/1.1"


async def test_a_missing_socket_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    async with open_client(uds=missing) as client:
        with pytest.raises(ConnectError) as caught:
            await client.get("http://example.com/")
    assert f"over the Unix socket {missing}" in str(caught.value)
    causes: list[BaseException] = []
    cause: BaseException | None = caught.value
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    assert isinstance(causes[-1], FileNotFoundError), causes


def test_http_key_carries_the_socket() -> None:
    origin = Origin("http", "example.com", 80)
    plain = HTTPKey(origin)
    one = HTTPKey(origin, uds="/run/a.sock")
    assert one == HTTPKey(origin, uds="/run/a.sock")
    assert hash(one) == hash(HTTPKey(origin, uds="/run/a.sock"))
    assert one != plain
    assert one != HTTPKey(origin, uds="/run/b.sock")
    assert plain.uds is None
    assert repr(one) == "HTTPKey('http://example.com:80', HTTP/1.1, uds='/run/a.sock')"
    assert HTTPKey(origin, uds=Path("/run/a.sock")) == one  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uds must be"):
        HTTPKey(origin, uds=b"/run/a.sock")  # type: ignore[arg-type]


async def test_bad_uds_fails_at_open() -> None:
    with pytest.raises(TypeError, match="uds must be"):
        async with open_client(uds=7):  # type: ignore[arg-type]
            raise AssertionError("unreachable")  # pragma: no cover


async def _gather(get: Callable[[str], Awaitable[Response]], urls: list[str]) -> list[Response]:
    """``get`` each of ``urls`` at once; the responses in the order of ``urls``."""
    results: dict[int, Response] = {}

    async def one(index: int, url: str) -> None:
        results[index] = await get(url)

    async with trio.open_nursery() as nursery:
        for index, url in enumerate(urls):
            nursery.start_soon(one, index, url)
    return [results[index] for index in range(len(urls))]
