"""HTTP/1.1 against servers that send what nobody asked for, over real loopback sockets.

A response may only be made of bytes that arrived after its request was sent: a connection
with anything unread (in the parser, in the TLS object, in the socket) is never used for
another request, whether a pool hands it out or it is the client's only sender. And what we
send must never be ambiguous: no second Host header, and no request the server sees complete
when we reported an error.

House rules: 127.0.0.1, port 0, every wait bounded, no sleeps. Bytes that must arrive "later"
(in a TCP segment of their own, after the client has read the response) are written by the
test at a point it controls, and the test waits until the client's socket is readable.
"""

from __future__ import annotations

import os
import select
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import h11
import pytest
import trio
import trio.testing
from _servers import WAIT, TLSFiles

from trio_connpool import Instrument
from trio_connpool._exceptions import (
    InvalidHeader,
    InvalidURL,
    LocalProtocolError,
    ServerDisconnected,
    TransportError,
)
from trio_connpool.http import (
    HTTP11Connection,
    Origin,
    Request,
    Response,
    Timeouts,
    _http11,
    open_client,
    open_stream,
)
from trio_connpool.http._http11 import _socket_of
from trio_connpool.http._trio_ssl import tls_buffers

if TYPE_CHECKING:
    from collections.abc import Hashable
    from pathlib import Path

# What a hostile server slips in: bytes that parse as a complete response.
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
_READ = 64 * 1024


def response(status: int, path: str, body: bytes = b"") -> bytes:
    """A response that names the request it answers (``X-Path``)."""
    head = f"HTTP/1.1 {status} Whatever\r\nX-Path: {path}\r\n"
    if status not in (204, 304):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + body


def echo(path: str) -> bytes:
    return response(200, path, path.encode("ascii"))


# ---- a server whose every write we control -----------------------------------------------


class Peer:
    """The server side of one connection: plain TCP, or TLS whose records we cut ourselves.

    Over TLS every part given to `send` becomes one TLS record, and all of them go out in
    one write on the socket, so the client receives them in one read.
    """

    def __init__(
        self,
        server: StrayServer,
        stream: trio.SocketStream,
        index: int,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.server = server
        self.stream = stream
        self.index = index
        self.h11 = h11.Connection(h11.SERVER)
        self.raw = bytearray()  # every (decrypted) byte received
        self.requests = 0
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = (
            None if tls is None else tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
        )

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(_READ)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.stream.send_all(data)

    async def handshake(self) -> None:
        assert self._tls is not None
        for _ in range(100):
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError("EOF in the handshake") from None
            else:
                await self._flush()  # Finished, and TLS 1.3 session tickets
                return
        raise AssertionError("handshake did not end")

    async def receive(self) -> bytes:
        """The next bytes from the client (decrypted over TLS); ``b""`` at its end."""
        if self._tls is None:
            return bytes(await self.stream.receive_some(_READ))
        for _ in range(1000):
            try:
                return self._tls.read(_READ)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLError:
                return b""  # EOF without close_notify, and the like
        raise AssertionError("no progress reading TLS")

    def _wire(self, part: bytes) -> bytes:
        if self._tls is None:
            return part
        self._tls.write(part)
        return self._outgoing.read()

    async def send(self, *parts: bytes) -> None:
        """Send ``parts`` in one write (over TLS: one record each)."""
        await self.stream.send_all(b"".join(self._wire(part) for part in parts))

    def inject_now(self, data: bytes) -> None:
        """Write ``data`` at once, without yielding (its own record over TLS)."""
        wire = self._wire(data)
        assert os.write(self.stream.socket.fileno(), wire) == len(wire)

    async def receive_request(self) -> str | None:
        """The target of the next complete request, or None if the client went away first."""
        if self.h11.their_state is h11.DONE:
            # Our responses are written raw, not through h11: start afresh for each request,
            # with what the client already sent after the last one.
            rest, closed = self.h11.trailing_data
            self.h11 = h11.Connection(h11.SERVER)
            if rest:
                self.h11.receive_data(rest)
            if closed:
                self.h11.receive_data(b"")
        target: str | None = None
        for _ in range(100_000):
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return None  # closed in the middle of a request
            if event is h11.NEED_DATA:
                data = await self.receive()
                self.raw += data
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                target = event.target.decode("ascii")
            elif isinstance(event, h11.EndOfMessage):
                assert target is not None
                self.requests += 1
                return target
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif not isinstance(event, h11.Data):  # pragma: no cover
                raise AssertionError(f"unexpected {event!r}")
        raise AssertionError("request never ended")


Answer = Callable[[Peer, str], Awaitable[None]]


async def answer_echo(peer: Peer, path: str) -> None:
    await peer.send(echo(path))


class StrayServer:
    """An HTTP/1.1 server on 127.0.0.1: ``answer(peer, target)`` answers each request.

    Counters: ``accepted``; ``requests``: (connection index, target) of each complete
    request; ``closed``: connections that ended (the client closed, or broke them).
    """

    def __init__(self, answer: Answer = answer_echo, tls: TLSFiles | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self._context = None if tls is None else tls.server_context()
        self.port = 0
        self.accepted = 0
        self.closed = 0
        self.requests: list[tuple[int, str]] = []
        self.peers: list[Peer] = []
        self._by_client: dict[tuple[str, int], Peer] = {}
        self._changed = trio.Event()

    def url(self, path: str) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def peer_of(self, client_socket: trio.socket.SocketType) -> Peer:
        """The server side of the connection whose client end is ``client_socket``."""
        host, port = client_socket.getsockname()[:2]
        return self._by_client[(host, port)]

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT):
            while not predicate():
                await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                peer = Peer(self, stream, self.accepted, self._context)
                self.peers.append(peer)
                host, port = stream.socket.getpeername()[:2]
                self._by_client[(host, port)] = peer
                self.accepted += 1
                self._changed_now()
                nursery.start_soon(self._handle, peer)

    async def _handle(self, peer: Peer) -> None:
        try:
            if peer._tls is not None:
                await peer.handshake()
            for _ in range(10_000):
                target = await peer.receive_request()
                if target is None:
                    break
                self.requests.append((peer.index, target))
                self._changed_now()
                await self.answer(peer, target)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(peer.stream)
            self.closed += 1
            self._changed_now()


@asynccontextmanager
async def stray_server(
    answer: Answer = answer_echo, tls: TLSFiles | None = None
) -> AsyncIterator[StrayServer]:
    server = StrayServer(answer, tls)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture(params=["plain", "tls"])
def tls(request: pytest.FixtureRequest, tmp_path: Path) -> TLSFiles | None:
    return None if request.param == "plain" else TLSFiles.create(tmp_path)


def client_context(tls: TLSFiles | None) -> ssl.SSLContext | bool:
    return True if tls is None else tls.client_context()


async def direct_connection(server: StrayServer) -> HTTP11Connection:
    """One HTTP11Connection to ``server``, to be used as a client's only sender."""
    tls = server.tls
    origin = Origin("http" if tls is None else "https", "127.0.0.1", server.port)
    context = None if tls is None else tls.client_context()
    stream, _ = await open_stream(origin, ssl_context=context, connect_timeout=WAIT)
    return HTTP11Connection(stream, origin, timeouts=Timeouts(read=WAIT, write=WAIT))


def client_socket(connection: object) -> trio.socket.SocketType:
    sock = _socket_of(cast("HTTP11Connection", connection)._stream)
    assert sock is not None
    return sock


def wait_readable_now(sock: trio.socket.SocketType) -> None:
    """Block (briefly, bounded) until ``sock`` has something to read: the bytes just written
    on the other end of the loopback connection have arrived."""
    readable, _, _ = select.select([sock.fileno()], [], [], WAIT)
    assert readable, "the injected bytes never arrived"


def assert_answers(responses: dict[str, Response], status: int) -> None:
    """Every response answers its own request, none is the stray one."""
    for path, resp in responses.items():
        assert resp.content != b"injected", path
        assert resp.headers.get("x-path") == path, (path, resp.headers)
        assert resp.status_code == status, (path, resp)


# ---- bytes that came with the response ---------------------------------------------------


async def test_a_quiet_connection_is_reused(tls: TLSFiles | None) -> None:
    """The checks find nothing on a well-behaved server: one connection serves everything,
    through the pool and as the only sender."""
    with trio.fail_after(WAIT):
        async with stray_server(tls=tls) as server:
            async with open_client(verify=client_context(tls)) as client:
                for path in ("/a", "/b", "/c"):
                    assert (await client.get(server.url(path))).content == path.encode()
            connection = await direct_connection(server)
            try:
                async with open_client(pool=connection) as client:
                    for path in ("/d", "/e"):
                        assert (await client.get(server.url(path))).content == path.encode()
            finally:
                await connection.aclose()
            assert server.requests == [(0, "/a"), (0, "/b"), (0, "/c"), (1, "/d"), (1, "/e")]


@pytest.mark.parametrize("first", [response(204, "/a"), response(200, "/a", b"ok")])
async def test_pool_never_reuses_a_connection_with_stray_bytes(
    tls: TLSFiles | None, first: bytes
) -> None:
    """A response and stray bytes in one write (over TLS: two records, so the stray ones
    stay inside the TLS object while the socket looks quiet): the next request goes on a
    new connection and gets its own answer."""

    async def answer(peer: Peer, path: str) -> None:
        if path == "/a":
            await peer.send(first, STRAY)
        else:
            await peer.send(echo(path))

    with trio.fail_after(WAIT):
        async with stray_server(answer, tls) as server:
            async with open_client(verify=client_context(tls)) as client:
                first_response = await client.get(server.url("/a"))
                assert first_response.headers.get("x-path") == "/a"
                second = await client.get(server.url("/b"))
                assert_answers({"/b": second}, 200)
                assert second.content == b"/b"
            assert server.requests == [(0, "/a"), (1, "/b")]


@pytest.mark.parametrize("later", [False, True], ids=["same-write", "later"])
async def test_single_connection_sender_refuses_after_stray_bytes(
    tls: TLSFiles | None, later: bool
) -> None:
    """With one connection as the client's sender, stray bytes after a response (with it,
    or later in a segment of their own) make the next request fail with a typed error
    before it is sent; never does it get the stray response."""
    stray_sent = trio.Event()
    read_first = trio.Event()

    async def answer(peer: Peer, path: str) -> None:
        if later:
            await peer.send(response(304, path))
            await read_first.wait()
            await peer.send(STRAY)
            stray_sent.set()
        else:
            await peer.send(response(304, path), STRAY)

    with trio.fail_after(WAIT):
        async with stray_server(answer, tls) as server:
            connection = await direct_connection(server)
            try:
                async with open_client(pool=connection) as client:
                    first = await client.get(server.url("/a"))
                    assert_answers({"/a": first}, 304)
                    read_first.set()
                    if later:
                        await stray_sent.wait()
                        await trio.lowlevel.wait_readable(client_socket(connection))
                    # Found when the next request was about to go out, or (when they came
                    # in the response's own read and reached the parser) as the response
                    # ended, which closed the connection at once.
                    with pytest.raises(
                        TransportError, match=r"before the request|after the last response"
                    ) as info:
                        await client.get(server.url("/b"))
                    if isinstance(info.value, ServerDisconnected):
                        assert getattr(info.value, "retryable", False)  # it was never sent
                    assert info.value.url == server.url("/b")
                    assert connection.is_closed()
                    # Refused for good: nothing is ever read from it again.
                    with pytest.raises(TransportError, match="is closed"):
                        await client.get(server.url("/c"))
                await server.wait_for(lambda: server.closed == 1)
                assert server.requests == [(0, "/a")]  # /b was never sent
            finally:
                await connection.aclose()


async def test_cancelled_while_refusing_a_dirty_connection_leaks_nothing(
    tls: TLSFiles | None,
) -> None:
    """The refusal of a connection that holds stray bytes awaits its close. Cancelled
    there, the close still completes (it is shielded), the typed refusal comes out, and
    the request sends nothing: the connection is closed, not left open."""
    read_first = trio.Event()
    stray_sent = trio.Event()

    async def answer(peer: Peer, path: str) -> None:
        await peer.send(response(304, path))
        await read_first.wait()
        await peer.send(STRAY)
        stray_sent.set()

    with trio.fail_after(WAIT):
        async with stray_server(answer, tls) as server:
            connection = await direct_connection(server)
            try:
                first = await connection.send_request(Request("GET", server.url("/a")))
                await first.aread()
                read_first.set()
                await stray_sent.wait()
                await trio.lowlevel.wait_readable(client_socket(connection))
                with trio.CancelScope() as scope:
                    scope.cancel()
                    with pytest.raises(ServerDisconnected, match="request was not sent"):
                        await connection.send_request(Request("POST", server.url("/b")))
                assert connection.is_closed()
                await server.wait_for(lambda: server.closed == 1)
                assert server.requests == [(0, "/a")]  # /b was never sent
            finally:
                await connection.aclose()


# ---- what trio.SSLStream holds -----------------------------------------------------------


async def test_tls_buffers_of_trio_ssl_stream(tmp_path: Path) -> None:
    """The private parts of trio.SSLStream that _trio_ssl reads are still there and still
    mean what it says: a TLS record that came in the same read as the one returned waits,
    undecrypted, in the incoming MemoryBIO, where nothing public shows it."""
    tls = TLSFiles.create(tmp_path)

    async def answer(peer: Peer, path: str) -> None:
        await peer.send(echo(path), b"second record")

    with trio.fail_after(WAIT):
        async with stray_server(answer, tls) as server:
            origin = Origin("https", "127.0.0.1", server.port)
            stream, _ = await open_stream(
                origin, ssl_context=tls.client_context(), connect_timeout=WAIT
            )
            try:
                assert isinstance(stream, trio.SSLStream)
                buffers = tls_buffers(stream)
                assert buffers is not None, "trio.SSLStream changed: see _trio_ssl.py"
                incoming, ssl_object = buffers
                await stream.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                assert await stream.receive_some() == echo("/x")
                assert incoming.pending > 0
                assert ssl_object.pending() == stream.pending() == 0
                assert await stream.receive_some() == b"second record"
                assert incoming.pending == 0
            finally:
                await trio.aclose_forcefully(stream)


def test_tls_buffers_of_something_else() -> None:
    """A trio that keeps other attributes (here: none) gets None, not an exception."""
    assert tls_buffers(cast("trio.SSLStream[trio.abc.Stream]", object())) is None


async def test_tls_connection_is_not_reused_when_its_buffers_are_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a future trio hide its buffers, TLS connections serve one request each rather
    than being reused without the check."""
    monkeypatch.setattr(_http11, "tls_buffers", lambda stream: None)
    tls = TLSFiles.create(tmp_path)
    with trio.fail_after(WAIT):
        async with stray_server(tls=tls) as server:
            async with open_client(verify=tls.client_context()) as client:
                for path in ("/a", "/b"):
                    assert (await client.get(server.url(path))).content == path.encode()
            assert server.requests == [(0, "/a"), (1, "/b")]


# ---- bytes that come later ----------------------------------------------------------------


class Injector(Instrument):
    """When a connection goes back to the pool idle, the server writes the stray bytes on it
    at once (after the pool's own check of the connection) and they arrive before anyone
    can send on it; ``every`` picks which releases (1: all)."""

    def __init__(self, server: StrayServer, every: int = 1) -> None:
        self.server = server
        self.every = every
        self.releases = 0
        self.injected = 0

    def lease_released(self, key: Hashable, connection: object) -> None:
        conn = cast("HTTP11Connection", connection)
        if not conn.is_ready():  # closed: nothing to poison
            return
        self.releases += 1
        if self.releases % self.every:
            return
        sock = client_socket(conn)
        self.server.peer_of(sock).inject_now(STRAY)
        self.injected += 1
        wait_readable_now(sock)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_stray_bytes_while_handed_to_a_waiter(tls: TLSFiles | None, method: str) -> None:
    """The pool hands a released connection to a waiting task; stray bytes arrive before
    that task runs. The task must not take them for its response: its request is not sent
    there, and since nothing of it was written, it is sent on a new connection and gets its
    own answer, a POST (not idempotent) as well as a GET."""
    answer_a = trio.Event()

    async def answer(peer: Peer, path: str) -> None:
        if path == "/a":
            await answer_a.wait()
        await peer.send(response(304, path))

    responses: dict[str, Response] = {}
    errors: list[ServerDisconnected] = []
    with trio.fail_after(WAIT):
        async with stray_server(answer, tls) as server:
            injector = Injector(server)
            async with open_client(
                verify=client_context(tls), max_connections=1, instruments=[injector]
            ) as client:

                async def send(method: str, path: str) -> None:
                    try:
                        responses[path] = await client.request(method, server.url(path))
                    except ServerDisconnected as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, "GET", "/a")
                    await server.wait_for(lambda: server.requests == [(0, "/a")])
                    nursery.start_soon(send, method, "/b")
                    await trio.testing.wait_all_tasks_blocked()
                    assert client.pool is not None
                    assert client.pool.statistics().waiting == 1
                    answer_a.set()
            assert injector.injected >= 1
            assert_answers(responses, 304)
            assert errors == []
            assert set(responses) == {"/a", "/b"}
            assert server.requests == [(0, "/a"), (1, "/b")]
            assert server.peers[1].raw.startswith(method.encode() + b" /b ")


async def test_many_requests_never_see_stray_bytes(tls: TLSFiles | None) -> None:
    """304s, each followed (on every other release) by stray bytes in a later segment,
    through sequential and concurrent requests: every request gets its own answer."""
    with trio.fail_after(4 * WAIT):
        async with stray_server(lambda peer, path: peer.send(response(304, path)), tls) as server:
            injector = Injector(server, every=2)
            responses: dict[str, Response] = {}
            async with open_client(
                verify=client_context(tls), max_connections=4, instruments=[injector]
            ) as client:

                async def get(path: str) -> None:
                    responses[path] = await client.get(server.url(path))

                for i in range(20):
                    await get(f"/seq/{i}")
                async with trio.open_nursery() as nursery:
                    for i in range(40):
                        nursery.start_soon(get, f"/con/{i}")
            assert len(responses) == 60
            assert_answers(responses, 304)
            assert injector.injected >= 10
            # Nothing was answered twice: each request reached the server exactly once.
            assert sorted(path for _, path in server.requests) == sorted(responses)


# ---- what we send -------------------------------------------------------------------------


async def test_two_host_headers_are_refused_before_sending() -> None:
    with trio.fail_after(WAIT):
        async with stray_server() as server, open_client() as client:
            with pytest.raises(InvalidHeader, match="Host"):
                await client.get(
                    server.url("/a"), headers=[("Host", "a.example"), ("host", "b.example")]
                )
            # Still fine with one.
            ok = await client.get(server.url("/b"), headers={"Host": "a.example"})
            assert ok.content == b"/b"
        # The refused request sent nothing at all, and left its connection usable.
        assert server.requests == [(0, "/b")]
        assert server.peers[0].raw.startswith(b"GET /b ")


@pytest.mark.parametrize(
    "path", ["/\udc80", "/?q=\udc80", "/#\udc80", "/p\ud800ath?q=1", "/?\udfff"]
)
async def test_lone_surrogate_in_url_is_invalid_url(path: str) -> None:
    with trio.fail_after(WAIT):
        async with stray_server() as server, open_client() as client:
            with pytest.raises(InvalidURL, match="surrogate"):
                await client.get(server.url(path))
        assert server.accepted == 0


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(
    ("length", "parts"),
    [
        (5, (b"abcde", b"f")),  # the declared length is reached, then more comes
        (5, (b"ab", b"cde", b"fg")),
        (5, (b"ab", b"cdefg")),  # too much within one chunk
        (5, (b"abc",)),  # too little
        (5, (b"ab", b"", b"c")),
    ],
)
async def test_streamed_body_not_matching_content_length(
    length: int, parts: tuple[bytes, ...]
) -> None:
    """The error is the typed one, the connection is closed, and the server never sees a
    complete request (it may have seen the head and part of the body)."""
    with trio.fail_after(WAIT):
        async with stray_server() as server, open_client() as client:
            with pytest.raises(LocalProtocolError, match="Content-Length") as info:
                await client.request(
                    "POST",
                    server.url("/upload"),
                    headers={"Content-Length": str(length)},
                    content=_chunks(*parts),
                )
            assert type(info.value) is LocalProtocolError
            await server.wait_for(lambda: server.closed == 1)
            assert server.requests == []
            assert client.pool is not None
            assert client.pool.statistics().idle == 0
            # A good upload still works, on a new connection.
            ok = await client.request(
                "POST",
                server.url("/ok"),
                headers={"Content-Length": "3"},
                content=_chunks(b"a", b"bc"),
            )
            assert ok.content == b"/ok"
        assert server.requests == [(1, "/ok")]
