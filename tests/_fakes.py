"""Fakes with real behaviour for the pool core's tests (no mocks).

``FakeConnection`` is a connection that knows whether it is open, how many leases it takes,
what it weighs, and tells the pool when any of that changes. ``FakeConnector`` makes them on
a script (delays on trio's clock, failures, gates) and remembers every one it made, so a test
can check at the end that the pool closed each exactly once.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import attrs
import trio

from trio_connpool import Pool

__all__ = [
    "BackgroundConnection",
    "FakeConnection",
    "FakeConnector",
    "Step",
    "assert_balanced",
    "assert_pool_closed",
    "assert_stats",
]

_ids = itertools.count(1)


class FakeConnection:
    """A pooled connection with observable state.

    Args:
        key: The key it was made for.
        capacity: How many leases it takes at once.
        weight: How much of the pool's limits it uses.
        hang_on_close: ``aclose()`` blocks until cancelled (tests the forceful close).
        clean: What ``is_clean()`` answers.
    """

    def __init__(
        self,
        key: Hashable,
        *,
        capacity: int = 1,
        weight: int = 1,
        hang_on_close: bool = False,
        clean: bool = False,
    ) -> None:
        self.id = next(_ids)
        self.key = key
        self.capacity = capacity
        self.weight = weight
        self.hang_on_close = hang_on_close
        self.clean = clean
        self.ready = True
        self.dead = False
        self.closed = False
        self.aclose_calls = 0
        self.close_cancelled = False
        self.closed_at: float | None = None
        self.callback: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<FakeConnection #{self.id} key={self.key!r}>"

    # What the pool probes.

    def is_ready(self) -> bool:
        return self.ready and not self.closed

    def is_closed(self) -> bool:
        return self.closed or self.dead

    def is_clean(self) -> bool:
        return self.clean

    def set_state_callback(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    async def aclose(self) -> None:
        self.aclose_calls += 1
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        self.closed_at = trio.current_time()
        if self.hang_on_close:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.close_cancelled = True
                raise
        await trio.lowlevel.checkpoint()

    @property
    def expected_aclose_calls(self) -> int:
        """A graceful close, plus a forceful one if the graceful one hangs."""
        return 2 if self.hang_on_close else 1

    # What a test (standing in for the peer) does to it.

    def _changed(self) -> None:
        if self.callback is not None:
            self.callback()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._changed()

    def go_away(self) -> None:
        """Take no new leases (an HTTP/2 GOAWAY)."""
        self.ready = False
        self._changed()

    def come_back(self) -> None:
        self.ready = True
        self._changed()

    def die(self) -> None:
        """The peer closed it."""
        self.dead = True
        self._changed()


class BackgroundConnection(FakeConnection):
    """A connection with its own task (an HTTP/2 reader, say)."""

    def __init__(self, key: Hashable, **kwargs: bool | int) -> None:
        super().__init__(key, **kwargs)  # type: ignore[arg-type]
        self.background_started = False
        self.background_cancelled = False
        self.background_finished = False
        self._stop = trio.Event()

    async def run_background(self) -> None:
        self.background_started = True
        try:
            await self._stop.wait()
        except trio.Cancelled:
            self.background_cancelled = True
            raise
        self.background_finished = True

    def end_background(self) -> None:
        """Make ``run_background`` return (the peer went away)."""
        self._stop.set()


@attrs.define
class Step:
    """What one call of the connector does.

    Attributes:
        delay: Seconds (on trio's clock) before anything else.
        gate: Wait for this event before answering.
        fail: Raise this instead of making a connection.
        capacity, weight, hang_on_close, clean: The connection's properties.
        background: Make a :class:`BackgroundConnection`.
    """

    delay: float = 0.0
    gate: trio.Event | None = None
    fail: BaseException | None = None
    capacity: int = 1
    weight: int = 1
    hang_on_close: bool = False
    clean: bool = False
    background: bool = False


class FakeConnector:
    """``await connector(key)``: makes :class:`FakeConnection` objects on a script.

    Steps queued with :meth:`script` are used in call order (per key first, then global);
    without one, ``default`` is used.
    """

    def __init__(self, default: Step | None = None) -> None:
        self.default = default if default is not None else Step()
        self.made: list[FakeConnection] = []
        self.calls: list[Hashable] = []
        self.failed = 0
        self.cancelled = 0
        self.in_flight = 0
        self._steps: deque[Step] = deque()
        self._key_steps: dict[Hashable, deque[Step]] = {}

    def script(self, *steps: Step, key: Hashable | None = None) -> None:
        if key is None:
            self._steps.extend(steps)
        else:
            self._key_steps.setdefault(key, deque()).extend(steps)

    def _next_step(self, key: Hashable) -> Step:
        per_key = self._key_steps.get(key)
        if per_key:
            return per_key.popleft()
        if self._steps:
            return self._steps.popleft()
        return self.default

    async def __call__(self, key: Hashable) -> FakeConnection:
        self.calls.append(key)
        step = self._next_step(key)
        self.in_flight += 1
        try:
            await trio.lowlevel.checkpoint()
            if step.delay:
                await trio.sleep(step.delay)
            if step.gate is not None:
                await step.gate.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        if step.fail is not None:
            self.failed += 1
            raise step.fail
        cls = BackgroundConnection if step.background else FakeConnection
        connection = cls(
            key,
            capacity=step.capacity,
            weight=step.weight,
            hang_on_close=step.hang_on_close,
            clean=step.clean,
        )
        self.made.append(connection)
        return connection

    def open(self) -> list[FakeConnection]:
        """Connections made and not closed yet."""
        return [c for c in self.made if not c.closed]

    def all_closed(self) -> bool:
        return all(c.closed for c in self.made)


def assert_pool_closed(pool: Pool[Any, Any]) -> None:
    """After the pool closed: nothing left in it, no key, no weight."""
    stats = pool.statistics()
    assert stats.closed
    assert (stats.idle, stats.in_use, stats.connecting, stats.waiting, stats.leases) == (
        0,
        0,
        0,
        0,
        0,
    ), stats
    assert stats.weight == 0
    assert dict(stats.keys) == {}


def assert_balanced(pool: Pool[Hashable, FakeConnection], connector: FakeConnector) -> None:
    """After the pool closed: nothing left in it, every connection closed exactly once."""
    assert_pool_closed(pool)
    assert connector.in_flight == 0
    for connection in connector.made:
        assert connection.closed, connection
        assert connection.aclose_calls == connection.expected_aclose_calls, connection


def assert_stats(
    pool: Pool[Hashable, FakeConnection],
    connector: FakeConnector | None = None,
    *,
    idle: int | None = None,
    in_use: int | None = None,
    connecting: int | None = None,
    waiting: int | None = None,
    leases: int | None = None,
    weight: int | None = None,
) -> None:
    """Check an open pool's statistics against the numbers given (None: not checked).

    With ``connector``, also check that the pool's open connections are exactly the ones the
    connector made and nobody closed (call it at quiescence: closes run as tasks).
    """
    stats = pool.statistics()
    expected = {
        "idle": idle,
        "in_use": in_use,
        "connecting": connecting,
        "waiting": waiting,
        "leases": leases,
        "weight": weight,
    }
    actual = {name: getattr(stats, name) for name in expected}
    for name, value in expected.items():
        if value is not None:
            assert actual[name] == value, (name, actual)
    assert stats.leases >= stats.in_use
    if connector is not None:
        assert stats.idle + stats.in_use == len(connector.open()), (actual, connector.open())
        assert stats.connecting == connector.in_flight, (actual, connector.in_flight)
