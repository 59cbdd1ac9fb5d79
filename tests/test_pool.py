"""The trio driver: open_pool, create_pool, Pool.acquire/release/lease/statistics/aclose.

Everything runs on pytest-trio's ``autojump_clock`` where time matters, so delays, timeouts
and expiries are asserted at exact virtual times; quiescence is reached with
``wait_all_tasks_blocked``. Connections come from ``FakeConnector`` and every test that exits
its pool checks that each connection made was closed exactly once.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Hashable

import pytest
import trio
import trio.testing
from _fakes import (
    BackgroundConnection,
    FakeConnection,
    FakeConnector,
    Step,
    assert_balanced,
    assert_stats,
)

from trio_connpool import (
    ConnectError,
    Instrument,
    Lease,
    Pool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ReleasePolicy,
    Reservation,
    TooManyWaiters,
    create_pool,
    open_pool,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

FakePool = Pool[Hashable, FakeConnection]
FakeLease = Lease[Hashable, FakeConnection]


async def hold(
    pool: FakePool,
    key: Hashable,
    got: list[FakeLease],
    release: trio.Event,
) -> None:
    """Lease a connection, report it in ``got``, and give it back when ``release`` is set."""
    lease = await pool.acquire(key)
    got.append(lease)
    await release.wait()
    pool.release(lease)


# ---------------------------------------------------------------------- basics


async def test_lease_round_trip_and_reuse(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        seen = []
        for _ in range(10):
            async with pool.lease("a") as connection:
                assert isinstance(connection, FakeConnection)
                assert_stats(pool, idle=0, in_use=1, leases=1, waiting=0, weight=1)
                seen.append(connection)
            assert_stats(pool, connector, idle=1, in_use=0, leases=0, connecting=0)
        assert len(connector.made) == 1
        assert seen == [connector.made[0]] * 10
        assert connector.calls == ["a"]
        stats = pool.statistics()
        assert stats.keys["a"].idle == 1
        assert stats.max_connections == 100
        assert not stats.closed and not pool.closed
    assert pool.statistics().closed
    assert_balanced(pool, connector)


async def test_lease_is_reused_flag() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        first = await pool.acquire("a")
        assert not first.is_reused
        assert first.key == "a"
        pool.release(first)
        second = await pool.acquire("a")
        assert second.is_reused
        assert second.connection is first.connection
        pool.release(second)
    assert_balanced(pool, connector)


async def test_concurrent_leases_bounded_by_max_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=0.5))
    active = 0
    peak = 0

    async def worker(pool: FakePool) -> None:
        nonlocal active, peak
        async with pool.lease("a"):
            active += 1
            peak = max(peak, active)
            stats = pool.statistics()
            assert stats.connections + stats.connecting <= 3
            await trio.sleep(1)
            active -= 1

    async with open_pool(connector, max_connections=3) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(worker, pool)
        assert peak == 3
        assert len(connector.made) == 3
        # 0.5 s to connect, then four rounds of 1 s (3 + 3 + 3 + 1).
        assert trio.current_time() == pytest.approx(4.5)
        assert_stats(pool, connector, idle=3, in_use=0, waiting=0, leases=0)
    assert_balanced(pool, connector)


async def test_acquire_timeout_is_exact_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1, acquire_timeout=5.0) as pool:
        held = await pool.acquire("a")
        start = trio.current_time()
        with pytest.raises(PoolTimeout) as info:
            await pool.acquire("a")
        assert trio.current_time() == start + 5.0
        assert info.value.key == "a"
        assert isinstance(info.value, PoolError)
        assert_stats(pool, connector, waiting=0, leases=1, connecting=0, idle=0)
        pool.release(held)
        assert_stats(pool, connector, waiting=0, leases=0, idle=1)
    assert_balanced(pool, connector)


async def test_per_call_timeout_overrides_the_pool_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1, acquire_timeout=5.0) as pool:
        held = await pool.acquire("a")
        start = trio.current_time()
        with pytest.raises(PoolTimeout):
            await pool.acquire("a", timeout=2.0)
        assert trio.current_time() == start + 2.0
        with pytest.raises(PoolTimeout):
            async with pool.lease("a", timeout=0):
                pytest.fail("unreachable")  # pragma: no cover
        assert trio.current_time() == start + 2.0

        async def release_later() -> None:
            await trio.sleep(10)
            pool.release(held)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_later)
            lease = await pool.acquire("a", timeout=None)  # Longer than the default 5 s.
        assert trio.current_time() == start + 12.0
        assert lease.connection is held.connection
        pool.release(lease)
        assert_stats(pool, connector, waiting=0, leases=0, idle=1)
    assert_balanced(pool, connector)


@pytest.mark.parametrize(
    ("policy", "order"), [(ReleasePolicy.LIFO, [2, 1, 0]), (ReleasePolicy.FIFO, [0, 1, 2])]
)
async def test_release_policy_through_the_pool(policy: ReleasePolicy, order: list[int]) -> None:
    connector = FakeConnector()
    async with open_pool(connector, release_policy=policy) as pool:
        leases = [await pool.acquire("a") for _ in range(3)]
        assert len(connector.made) == 3
        for lease in leases:  # Released in the order they were made.
            pool.release(lease)
        again = [await pool.acquire("a") for _ in range(3)]
        assert [connector.made.index(lease.connection) for lease in again] == order
        for lease in again:
            pool.release(lease)
    assert_balanced(pool, connector)


async def test_waiters_are_served_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    served: list[int] = []

    async def waiter(pool: FakePool, index: int) -> None:
        async with pool.lease("a"):
            served.append(index)
            await trio.sleep(1)

    async with open_pool(connector, max_connections_per_key=1) as pool:
        held = await pool.acquire("a")
        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(waiter, pool, index)
                await trio.testing.wait_all_tasks_blocked()  # It has queued: arrival fixed.
                assert pool.statistics().waiting == index + 1
            pool.release(held)
        assert served == list(range(10))
        assert len(connector.made) == 1
        assert trio.current_time() == 10.0
    assert_balanced(pool, connector)


async def test_global_limit_evicts_the_lru_idle_connection_of_another_key() -> None:
    connector = FakeConnector()
    async with open_pool(connector, max_connections=2) as pool:
        a1 = await pool.acquire("a")
        a2 = await pool.acquire("a")
        pool.release(a1)  # Least recently used.
        pool.release(a2)
        async with pool.lease("b") as b_conn:
            assert b_conn.key == "b"
            await trio.testing.wait_all_tasks_blocked()
            assert a1.connection.closed
            assert not a2.connection.closed
            stats = pool.statistics()
            assert stats.keys["a"].idle == 1
            assert stats.keys["b"].in_use == 1
            assert stats.weight == 2
        assert_stats(pool, connector, idle=2, weight=2)
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- capacity and weight


async def test_capacity_change_through_the_state_callback() -> None:
    connector = FakeConnector(Step(capacity=2))
    async with open_pool(connector, max_connections_per_key=1) as pool:
        release = trio.Event()
        got: list[FakeLease] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(hold, pool, "a", got, release)
            await trio.testing.wait_all_tasks_blocked()
            (conn,) = connector.made
            assert len(got) == 2
            assert_stats(pool, connector, in_use=1, leases=2, waiting=1)
            conn.set_capacity(3)  # The waiter is served at once.
            await trio.testing.wait_all_tasks_blocked()
            assert len(got) == 3
            assert_stats(pool, connector, in_use=1, leases=3, waiting=0)
            # Lowered below the leases in flight: new leases wait, nothing is lost.
            conn.set_capacity(1)
            late: list[FakeLease] = []
            late_release = trio.Event()
            nursery.start_soon(hold, pool, "a", late, late_release)
            await trio.testing.wait_all_tasks_blocked()
            assert late == []
            assert_stats(pool, connector, leases=3, waiting=1)
            for lease in got[:2]:
                pool.release(lease)
            await trio.testing.wait_all_tasks_blocked()
            assert late == []  # One lease left, capacity 1: still full.
            assert_stats(pool, connector, leases=1, waiting=1)
            pool.release(got[2])
            await trio.testing.wait_all_tasks_blocked()
            assert [lease.connection for lease in late] == [conn]
            assert_stats(pool, connector, leases=1, waiting=0)
            release.set()  # Their releases are no-ops now.
            late_release.set()
        assert_stats(pool, connector, idle=1, leases=0, waiting=0)
        assert len(connector.made) == 1
    assert_balanced(pool, connector)


async def test_go_away_and_die_through_the_state_callback() -> None:
    connector = FakeConnector(Step(capacity=2))
    async with open_pool(connector) as pool:
        lease = await pool.acquire("a")
        conn = lease.connection
        conn.go_away()  # No new leases on it: the next acquire makes a new connection.
        other = await pool.acquire("a")
        assert other.connection is not conn
        conn.die()  # Dropped at once and closed, though leased.
        await trio.testing.wait_all_tasks_blocked()
        assert conn.closed
        assert_stats(pool, connector, in_use=1, leases=1)
        pool.release(lease)  # No-op.
        pool.release(other)
        assert_stats(pool, connector, idle=1, leases=0)
    assert_balanced(pool, connector)


async def test_weight_is_corrected_once_the_connection_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    known: dict[Hashable, Reservation] = {}

    def reserve(key: Hashable) -> Reservation:
        return known.get(key, Reservation(weight=4, capacity=10))

    class LearningConnector(FakeConnector):
        async def __call__(self, key: Hashable) -> FakeConnection:
            connection = await super().__call__(key)
            known[key] = Reservation(weight=1, capacity=1)  # It speaks HTTP/1.1 after all.
            return connection

    connector = LearningConnector(Step(delay=1.0))
    release = trio.Event()
    got: list[FakeLease] = []
    async with open_pool(connector, max_connections_per_key=4, reserve=reserve) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(hold, pool, "a", got, release)
            await trio.testing.wait_all_tasks_blocked()
            assert connector.calls == ["a"]  # One connect for ten waiters.
            assert_stats(pool, connector, connecting=1, waiting=10, weight=4)
            await trio.sleep(1)
            await trio.testing.wait_all_tasks_blocked()
            # Corrected to weight 1: three more connects start, up to the per-key limit.
            assert len(connector.calls) == 4
            assert len(got) == 1
            assert_stats(pool, connector, in_use=1, connecting=3, waiting=9, weight=4)
            await trio.sleep(1)
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() == 2.0
            assert len(got) == 4
            assert_stats(pool, connector, in_use=4, connecting=0, waiting=6, weight=4)
            release.set()
        assert len(got) == 10
        assert len(connector.made) == 4
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- errors


async def test_connect_failure_raises_connect_error_for_its_waiter_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cause = OSError("connection refused")
    connector = FakeConnector()
    connector.script(Step(delay=1.0, fail=cause), Step(delay=2.0))
    outcomes: dict[str, object] = {}

    async def first(pool: FakePool) -> None:
        try:
            await pool.acquire("a")
        except ConnectError as exc:
            outcomes["first"] = exc

    async def second(pool: FakePool) -> None:
        lease = await pool.acquire("a")
        outcomes["second"] = lease.connection
        pool.release(lease)

    async with open_pool(connector) as pool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first, pool)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second, pool)
        error = outcomes["first"]
        assert isinstance(error, ConnectError)
        assert error.__cause__ is cause
        assert error.key == "a"
        assert outcomes["second"] is connector.made[0]
        assert trio.current_time() == 2.0
        assert_stats(pool, connector, idle=1, waiting=0, connecting=0, weight=1)
    assert_balanced(pool, connector)


@pytest.mark.parametrize("clean", [False, True])
async def test_exception_in_a_lease_closes_the_connection_unless_clean(clean: bool) -> None:
    connector = FakeConnector(Step(clean=clean))
    async with open_pool(connector) as pool:
        with pytest.raises(KeyError):
            async with pool.lease("a"):
                raise KeyError("boom")
        await trio.testing.wait_all_tasks_blocked()
        (conn,) = connector.made
        assert conn.closed is not clean
        assert_stats(pool, connector, idle=1 if clean else 0, leases=0)
    assert_balanced(pool, connector)


async def test_cancelled_lease_body_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        with trio.move_on_after(1) as scope:
            async with pool.lease("a"):
                await trio.sleep_forever()
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert connector.made[0].closed
        assert_stats(pool, connector, idle=0, leases=0, weight=0)
    assert_balanced(pool, connector)


async def test_user_exception_comes_out_of_open_pool_unwrapped() -> None:
    connector = FakeConnector()
    with pytest.raises(ValueError, match="mine") as info:
        async with open_pool(connector) as pool, pool.lease("a"):
            raise ValueError("mine")
    assert type(info.value) is ValueError
    assert_balanced(pool, connector)
    assert len(connector.made) == 1


async def test_cancelled_block_is_not_turned_into_pool_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: cancelling the open_pool block from outside also cancelled the pool's own
    tasks; their Cancelled made the group look like an internal failure, so the caller got
    PoolError instead of a cancellation its cancel scope would catch."""
    connector = FakeConnector()
    with trio.move_on_after(1) as scope:
        async with open_pool(connector) as pool:
            _lease = await pool.acquire("a")  # held until the pool closes
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert_balanced(pool, connector)


async def test_internal_failure_is_a_pool_error_chained_from_the_group() -> None:
    class BrokenBackground(FakeConnector):
        async def __call__(self, key: Hashable) -> FakeConnection:
            connection = await super().__call__(key)

            async def run_background() -> None:
                raise BaseException("escapes the pool's task")

            connection.run_background = run_background  # type: ignore[attr-defined]
            return connection

    connector = BrokenBackground()
    with pytest.raises(PoolError) as info:
        async with open_pool(connector) as pool:
            _lease = await pool.acquire("a")  # held until the pool closes
            await trio.sleep_forever()
    assert isinstance(info.value.__cause__, BaseExceptionGroup)
    assert connector.all_closed()


async def test_options_are_validated_at_once() -> None:
    connector = FakeConnector()
    with pytest.raises(ValueError):
        async with open_pool(connector, max_connections=0):
            pytest.fail("unreachable")  # pragma: no cover
    with pytest.raises(ValueError):
        async with open_pool(connector, acquire_timeout=-1):
            pytest.fail("unreachable")  # pragma: no cover
    with pytest.raises(TypeError):
        async with open_pool(connector, close_timeout=None):  # type: ignore[arg-type]
            pytest.fail("unreachable")  # pragma: no cover
    with pytest.raises(TypeError):
        async with open_pool(connector, instruments=[object()]):  # type: ignore[list-item]
            pytest.fail("unreachable")  # pragma: no cover
    with pytest.raises(TypeError):
        async with open_pool("not callable"):  # type: ignore[arg-type]
            pytest.fail("unreachable")  # pragma: no cover
    assert connector.calls == []


# ---------------------------------------------------------------------- closing


async def test_pool_exit_fails_waiters_and_cancels_connects() -> None:
    gate = trio.Event()  # Never set: the connector hangs.
    connector = FakeConnector(Step(gate=gate))
    errors: list[BaseException] = []

    async def waiter(pool: FakePool) -> None:
        try:
            await pool.acquire("a")
        except PoolClosed as exc:
            errors.append(exc)

    async with (
        trio.open_nursery() as nursery,
        open_pool(connector, max_connections_per_key=1) as pool,
    ):
        for _ in range(3):
            nursery.start_soon(waiter, pool)
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, waiting=3, connecting=1)
    assert len(errors) == 3
    assert all(isinstance(e, PoolClosed) and e.key == "a" for e in errors)
    assert connector.cancelled == 1
    assert connector.made == []
    assert_balanced(pool, connector)


async def test_pool_exit_does_not_wait_for_a_lease_held_outside(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    release = trio.Event()
    got: list[FakeLease] = []
    async with trio.open_nursery() as nursery:
        async with open_pool(connector) as pool:
            nursery.start_soon(hold, pool, "a", got, release)
            await trio.testing.wait_all_tasks_blocked()
            assert len(got) == 1
        assert trio.current_time() == 0.0  # Exit did not wait for the lease.
        (lease,) = got
        assert lease.connection.closed
        assert_balanced(pool, connector)
        release.set()  # Releasing afterwards is a no-op.
    assert lease.released
    assert_balanced(pool, connector)
    with trio.testing.assert_no_checkpoints():
        pool.release(lease)


async def test_hanging_close_is_made_forceful_after_close_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(hang_on_close=True))
    async with open_pool(connector, close_timeout=2.0) as pool:
        async with pool.lease("a"):
            pass
        start = trio.current_time()
    assert trio.current_time() == start + 2.0
    (conn,) = connector.made
    assert conn.close_cancelled
    assert conn.aclose_calls == 2  # Graceful, then forceful.
    assert_balanced(pool, connector)


async def test_acquire_on_a_closed_pool_raises_pool_closed() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        pass
    with pytest.raises(PoolClosed):
        await pool.acquire("a")
    with pytest.raises(PoolClosed) as info:
        async with pool.lease("a"):
            pytest.fail("unreachable")  # pragma: no cover
    assert info.value.key == "a"
    await pool.aclose()  # Idempotent.
    assert connector.calls == []


async def test_max_waiters_raises_too_many_waiters_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    release = trio.Event()
    got: list[FakeLease] = []
    async with open_pool(connector, max_connections_per_key=1, max_waiters=2) as pool:
        held = await pool.acquire("a")
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(hold, pool, "a", got, release)
            await trio.testing.wait_all_tasks_blocked()
            assert_stats(pool, connector, leases=1, waiting=2)
            start = trio.current_time()
            with pytest.raises(TooManyWaiters) as info:
                await pool.acquire("a")
            assert trio.current_time() == start  # At once.
            assert info.value.key == "a"
            assert_stats(pool, connector, leases=1, waiting=2)
            pool.release(held)
            release.set()
        assert len(got) == 2
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- expiry


async def test_idle_timeout_closes_at_the_exact_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector, idle_timeout=10.0) as pool:
        async with pool.lease("a"):
            await trio.sleep(3)
        (conn,) = connector.made
        await trio.sleep(9.5)
        assert not conn.closed
        await trio.sleep(1)
        assert conn.closed_at == pytest.approx(13.0, abs=1e-9)
        assert_stats(pool, connector, idle=0, weight=0)
        assert dict(pool.statistics().keys) == {}
        # A new lease makes a new connection.
        async with pool.lease("a") as again:
            assert again is not conn
    assert_balanced(pool, connector)


async def test_reuse_postpones_the_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector()
    async with open_pool(connector, idle_timeout=10.0) as pool:
        for _ in range(5):
            async with pool.lease("a"):
                pass
            await trio.sleep(8)
        assert len(connector.made) == 1
        (conn,) = connector.made
        assert not conn.closed
        assert trio.current_time() == 40.0  # Released last at 32.
        await trio.sleep(5)
        assert conn.closed_at == pytest.approx(42.0, abs=1e-9)
    assert_balanced(pool, connector)


async def test_max_lifetime_with_seeded_jitter(autojump_clock: trio.testing.MockClock) -> None:
    expected = 100.0 * (1.0 - random.Random(3).random() * 0.1)
    connector = FakeConnector()
    async with open_pool(
        connector, idle_timeout=None, max_lifetime=100.0, rng=random.Random(3)
    ) as pool:
        async with pool.lease("a"):
            pass
        await trio.sleep(200)
        (conn,) = connector.made
        assert conn.closed_at == pytest.approx(expected, abs=1e-9)
        assert 90.0 <= expected <= 100.0
    assert_balanced(pool, connector)


async def test_max_lifetime_of_a_leased_connection_ends_at_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(
        connector, idle_timeout=None, max_lifetime=10.0, lifetime_jitter=0
    ) as pool:
        lease = await pool.acquire("a")
        await trio.sleep(15)
        assert not lease.connection.closed  # Never closed under its user.
        async with pool.lease("a") as other:  # Retired: takes no new lease.
            assert other is not lease.connection
        pool.release(lease)
        await trio.testing.wait_all_tasks_blocked()
        assert lease.connection.closed_at == 15.0
        assert_stats(pool, connector, idle=1, leases=0)
    assert_balanced(pool, connector)


async def test_dead_connections_are_dropped_at_hand_out() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        async with pool.lease("a") as first:
            pass
        first.dead = True  # Silently: no state callback.
        assert_stats(pool, idle=1)
        async with pool.lease("a") as second:
            assert second is not first
            assert not second.is_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert first.closed
        assert first.aclose_calls == 1
        assert_stats(pool, connector, idle=1)
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- background tasks


async def test_background_task_runs_in_the_pool_and_is_cancelled_on_close() -> None:
    connector = FakeConnector(Step(background=True))
    async with open_pool(connector) as pool:
        with pytest.raises(RuntimeError):
            async with pool.lease("a") as conn:
                assert isinstance(conn, BackgroundConnection)
                await trio.testing.wait_all_tasks_blocked()
                assert conn.background_started
                raise RuntimeError("the exchange broke")
        await trio.testing.wait_all_tasks_blocked()
        assert isinstance(conn, BackgroundConnection)
        assert conn.background_cancelled
        assert conn.closed
        async with pool.lease("a") as idle_one:
            pass
        assert isinstance(idle_one, BackgroundConnection)
    assert idle_one.background_cancelled  # Pool exit cancels it too.
    assert_balanced(pool, connector)


async def test_background_task_ending_drops_the_connection() -> None:
    connector = FakeConnector(Step(background=True))
    async with open_pool(connector) as pool:
        async with pool.lease("a") as conn:
            pass
        assert isinstance(conn, BackgroundConnection)
        conn.end_background()  # The peer went away.
        await trio.testing.wait_all_tasks_blocked()
        assert conn.background_finished
        assert conn.closed
        assert_stats(pool, connector, idle=0, weight=0)
        async with pool.lease("a") as fresh:
            assert fresh is not conn
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- instruments


class Recorder(Instrument):
    def __init__(self) -> None:
        self.events: list[tuple[str, Hashable]] = []

    def connect_started(self, key: Hashable) -> None:
        self.events.append(("connect_started", key))

    def connect_succeeded(self, key: Hashable, connection: object) -> None:
        self.events.append(("connect_succeeded", key))

    def connect_failed(self, key: Hashable, error: BaseException | None) -> None:
        self.events.append(("connect_failed", key))

    def waiting(self, key: Hashable) -> None:
        self.events.append(("waiting", key))

    def lease_acquired(self, key: Hashable, connection: object) -> None:
        self.events.append(("lease_acquired", key))

    def lease_released(self, key: Hashable, connection: object) -> None:
        self.events.append(("lease_released", key))

    def connection_closed(self, key: Hashable, connection: object) -> None:
        self.events.append(("connection_closed", key))

    def hook_failed(self, hook: str, error: Exception) -> None:
        self.events.append(("hook_failed", hook))


class Broken(Instrument):
    def lease_acquired(self, key: Hashable, connection: object) -> None:
        raise RuntimeError("a broken hook")


async def test_instrument_hooks_are_called_in_order() -> None:
    connector = FakeConnector()
    connector.script(Step(fail=OSError("refused")))
    recorder = Recorder()
    async with open_pool(connector, instruments=[recorder, Broken()]) as pool:
        with pytest.raises(ConnectError):
            await pool.acquire("a")
        async with pool.lease("a"):
            pass
        async with pool.lease("a"):
            pass
    assert recorder.events == [
        ("waiting", "a"),
        ("connect_started", "a"),
        ("connect_failed", "a"),
        ("waiting", "a"),
        ("connect_started", "a"),
        ("connect_succeeded", "a"),
        ("lease_acquired", "a"),
        ("hook_failed", "lease_acquired"),
        ("lease_released", "a"),
        ("lease_acquired", "a"),  # Fast path: no waiting.
        ("hook_failed", "lease_acquired"),
        ("lease_released", "a"),
        ("connection_closed", "a"),
    ]
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- create_pool


async def test_create_pool_in_the_callers_nursery_then_aclose() -> None:
    connector = FakeConnector()
    async with trio.open_nursery() as nursery:
        pool: FakePool = await create_pool(nursery, connector, max_connections=5)
        assert pool.statistics().max_connections == 5
        async with pool.lease("a") as conn:
            assert conn.key == "a"
        await pool.aclose()
        assert pool.closed
        with pytest.raises(PoolClosed):
            await pool.acquire("a")
    assert_balanced(pool, connector)


async def test_create_pool_closes_when_its_nursery_is_cancelled() -> None:
    connector = FakeConnector()
    async with trio.open_nursery() as nursery:
        pool: FakePool = await create_pool(nursery, connector)
        async with pool.lease("a"):
            pass
        nursery.cancel_scope.cancel()
    assert pool.closed
    assert_balanced(pool, connector)


async def test_pool_not_running_refuses_acquire() -> None:
    pool: FakePool = Pool(FakeConnector())
    with pytest.raises(PoolClosed):
        await pool.acquire("a")
    await pool.aclose()
    assert pool.closed


# ---------------------------------------------------------------------- checkpoints


async def test_checkpoints() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        with trio.testing.assert_checkpoints():
            lease = await pool.acquire("a")  # Slow path: connects.
        with trio.testing.assert_no_checkpoints():
            pool.release(lease)
        with trio.testing.assert_checkpoints():
            lease = await pool.acquire("a")  # Fast path: an idle connection.
        with trio.testing.assert_no_checkpoints():
            pool.release(lease, discard=True)
        with trio.testing.assert_no_checkpoints():
            pool.release(lease)  # Twice.
        with trio.testing.assert_checkpoints():
            await pool.aclose()
        with trio.testing.assert_checkpoints():
            await pool.aclose()  # Already closed.
    assert_balanced(pool, connector)


# ---------------------------------------------------------------------- the two halves of acquire


async def test_try_acquire_then_acquire_in_line_by_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The halves a caller that does I/O next uses: no checkpoint on a hit, a wait by the
    caller's own deadline (one budget for several waits) on a miss."""
    connector = FakeConnector()
    async with open_pool(connector, max_connections=1) as pool:
        with trio.testing.assert_no_checkpoints():
            assert pool.try_acquire("a") is None  # Nothing idle: nothing started either.
        assert_stats(pool, connecting=0, waiting=0)
        with trio.testing.assert_checkpoints():
            lease = await pool.acquire_in_line("a", None)  # Connects for it.
        with trio.testing.assert_no_checkpoints():
            assert pool.try_acquire("a") is None  # Leased: none idle.
        start = trio.current_time()
        with pytest.raises(PoolTimeout, match="within 10 s"):
            await pool.acquire_in_line("a", 10, start + 3)  # The deadline decides.
        assert trio.current_time() == start + 3
        with pytest.raises(TypeError, match="NaN"):
            await pool.acquire_in_line("a", 10, float("nan"))
        with pytest.raises(TypeError, match="not NaN"):
            await pool.acquire_in_line("a", 10, "soon")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await pool.acquire_in_line("a", "10")  # type: ignore[arg-type]
        assert_stats(pool, waiting=0)
        pool.release(lease)
        with trio.testing.assert_no_checkpoints():
            again = pool.try_acquire("a")
        assert again is not None and again.connection is lease.connection
        pool.release(again)
        with trio.testing.assert_checkpoints():
            third = await pool.acquire_in_line("a", 5)  # Idle: served through the line.
        assert third.connection is lease.connection
        pool.release(third)
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire_in_line("a", 5)  # Served as it joins, but cancelled: given back.
        assert scope.cancelled_caught
        assert_stats(pool, idle=1, in_use=0, leases=0, waiting=0)
    with pytest.raises(PoolClosed):
        pool.try_acquire("a")
    assert_balanced(pool, connector)
