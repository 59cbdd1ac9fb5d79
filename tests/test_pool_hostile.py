"""Peers that refuse to be pooled: connections dead on arrival, and the limits that must
still mean what they say.

A peer that accepts and closes at once (a plain TCP server in front of a dead backend, a
database that drops the connection during login) must end in a typed error after a bounded
number of connects with a backoff, never in a reconnect storm that keeps the request waiting.
The generic pool's tests run on the autojump clock, so the backoff is virtual time and its
exact length is asserted; the HTTP client's run against a real socket on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable
from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced, assert_stats
from _servers import (
    WAIT,
    CountingApp,
    ServerConnection,
    assert_pool_balanced,
    run_fault_server,
    serve_hypercorn,
)

from trio_connpool import (
    ConnectError,
    Pool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    Reservation,
    ServerDisconnected,
    open_pool,
)
from trio_connpool.http import (
    Client,
    HTTPConnection,
    HTTPConnector,
    HTTPKey,
    Timeouts,
    open_client,
)

FakePool = Pool[Hashable, FakeConnection]

# What the pool does with a connection that is closed when its connect returns: this many
# connects in all, with these pauses between them (seconds).
ATTEMPTS = 3
BACKOFF = (0.1, 0.2)
# A storm is recognised well before it could hang a test: past this many connects the
# connector gives up making dead connections and the test's assertions fail instead.
STORM = 50


class DeadOnArrival(FakeConnector):
    """Makes connections that are already closed when the connect returns (for the first
    ``dead`` calls per key; None: all of them, until a storm is recognised), except for the
    keys in ``healthy``."""

    def __init__(
        self,
        dead: int | None = None,
        default: Step | None = None,
        healthy: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(default)
        self.dead = dead
        self.healthy = healthy
        self.dead_made: dict[Hashable, int] = {}
        self.call_times: list[float] = []

    async def __call__(self, key: Hashable) -> FakeConnection:
        self.call_times.append(trio.current_time())
        connection = await super().__call__(key)
        made = self.dead_made.get(key, 0)
        if key in self.healthy:
            return connection
        if len(self.calls) <= STORM and (self.dead is None or made < self.dead):
            self.dead_made[key] = made + 1
            connection.dead = True
        return connection


def pool_of(client: Client) -> Pool[HTTPKey, HTTPConnection]:
    pool = client.pool
    assert pool is not None
    return pool


def dead_on_arrival_message(error: BaseException) -> bool:
    return "closed as soon as it was opened" in str(error)


# ---------------------------------------------------------------------- the generic pool


async def test_dead_on_arrival_fails_the_waiter_after_bounded_connects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = DeadOnArrival()
    async with open_pool(connector) as pool:
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(ConnectError) as caught:
            await pool.acquire("a")
        assert dead_on_arrival_message(caught.value), caught.value
        assert caught.value.key == "a"
        assert len(connector.calls) == ATTEMPTS
        # A backoff between connects, in virtual time: the error comes promptly after it.
        assert connector.call_times == [start, start + BACKOFF[0], start + sum(BACKOFF)]
        assert trio.current_time() - start == pytest.approx(sum(BACKOFF))
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=0, in_use=0, connecting=0, waiting=0, weight=0)
        assert all(c.closed and c.aclose_calls == 1 for c in connector.made)
        assert dict(pool.statistics().keys) == {}
    assert_balanced(pool, connector)


async def test_one_dead_connection_is_retried_after_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = DeadOnArrival(dead=1)
    async with open_pool(connector) as pool:
        start = trio.current_time()
        async with pool.lease("a") as connection:
            assert not connection.is_closed()
            assert trio.current_time() - start == pytest.approx(BACKOFF[0])
        assert len(connector.calls) == 2
        assert connector.made[0].closed
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=1, connecting=0, waiting=0, weight=1)
    assert_balanced(pool, connector)


async def test_every_waiter_of_a_dead_key_gets_the_error_and_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = DeadOnArrival(healthy=frozenset("b"))
    errors: list[PoolError] = []

    async def want(pool: FakePool, key: Hashable) -> None:
        try:
            async with pool.lease(key):
                pass
        except PoolError as exc:
            errors.append(exc)

    async with open_pool(connector, max_connections=10) as pool:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(want, pool, "a")
                nursery.start_soon(want, pool, "b")
        assert len(errors) == 5
        assert all(isinstance(e, ConnectError) and dead_on_arrival_message(e) for e in errors)
        assert all(e.key == "a" for e in errors)
        # Each connect is for one waiter (capacity 1) and gives up after ATTEMPTS.
        assert connector.calls.count("a") <= 5 * ATTEMPTS
        assert connector.calls.count("b") == 1
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=1, connecting=0, waiting=0, weight=1)
    assert_balanced(pool, connector)


async def test_dead_idle_connections_then_dead_connects_end_in_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = DeadOnArrival(dead=0)  # The first connections are fine...
    async with open_pool(connector) as pool:
        leases = [await pool.acquire("a") for _ in range(3)]
        for lease in leases:
            pool.release(lease)
            lease.connection.dead = True  # ...then die silently while idle,
        connector.dead = None  # and every new connection is dead on arrival.
        with trio.fail_after(60), pytest.raises(ConnectError) as caught:
            await pool.acquire("a")
        assert dead_on_arrival_message(caught.value)
        assert len(connector.calls) == 3 + ATTEMPTS
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=0, connecting=0, waiting=0, weight=0)
    assert_balanced(pool, connector)


async def test_waiter_that_gives_up_during_the_backoff_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = DeadOnArrival()
    async with open_pool(connector) as pool:
        with trio.fail_after(60), pytest.raises(PoolTimeout):
            await pool.acquire("a", timeout=BACKOFF[0] / 2)
        # The connect goes on without it (late binding) and gives up on its own.
        assert_stats(pool, connecting=1, waiting=0)  # In its backoff: no connector call.
        await trio.sleep(sum(BACKOFF))
        await trio.testing.wait_all_tasks_blocked()
        assert len(connector.calls) == ATTEMPTS
        assert_stats(pool, connector, idle=0, connecting=0, waiting=0, weight=0)
    assert_balanced(pool, connector)


async def test_pool_exit_during_the_backoff_closes_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = DeadOnArrival()
    failures: list[PoolError] = []

    async def want(pool: FakePool) -> None:
        try:
            await pool.acquire("a")
        except PoolError as exc:
            failures.append(exc)

    async with open_pool(connector) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(want, pool)
        await trio.sleep(BACKOFF[0] / 2)
        assert len(connector.calls) == 1
        assert_stats(pool, connecting=1, waiting=1)  # In its backoff.
        await pool.aclose()
    assert [type(e) for e in failures] == [PoolClosed]
    assert len(connector.calls) == 1
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- the HTTP client


async def _close_at_once(conn: ServerConnection) -> None:
    """Accept, then close without reading or sending anything."""


async def test_http_client_against_a_server_that_closes_at_once() -> None:
    async with run_fault_server(_close_at_once) as server, open_client() as client:
        with trio.fail_after(WAIT), pytest.raises(PoolError) as caught:
            await client.get(server.url("/"))
        # Closed before the pool looked (a failed connect), or after the request was sent
        # (the server disconnected): either way a typed error, and no storm.
        assert isinstance(caught.value, (ConnectError, ServerDisconnected)), caught.value
        assert server.accepted <= ATTEMPTS
        assert_pool_balanced(client.pool, idle=0)


async def test_http_client_connection_closed_before_the_pool_sees_it() -> None:
    """The same server, with each connect returning only once the server has closed the
    connection: the pool always sees it dead on arrival."""
    async with run_fault_server(_close_at_once) as server:
        http = HTTPConnector()
        connects = 0

        async def connector(key: HTTPKey) -> HTTPConnection:
            nonlocal connects
            connects += 1
            connection = await http(key)
            await server.wait_for(lambda: server.server_closed >= connects)
            return connection

        async with open_pool(connector) as pool, open_client(pool=pool) as client:
            with trio.fail_after(WAIT), pytest.raises(ConnectError) as caught:
                await client.get(server.url("/"))
            assert dead_on_arrival_message(caught.value), caught.value
            assert connects == ATTEMPTS
            assert server.accepted == ATTEMPTS
            assert_pool_balanced(pool, idle=0)
            assert server.requests == []


# ---------------------------------------------------------------------- default timeouts


def test_every_wait_of_a_request_has_a_finite_default() -> None:
    default = Timeouts()
    assert (default.connect, default.read, default.write, default.pool) == (5.0, 5.0, 5.0, 5.0)


async def test_request_that_cannot_get_a_connection_times_out_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No pool timeout given: a request whose connect never finishes ends in PoolTimeout after
    the default 5 s (a connector without a connect timeout of its own stands for anything that
    keeps the request waiting: a full pool, a connect that never ends)."""
    started = 0

    async def never(key: HTTPKey) -> HTTPConnection:
        nonlocal started
        started += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with open_pool(never) as pool, open_client(pool=pool) as client:
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(PoolTimeout) as caught:
            await client.get("http://127.0.0.1:9/")
        assert trio.current_time() - start == 5.0
        assert caught.value.key is not None
        assert started == 1
        # The connect goes on for the next request (late binding); nobody waits for it.
        stats = pool.statistics()
        assert (stats.waiting, stats.leases, stats.connecting) == (0, 0, 1)


# ---------------------------------------------------------------------- the global limit


async def test_global_limit_counts_connections_not_weight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three keys whose connections each fill their key's budget (weight 8 of 8, an HTTP/2
    connection per origin) all get one at once under max_connections=20: weight is a per-key
    budget, not a way to make one connection count as eight against the global limit."""
    connector = FakeConnector(Step(weight=8, capacity=100))
    reserve = lambda key: Reservation(weight=8, capacity=100)  # noqa: E731
    async with open_pool(
        connector, max_connections=20, max_connections_per_key=8, reserve=reserve
    ) as pool:
        leases = []
        with trio.fail_after(60):
            for key in "abc":
                leases.append(await pool.acquire(key, timeout=1.0))
        assert trio.current_time() == 0.0
        stats = pool.statistics()
        assert (stats.connections, stats.connecting, stats.waiting) == (3, 0, 0)
        assert {key: s.weight for key, s in stats.keys.items()} == {"a": 8, "b": 8, "c": 8}
        # The per-key budget still holds: a key's second lease shares its one connection.
        more = await pool.acquire("a", timeout=1.0)
        assert more.connection is leases[0].connection
        assert len(connector.made) == 3
        for lease in [*leases, more]:
            pool.release(lease)
        assert_stats(pool, connector, idle=3, in_use=0, connecting=0, waiting=0, weight=24)
    assert_balanced(pool, connector)


async def test_global_limit_of_two_caps_plain_connections_at_two(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=2) as pool:
        first = await pool.acquire("a")
        second = await pool.acquire("b")
        with pytest.raises(PoolTimeout):
            await pool.acquire("c", timeout=1.0)
        assert trio.current_time() == 1.0
        assert_stats(pool, connector, in_use=2, connecting=0, waiting=0)
        pool.release(first)  # Idle now: evicted to make room for "c".
        third = await pool.acquire("c", timeout=1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert first.connection.closed
        assert pool.statistics().connections == 2
        assert len(connector.made) == 3
        pool.release(second)
        pool.release(third)
        assert_stats(pool, connector, idle=2, in_use=0, connecting=0, waiting=0, weight=2)
    assert_balanced(pool, connector)


async def test_eviction_makes_room_in_connection_units(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A heavy idle connection of another key is evicted for one new connection, and one
    eviction is always enough (every connection counts as one)."""
    weights: dict[Hashable, int] = {"a": 8, "b": 8, "c": 1}
    connector = FakeConnector()
    connector.script(Step(weight=8), key="a")
    connector.script(Step(weight=8), key="b")
    async with open_pool(
        connector,
        max_connections=2,
        max_connections_per_key=8,
        reserve=lambda key: Reservation(weight=weights[key]),
    ) as pool:
        with trio.fail_after(60):
            for key in "ab":
                async with pool.lease(key):
                    pass
            assert_stats(pool, connector, idle=2, weight=16)
            async with pool.lease("c") as connection:
                assert connection.key == "c"
                await trio.testing.wait_all_tasks_blocked()
                (a,) = (c for c in connector.made if c.key == "a")
                assert a.closed  # The least recently used idle connection, and only it.
                assert_stats(pool, connector, idle=1, in_use=1, weight=9)
    assert_balanced(pool, connector)


async def test_http2_three_origins_share_max_connections_twenty() -> None:
    """Three h2c origins, max_connections=20 and the default per-key limit (10): each
    HTTP/2 connection weighs 10, and all three are open at once."""
    apps = [CountingApp() for _ in range(3)]
    async with (
        serve_hypercorn(apps[0]) as one,
        serve_hypercorn(apps[1]) as two,
        serve_hypercorn(apps[2]) as three,
        open_client(http2=True, http1=False, max_connections=20) as client,
    ):
        bases = [one, two, three]
        with trio.fail_after(WAIT * 5):
            # Each origin's stream is held open while the next origin is asked.
            async with AsyncExitStack() as stack:
                for base in bases:
                    response = await stack.enter_async_context(
                        client.stream("GET", f"{base}/bytes/10")
                    )
                    assert response.http_version == "HTTP/2"
                stats = pool_of(client).statistics()
                assert (stats.connections, stats.in_use, stats.waiting) == (3, 3, 0)
                assert [s.weight for s in stats.keys.values()] == [10, 10, 10]

            async def burst(base: str, n: int) -> None:
                response = await client.get(f"{base}/slow/20?n={n}")
                assert response.status_code == 200

            async with trio.open_nursery() as nursery:
                for n in range(30):
                    nursery.start_soon(burst, bases[n % 3], n)
        assert [app.connections for app in apps] == [1, 1, 1]
        assert [app.requests for app in apps] == [11, 11, 11]
        assert_pool_balanced(client.pool, idle=3)


# ---- waiters' timeouts, kept by the pool's timer ------------------------------------------


@pytest.mark.parametrize("timeout", [math.nan, -1.0, "1"])
async def test_a_bad_per_call_timeout_is_refused_before_the_task_joins_the_line(
    autojump_clock: trio.testing.MockClock, timeout: object
) -> None:
    """A NaN deadline at the top of the heap held up every other waiter's timeout, and a
    string failed after the task had joined the line, leaving a waiter that a release then
    tried to wake (a crash of the whole run)."""
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1) as pool:
        held = await pool.acquire("a")
        with pytest.raises((TypeError, ValueError), match="timeout"):
            await pool.acquire("a", timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="timeout"):
            pool.lease("a", timeout=timeout)  # type: ignore[arg-type]
        assert pool.statistics().waiting == 0
        start = trio.current_time()
        with trio.fail_after(100), pytest.raises(PoolTimeout):
            await pool.acquire("a", timeout=1.0)
        assert trio.current_time() == start + 1.0
        pool.release(held)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().idle == 1


@pytest.mark.parametrize("release_first", [True, False])
async def test_a_waiter_served_at_the_tick_it_times_out_leaks_nothing(
    autojump_clock: trio.testing.MockClock, release_first: bool
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1) as pool:
        held = await pool.acquire("a")
        outcomes: list[object] = []

        async def waiter() -> None:
            try:
                lease = await pool.acquire("a", timeout=1.0)
            except PoolTimeout as exc:
                outcomes.append(exc)
            else:
                outcomes.append(lease)
                pool.release(lease)

        async def releaser() -> None:
            await trio.sleep(1.0)
            pool.release(held)

        async with trio.open_nursery() as nursery:
            first, second = (releaser, waiter) if release_first else (waiter, releaser)
            nursery.start_soon(first)
            nursery.start_soon(second)
        assert len(outcomes) == 1
        stats = pool.statistics()
        assert (stats.waiting, stats.in_use, stats.leases, stats.idle) == (0, 0, 0, 1), stats


async def test_a_waiter_cancelled_at_the_tick_it_times_out_leaks_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1) as pool:
        held = await pool.acquire("a")
        for _ in range(3):
            with trio.move_on_after(1.0), contextlib.suppress(PoolTimeout):
                await pool.acquire("a", timeout=1.0)
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.statistics()
        assert (stats.waiting, stats.in_use) == (0, 1), stats
        pool.release(held)
        pool.release(await pool.acquire("a", timeout=0))


async def test_mixed_timeouts_fire_each_at_its_own_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1, acquire_timeout=50.0) as pool:
        held = await pool.acquire("a")
        fired: dict[str, float] = {}
        start = trio.current_time()

        async def wait(name: str, timeout: float | None = None) -> None:
            try:
                if timeout is None:
                    await pool.acquire("a")  # the pool's acquire_timeout
                else:
                    await pool.acquire("a", timeout=timeout)
            except PoolTimeout:
                fired[name] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for name, timeout in [("t9", 9.0), ("t3", 3.0), ("t0", 0.0), ("t3b", 3.0)]:
                nursery.start_soon(wait, name, timeout)
            nursery.start_soon(wait, "default")
        assert fired == {"t0": 0.0, "t3": 3.0, "t3b": 3.0, "t9": 9.0, "default": 50.0}
        pool.release(held)
