"""Errors that say why: every message names what failed, where, and the root cause in words,
once. Checked against real sockets (an untrusted certificate, a closed port, a name that
does not resolve, a peer that never answers, a reset) through our client and through httpx
on our transport; the full message is asserted, not only the type."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import sys
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from _servers import (
    CountingApp,
    ServerConnection,
    TLSFiles,
    assert_pool_balanced,
    run_fault_server,
    serve_hypercorn,
)

import trio_connpool
from trio_connpool import (
    ConnectError,
    ConnectTimeout,
    InvalidURL,
    PoolError,
    ReadTimeout,
    RemoteProtocolError,
    TrioRequiredError,
    create_pool,
    open_client,
    open_pool,
)
from trio_connpool._exceptions import reason_of, words_for
from trio_connpool.contrib.httpx import AsyncPoolTransport
from trio_connpool.http import URL, Origin, Timeouts

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

REFUSED = os.strerror(errno.ECONNREFUSED)  # "Connection refused"
RESET = os.strerror(errno.ECONNRESET)  # "Connection reset by peer"
UNTRUSTED = "certificate verify failed: unable to get local issuer certificate"
UNRESOLVABLE = "nosuch.invalid"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _resolver_words() -> str:
    """What the resolver says of a ``.invalid`` name here: its own words, whatever they are
    (no DNS at all reads differently from a name that does not exist)."""
    try:
        await trio.socket.getaddrinfo(UNRESOLVABLE, 80, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        assert exc.strerror
        return exc.strerror
    # A resolver that answers for .invalid names would send the test's connect off this
    # machine: that is not tried.
    pytest.skip(f"the resolver here answers for {UNRESOLVABLE}")


# ---- the failing servers ----------------------------------------------------------------


@asynccontextmanager
async def _untrusted_tls(tmp_path: Path) -> AsyncIterator[str]:
    async with serve_hypercorn(CountingApp(), TLSFiles.create(tmp_path)) as base:
        yield base


async def _silent(conn: ServerConnection) -> None:
    await conn.receive_request()
    await conn.wait_peer_closed()  # and never answer


@asynccontextmanager
async def _listening_only() -> AsyncIterator[int]:
    """A TCP port whose connections the kernel accepts and nobody ever speaks on."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        yield listeners[0].socket.getsockname()[1]


# ---- through our client -----------------------------------------------------------------


async def test_untrusted_certificate_says_why(tmp_path: Path) -> None:
    async with _untrusted_tls(tmp_path) as base, open_client() as client:
        with pytest.raises(ConnectError) as caught:
            await client.get(base + "/")
        assert_pool_balanced(client.pool, idle=0)
    error = caught.value
    assert type(error) is ConnectError
    assert str(error) == f"cannot connect to {base}: {UNTRUSTED}"
    assert repr(error.key) == f"HTTPKey({base!r}, HTTP/1.1, tls=default)"
    assert error.reason == UNTRUSTED
    chain = [error.__cause__, error.__cause__.__cause__ if error.__cause__ else None]
    assert any(isinstance(exc, ConnectError) for exc in chain)  # the connector's own


async def test_hostname_mismatch_says_why(tmp_path: Path) -> None:
    files = TLSFiles.create(tmp_path)
    other = files.ca.issue_cert("other.example")  # trusted, but not for 127.0.0.1
    other.private_key_and_cert_chain_pem.write_to_path(str(files.certfile))
    other.private_key_pem.write_to_path(str(files.keyfile))
    async with (
        serve_hypercorn(CountingApp(), files) as base,
        open_client(verify=files.client_context()) as client,
    ):
        with pytest.raises(ConnectError) as caught:
            await client.get(base + "/")
    assert str(caught.value) == (
        f"cannot connect to {base}: certificate verify failed: "
        "IP address mismatch, certificate is not valid for '127.0.0.1'."
    )
    assert repr(caught.value.key) == f"HTTPKey({base!r}, HTTP/1.1, tls=custom)"


async def test_refused_port_says_connection_refused() -> None:
    port = _closed_port()
    async with open_client() as client:
        with pytest.raises(ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{port}/path")
    assert str(caught.value) == f"cannot connect to http://127.0.0.1:{port}: {REFUSED}"
    assert "all attempts" not in str(caught.value)


async def test_unresolvable_name_says_the_resolvers_words_once() -> None:
    words = await _resolver_words()
    async with open_client() as client:
        with pytest.raises(ConnectError) as caught:
            await client.get(f"http://{UNRESOLVABLE}/")
    text = str(caught.value)
    assert text == f"cannot connect to http://{UNRESOLVABLE}:80: {words}"
    assert text.count(words) == 1


async def test_connect_timeout_says_how_long(autojump_clock: trio.testing.MockClock) -> None:
    async with _listening_only() as port, open_client(timeouts=Timeouts(connect=2.0)) as client:
        start = trio.current_time()
        with pytest.raises(ConnectTimeout) as caught:
            await client.get(f"https://127.0.0.1:{port}/")
        assert trio.current_time() - start == pytest.approx(2.0)
    assert str(caught.value) == f"connecting to https://127.0.0.1:{port} took longer than 2.0 s"


async def test_read_timeout_names_the_url(autojump_clock: trio.testing.MockClock) -> None:
    async with run_fault_server(_silent) as server, open_client(timeouts=Timeouts(read=3.0)) as c:
        with pytest.raises(ReadTimeout) as caught:
            await c.get(server.url("/slow?x=1"))
    expected = f"no data within the read timeout of 3.0 s (url={server.url('/slow?x=1')})"
    assert str(caught.value) == expected


async def test_reset_mid_body_says_connection_reset() -> None:
    reset = trio.Event()

    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(1000)
        await conn.send_raw(b"x" * 10)
        await reset.wait()
        conn.reset()

    async with run_fault_server(script) as server, open_client() as client:
        url = server.url("/body")
        async with client.stream("GET", url) as response:
            reset.set()
            with pytest.raises(RemoteProtocolError) as caught:
                await response.aread()
    assert str(caught.value) == (
        f"the connection broke in the middle of the response (url={url}): {RESET}"
    )


async def test_a_generic_connectors_error_names_the_key() -> None:
    async def connect(key: tuple[str, int]) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"Error connecting to {key}: nope")

    async with open_pool(connect) as pool:
        with pytest.raises(ConnectError) as caught:
            await pool.acquire(("db", 5432))
    assert str(caught.value) == f"connect failed (key=('db', 5432)): {REFUSED}"


# ---- through httpx on our transport -----------------------------------------------------


async def _httpx_get(url: str, **options: Any) -> tuple[httpx.TransportError, Any]:
    # httpx's own timeout setting (5 s by default) is what the transport honours for read,
    # write and pool: give it the same limits as the transport's.
    timeouts = options.get("timeouts")
    timeout = (
        httpx.Timeout(5.0)
        if timeouts is None
        else httpx.Timeout(
            connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
        )
    )
    async with (
        AsyncPoolTransport(**options) as transport,
        httpx.AsyncClient(transport=transport, timeout=timeout) as client,
    ):
        with pytest.raises(httpx.TransportError) as caught:
            await client.get(url)
        assert_pool_balanced(transport.pool, idle=0)
    return caught.value, caught.value.__cause__


async def test_httpx_untrusted_certificate(tmp_path: Path) -> None:
    async with _untrusted_tls(tmp_path) as base:
        error, ours = await _httpx_get(base + "/")
    assert type(error) is httpx.ConnectError
    assert type(ours) is ConnectError
    assert str(error) == str(ours) == f"cannot connect to {base}: {UNTRUSTED}"


async def test_httpx_refused_port() -> None:
    port = _closed_port()
    error, ours = await _httpx_get(f"http://127.0.0.1:{port}/")
    assert type(error) is httpx.ConnectError
    assert type(ours) is ConnectError
    assert str(error) == f"cannot connect to http://127.0.0.1:{port}: {REFUSED}"


async def test_httpx_unresolvable_name() -> None:
    words = await _resolver_words()
    error, ours = await _httpx_get(f"http://{UNRESOLVABLE}/")
    assert type(error) is httpx.ConnectError
    assert type(ours) is ConnectError
    assert str(error) == f"cannot connect to http://{UNRESOLVABLE}:80: {words}"
    assert str(error).count(words) == 1


async def test_httpx_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with _listening_only() as port:
        url = f"https://127.0.0.1:{port}/"
        error, ours = await _httpx_get(url, timeouts=Timeouts(connect=2.0))
    assert type(error) is httpx.ConnectTimeout
    assert type(ours) is ConnectTimeout
    assert str(error) == f"connecting to https://127.0.0.1:{port} took longer than 2.0 s"


async def test_httpx_read_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with run_fault_server(_silent) as server:
        url = server.url("/slow")
        error, ours = await _httpx_get(url, timeouts=Timeouts(read=3.0))
    assert type(error) is httpx.ReadTimeout
    assert type(ours) is ReadTimeout
    assert str(error) == f"no data within the read timeout of 3.0 s (url={url})"


async def test_httpx_reset_mid_body() -> None:
    reset = trio.Event()

    async def script(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(1000)
        await conn.send_raw(b"x" * 10)
        await reset.wait()
        conn.reset()

    async with (
        run_fault_server(script) as server,
        AsyncPoolTransport() as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        url = server.url("/body")
        async with client.stream("GET", url) as response:
            reset.set()
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await response.aread()
    assert type(caught.value.__cause__) is RemoteProtocolError
    assert str(caught.value) == (
        f"the connection broke in the middle of the response (url={url}): {RESET}"
    )


async def test_httpx_proxy_error_of_ours_is_httpx_proxy_error() -> None:
    class ProxyError(ConnectError):  # the shape a proxy's failure takes
        pass

    class Refusing:
        async def send_request(self, request: object) -> object:
            await trio.lowlevel.checkpoint()
            raise ProxyError("the proxy refused the tunnel: 407") from OSError(
                errno.ECONNRESET, "reset"
            )

    async with (
        AsyncPoolTransport(pool=Refusing()) as transport,  # type: ignore[arg-type]
        httpx.AsyncClient(transport=transport) as client,
    ):
        with pytest.raises(httpx.ProxyError) as caught:
            await client.get("http://127.0.0.1:1/")
    assert type(caught.value.__cause__) is ProxyError
    assert str(caught.value) == f"the proxy refused the tunnel: 407: {RESET}"


# ---- how reasons are found --------------------------------------------------------------


def _raise_from(error: PoolError, cause: BaseException) -> PoolError:
    try:
        raise error from cause
    except PoolError as exc:
        return exc


def test_every_leaf_of_a_group_is_said_once() -> None:
    group = BaseExceptionGroup(
        "all attempts",
        [
            ConnectionRefusedError(errno.ECONNREFUSED, "Error connecting to ('::1', 1): ..."),
            ConnectionRefusedError(errno.ECONNREFUSED, "Error connecting to ('127.0.0.1', 1)"),
            OSError(errno.EADDRNOTAVAIL, "Error connecting to ('::1', 1): ..."),
        ],
    )
    wrapped = OSError("all attempts to connect to localhost:1 failed")
    wrapped.__cause__ = group
    error = _raise_from(ConnectError("cannot connect to http://localhost:1"), wrapped)
    assert str(error) == (
        f"cannot connect to http://localhost:1: {REFUSED}; {os.strerror(errno.EADDRNOTAVAIL)}"
    )


def test_a_huge_group_is_said_in_bounded_time_and_length() -> None:
    # 20,000 distinct leaves: the check for words said already went through a list (20 s
    # for 30,000), and the message listed every one of them.
    group = BaseExceptionGroup("many", [ValueError(f"leaf {i}") for i in range(20_000)])
    error = _raise_from(ConnectError("cannot connect"), group)
    started = time.perf_counter()
    text = str(error)
    assert time.perf_counter() - started < 1.0
    assert text.startswith("cannot connect: ValueError: leaf 0; ValueError: leaf 1; ")
    assert text.endswith("; ValueError: leaf 7; and 19992 more")
    assert words_for(group).endswith("; and 19992 more")


def test_words_already_in_the_message_are_not_repeated() -> None:
    error = _raise_from(
        ConnectError(f"cannot connect: {REFUSED}"), ConnectionRefusedError(111, "x")
    )
    assert str(error) == f"cannot connect: {REFUSED}"
    error = _raise_from(RemoteProtocolError("bad frame: oops"), ValueError("oops"))
    assert str(error) == "bad frame: oops"
    error = _raise_from(RemoteProtocolError("bad frame"), ValueError("oops"))
    assert str(error) == "bad frame: ValueError: oops"


def test_context_is_followed_but_not_a_cancellation() -> None:
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except OSError:
            raise RemoteProtocolError("broke") from None
    except RemoteProtocolError as exc:
        suppressed = exc
    assert str(suppressed) == "broke"  # `from None`: the context is not the reason
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except OSError:
            raise RemoteProtocolError("broke")  # noqa: B904 - the context is the point
    except RemoteProtocolError as exc:
        implicit = exc
    assert str(implicit) == f"broke: {RESET}"
    timeout = ConnectTimeout("took longer than 1 s")
    timeout.__cause__ = trio.TooSlowError()
    timeout.__cause__.__context__ = KeyboardInterrupt()
    assert str(timeout) == "took longer than 1 s"
    assert timeout.reason is None


def test_a_cycle_ends() -> None:
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    error = _raise_from(trio_connpool.TransportError("x"), first)
    assert str(error) == "x: ValueError: b"


def test_tls_and_resolver_words() -> None:
    tls = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert words_for(tls) == "TLS error: wrong version number"
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert words_for(gai) == "Name or service not known"
    assert words_for(trio.BrokenResourceError()) == "BrokenResourceError"
    assert reason_of(ValueError("no cause")) is None


def test_where_an_error_happened_prints_readably() -> None:
    origin = Origin("https", "example.com", 443)
    assert str(ConnectError("failed", key=origin)) == "failed (https://example.com:443)"
    assert str(ConnectError(f"cannot connect to {origin}", key=origin)) == (
        "cannot connect to https://example.com:443"
    )
    assert str(PoolError("failed", key=("db", 1))) == "failed (key=('db', 1))"
    assert str(PoolError("failed", key="db")) == "failed (key='db')"
    assert str(PoolError("failed", url="http://a/", key=origin)) == "failed (url=http://a/)"
    assert str(PoolError()) == ""


async def test_http_keys_print_their_tls_by_name() -> None:
    secure = Origin("https", "example.com", 443)
    plain = Origin("http", "example.com", 80)
    custom = ssl.create_default_context()
    shown: dict[str, str] = {}
    for name, verify in (("default", True), ("insecure", False), ("custom", custom)):
        async with open_client(verify=verify, http2=True) as client:
            sender = client.sender
            assert isinstance(sender, trio_connpool.http.PoolSender)
            shown[name] = repr(sender.key_for(secure))
            assert repr(sender.key_for(plain)) == "HTTPKey('http://example.com:80', HTTP/1.1)"
    assert shown == {
        "default": "HTTPKey('https://example.com:443', HTTP/2,HTTP/1.1, tls=default)",
        "insecure": "HTTPKey('https://example.com:443', HTTP/2,HTTP/1.1, tls=insecure)",
        "custom": "HTTPKey('https://example.com:443', HTTP/2,HTTP/1.1, tls=custom)",
    }
    assert "0x" not in "".join(shown.values())


# ---- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["example.com/path", "localhost:8000", "127.0.0.1:8000/x", "//example.com/"]
)
def test_a_url_without_a_scheme_says_so(text: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        URL(text)
    assert str(caught.value) == (
        f"URL has no scheme: {text!r} is missing 'http://' or 'https://' in front"
    )


def test_an_unsupported_scheme_is_named() -> None:
    with pytest.raises(InvalidURL) as caught:
        URL("ftp://example.com/")
    assert str(caught.value) == (
        "unsupported URL scheme 'ftp' in 'ftp://example.com/' (use http or https)"
    )


async def test_a_client_given_a_url_without_a_scheme() -> None:
    async with open_client() as client:
        with pytest.raises(InvalidURL, match="missing 'http://' or 'https://'"):
            await client.get("localhost:8000")


# ---- outside trio ----------------------------------------------------------------------


def _under_asyncio(entry: str) -> str:
    return (
        f"{entry} was called under asyncio, but trio_connpool runs under trio only (its "
        "httpx transport too): start the program with trio.run(main), or call it from "
        "asyncio through trio-asyncio"
    )


async def _noop_connect(key: object) -> trio.abc.AsyncResource:
    raise AssertionError("never called")


def _entries() -> list[tuple[str, Callable[[], Any]]]:
    async def client() -> None:
        async with open_client():
            pass

    async def pool() -> None:
        async with open_pool(_noop_connect):
            pass

    async def created() -> None:
        await create_pool(None, _noop_connect)  # type: ignore[arg-type]

    async def transport() -> None:
        async with httpx.AsyncClient(transport=AsyncPoolTransport()):
            pass

    return [
        ("open_client()", client),
        ("open_pool()", pool),
        ("create_pool()", created),
        ("AsyncPoolTransport.__aenter__()", transport),
    ]


@pytest.mark.parametrize(("entry", "main"), _entries(), ids=[e for e, _ in _entries()])
def test_under_asyncio_the_entry_points_say_trio_is_needed(
    entry: str, main: Callable[[], Any]
) -> None:
    with pytest.raises(TrioRequiredError) as caught:
        asyncio.run(main())
    assert isinstance(caught.value, RuntimeError)
    assert str(caught.value) == _under_asyncio(entry)


def test_outside_any_loop_too() -> None:
    coroutine = open_pool(_noop_connect).__aenter__()
    with pytest.raises(TrioRequiredError, match=r"^open_pool\(\) was called outside a trio"):
        coroutine.send(None)
