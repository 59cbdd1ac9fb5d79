"""LoggingInstrument: every pool event as a logging record, with the right message and level.

A real pool over ``FakeConnector``; records are read with pytest's ``caplog``. Messages are
compared exactly (they are what users grep their logs for), and so are levels and the
``pool_event`` / ``pool_key`` extras.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced

from trio_connpool import ConnectError, Instrument, Pool, PoolClosed, open_pool
from trio_connpool._logging import LoggingInstrument

FakePool = Pool[Hashable, FakeConnection]


def _ours(
    caplog: pytest.LogCaptureFixture, name: str = "trio_connpool"
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


def _records(
    caplog: pytest.LogCaptureFixture, name: str = "trio_connpool"
) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in _ours(caplog, name)]


async def test_scenario_logs_each_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    connector = FakeConnector()
    connector.script(Step(fail=OSError("refused")), key="b")
    pool: FakePool
    async with open_pool(connector, instruments=[LoggingInstrument()]) as pool:
        async with pool.lease("a"):
            pass
        async with pool.lease("a"):  # reused: no connect this time
            pass
        with pytest.raises(ConnectError):
            async with pool.lease("b"):
                raise AssertionError("unreachable")  # pragma: no cover
    assert_balanced(pool, connector)
    (conn,) = connector.made
    debug = logging.DEBUG
    assert _records(caplog) == [
        (debug, "waiting for a connection: key='a'"),
        (debug, "connect started: key='a'"),
        (debug, f"connect succeeded: key='a' connection={conn!r}"),
        (debug, f"lease acquired: key='a' connection={conn!r}"),
        (debug, f"lease released: key='a' connection={conn!r}"),
        (debug, f"lease acquired: key='a' connection={conn!r}"),
        (debug, f"lease released: key='a' connection={conn!r}"),
        (debug, "waiting for a connection: key='b'"),
        (debug, "connect started: key='b'"),
        (debug, "connect failed: key='b' error=OSError('refused')"),
        (debug, f"connection closed: key='a' connection={conn!r}"),
    ]
    events = [(r.__dict__["pool_event"], r.__dict__["pool_key"]) for r in _ours(caplog)]
    assert events == [
        ("waiting", "a"),
        ("connect_started", "a"),
        ("connect_succeeded", "a"),
        ("lease_acquired", "a"),
        ("lease_released", "a"),
        ("lease_acquired", "a"),
        ("lease_released", "a"),
        ("waiting", "b"),
        ("connect_started", "b"),
        ("connect_failed", "b"),
        ("connection_closed", "a"),
    ]


async def test_cancelled_connect_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    connector = FakeConnector(Step(gate=trio.Event()))  # never answers
    closed: list[PoolClosed] = []

    async def wait_for_connection(pool: FakePool) -> None:
        try:
            await pool.acquire("c")
        except PoolClosed as exc:
            closed.append(exc)

    pool: FakePool
    with trio.fail_after(5):
        async with (
            trio.open_nursery() as nursery,
            open_pool(connector, instruments=[LoggingInstrument()]) as pool,
        ):
            nursery.start_soon(wait_for_connection, pool)
            await trio.testing.wait_all_tasks_blocked()
    assert len(closed) == 1
    assert_balanced(pool, connector)
    assert _records(caplog) == [
        (logging.DEBUG, "waiting for a connection: key='c'"),
        (logging.DEBUG, "connect started: key='c'"),
        (logging.DEBUG, "connect cancelled: key='c'"),
    ]


class _Broken(Instrument):
    def lease_acquired(self, key: Hashable, connection: object) -> None:
        raise RuntimeError(f"boom on {key!r}")


@pytest.mark.parametrize(
    ("level", "expected"), [(logging.DEBUG, logging.WARNING), (logging.ERROR, logging.ERROR)]
)
async def test_failing_hook_is_a_warning_with_traceback(
    caplog: pytest.LogCaptureFixture, level: int, expected: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    connector = FakeConnector()
    pool: FakePool
    async with (
        open_pool(connector, instruments=[_Broken(), LoggingInstrument(level=level)]) as pool,
        pool.lease("a"),
    ):  # the broken hook does not break the lease
        pass
    assert_balanced(pool, connector)
    failures = [r for r in _ours(caplog) if r.__dict__["pool_event"] == "hook_failed"]
    assert len(failures) == 1
    (record,) = failures
    assert record.levelno == expected
    assert record.getMessage() == "hook lease_acquired failed: RuntimeError(\"boom on 'a'\")"
    assert record.__dict__["pool_key"] is None
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    # Every other event is still there, at the instrument's level.
    others = [r.levelno for r in _ours(caplog) if r.__dict__["pool_event"] != "hook_failed"]
    assert others == [level] * 6


async def test_custom_logger_and_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    by_name = LoggingInstrument("myapp.pool", level=logging.INFO)
    given = logging.getLogger("myapp.other")
    by_object = LoggingInstrument(given, level=logging.INFO)
    assert by_object.logger is given
    connector = FakeConnector()
    pool: FakePool
    async with open_pool(connector, instruments=[by_name, by_object]) as pool, pool.lease("k"):
        pass
    assert_balanced(pool, connector)
    for name in ("myapp.pool", "myapp.other"):
        records = _records(caplog, name)
        assert len(records) == 6
        assert {levelno for levelno, _ in records} == {logging.INFO}
    assert _records(caplog, "trio_connpool") == []


class _CountingKey:
    """A key that counts how often its repr is computed."""

    def __init__(self) -> None:
        self.reprs = 0

    def __repr__(self) -> str:
        self.reprs += 1
        return "<key>"


async def test_disabled_level_costs_no_formatting(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trio_connpool")
    key = _CountingKey()
    connector = FakeConnector()
    pool: FakePool
    async with open_pool(connector, instruments=[LoggingInstrument()]) as pool, pool.lease(key):
        pass
    assert_balanced(pool, connector)
    assert caplog.records == []
    assert key.reprs == 0


def test_repr_and_argument_checks() -> None:
    assert repr(LoggingInstrument()) == "<LoggingInstrument logger='trio_connpool' level=DEBUG>"
    assert (
        repr(LoggingInstrument("x", level=logging.INFO))
        == "<LoggingInstrument logger='x' level=INFO>"
    )
    with pytest.raises(TypeError, match="logger must be"):
        LoggingInstrument(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="level must be"):
        LoggingInstrument(level="DEBUG")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="level must be"):
        LoggingInstrument(level=True)


async def test_open_client_takes_instruments(caplog: pytest.LogCaptureFixture) -> None:
    from _servers import CountingApp, serve_hypercorn

    from trio_connpool import open_client

    caplog.set_level(logging.DEBUG, logger="trio_connpool")
    async with (
        serve_hypercorn(CountingApp()) as base,
        open_client(instruments=[LoggingInstrument()]) as client,
    ):
        await client.get(f"{base}/")
    events = [getattr(r, "pool_event", None) for r in caplog.records if r.name == "trio_connpool"]
    assert events[:3] == ["waiting", "connect_started", "connect_succeeded"]
    assert "lease_released" in events
    assert events[-1] == "connection_closed"
