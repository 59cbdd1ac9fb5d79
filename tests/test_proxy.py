"""Proxies end to end: squid forwards ``http://`` requests and tunnels ``https://`` ones
(HTTP/1.1 and HTTP/2 inside CONNECT), over TLS to the proxy too and with Basic auth;
microsocks carries SOCKS5; scripted proxies answer 407/403/502, close or stall. Every
failure is a typed error with its reason, raised before anything reaches the origin.

squid and microsocks run from their own files on 127.0.0.1 (see _proxies.py); a missing one
skips its tests with the reason, or fails them under TRIO_CONNPOOL_REQUIRE_PROXIES=1.
"""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncGenerator, Generator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import pytest
import trio
from _proxies import (
    PASSWORD,
    USER,
    Socks,
    Squid,
    free_port,
    run_microsocks,
    run_squid,
    scripted_proxy as scripted,
)
from _servers import CountingApp, TLSFiles, assert_pool_balanced, serve_hypercorn

from trio_connpool import ConnectError, ConnectTimeout, InvalidURL, ProxyError
from trio_connpool.http import (
    HTTPKey,
    Origin,
    PoolSender,
    Proxy,
    Timeouts,
    open_client,
)
from trio_connpool.http._proxyenv import ProxyEnv

CREDENTIALS = f"{USER}:{quote(PASSWORD, safe='')}"


class HeaderApp(CountingApp):
    """Records the Via and Proxy-Authorization fields of every request it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.via: list[bytes | None] = []
        self.proxy_authorization: list[bytes | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            self.via.append(headers.get(b"via"))
            self.proxy_authorization.append(headers.get(b"proxy-authorization"))
        await super().__call__(scope, receive, send)


@pytest.fixture(scope="module")
def squid() -> Generator[Squid]:
    with run_squid() as running:
        yield running


@pytest.fixture(scope="module")
def socks() -> Generator[Socks]:
    with run_microsocks() as running:
        yield running


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls-proxy"))


@asynccontextmanager
async def origin(tls: TLSFiles | None = None) -> AsyncGenerator[tuple[HeaderApp, str]]:
    app = HeaderApp()
    async with serve_hypercorn(app, tls) as base:
        yield app, base


def _h2_context(tls: TLSFiles) -> Any:
    return tls.client_context(["h2", "http/1.1"])


# ---- forwarding ------------------------------------------------------------------------------


async def test_http_is_forwarded_over_one_connection_to_the_proxy(squid: Squid) -> None:
    async with origin() as (app, base), open_client(proxy=squid.url(), trust_env=False) as client:
        # Two origins (127.0.0.1 and localhost name the same server), one proxy connection.
        other = base.replace("127.0.0.1", "localhost")
        for url in (base + "/", other + "/", base + "/bytes/10"):
            response = await client.get(url)
            assert response.status_code == 200
        pool = client.pool
        assert pool is not None
        stats = pool.statistics()
        assert stats.connections == 1, stats
        (key,) = stats.keys
        assert isinstance(key, HTTPKey)
        assert key.proxy == Proxy(squid.url())
        assert key.origin == Origin("http", "127.0.0.1", squid.plain)
        assert_pool_balanced(pool, idle=1)
    # The origin got each request from squid (its Via), not from us.
    assert len(app.via) == 3
    assert all(via is not None and b"squid" in via for via in app.via), app.via


async def test_direct_requests_carry_no_via(squid: Squid) -> None:
    # The check above can fail: without a proxy, the origin sees no Via.
    async with origin() as (app, base), open_client(trust_env=False) as client:
        assert (await client.get(base + "/")).status_code == 200
    assert app.via == [None]


async def test_forwarding_sends_credentials_to_the_proxy_only(squid: Squid) -> None:
    proxy = squid.url("auth", userinfo=CREDENTIALS)
    async with origin() as (app, base), open_client(proxy=proxy, trust_env=False) as client:
        response = await client.get(base + "/")
        assert response.status_code == 200
        assert response.text == "hello, world"
    assert app.proxy_authorization == [None]  # squid took it; the origin never saw it
    assert app.via[0] is not None


async def test_forwarding_without_credentials_is_a_proxy_error(squid: Squid) -> None:
    async with origin() as (app, base), open_client(proxy=squid.url("auth"), trust_env=False) as c:
        with pytest.raises(ProxyError) as caught:
            await c.get(base + "/")
        assert caught.value.status_code == 407
        assert "proxy credentials are missing or wrong" in str(caught.value)
        assert_pool_balanced(c.pool)
    assert app.requests == 0


# ---- tunnels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("http2", [False, True])
async def test_https_goes_through_a_connect_tunnel(
    squid: Squid, tls: TLSFiles, http2: bool
) -> None:
    verify = _h2_context(tls) if http2 else tls.client_context()
    proxy = squid.url("auth", userinfo=CREDENTIALS)
    async with (
        origin(tls) as (app, base),
        open_client(proxy=proxy, verify=verify, http2=http2, trust_env=False) as client,
    ):
        for _ in range(3):
            response = await client.get(base + "/")
            assert response.status_code == 200
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        pool = client.pool
        assert pool is not None
        (key,) = pool.statistics().keys
        assert isinstance(key, HTTPKey)
        assert key.origin == Origin("https", "127.0.0.1", int(base.rsplit(":", 1)[1]))
        assert key.proxy is not None
        assert app.connections == 1
        assert_pool_balanced(pool, idle=1)
    # Inside the tunnel squid sees only TLS: it adds no Via, and the credentials stayed
    # with it (on CONNECT).
    assert app.via == [None] * 3
    assert app.proxy_authorization == [None] * 3
    assert f"CONNECT 127.0.0.1:{key.origin.port} " in squid.access_log()


async def test_two_hundred_concurrent_requests(squid: Squid, tls: TLSFiles) -> None:
    async with (
        origin() as (plain_app, plain),
        origin(tls) as (tls_app, secure),
        open_client(
            proxy=squid.url(),
            verify=_h2_context(tls),
            http2=True,
            trust_env=False,
            timeouts=Timeouts(pool=30.0),
        ) as client,
    ):
        statuses: list[int] = []

        async def one(url: str) -> None:
            statuses.append((await client.get(url)).status_code)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(200):
                    nursery.start_soon(one, (plain if index % 2 else secure) + "/slow/5")
        assert statuses == [200] * 200
        pool = client.pool
        assert pool is not None
        assert len(pool.statistics().keys) == 2  # the forwarding key and one tunnel
        assert_pool_balanced(pool)
    assert plain_app.requests == tls_app.requests == 100
    assert tls_app.connections == 1  # one HTTP/2 connection through the tunnel


async def test_proxy_over_tls_forwards_and_tunnels(squid: Squid, tls: TLSFiles) -> None:
    proxy = Proxy(squid.url("tls"), ssl_context=squid.tls_files.client_context())
    async with (
        origin() as (plain_app, plain),
        origin(tls) as (_, secure),
        open_client(proxy=proxy, verify=_h2_context(tls), http2=True, trust_env=False) as c,
    ):
        assert (await c.get(plain + "/")).status_code == 200
        response = await c.get(secure + "/")  # TLS inside TLS
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert_pool_balanced(c.pool, idle=2)
    assert plain_app.via[0] is not None


async def test_proxy_over_tls_is_verified(squid: Squid) -> None:
    # The proxy's certificate comes from a CA nobody trusts here: verify=True refuses it.
    async with open_client(proxy=squid.url("tls"), trust_env=False) as client:
        with pytest.raises(ProxyError) as caught:
            await client.get("http://127.0.0.1:1/")
    assert "cannot connect to the proxy https://127.0.0.1:" in str(caught.value)
    assert "certificate verify failed" in str(caught.value)


async def test_connect_to_a_forbidden_destination(squid: Squid) -> None:
    async with open_client(proxy=squid.url(), trust_env=False) as client:
        with pytest.raises(ProxyError) as caught:
            await client.get("https://forbidden.invalid/")
    assert caught.value.status_code == 403
    assert "the proxy forbids this destination" in str(caught.value)
    assert "403 Forbidden" in str(caught.value)


async def test_tunnel_with_wrong_credentials(squid: Squid, tls: TLSFiles) -> None:
    proxy = squid.url("auth", userinfo=f"{USER}:wrong")
    async with (
        origin(tls) as (app, base),
        open_client(proxy=proxy, verify=tls.client_context(), trust_env=False) as client,
    ):
        with pytest.raises(ProxyError) as caught:
            await client.get(base + "/")
        assert_pool_balanced(client.pool, idle=0)
    assert caught.value.status_code == 407
    message = str(caught.value)
    assert message.startswith("proxy credentials are missing or wrong: http://127.0.0.1:")
    assert "407 Proxy Authentication Required" in message
    assert "wrong" not in message.split(":", 1)[1].replace("missing or wrong", "")
    assert app.requests == 0


# ---- SOCKS5 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
async def test_socks5(socks: Socks, tls: TLSFiles, scheme: str) -> None:
    async with (
        origin() as (plain_app, plain),
        origin(tls) as (_, secure),
        open_client(
            proxy=socks.url(scheme), verify=_h2_context(tls), http2=True, trust_env=False
        ) as client,
    ):
        assert (await client.get(plain.replace("127.0.0.1", "localhost") + "/")).status_code == 200
        response = await client.get(secure + "/")
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        pool = client.pool
        assert pool is not None
        assert all(
            isinstance(key, HTTPKey) and key.proxy is not None for key in pool.statistics().keys
        )
        assert_pool_balanced(pool, idle=2)
    assert plain_app.via == [None]


async def test_socks5_wrong_password(socks: Socks) -> None:
    proxy = socks.url(userinfo=f"{USER}:wrong")
    async with open_client(proxy=proxy, trust_env=False) as client:
        with pytest.raises(ProxyError) as caught:
            await client.get("http://127.0.0.1:1/")
    assert caught.value.status_code is None
    assert str(caught.value).startswith(f"the SOCKS proxy socks5://127.0.0.1:{socks.port} refused")


async def test_socks_without_python_socks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("python_socks", "python_socks.async_", "python_socks.async_.trio"):
        monkeypatch.setitem(sys.modules, name, None)
    # Given: the client does not open.
    with pytest.raises(ImportError, match=r"pip install 'trio-connpool\[socks\]'"):
        async with open_client(proxy="socks5://127.0.0.1:1", trust_env=False):
            pytest.fail("opened")
    # From the environment: the request fails with the same words.
    monkeypatch.setenv("ALL_PROXY", "socks5h://127.0.0.1:1")
    monkeypatch.delenv("all_proxy", raising=False)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with open_client() as client:
        with pytest.raises(ProxyError, match=r"trio-connpool\[socks\]"):
            await client.get("http://127.0.0.1:1/")


# ---- scripted faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ("407", "proxy credentials are missing or wrong"),
        ("403", "the proxy forbids this destination"),
        ("502", "the proxy refused the tunnel"),
    ],
)
async def test_connect_refused_with_a_status(status: str, words: str) -> None:
    async with scripted(status) as proxy, open_client(proxy=proxy.url, trust_env=False) as c:
        with pytest.raises(ProxyError) as caught:
            await c.get("https://example.com/")
        assert_pool_balanced(c.pool, idle=0)
    assert caught.value.status_code == int(status)
    assert str(caught.value).startswith(f"{words}: {proxy.url} answered CONNECT example.com:443")
    assert proxy.heads[0].startswith(b"CONNECT example.com:443 HTTP/1.1\r\n")


async def test_connect_sends_credentials_once_to_the_proxy() -> None:
    async with (
        scripted("407") as proxy,
        open_client(proxy=f"http://{CREDENTIALS}@127.0.0.1:{proxy.port}", trust_env=False) as c,
    ):
        with pytest.raises(ProxyError):
            await c.get("https://example.com/")
    (head,) = proxy.heads
    assert b"\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0OnB3\r\n" in head


@pytest.mark.parametrize("fault", ["close", "junk"])
async def test_proxy_that_closes_or_talks_nonsense(fault: str) -> None:
    async with scripted(fault) as proxy, open_client(proxy=proxy.url, trust_env=False) as c:
        with pytest.raises(ProxyError) as caught:
            await c.get("https://example.com/")
    assert caught.value.status_code is None
    assert str(caught.value).startswith(
        f"the proxy {proxy.url} gave no valid answer to CONNECT example.com:443"
    )


async def test_proxy_that_stalls_is_a_connect_timeout() -> None:
    timeouts = Timeouts(connect=0.3, pool=5.0)
    async with (
        scripted("stall") as proxy,
        open_client(proxy=proxy.url, timeouts=timeouts, trust_env=False) as client,
    ):
        start = trio.current_time()
        with pytest.raises(ConnectTimeout) as caught:
            await client.get("https://example.com/")
        assert trio.current_time() - start < 3.0
        assert_pool_balanced(client.pool, idle=0)
    assert "through the proxy http://127.0.0.1:" in str(caught.value)


async def test_unreachable_proxy() -> None:
    port = free_port()
    async with open_client(proxy=f"http://127.0.0.1:{port}", trust_env=False) as client:
        with pytest.raises(ProxyError) as caught:
            await client.get("http://example.com/")
    assert isinstance(caught.value, ConnectError)
    assert caught.value.status_code is None
    message = str(caught.value)
    assert message.startswith(f"cannot connect to the proxy http://127.0.0.1:{port}")
    assert "refused" in message.lower()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://127.0.0.1:21", "unsupported proxy scheme 'ftp'"),
        ("http://", "proxy URL has no host"),
        ("http://:8080", "proxy URL has no host"),
        ("http://127.0.0.1:99999", "invalid proxy URL"),
        ("http://u:pw@127.0.0.1:3128/path", "a proxy URL has no path or query"),
        ("127.0.0.1:3128", "unsupported proxy scheme"),
    ],
)
async def test_bad_proxy_url_raises_when_the_client_opens(url: str, words: str) -> None:
    with pytest.raises(InvalidURL, match=words) as caught:
        async with open_client(proxy=url):
            pytest.fail("opened")
    assert "pw@" not in str(caught.value)


async def test_proxy_must_be_a_url_or_a_proxy() -> None:
    with pytest.raises(TypeError, match="proxy must be a URL string or a Proxy"):
        async with open_client(proxy=3128):  # type: ignore[arg-type]
            pytest.fail("opened")


# ---- keys and the Proxy value ----------------------------------------------------------------


def test_proxy_value_hides_credentials() -> None:
    proxy = Proxy(f"http://{CREDENTIALS}@Proxy.Example:3128")
    assert repr(proxy) == "Proxy('http://proxy.example:3128')"
    assert proxy.username == USER
    assert proxy.password == PASSWORD
    assert proxy == Proxy("http://proxy.example:3128", auth=(USER, PASSWORD))
    assert proxy != Proxy("http://proxy.example:3128")
    assert Proxy("socks5://h").port == 1080
    assert Proxy("https://h").port == 443
    key = HTTPKey(Origin("https", "example.com", 443), proxy=proxy)
    assert "s3cret" not in repr(key)
    assert (
        repr(key)
        == "HTTPKey('https://example.com:443', HTTP/1.1, proxy=http://proxy.example:3128)"
    )


def test_keys_through_different_proxies_never_mix() -> None:
    origin_ = Origin("https", "example.com", 443)
    direct = HTTPKey(origin_)
    one = HTTPKey(origin_, proxy=Proxy("http://a:1"))
    same = HTTPKey(origin_, proxy=Proxy("http://a:1"))
    other = HTTPKey(origin_, proxy=Proxy("http://b:1"))
    assert one == same and hash(one) == hash(same)
    assert len({direct, one, other}) == 3


# ---- the environment -------------------------------------------------------------------------


class _Env:
    def __init__(self, url: str | None) -> None:
        self.url = url
        self.asked: list[tuple[str, str, int]] = []

    def proxy_for(self, scheme: str, host: str, port: int) -> str | None:
        self.asked.append((scheme, host, port))
        return self.url


async def test_sender_asks_the_environment_once_per_origin() -> None:
    env = _Env("http://127.0.0.1:3128")
    async with open_client(trust_env=False) as client:
        pool = client.pool
        assert pool is not None
        sender = PoolSender(pool, proxy_env=env)
        origin_ = Origin("http", "example.com", 80)
        first = sender.key_for(origin_)
        assert sender.key_for(origin_) is first
        assert first.proxy == Proxy("http://127.0.0.1:3128")
        assert env.asked == [("http", "example.com", 80)]
        # An explicit proxy wins: the environment is not asked.
        explicit = PoolSender(pool, proxy="http://other:1", proxy_env=env)
        assert explicit.key_for(origin_).proxy == Proxy("http://other:1")
        assert len(env.asked) == 1


async def test_trust_env_reads_proxy_variables(
    squid: Squid, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", squid.url())
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with origin() as (app, base):
        async with open_client() as client:  # trust_env=True by default
            assert (await client.get(base + "/")).status_code == 200
        async with open_client(trust_env=False) as client:
            assert (await client.get(base + "/")).status_code == 200
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        async with open_client() as client:
            assert (await client.get(base + "/")).status_code == 200
        monkeypatch.delenv("NO_PROXY")
        # An explicit proxy wins over the environment's (here one that does not exist).
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
        async with open_client(proxy=squid.url()) as client:
            assert (await client.get(base + "/")).status_code == 200
    assert [via is not None for via in app.via] == [True, False, False, True]


def test_proxy_env_stand_in() -> None:
    env = ProxyEnv.from_environ(
        {"HTTP_PROXY": "http://p:1", "https_proxy": "http://s:2", "NO_PROXY": ".internal,h:81"}
    )
    assert env.proxy_for("http", "example.com", 80) == "http://p:1"
    assert env.proxy_for("https", "example.com", 443) == "http://s:2"
    assert env.proxy_for("http", "a.internal", 80) is None
    assert env.proxy_for("http", "h", 81) is None
    assert env.proxy_for("http", "h", 80) == "http://p:1"
    assert ProxyEnv.from_environ({}).proxy_for("http", "x", 80) is None


# ---- the httpx transport and the command line ------------------------------------------------


async def test_httpx_transport_through_a_proxy(squid: Squid, tls: TLSFiles) -> None:
    import httpx

    from trio_connpool.contrib.httpx import AsyncPoolTransport

    proxy = httpx.Proxy(squid.url("auth"), auth=(USER, PASSWORD))
    async with origin(tls) as (app, base):
        transport = AsyncPoolTransport(proxy=proxy, verify=tls.client_context(), trust_env=False)
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(base + "/")
            assert response.status_code == 200
        refused = AsyncPoolTransport(proxy=squid.url("auth"), verify=tls.client_context())
        async with httpx.AsyncClient(transport=refused) as client:
            with pytest.raises(httpx.ProxyError, match="proxy credentials are missing or wrong"):
                await client.get(base + "/")
    assert app.requests == 1


async def test_cli_proxy_option(squid: Squid) -> None:
    from trio_connpool._cli import _parser  # pyright: ignore[reportPrivateUsage]
    from trio_connpool._commands import UsageError, fetch_command, parse_url

    args = _parser().parse_args(["get", "--proxy", squid.url(), "http://127.0.0.1:1/"])
    assert args.proxy == squid.url()
    args = _parser().parse_args(["load", "-x", squid.url(), "http://127.0.0.1:1/"])
    assert args.proxy == squid.url()
    async with origin() as (app, base):
        out, err = io.BytesIO(), io.StringIO()
        url = parse_url(base + "/")
        status = await fetch_command("u", url, proxy=squid.url(), out=out, err=err)
        assert status == 0, err.getvalue()
        assert out.getvalue() == b"hello, world"
        with pytest.raises(UsageError, match="--proxy: unsupported proxy scheme 'ftp'"):
            await fetch_command("u", url, proxy="ftp://127.0.0.1:1", out=out, err=err)
        port = free_port()
        err = io.StringIO()
        status = await fetch_command("u", url, proxy=f"http://127.0.0.1:{port}", out=out, err=err)
        assert status == 1
        assert f"ProxyError: cannot connect to the proxy http://127.0.0.1:{port}" in err.getvalue()
    assert app.via[0] is not None
