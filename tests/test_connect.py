"""Tests of open_stream and create_ssl_context over real loopback TCP and TLS (trustme CA).

Loopback only, port 0 everywhere; the one real-time wait is a 0.2 s connect timeout.
"""

from __future__ import annotations

import socket
import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import trustme

from trio_connpool._exceptions import ConnectError, ConnectTimeout
from trio_connpool.http import Origin, create_ssl_context, open_stream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@asynccontextmanager
async def tls_server(
    ca: trustme.CA, alpn: list[str] | None = None, names: tuple[str, ...] = ("127.0.0.1",)
) -> AsyncIterator[int]:
    """A TLS listener on 127.0.0.1 that handshakes and then waits for the client to leave."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(server_context)
    if alpn is not None:
        server_context.set_alpn_protocols(alpn)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    listener = trio.SSLListener(listeners[0], server_context, https_compatible=True)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            for _ in range(1000):
                if not await stream.receive_some():
                    break
        except trio.BrokenResourceError:
            pass  # the client rejected us, or left without close_notify
        finally:
            await trio.aclose_forcefully(stream)

    async def serve(nursery: trio.Nursery) -> None:
        for _ in range(100):
            nursery.start_soon(handle, await listener.accept())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, nursery)
            yield port
            nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()


def trusting_context(ca: trustme.CA, *, http2: bool = False) -> ssl.SSLContext:
    context = create_ssl_context(http2=http2)
    ca.configure_trust(context)
    return context


def cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


async def test_plain_tcp() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        stream, alpn = await open_stream(
            Origin("http", "127.0.0.1", port), ssl_context=None, connect_timeout=5
        )
        server = await listeners[0].accept()
        assert alpn is None
        assert isinstance(stream, trio.SocketStream)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await stream.aclose()
        await server.aclose()
    finally:
        await listeners[0].aclose()


@pytest.mark.parametrize(
    ("server_alpn", "http2", "expected"),
    [
        (["h2", "http/1.1"], False, "http/1.1"),
        (["h2", "http/1.1"], True, "h2"),
        (["http/1.1"], True, "http/1.1"),
        (None, True, None),
    ],
)
async def test_tls_handshake_and_alpn(
    ca: trustme.CA, server_alpn: list[str] | None, http2: bool, expected: str | None
) -> None:
    async with tls_server(ca, server_alpn) as port:
        stream, alpn = await open_stream(
            Origin("https", "127.0.0.1", port),
            ssl_context=trusting_context(ca, http2=http2),
            connect_timeout=5,
        )
        try:
            assert alpn == expected
            assert isinstance(stream, trio.SSLStream)
            assert stream.server_hostname == "127.0.0.1"
        finally:
            await stream.aclose()


async def test_unknown_ca_is_connect_error(ca: trustme.CA) -> None:
    origin = Origin("https", "127.0.0.1", 0)
    async with tls_server(ca) as port:
        origin = Origin("https", "127.0.0.1", port)
        with pytest.raises(ConnectError) as info:
            await open_stream(origin, ssl_context=create_ssl_context(), connect_timeout=5)
    assert type(info.value) is ConnectError
    assert info.value.key == origin
    assert any(isinstance(exc, ssl.SSLCertVerificationError) for exc in cause_chain(info.value))


async def test_hostname_mismatch_is_connect_error(ca: trustme.CA) -> None:
    async with tls_server(ca, names=("other.example",)) as port:
        with pytest.raises(ConnectError) as info:
            await open_stream(
                Origin("https", "127.0.0.1", port),
                ssl_context=trusting_context(ca),
                connect_timeout=5,
            )
    assert any(isinstance(exc, ssl.SSLCertVerificationError) for exc in cause_chain(info.value))


async def test_verify_false_accepts_unknown_ca(ca: trustme.CA) -> None:
    async with tls_server(ca, ["http/1.1"], names=("other.example",)) as port:
        stream, alpn = await open_stream(
            Origin("https", "127.0.0.1", port),
            ssl_context=create_ssl_context(False),
            connect_timeout=5,
        )
        await stream.aclose()
    assert alpn == "http/1.1"


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    origin = Origin("http", "127.0.0.1", port)
    with pytest.raises(ConnectError) as info:
        await open_stream(origin, ssl_context=None, connect_timeout=5)
    assert type(info.value) is ConnectError
    assert info.value.key == origin
    assert isinstance(info.value.__cause__, OSError)


async def test_connect_timeout_in_handshake() -> None:
    """A TCP listener that never speaks TLS: the handshake hangs until the timeout."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    origin = Origin("https", "127.0.0.1", port)
    try:
        start = trio.current_time()
        with pytest.raises(ConnectTimeout) as info:
            await open_stream(origin, ssl_context=create_ssl_context(), connect_timeout=0.2)
        assert 0.2 <= trio.current_time() - start < 2
        assert info.value.key == origin
        assert isinstance(info.value.__cause__, trio.TooSlowError)
    finally:
        await listeners[0].aclose()


async def test_cancelled_handshake_closes_stream() -> None:
    # Cancelled once the server has accepted, so during the handshake whatever the machine's
    # speed (a fixed delay could fire before the TCP connect, leaving accept() waiting).
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    context = create_ssl_context()
    server: trio.SocketStream | None = None
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as handshake:

                    async def accept_then_cancel() -> None:
                        nonlocal server
                        server = await listeners[0].accept()
                        handshake.cancel()

                    nursery.start_soon(accept_then_cancel)
                    await open_stream(
                        Origin("https", "127.0.0.1", port),
                        ssl_context=context,
                        connect_timeout=None,
                    )
                assert handshake.cancelled_caught
            assert server is not None
            # The client socket was closed: after its hello (if it went out), EOF.
            data = await server.receive_some()
            if data:
                assert await server.receive_some() == b""
            await server.aclose()
    finally:
        await listeners[0].aclose()


async def test_user_context_is_not_modified(ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    before = (context.check_hostname, context.verify_mode, context.options)
    assert create_ssl_context(context, http2=True) is context
    assert (context.check_hostname, context.verify_mode, context.options) == before
    async with tls_server(ca, ["h2", "http/1.1"]) as port:
        stream, alpn = await open_stream(
            Origin("https", "127.0.0.1", port), ssl_context=context, connect_timeout=5
        )
        await stream.aclose()
    assert alpn == "http/1.1"  # h2 was not added to the caller's ALPN list
    assert (context.check_hostname, context.verify_mode, context.options) == before


def test_create_ssl_context_defaults() -> None:
    verified = create_ssl_context()
    assert verified.verify_mode == ssl.CERT_REQUIRED
    assert verified.check_hostname
    unverified = create_ssl_context(False, http2=True)
    assert unverified.verify_mode == ssl.CERT_NONE
    assert not unverified.check_hostname
    assert create_ssl_context() is not verified
    with pytest.raises(TypeError, match="verify must be"):
        create_ssl_context(1)  # type: ignore[arg-type]
    # A string is a CA bundle's path now.
    with pytest.raises(FileNotFoundError, match="no such CA bundle"):
        create_ssl_context("yes")
