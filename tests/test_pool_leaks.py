"""Leak detection: ``leak_timeout`` reports a lease held too long, once, with where it was
acquired; a lease collected without a release warns (`ResourceWarning`) and gives its slot
back, its connection closed.

Timers run on pytest-trio's ``autojump_clock`` (MockClock(autojump_threshold=0)), so a report
is asserted at its exact virtual time; the client test runs against hypercorn on 127.0.0.1.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Hashable

import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced
from _servers import WAIT, CountingApp, assert_pool_balanced, serve_hypercorn

from trio_connpool import Instrument, LeakReport, Lease, Pool, PoolOptions, open_pool
from trio_connpool.http import open_client

FakePool = Pool[Hashable, FakeConnection]
FakeLease = Lease[Hashable, FakeConnection]


class Leaks(Instrument):
    """Records every leak report, and the releases."""

    def __init__(self) -> None:
        self.reports: list[LeakReport] = []
        self.connections: list[object] = []
        self.released: list[Hashable] = []
        self.reported = trio.Event()

    def lease_leaked(self, key: Hashable, connection: object, report: LeakReport) -> None:
        self.reports.append(report)
        self.connections.append(connection)
        self.reported.set()

    def lease_released(self, key: Hashable, connection: object) -> None:
        self.released.append(key)


def leak_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "pool_event", None) == "lease_leaked"]


def frame_names(report: LeakReport) -> list[str]:
    return [frame.name for frame in report.stack]


async def collected() -> None:
    """Let the garbage go: trio's run loop holds the value it last sent into a task (an
    acquire's lease, say) until it runs the next task step; then collect the cycles."""
    await trio.lowlevel.checkpoint()
    gc.collect()


async def acquire_here(pool: FakePool, key: Hashable) -> FakeLease:
    """Acquire in a function of its own: the stack must name it, innermost."""
    return await pool.acquire(key)


def test_leak_timeout_is_an_option_off_by_default() -> None:
    assert PoolOptions().leak_timeout is None
    assert PoolOptions(leak_timeout=2).leak_timeout == 2
    with pytest.raises(ValueError, match="leak_timeout"):
        PoolOptions(leak_timeout=-1)
    with pytest.raises(TypeError, match="leak_timeout"):
        PoolOptions(leak_timeout="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leak_timeout"):
        PoolOptions(leak_timeout=float("nan"))


async def test_reported_once_after_the_timeout_not_before(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    connector = FakeConnector()
    leaks = Leaks()
    async with open_pool(connector, leak_timeout=10, instruments=[leaks]) as pool:
        start = trio.current_time()
        lease = await acquire_here(pool, "a")
        await trio.sleep(9.999)
        assert leaks.reports == []
        assert leak_records(caplog) == []
        await trio.sleep(0.002)
        assert len(leaks.reports) == 1
        await trio.sleep(1000)
        assert len(leaks.reports) == 1  # once per lease
        assert len(leak_records(caplog)) == 1

        report = leaks.reports[0]
        assert report.key == "a"
        assert report.connection is lease.connection
        assert leaks.connections == [lease.connection]
        assert report.acquired_at == start
        assert report.held_for == pytest.approx(10)
        assert report.task_name == trio.lowlevel.current_task().name
        names = frame_names(report)
        assert names[-1] == "acquire_here"  # the library's own frames are left out
        assert names[-2] == "test_reported_once_after_the_timeout_not_before"
        assert "test_pool_leaks.py" in report.format_stack()

        # Nothing was cancelled or closed: the lease is still good, and goes back as usual.
        assert not lease.connection.closed
        caplog.clear()
        pool.release(lease)
        late = [r for r in caplog.records if getattr(r, "pool_event", None)]
        assert [(r.levelname, r.pool_event) for r in late] == [  # type: ignore[attr-defined]
            ("DEBUG", "lease_released_late")
        ]
        assert "released after 1010.001 s" in late[0].getMessage()
        assert_pool_balanced(pool, idle=1)
    assert_balanced(pool, connector)


async def test_the_warning_says_key_time_task_and_stack(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_connpool")
    async with open_pool(FakeConnector(), leak_timeout=2.5) as pool:

        async def worker() -> None:
            lease = await acquire_here(pool, ("db", 5432))
            await trio.sleep(3)
            pool.release(lease)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, name="the-worker")
    [record] = leak_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.name == "trio_connpool"
    assert record.pool_key == ("db", 5432)  # type: ignore[attr-defined]
    message = record.getMessage()
    assert "lease held for 2.500 s (leak_timeout is 2.5 s)" in message
    assert "key=('db', 5432)" in message
    assert "'the-worker'" in message
    assert "in acquire_here" in message
    assert "in worker" in message
    assert "return await pool.acquire(key)" in message  # source lines, read when shown


async def test_not_reported_when_released_in_time(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    connector = FakeConnector()
    leaks = Leaks()
    async with open_pool(connector, leak_timeout=10, instruments=[leaks]) as pool:
        for _ in range(3):
            async with pool.lease("a"):
                await trio.sleep(9.9)
        lease = await pool.acquire("b")
        await trio.sleep(9.9)
        pool.release(lease)
        await trio.sleep(1000)
        assert leaks.reports == []
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert_pool_balanced(pool)
    assert_balanced(pool, connector)


async def test_each_lease_at_its_own_deadline_whichever_way_it_was_acquired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    leaks = Leaks()
    async with open_pool(
        connector, leak_timeout=10, max_connections=1, instruments=[leaks]
    ) as pool:
        start = trio.current_time()
        first = await pool.acquire("a")
        got: list[FakeLease] = []

        async def wait_in_line() -> None:
            got.append(await pool.acquire("a"))  # parks: the only connection is leased

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_in_line, name="in-line")
            await trio.sleep(4)
            pool.release(first)  # handed to the waiter at start + 4
        await trio.sleep(9.999)
        assert leaks.reports == []
        await trio.sleep(0.002)
        assert [r.acquired_at - start for r in leaks.reports] == [4]
        assert leaks.reports[0].task_name == "in-line"
        pool.release(got[0])
    assert_balanced(pool, connector)


async def test_try_acquire_and_lease_are_tracked_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leaks = Leaks()
    async with open_pool(FakeConnector(), leak_timeout=1, instruments=[leaks]) as pool:
        async with pool.lease("a"):
            pass
        lease = pool.try_acquire("a")  # the idle connection, at once
        assert lease is not None
        async with pool.lease("b"):
            await trio.sleep(2)
        assert sorted(str(r.key) for r in leaks.reports) == ["a", "b"]
        pool.release(lease)
        assert_pool_balanced(pool)


# ---------------------------------------------------------------------- collected leases


async def test_a_collected_lease_warns_and_its_slot_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    leaks = Leaks()
    async with open_pool(connector, max_connections=1, instruments=[leaks]) as pool:
        lease = await pool.acquire("a")
        connection = lease.connection
        with pytest.warns(ResourceWarning, match="Enable leak_timeout to see where") as info:  # noqa: PT031 - the del may warn at once
            del lease
            await collected()
        assert "key 'a'" in str(info[0].message)
        await trio.testing.wait_all_tasks_blocked()
        # The connection's state is unknown: it is closed, not reused; its slot is free.
        assert connection.closed
        assert leaks.released == ["a"]
        assert_pool_balanced(pool, idle=0)
        with trio.fail_after(1):
            async with pool.lease("a") as fresh:
                assert fresh is not connection
        assert_pool_balanced(pool, idle=1)
    assert_balanced(pool, connector)


async def test_with_leak_timeout_the_warning_says_where(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    leaks = Leaks()
    async with open_pool(connector, leak_timeout=5, instruments=[leaks]) as pool:
        lease = await acquire_here(pool, "a")
        with pytest.warns(ResourceWarning) as info:  # noqa: PT031 - the del may warn at once
            del lease
            await collected()
        message = str(info[0].message)
        assert "It was acquired by task" in message
        assert "in acquire_here" in message
        assert "in test_with_leak_timeout_the_warning_says_where" in message
        await trio.sleep(100)
        assert leaks.reports == []  # taken back before its time: not reported as well
        assert_pool_balanced(pool, idle=0)
    assert_balanced(pool, connector)


async def test_a_collected_lease_in_a_reference_cycle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        lease = await pool.acquire("a")
        holder: list[object] = [lease]
        holder.append(holder)  # only the cycle collector can free it
        del lease, holder
        with pytest.warns(ResourceWarning, match="garbage-collected without release"):
            await collected()
        await trio.testing.wait_all_tasks_blocked()
        assert_pool_balanced(pool, idle=0)
    assert_balanced(pool, connector)


async def test_a_lease_collected_on_another_thread() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        box = [await pool.acquire("a")]
        connection = box[0].connection
        with pytest.warns(ResourceWarning, match="garbage-collected"):
            # The last reference goes on a worker thread: __del__ runs there.
            await trio.to_thread.run_sync(box.clear)
        with trio.fail_after(WAIT):
            while not connection.closed:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert_pool_balanced(pool, idle=0)
    assert_balanced(pool, connector)


async def test_a_collected_lease_of_a_shared_connection_retires_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connector = FakeConnector(Step(capacity=2))
    async with open_pool(connector) as pool:
        kept = await pool.acquire("a")
        lost = await pool.acquire("a")
        connection = kept.connection
        assert lost.connection is connection
        with pytest.warns(ResourceWarning):  # noqa: PT031 - the del may warn at once
            del lost
            await collected()
        await trio.testing.wait_all_tasks_blocked()
        # The other lease goes on; the connection takes no new one and closes after it.
        assert not connection.closed
        stats = pool.statistics()
        assert (stats.leases, stats.in_use) == (1, 1)
        async with pool.lease("a") as other:
            assert other is not connection
        pool.release(kept)
        await trio.testing.wait_all_tasks_blocked()
        assert connection.is_closed()
        assert_pool_balanced(pool, idle=1)
    assert_balanced(pool, connector)


async def test_a_lease_collected_after_the_pool_closed_is_silent() -> None:
    connector = FakeConnector()
    async with open_pool(connector) as pool:
        lease = await pool.acquire("a")
    # The pool closed its connection already: nothing is held, nothing to warn about (the
    # suite turns warnings into errors).
    del lease
    await collected()
    assert_balanced(pool, connector)


async def test_a_released_lease_is_collected_silently() -> None:
    async with open_pool(FakeConnector()) as pool:
        lease = await pool.acquire("a")
        pool.release(lease)
        del lease
        await collected()
        assert_pool_balanced(pool, idle=1)


# ---------------------------------------------------------------------- the HTTP client


async def test_client_reports_a_streamed_response_held_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    leaks = Leaks()
    app = CountingApp()
    async with (
        serve_hypercorn(app) as base,
        open_client(leak_timeout=0.05, instruments=[leaks]) as client,
    ):
        async with client.stream("GET", base + "/bytes/1000000") as response:
            assert response.status_code == 200
            with trio.fail_after(WAIT):
                await leaks.reported.wait()
            body = await response.aread()
        assert len(body) == 1_000_000
        [report] = leaks.reports
        assert report.key.origin.port == int(base.rsplit(":", 1)[1])  # type: ignore[attr-defined]
        assert report.held_for >= 0.05
        assert report.task_name == trio.lowlevel.current_task().name
        # Innermost: the test's own ``async with client.stream(...)``.
        assert frame_names(report)[-1] == "test_client_reports_a_streamed_response_held_open"
        [record] = leak_records(caplog)
        assert "test_client_reports_a_streamed_response_held_open" in record.getMessage()
        events = [getattr(r, "pool_event", None) for r in caplog.records]
        assert "lease_released_late" in events
        assert_pool_balanced(client.pool, idle=1)
