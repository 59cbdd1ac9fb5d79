"""Pre-connecting: Pool.prewarm(key, n) and the min_idle_per_key option.

Timing runs on pytest-trio's ``autojump_clock`` (a MockClock with autojump_threshold=0), so
connect delays, idle expiry and the refill backoff are asserted at exact virtual times.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced, assert_stats

from trio_connpool import (
    ConnectError,
    Instrument,
    Lease,
    Pool,
    PoolClosed,
    PoolOptions,
    Reservation,
    open_pool,
)

FakePool = Pool[Hashable, FakeConnection]
FakeLease = Lease[Hashable, FakeConnection]


class Counting(Instrument):
    def __init__(self) -> None:
        self.started = 0
        self.failed: list[BaseException | None] = []

    def connect_started(self, key: Hashable) -> None:
        self.started += 1

    def connect_failed(self, key: Hashable, error: BaseException | None) -> None:
        self.failed.append(error)


# ---------------------------------------------------------------------- prewarm


async def test_prewarm_opens_concurrently_up_to_n(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector(Step(delay=1.0))
    async with open_pool(connector) as pool:
        start = trio.current_time()
        assert await pool.prewarm("a", 3) == 3
        assert trio.current_time() - start == 1.0  # concurrently, not one after another
        assert_stats(pool, connector, idle=3, in_use=0, connecting=0)
        assert await pool.prewarm("a", 3) == 0  # already there
        assert await pool.prewarm("a", 5) == 2
        assert await pool.prewarm("a", 0) == 0
        assert_stats(pool, connector, idle=5)
        # The first five concurrent acquires open nothing.
        leases = [await pool.acquire("a") for _ in range(5)]
        assert len(connector.calls) == 5
        for lease in leases:
            pool.release(lease)
    assert_balanced(pool, connector)


async def test_prewarm_stops_at_the_per_key_limit(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections_per_key=2) as pool:
        assert await pool.prewarm("a", 5) == 2
        assert await pool.prewarm("a", 5) == 0
        assert_stats(pool, connector, idle=2, weight=2)
    assert_balanced(pool, connector)


async def test_prewarm_takes_only_free_global_room(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=3) as pool:
        assert await pool.prewarm("b", 2) == 2
        assert await pool.prewarm("a", 5) == 1
        # No eviction: b keeps its two idle connections.
        stats = pool.statistics()
        assert (stats.keys["a"].idle, stats.keys["b"].idle) == (1, 2)
        assert await pool.prewarm("c", 1) == 0
        assert "c" not in pool.statistics().keys
        # A request still evicts, as always.
        async with pool.lease("c"):
            pass
        assert stats.connections == 3
    assert_balanced(pool, connector)


async def test_prewarm_counts_an_http2_like_connection_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One connection with capacity serves n: reserve says so, the connection confirms it.
    connector = FakeConnector(Step(delay=0.5, capacity=100, weight=4))
    async with open_pool(
        connector,
        max_connections_per_key=4,
        reserve=lambda key: Reservation(weight=4, capacity=100),
    ) as pool:
        assert await pool.prewarm("a", 3) == 1
        assert await pool.prewarm("a", 50) == 0
        assert_stats(pool, connector, idle=1, weight=4)
        leases = [await pool.acquire("a") for _ in range(3)]
        assert len(connector.calls) == 1
        for lease in leases:
            pool.release(lease)
    assert_balanced(pool, connector)
    # Without a per-key limit the capacity still counts: one connect covers 3.
    connector = FakeConnector(Step(capacity=100))
    async with open_pool(connector, reserve=lambda key: Reservation(capacity=100)) as pool:
        assert await pool.prewarm("a", 3) == 1
    assert_balanced(pool, connector)


async def test_prewarm_raises_the_first_failure_after_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    instrument = Counting()
    connector = FakeConnector()
    connector.script(Step(delay=2.0), Step(delay=1.0, fail=OSError("refused")), Step(delay=3.0))
    async with open_pool(connector, instruments=[instrument]) as pool:
        start = trio.current_time()
        with pytest.raises(ConnectError) as info:
            await pool.prewarm("a", 3)
        assert trio.current_time() - start == 3.0  # waited for the other two
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.key == "a"
        assert_stats(pool, connector, idle=2, connecting=0)
        assert len(instrument.failed) == 1
    assert_balanced(pool, connector)


async def test_cancelled_prewarm_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=10.0))
    async with open_pool(connector) as pool:
        with trio.move_on_after(1.0):
            await pool.prewarm("a", 3)
        # At once: no connect counts any more.
        stats = pool.statistics()
        assert (stats.connecting, stats.weight, dict(stats.keys)) == (0, 0, {})
        await trio.testing.wait_all_tasks_blocked()
        assert connector.cancelled == 3
        assert connector.made == []
        await trio.sleep(20)
        assert_stats(pool, connector, idle=0, connecting=0)
    assert_balanced(pool, connector)


async def test_cancelled_prewarm_keeps_a_connect_a_request_counts_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=10.0))
    async with open_pool(connector) as pool, trio.open_nursery() as nursery:
        got: list[FakeLease] = []
        at: list[float] = []

        async def request() -> None:
            got.append(await pool.acquire("a"))
            at.append(trio.current_time())

        with trio.move_on_after(1.0):
            nursery.start_soon(request)  # arrives while the prewarm connects run
            await pool.prewarm("a", 2)
        await trio.testing.wait_all_tasks_blocked()
        # The waiter was attributed to one prewarm connect: it keeps running for it.
        assert_stats(pool, connector, connecting=1, waiting=1)
        await trio.sleep(10)
        assert len(got) == 1 and at == [10.0]
        assert len(connector.calls) == 2  # no extra connect for the request
        pool.release(got[0])
    assert_balanced(pool, connector)


async def test_prewarm_on_a_closed_pool_and_bad_n(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector(Step(delay=5.0))
    async with open_pool(connector) as pool:
        with pytest.raises(TypeError):
            await pool.prewarm("a", 1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await pool.prewarm("a", True)
        with pytest.raises(ValueError, match="0 or more"):
            await pool.prewarm("a", -1)

        async def close_soon() -> None:
            await trio.sleep(1)
            await pool.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(PoolClosed):
                await pool.prewarm("a", 2)
        with pytest.raises(PoolClosed):
            await pool.prewarm("a", 2)
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- min_idle_per_key


def test_min_idle_option_is_checked() -> None:
    assert PoolOptions().min_idle_per_key is None
    assert PoolOptions(min_idle_per_key=0).min_idle_per_key == 0
    with pytest.raises(ValueError, match="0 or more"):
        PoolOptions(min_idle_per_key=-1)
    with pytest.raises(TypeError):
        PoolOptions(min_idle_per_key=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout above 0"):
        PoolOptions(min_idle_per_key=1, idle_timeout=0)
    PoolOptions(min_idle_per_key=1, idle_timeout=None)


async def test_min_idle_refills_a_used_key_and_keeps_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, min_idle_per_key=2, idle_timeout=10) as pool:
        async with pool.lease("a"):
            await trio.testing.wait_all_tasks_blocked()
            # While the lease is held, two more are opened to stand idle.
            assert_stats(pool, connector, idle=2, in_use=1)
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=3)
        # Used every 4 s for 5 minutes (LIFO: the same connection each time): the surplus
        # one expires, the minimum stays open, nothing is reopened in a loop.
        for _ in range(75):
            await trio.sleep(4)
            async with pool.lease("a"):
                pass
        assert_stats(pool, connector, idle=2)
        assert len(connector.calls) == 3
        assert sum(c.closed for c in connector.made) == 1
    assert_balanced(pool, connector)


async def test_min_idle_reopens_after_lifetime_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(
        connector, min_idle_per_key=2, idle_timeout=60, max_lifetime=30, lifetime_jitter=0
    ) as pool:
        async with pool.lease("a"):
            await trio.testing.wait_all_tasks_blocked()  # refilled: two idle besides it
        assert_stats(pool, connector, idle=3)
        await trio.sleep(20)
        async with pool.lease("a"):  # in use
            pass
        await trio.sleep(15)  # t=35: all three passed their lifetime
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=2)
        assert len(connector.calls) == 5
        assert len(connector.open()) == 2
        assert len(connector.open()) == 2
    assert_balanced(pool, connector)


async def test_min_idle_reopens_after_a_server_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, min_idle_per_key=2, idle_timeout=60) as pool:
        async with pool.lease("a"):
            await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=3)
        used = connector.made[0]
        used.die()  # the peer closed a connection that served: not the minimum's
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=2)
        assert len(connector.calls) == 3
        async with pool.lease("a") as connection:  # a refill connection serves
            pass
        connection.die()  # the peer closed it: reopened at once
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=2)
        assert trio.current_time() == 0.0
        assert len(connector.calls) == 4
        for connection in connector.open():
            connection.die()  # refill connections closed before use: one probe after 1 s
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=0)
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=2)
        assert len(connector.calls) == 6
    assert_balanced(pool, connector)


async def test_min_idle_backs_off_a_failing_host(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector(Step(fail=OSError("refused")))
    connector.script(Step())  # the request's own connect works; then the host is down
    async with open_pool(connector, min_idle_per_key=2, idle_timeout=None) as pool:
        lease = await pool.acquire("a")  # held: the key stays in use
        await trio.sleep(600)
        # Backoff 1 s, doubling to 60 s: a bounded number of tries in 10 mocked minutes
        # (a tight loop would make millions), and it keeps trying.
        # Two connects fail at t=0, then one probe at 1, 3, 7, 15, 31, 63, then every 60 s.
        assert connector.failed == 16, connector.failed
        await trio.sleep(600)
        assert connector.failed == 26  # at the 60 s cap: one every minute
        # The host comes back: refill succeeds at the next try.
        connector.default = Step()
        await trio.sleep(61)
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=2, in_use=1)
        pool.release(lease)
    assert_balanced(pool, connector)


async def test_min_idle_backs_off_connections_closed_unused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A peer that accepts, then closes each connection a moment later, before it is used.
    class Closer(FakeConnector):
        async def __call__(self, key: Hashable) -> FakeConnection:
            connection = await super().__call__(key)
            if len(self.made) > 1:

                async def close_later() -> None:
                    await trio.sleep(0.01)
                    connection.die()

                nursery.start_soon(close_later)
            return connection

    connector = Closer()
    async with (
        trio.open_nursery() as nursery,
        open_pool(connector, min_idle_per_key=1, idle_timeout=None) as pool,
    ):
        lease = await pool.acquire("a")
        await trio.sleep(600)
        # The request's connect, the first refill, then one after 1 s, 2, 4, ... 32, and
        # every 60 s: 16 in 10 minutes (closed 10 ms after each connect, a loop: 60000).
        assert len(connector.calls) == 16, len(connector.calls)
        pool.release(lease)
    assert_balanced(pool, connector)


async def test_min_idle_stops_for_a_key_gone_cold(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector()
    async with open_pool(connector, min_idle_per_key=2, idle_timeout=10) as pool:
        async with pool.lease("a"):
            await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, idle=3)
        await trio.sleep(10)  # unused for idle_timeout: everything expires, nothing refills
        await trio.testing.wait_all_tasks_blocked()
        assert dict(pool.statistics().keys) == {}
        await trio.sleep(1000)
        assert len(connector.calls) == 3
        # Prewarmed but never leased: not kept either.
        assert await pool.prewarm("b", 2) == 2
        await trio.sleep(10)
        await trio.testing.wait_all_tasks_blocked()
        assert dict(pool.statistics().keys) == {}
        assert len(connector.calls) == 5
    assert_balanced(pool, connector)


async def test_min_idle_never_blocks_a_request(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector(Step(delay=5.0))
    async with open_pool(
        connector, max_connections=2, min_idle_per_key=1, idle_timeout=100
    ) as pool:
        lease = await pool.acquire("a")  # t=5; a refill connect for "a" starts now
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, connecting=1, in_use=1)
        start = trio.current_time()
        # The pool is full with the refill connect in flight: a request for another key
        # withdraws it rather than wait for it.
        async with pool.lease("b"):
            assert trio.current_time() - start == 5.0  # its own connect only
        assert connector.cancelled == 1
        pool.release(lease)
        # Room is never taken back by eviction: "a" refills only when room frees itself.
        await trio.sleep(50)
        stats = pool.statistics()
        assert (stats.keys["a"].idle, stats.keys["b"].idle, stats.connecting) == (1, 1, 0)
    assert_balanced(pool, connector)


async def test_a_waiter_takes_the_refill_connect(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector(Step(delay=5.0))
    async with open_pool(connector, max_connections_per_key=2, min_idle_per_key=1) as pool:
        first = await pool.acquire("a")  # t=5; a refill connect starts
        await trio.sleep(1)
        second = await pool.acquire("a")  # served by the refill connect at t=10
        assert trio.current_time() == 10.0
        assert len(connector.calls) == 2
        pool.release(first)
        pool.release(second)
    assert_balanced(pool, connector)


async def test_a_request_for_another_key_cancels_a_prewarm_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=5.0))
    async with open_pool(connector, max_connections=2) as pool, trio.open_nursery() as nursery:
        result: list[int] = []

        async def prewarm() -> None:
            result.append(await pool.prewarm("a", 2))

        nursery.start_soon(prewarm)
        await trio.sleep(1)
        async with pool.lease("b"):  # the pool is full of prewarm connects: one yields
            assert trio.current_time() == 6.0
        await trio.testing.wait_all_tasks_blocked()
        assert result == [1]
        assert connector.cancelled == 1
        stats = pool.statistics()
        assert (stats.keys["a"].idle, stats.keys["b"].idle) == (1, 1)
    assert_balanced(pool, connector)


class _Steps(trio.abc.Instrument):
    """Counts the scheduler's task steps: a task that loops without blocking makes many."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_prewarmed_connection_dying_unused_does_not_spin_the_timer() -> None:
    # A connection from prewarm() for a key never leased closes before use: the refill
    # backoff noted a retry for that key, which no refill pass looked at again (the key is
    # not in use), so the timer's next deadline stayed in the past and it woke on every
    # scheduler pass: a busy loop until the pool closed. Real time here: on the mocked
    # clock such a loop stops time itself.
    connector = FakeConnector()
    steps = _Steps()
    async with open_pool(connector, min_idle_per_key=1, idle_timeout=None) as pool:
        assert await pool.prewarm("a", 1) == 1
        connector.made[0].die()
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        try:
            await trio.sleep(1.5)  # past the 1 s backoff
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps < 100, steps.steps
        assert_stats(pool, connector, idle=0)
        # The key was never leased: nothing reopens it.
        assert len(connector.calls) == 1
    assert_balanced(pool, connector)
