"""Hundreds of concurrent requests through a fault-injecting proxy to a real hypercorn server.

The proxy (tests/_faultproxy.py) gives each connection a fault drawn from a seeded
`random.Random`: pass through, stall, reset, truncate or delay, after a number of bytes.
The client runs with short timeouts. Whatever the faults, the load must end within a
stated wall-clock bound; each request must either succeed with the right body or raise a
public `PoolError` subclass (nothing else, no exception group); some must succeed; every
fault must really have happened; each pool must end balanced; and once the proxy stops
injecting faults the clients must recover: a connection that went bad may fail a request or
two more (and is closed for it), and then requests succeed. A bad connection that stays in
the pool (an HTTP/2 connection that hears nothing and is never PINGed) fails that.

HTTP/1.1 over TCP and TLS; HTTP/2 over TCP (h2c, prior knowledge) and TLS (ALPN h2); TLS
with trustme certificates. Each load spreads over several clients (each with its own pool),
so several connections are open at once and faults keep being drawn: one HTTP/2 connection
per origin that passes everything through would otherwise end the faults.

Loopback only, ports from 0, every loop bounded, the seeds fixed so a run is reproducible.
"""

from __future__ import annotations

import select
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
import trio.testing
from _faultproxy import Direction, Fault, FaultProxy
from _servers import CountingApp, TLSFiles, assert_pool_balanced, serve_hypercorn

from trio_connpool import Instrument, PoolError
from trio_connpool.http import Client, Timeouts, open_client

TIMEOUTS = Timeouts(connect=1.0, read=1.0, write=1.0, pool=3.0)
CLIENTS = 20
REQUESTS = 300  # in all, spread over the clients, all started at once
BIG = 20_000  # every fourth request asks for this many bytes (several frames or reads)
LOAD_BOUND = 30.0  # seconds of wall-clock time for the whole load
RECOVERY_BOUND = 30.0  # seconds for the recovery requests after the load
RECOVERED = 3  # requests per client that must succeed in a row once the faults stop
# Client, proxy and server share one thread: on a starved machine (CI, parallel jobs) a
# request on a good connection can take longer than the 1 s read timeout. Each client may
# lose this many recovery requests to that.
SLACK = 3
# A connect whose requester left (a PoolTimeout) still runs to its end in the pool: up to 3
# attempts (a connection closed on arrival is dialled again after 0.1 s, then 0.2 s).
SETTLE_BOUND = 3 * 1.0 + 1.0
WEIGHTS = {Fault.PASS: 2, Fault.STALL: 2, Fault.RESET: 1, Fault.TRUNCATE: 1, Fault.DELAY: 2}


@attrs.frozen
class Variant:
    name: str
    http1: bool
    http2: bool
    tls: bool
    seed: int
    # The ranges of bytes after which a fault strikes, server to client and client to server.
    # A TLS handshake alone is about 3-5 KiB down and 600 bytes up: over TLS, most faults
    # strike later, so that requests run first.
    after_down: tuple[int, int]
    after_up: tuple[int, int]


PLAIN = {"after_down": (1, 8192), "after_up": (1, 1024)}
TLS = {"after_down": (1024, 16384), "after_up": (128, 2048)}
VARIANTS = [
    Variant("http1", http1=True, http2=False, tls=False, seed=1, **PLAIN),
    Variant("http1-tls", http1=True, http2=False, tls=True, seed=2, **TLS),
    Variant("h2c", http1=False, http2=True, tls=False, seed=3, **PLAIN),
    Variant("h2-tls", http1=False, http2=True, tls=True, seed=4, **TLS),
]


# ---- the proxy itself, in front of an echo server ---------------------------------------------

WAIT_PROXY = 5.0  # far above what these loopback exchanges need (a delay is 0.1 s at most)
PAYLOAD = bytes(range(256)) * 80  # 20,480 bytes, more than any `after` drawn below


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        for _ in range(10_000):  # bounded: each round echoes some bytes or ends
            try:
                data = await stream.receive_some(65536)
                if not data:
                    return
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


@asynccontextmanager
async def _echo_server() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, _echo, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def _read_until_end(stream: trio.SocketStream) -> tuple[bytes, str]:
    """What arrives until EOF ("eof") or a reset ("reset")."""
    received = bytearray()
    for _ in range(10_000):  # bounded: each round reads some bytes or ends
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(received), "reset"
        if not data:
            return bytes(received), "eof"
        received += data
    raise AssertionError("the stream never ended")


def _readable(stream: trio.SocketStream) -> bool:
    return bool(select.select([stream.socket.fileno()], [], [], 0)[0])


async def _exchange(stream: trio.SocketStream, fault: Fault) -> tuple[bytes, str]:
    """Send PAYLOAD through the proxy to the echo server; what came back, and how it ended:
    "eof", "reset", or "open" (a stall: nothing more arrives, and no EOF)."""
    await stream.send_all(PAYLOAD)
    if fault is not Fault.STALL:
        if fault in (Fault.PASS, Fault.DELAY):
            await stream.send_eof()
        return await _read_until_end(stream)
    await trio.testing.wait_all_tasks_blocked()  # the proxy let through all it will
    received = bytearray()
    for _ in range(10_000):  # bounded: each round reads some bytes
        if not _readable(stream):
            return bytes(received), "open"
        received += await stream.receive_some(65536)
    raise AssertionError("the stall never stalled")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fault", list(Fault), ids=[fault.value for fault in Fault])
async def test_proxy_does_what_it_planned(fault: Fault, seed: int) -> None:
    async with _echo_server() as port:
        proxy = FaultProxy(
            port, seed=seed, weights={fault: 1}, after_down=(1, 8000), after_up=(1, 8000)
        )
        async with proxy:
            with trio.fail_after(WAIT_PROXY):
                stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                async with stream:
                    received, ending = await _exchange(stream, fault)
                    [connection] = proxy.connections
                    plan = connection.plan
                    assert plan.fault is fault
                    assert PAYLOAD.startswith(received)
                    if fault in (Fault.PASS, Fault.DELAY):
                        assert (received, ending) == (PAYLOAD, "eof")
                    else:
                        # Exactly `after` bytes went the counted way, then the fault struck.
                        assert connection.forwarded[plan.direction] == plan.after
                        expected = {
                            Fault.STALL: "open",
                            Fault.TRUNCATE: "eof",
                            Fault.RESET: "reset",
                        }
                        assert ending == expected[fault]
                        # Counted on the way back: the client got exactly `after` bytes (a
                        # reset may drop some it had not read). Counted on the way there: the
                        # echo of at most `after` bytes, the rest held or dropped.
                        exact = plan.direction is Direction.DOWN and fault is not Fault.RESET
                        if exact:
                            assert len(received) == plan.after
                        else:
                            assert len(received) <= plan.after
                    if fault is Fault.STALL:
                        assert proxy.open_sockets == 2  # both held open
            assert connection.fired
            assert proxy.fired == {fault: 1}
            assert proxy.planned == {fault: 1}
        assert proxy.open_sockets == 0


# ---- the load -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls-faultproxy"))


@attrs.define
class Outcomes:
    ok: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    wrong: list[str] = attrs.field(factory=list)  # a response with the wrong status or body
    unexpected: list[BaseException] = attrs.field(factory=list)  # not a public PoolError

    def describe(self) -> str:
        shown = "; ".join(f"{type(exc).__name__}: {exc!r}"[:300] for exc in self.unexpected[:5])
        return (
            f"{self.ok} ok, errors {dict(self.errors)}, {len(self.wrong)} wrong "
            f"{self.wrong[:5]}, {len(self.unexpected)} unexpected [{shown}]"
        )


class ConnectWatch(Instrument):
    """Wakes `settled` whenever a connect starts or ends."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def connect_started(self, key: Hashable) -> None:
        self._wake()

    def connect_succeeded(self, key: Hashable, connection: object) -> None:
        self._wake()

    def connect_failed(self, key: Hashable, error: BaseException | None) -> None:
        self._wake()

    async def settled(self, client: Client) -> None:
        """Return once the client's pool has no connect in flight."""
        pool = client.pool
        assert pool is not None
        for _ in range(1000):  # bounded: each round waits for a connect to start or end
            if pool.statistics().connecting == 0:
                return
            await self._changed.wait()
        raise AssertionError("connects kept starting")


def _target(n: int) -> tuple[str, bytes]:
    if n % 4 == 0:
        return f"/bytes/{BIG}?n={n}", b"x" * BIG
    return f"/?n={n}", b"hello, world"


async def _one(client: Client, base: str, n: int, outcomes: Outcomes) -> bool:
    """Send request ``n``; record how it ended; True if it succeeded."""
    path, body = _target(n)
    try:
        response = await client.get(base + path)
    except PoolError as exc:
        if type(exc).__name__.startswith("_"):
            outcomes.unexpected.append(exc)  # a private class: not one users can catch
        else:
            outcomes.errors[type(exc).__name__] += 1
        return False
    except Exception as exc:  # anything else, an exception group included, fails the test
        outcomes.unexpected.append(exc)
        return False
    if response.status_code != 200 or response.content != body:
        outcomes.wrong.append(f"{path}: {response.status_code} {len(response.content)}B")
        return False
    outcomes.ok += 1
    return True


@asynccontextmanager
async def _clients(
    variant: Variant, tls: TLSFiles, watch: ConnectWatch
) -> AsyncIterator[list[Client]]:
    verify: bool | ssl.SSLContext = True
    if variant.tls:
        verify = tls.client_context(["h2"] if variant.http2 else ["http/1.1"])
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                open_client(
                    verify=verify,
                    http1=variant.http1,
                    http2=variant.http2,
                    timeouts=TIMEOUTS,
                    max_connections_per_key=4,
                    instruments=[watch],
                )
            )
            for _ in range(CLIENTS)
        ]
        yield clients


def _pool_connections(client: Client) -> int:
    pool = client.pool
    assert pool is not None
    return pool.statistics().connections


async def _settle(watch: ConnectWatch, clients: list[Client]) -> None:
    with trio.fail_after(SETTLE_BOUND):
        for client in clients:
            await watch.settled(client)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.name for variant in VARIANTS])
async def test_load_through_fault_proxy(variant: Variant, tls: TLSFiles) -> None:
    app = CountingApp()
    outcomes = Outcomes()
    async with serve_hypercorn(app, tls if variant.tls else None) as server_base:
        target_port = int(server_base.rsplit(":", 1)[1])
        proxy = FaultProxy(
            target_port,
            seed=variant.seed,
            weights=WEIGHTS,
            after_down=variant.after_down,
            after_up=variant.after_up,
        )
        async with proxy:
            scheme = "https" if variant.tls else "http"
            base = f"{scheme}://127.0.0.1:{proxy.port}"
            watch = ConnectWatch()
            async with _clients(variant, tls, watch) as clients:
                started = trio.current_time()
                with trio.fail_after(LOAD_BOUND):
                    async with trio.open_nursery() as nursery:
                        for n in range(REQUESTS):
                            nursery.start_soon(_one, clients[n % CLIENTS], base, n, outcomes)
                elapsed = trio.current_time() - started
                report = f"{variant.name}: load took {elapsed:.1f}s; {outcomes.describe()}; "
                report += proxy.summary()
                assert not outcomes.unexpected, report
                assert not outcomes.wrong, report
                assert outcomes.ok > 0, report
                assert outcomes.ok + sum(outcomes.errors.values()) == REQUESTS, report
                for fault in Fault:
                    assert proxy.fired[fault] >= 1, f"{fault} never fired; {report}"
                await _settle(watch, clients)
                for client in clients:
                    assert_pool_balanced(client.pool)

                # Recovery: no new connection is faulty now, but those still open keep their
                # faults (some not struck yet). Each client sends requests one at a time until
                # RECOVERED in a row succeed. A bad connection may fail two of them (HTTP/2:
                # one read timeout while a body arrives, one with nothing received, which
                # makes it suspect), and is then closed; so the failures stay within twice
                # the connections open at the start, plus SLACK. A connection kept while it
                # fails every request makes the client fail every request: never within that.
                proxy.set_weights({Fault.PASS: 1})
                recovery = Outcomes()
                failed_late: list[str] = []

                async def recover(index: int, client: Client) -> None:
                    allowed = 2 * _pool_connections(client) + SLACK
                    results: list[bool] = []
                    # Bounded: past this many, more than `allowed` failed.
                    for i in range((allowed + 1) * (RECOVERED + 1)):
                        n = REQUESTS + 100 * index + i
                        results.append(await _one(client, base, n, recovery))
                        if results.count(False) > allowed:
                            break
                        if len(results) >= RECOVERED and all(results[-RECOVERED:]):
                            return
                    failed_late.append(f"client {index}: {allowed} failures allowed, {results}")

                with trio.fail_after(RECOVERY_BOUND):
                    async with trio.open_nursery() as nursery:
                        for index, client in enumerate(clients):
                            nursery.start_soon(recover, index, client)
                report += f"; recovery: {recovery.describe()}"
                assert not recovery.unexpected, report
                assert not recovery.wrong, report
                assert not failed_late, f"{failed_late}; {report}"
                await _settle(watch, clients)
                for client in clients:
                    assert_pool_balanced(client.pool)
        assert proxy.open_sockets == 0, report
