"""The pool's cumulative statistics (connects, failures, leases, waits and their time) and the
instrument hooks that come with them (``waited``, ``pool_opened``, ``pool_closed``), on
trio's virtual clock so every wait is an exact number of seconds.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced

from trio_connpool import ConnectError, Instrument, Pool, PoolClosed, PoolTimeout, open_pool

FakePool = Pool[Hashable, FakeConnection]


class Recorder(Instrument):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.failures: list[tuple[str, Exception]] = []

    def waiting(self, key: Hashable) -> None:
        self.events.append(("waiting", key, trio.current_time()))

    def waited(self, key: Hashable, seconds: float) -> None:
        self.events.append(("waited", key, seconds))

    def pool_opened(self, pool: object) -> None:
        self.events.append(("pool_opened", pool))

    def pool_closed(self, pool: object) -> None:
        assert isinstance(pool, Pool)
        self.events.append(("pool_closed", pool, pool.statistics().connections))

    def hook_failed(self, hook: str, error: Exception) -> None:
        self.failures.append((hook, error))


async def test_cumulative_counts_after_a_known_workload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # t=0: A and B wait for "a" (one connection per key); A's connect fails at t=1, B's
    # starts then and succeeds at t=3. Then C finds B's connection idle (no wait), holds it,
    # and D waits for it 0.5 s and times out.
    connector = FakeConnector()
    connector.script(Step(delay=1.0, fail=OSError("refused")), Step(delay=2.0))
    recorder = Recorder()
    errors: list[BaseException] = []

    async def a(pool: FakePool) -> None:
        try:
            await pool.acquire("a")
        except ConnectError as exc:
            errors.append(exc)

    async def b(pool: FakePool) -> None:
        lease = await pool.acquire("a")
        pool.release(lease)

    async with open_pool(connector, max_connections_per_key=1, instruments=[recorder]) as pool:
        start = pool.statistics()
        assert (start.connects, start.connect_failures, start.leases_served) == (0, 0, 0)
        assert (start.waits, start.wait_time) == (0, 0.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a, pool)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(b, pool)
        assert trio.current_time() == 3.0
        assert len(errors) == 1
        lease = await pool.acquire("a")  # idle: no wait
        with pytest.raises(PoolTimeout):
            await pool.acquire("a", timeout=0.5)
        pool.release(lease)
        stats = pool.statistics()
        assert stats.connects == 1
        assert stats.connect_failures == 1
        assert stats.leases_served == 2
        assert stats.waits == 3
        assert stats.wait_time == pytest.approx(1.0 + 3.0 + 0.5)
        # The per-key snapshot is unchanged by them.
        assert stats.keys["a"].idle == 1
    waited = [event for event in recorder.events if event[0] == "waited"]
    assert waited == [
        ("waited", "a", pytest.approx(1.0)),
        ("waited", "a", pytest.approx(3.0)),
        ("waited", "a", pytest.approx(0.5)),
    ]
    assert len([event for event in recorder.events if event[0] == "waiting"]) == 3
    assert recorder.events[0] == ("pool_opened", pool)
    # pool_closed comes last, once every connection is closed.
    assert recorder.events[-1] == ("pool_closed", pool, 0)
    assert not recorder.failures
    assert_balanced(pool, connector)


async def test_a_cancelled_wait_is_counted_with_its_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=10.0))
    async with open_pool(connector) as pool:
        with trio.move_on_after(3.0):
            await pool.acquire("a")
        stats = pool.statistics()
        assert stats.waits == 1
        assert stats.wait_time == pytest.approx(3.0)
        assert stats.leases_served == 0
        # The connect goes on for whoever comes next: it is neither a success nor a failure
        # yet.
        assert (stats.connects, stats.connect_failures, stats.connecting) == (0, 0, 1)
        lease = await pool.acquire("a")
        pool.release(lease)
        stats = pool.statistics()
        assert stats.waits == 2
        assert stats.wait_time == pytest.approx(10.0)
        assert (stats.connects, stats.leases_served) == (1, 1)
    assert_balanced(pool, connector)


async def test_connects_cancelled_by_the_closing_pool_count_as_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=10.0))
    closed: list[str] = []

    async def wait(pool: FakePool, key: str) -> None:
        with pytest.raises(PoolClosed):
            await pool.acquire(key)
        closed.append(key)

    async with open_pool(connector) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(wait, pool, "a")
        nursery.start_soon(wait, pool, "b")
        await trio.testing.wait_all_tasks_blocked()
        await pool.aclose()
    assert sorted(closed) == ["a", "b"]
    stats = pool.statistics()
    assert stats.closed
    assert (stats.connects, stats.connect_failures, stats.waits) == (0, 2, 2)


async def test_leases_served_counts_every_lease_of_a_multiplexed_connection() -> None:
    connector = FakeConnector(Step(capacity=3))
    async with open_pool(connector) as pool:
        leases = [await pool.acquire("a") for _ in range(3)]
        assert pool.statistics().leases_served == 3
        for lease in leases:
            pool.release(lease)
        lease = pool.acquire_nowait("a")
        pool.release(lease)
        stats = pool.statistics()
        # The first acquire waited for the connect; the others found room at once.
        assert (stats.leases_served, stats.waits, stats.connects) == (4, 1, 1)
    assert_balanced(pool, connector)


async def test_a_raising_waited_hook_is_reported_and_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Broken(Recorder):
        def waited(self, key: Hashable, seconds: float) -> None:
            raise RuntimeError("boom")

    broken = Broken()
    connector = FakeConnector(Step(delay=1.0))
    async with open_pool(connector, instruments=[broken]) as pool:
        lease = await pool.acquire("a")
        pool.release(lease)
        assert pool.statistics().waits == 1
    assert [hook for hook, _ in broken.failures] == ["waited"]
    assert_balanced(pool, connector)


async def test_hooks_set_on_the_instance_are_called_and_others_alongside(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The pool calls only the hooks an instrument overrides: on its class, or on the
    instance (set in ``__init__``). Two instruments each see their own."""
    acquired: list[Hashable] = []

    class OnInstance(Instrument):
        def __init__(self) -> None:
            self.lease_acquired = lambda key, connection: acquired.append(key)  # type: ignore[method-assign]

    recorder = Recorder()
    async with open_pool(
        FakeConnector(Step(delay=1.0)), instruments=[OnInstance(), recorder]
    ) as pool:
        pool.release(await pool.acquire("a"))
        pool.release(await pool.acquire("a"))
    assert acquired == ["a", "a"]
    assert [event[0] for event in recorder.events if event[0] in ("waiting", "waited")] == [
        "waiting",
        "waited",
    ]
