"""Cancellation at every await of acquire and connect: nothing leaks, nothing is lost.

Each test checks the statistics right after the cancellation and, after the pool exits, that
every connection the connector made was closed exactly once.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced, assert_stats

from trio_connpool import (
    ConnectError,
    Lease,
    Pool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    create_pool,
    open_pool,
)

FakePool = Pool[Hashable, FakeConnection]
FakeLease = Lease[Hashable, FakeConnection]


async def test_cancel_while_parked_then_the_connect_goes_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=5.0))
    async with open_pool(connector) as pool:
        with trio.move_on_after(1) as scope:
            await pool.acquire("a")
        assert scope.cancelled_caught
        assert_stats(pool, connector, waiting=0, connecting=1, leases=0, weight=1)
        await trio.sleep(10)
        # Late binding: the connect finished without its requester and went idle.
        assert_stats(pool, connector, waiting=0, connecting=0, idle=1, leases=0, weight=1)
        async with pool.lease("a") as conn:
            assert conn is connector.made[0]
        assert len(connector.calls) == 1
    assert_balanced(pool, connector)


async def test_cancel_while_parked_hands_the_connect_to_the_next_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(delay=5.0))
    got: list[FakeLease] = []

    async def patient(pool: FakePool) -> None:
        lease = await pool.acquire("a")
        got.append(lease)
        pool.release(lease)

    async with open_pool(connector, max_connections_per_key=1) as pool:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(1):
                nursery.start_soon(patient, pool)
                await pool.acquire("a")  # Second in line? No: first, the task starts later.
        assert len(got) == 1
        assert trio.current_time() == 5.0
        assert connector.calls == ["a"]  # No redundant connect for the second waiter.
        assert got[0].connection is connector.made[0]
        assert_stats(pool, connector, idle=1, waiting=0, connecting=0)
    assert_balanced(pool, connector)


async def test_cancel_a_waiter_among_several(autojump_clock: trio.testing.MockClock) -> None:
    connector = FakeConnector(Step(delay=5.0))
    order: list[int] = []

    async def waiter(pool: FakePool, index: int, cancel_at: float | None) -> None:
        with trio.move_on_at(cancel_at if cancel_at is not None else float("inf")):
            async with pool.lease("a"):
                order.append(index)
                await trio.sleep(1)

    async with open_pool(connector, max_connections_per_key=1) as pool:
        async with trio.open_nursery() as nursery:
            for index, cancel_at in enumerate([None, 2.0, None, 3.0, None]):
                nursery.start_soon(waiter, pool, index, cancel_at)
                await trio.testing.wait_all_tasks_blocked()
            assert_stats(pool, connector, waiting=5, connecting=1)
            await trio.sleep(3.5)
            assert_stats(pool, connector, waiting=3, connecting=1)
        assert order == [0, 2, 4]
        assert trio.current_time() == 8.0
        assert_stats(pool, connector, idle=1, waiting=0, leases=0)
    assert_balanced(pool, connector)


async def test_cancelled_at_the_fast_path_checkpoint_takes_no_lease() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        async with pool.lease("a"):
            pass
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire("a")
            pytest.fail("acquire did not raise Cancelled")  # pragma: no cover
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            async with pool.lease("a"):
                pytest.fail("entered the block")  # pragma: no cover
        assert scope.cancelled_caught
        assert_stats(pool, connector, idle=1, leases=0, waiting=0)
        assert not connector.made[0].closed
    assert_balanced(pool, connector)


async def test_cancelled_before_the_slow_path_starts_no_connect() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire("a")
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert connector.calls == []
        assert_stats(pool, connector, idle=0, connecting=0, waiting=0, weight=0)
        assert dict(pool.statistics().keys) == {}
    assert_balanced(pool, connector)


async def test_cancelling_the_waiter_leaves_the_connect_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    connector = FakeConnector(Step(gate=gate))
    async with open_pool(connector) as pool:
        with trio.move_on_after(1) as scope:
            await pool.acquire("a")
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        # The connect runs in the pool's nursery, not the waiter's: it goes on.
        assert connector.in_flight == 1
        assert connector.cancelled == 0
        assert_stats(pool, connector, waiting=0, connecting=1)
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, waiting=0, connecting=0, idle=1)
    assert_balanced(pool, connector)


async def test_cancelling_the_pool_during_a_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(gate=trio.Event()))  # Never answers.
    with trio.move_on_after(1) as scope:
        async with open_pool(connector) as pool:
            await pool.acquire("a")
    assert scope.cancelled_caught
    assert connector.cancelled == 1
    assert connector.made == []
    assert_balanced(pool, connector)


async def test_cancelled_connects_fail_outside_waiters_with_pool_closed_not_connect_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: when the nursery running a pool (create_pool) was cancelled, a connect task
    could see its Cancelled before the pool closed its state; its waiters then got
    ``ConnectError("connect was cancelled")`` and new connects were started in the dying
    nursery. The order of the two is up to trio's scheduler, so the scenario runs 8 times."""

    async def waiter(pool: FakePool, errors: list[BaseException]) -> None:
        try:
            await pool.acquire("a")
        except PoolError as exc:
            errors.append(exc)

    for _ in range(8):
        connector = FakeConnector(Step(gate=trio.Event()))  # Never answers.
        errors: list[BaseException] = []
        async with trio.open_nursery() as outside, trio.open_nursery() as pool_nursery:
            pool: FakePool = await create_pool(pool_nursery, connector)
            for _ in range(3):
                outside.start_soon(waiter, pool, errors)
            await trio.testing.wait_all_tasks_blocked()
            assert_stats(pool, connector, waiting=3, connecting=3)
            pool_nursery.cancel_scope.cancel()
        assert [type(e) for e in errors] == [PoolClosed] * 3
        assert connector.cancelled == 3
        assert len(connector.calls) == 3
        assert_balanced(pool, connector)


@pytest.mark.parametrize("attempt", range(4))
async def test_timeout_racing_with_a_release_at_the_same_instant(
    attempt: int, autojump_clock: trio.testing.MockClock
) -> None:
    connector = FakeConnector()
    results: list[object] = []
    async with open_pool(connector, max_connections=1) as pool:
        held = await pool.acquire("a")

        async def release_at_five() -> None:
            await trio.sleep(5)
            pool.release(held)

        async def acquire_with_timeout() -> None:
            try:
                lease = await pool.acquire("a", timeout=5)
            except PoolTimeout:
                results.append("timeout")
                assert pool.statistics().waiting == 0
            else:
                results.append(lease)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_at_five)
            nursery.start_soon(acquire_with_timeout)
        assert trio.current_time() == 5.0
        (result,) = results
        stats = pool.statistics()
        # Either the waiter has it or it sits idle: never lost.
        if isinstance(result, Lease):
            assert (stats.leases, stats.idle) == (1, 0)
            pool.release(result)
        else:
            assert result == "timeout"
            assert (stats.leases, stats.idle) == (0, 1)
        assert_stats(pool, connector, idle=1, leases=0, waiting=0)
    assert_balanced(pool, connector)


@pytest.mark.parametrize("release_first", [True, False])
async def test_cancel_and_release_in_the_same_step(release_first: bool) -> None:
    connector = FakeConnector()
    results: list[object] = []
    async with open_pool(connector, max_connections=1) as pool:
        held = await pool.acquire("a")
        scope = trio.CancelScope()

        async def waiter() -> None:
            with scope:
                results.append(await pool.acquire("a"))
            if scope.cancelled_caught:
                results.append("cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert_stats(pool, connector, waiting=1, leases=1)
            if release_first:
                pool.release(held)  # Handed straight to the waiter...
                scope.cancel()  # ...which keeps it: it was delivered before the cancel.
            else:
                scope.cancel()  # Withdrawn at once...
                pool.release(held)  # ...so the connection goes idle.
        if release_first:
            (lease,) = results
            assert isinstance(lease, Lease)
            assert lease.connection is held.connection
            assert_stats(pool, connector, leases=1, idle=0, waiting=0)
            pool.release(lease)
        else:
            assert results == ["cancelled"]
        assert_stats(pool, connector, leases=0, idle=1, waiting=0)
    assert_balanced(pool, connector)


async def test_connect_failing_at_the_instant_its_waiter_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    connector.script(Step(delay=1.0, fail=OSError("refused")))
    outcomes: list[str] = []
    async with open_pool(connector) as pool:
        with trio.move_on_after(1) as scope:
            try:
                await pool.acquire("a")
            except ConnectError:
                outcomes.append("connect error")
        if scope.cancelled_caught:
            outcomes.append("cancelled")
        assert len(outcomes) == 1  # One or the other, exactly once.
        await trio.testing.wait_all_tasks_blocked()
        assert_stats(pool, connector, waiting=0, connecting=0, idle=0, weight=0)
        assert dict(pool.statistics().keys) == {}
    assert_balanced(pool, connector)
