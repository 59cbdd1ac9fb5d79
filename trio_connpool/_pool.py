"""The trio driver of the pool: tasks, parking, timers, closing.

Everything the pool *decides* is in ``_state.py``; this module carries the decisions out. The
split follows h11 and httpcore: the synchronous core returns effects (wake this waiter with that
lease, start a connect, close that connection) and the thin async layer performs them.

Parking works the way trio's own ``ParkingLot`` and ``CapacityLimiter`` do, one level lower: a
waiter parks with ``trio.lowlevel.wait_task_rescheduled`` and is woken *with its lease* by
whoever frees a connection (direct hand-off, no thundering herd, no re-check loop). Its abort
function withdraws it from the state machine synchronously, so a cancelled or timed-out waiter
can never be handed a connection it will not pick up. A waiter's timeout is not a cancel scope
of its own (entering one, and trio's deadline bookkeeping for it, cost more than the rest of a
wait): its deadline goes into one heap, and the pool's timer withdraws a waiter whose time is
up and wakes it with `PoolTimeout`, as a release would wake it with a lease.

Task layout (structured, nothing outlives the pool)::

    caller's nursery (open_pool opens one for you)
    └── Pool._serve                       the pool's service task
        └── pool nursery
            ├── Pool._run_timer           waiter timeouts, idle and lifetime expiry, leak
            │                             reports, on trio.current_time()
            ├── Pool._connect  (n)        one per connect in flight
            ├── Pool._connect_spare (n)   one per prewarm() or min_idle_per_key connect
            ├── Pool._background (n)      a connection's own task, if it has run_background()
            └── Pool._close    (n)        graceful close, shielded, bounded by close_timeout
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import sys
import traceback
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, runtime_checkable

import outcome
import trio

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Unpack

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # pragma: no cover - exercised on Python 3.10 only
    from typing import NoReturn

    from exceptiongroup import BaseExceptionGroup

    def assert_never(value: NoReturn, /) -> NoReturn:
        """`typing.assert_never`, new in Python 3.11."""
        raise AssertionError(f"unhandled value: {value!r}")


from ._exceptions import ConnectError, PoolClosed, PoolError, PoolTimeout, TrioRequiredError
from ._options import (
    Instrument,
    LeakReport,
    PoolOptionArgs,
    PoolOptions,
    Reservation,
    check_duration,
    resolve_options,
)
from ._state import (
    CancelConnect,
    Close,
    Deliver,
    Effect,
    Fail,
    FailReason,
    LeakTrace,
    Lease,
    PoolState,
    PoolStatistics,
    StartConnect,
    Waiter,
    _Record,  # pyright: ignore[reportPrivateUsage]
)

# Private names used across this package's own layers, on purpose (each use silences
# pyright's reportPrivateUsage, and nothing else here does): ``_Record`` is the state
# machine's handle for one connection, which the driver only hands back to it; and a Pool is
# run only by open_pool and create_pool, through its ``_serve`` and ``_aclose_shielded``,
# which are not API.

__all__ = [
    "Connection",
    "Instrument",
    "Pool",
    "PoolOptions",
    "create_pool",
    "open_pool",
]

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")
_DEFAULT: Any = object()

# A connection that is closed when its connect returns is a failed connect: it is tried this
# many times in all, pausing _DEAD_ON_ARRIVAL_BACKOFF seconds, then twice that, and so on.
_DEAD_ON_ARRIVAL_ATTEMPTS = 3
_DEAD_ON_ARRIVAL_BACKOFF = 0.1
# The waiters' deadline heap is pruned of served and cancelled waiters when it reaches four
# times its size after the last pruning, and never below this.
_PRUNE_MIN = 64
# Leak detection: how many frames of the acquiring stack are kept (the innermost ones outside
# this package), and where this package's own frames are (skipped: the caller's are wanted).
_LEAK_STACK_DEPTH = 16
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_logger = logging.getLogger("trio_connpool")
# The file of trio's run loop, which resumes every task: a task's stack ends there.
_TRIO_RUN_LOOP = trio.lowlevel.current_task.__code__.co_filename
_CONTEXTLIB = contextlib.__file__


class _Spares:
    """The connects one :meth:`Pool.prewarm` call started (or, with ``refill``, those the
    pool starts for ``min_idle_per_key``), each with the cancel scope that withdraws it."""

    __slots__ = ("done", "error", "opened", "pending", "refill", "scopes")

    def __init__(self, *, refill: bool = False) -> None:
        self.refill = refill
        self.scopes: dict[_Record[Any, Any], trio.CancelScope] = {}
        self.pending = 0
        self.opened = 0
        self.error: BaseException | None = None
        self.done = trio.Event()

    def finished(self, record: _Record[Any, Any]) -> None:
        del self.scopes[record]
        self.pending -= 1
        if not self.pending:
            self.done.set()


@runtime_checkable
class Connection(Protocol):
    """What the pool needs of a connection: only ``aclose()``.

    The pool also uses these members when a connection has them (none is required):

    - ``is_closed() -> bool``: the connection is dead; the pool drops it when it sees this (it
      asks only for the one connection it is about to hand out, never scans the others). A
      new connection that is closed already is a failed connect: the pool dials again after
      a pause, three connects in all, then fails its waiters with :class:`ConnectError`.
    - ``is_ready() -> bool``: the connection takes no new leases while this is False (an
      HTTP/2 connection after GOAWAY).
    - ``is_clean() -> bool``: asked when a lease ends in an exception or cancellation; True
      means the connection is still usable (an HTTP/2 stream was reset but the connection is
      fine), so the pool keeps it instead of closing it.
    - ``capacity: int``: how many leases it takes at once (default 1; may change).
    - ``weight: int``: how much of its key's ``max_connections_per_key`` budget it uses
      (default 1). The global ``max_connections`` counts it as one connection whatever it
      weighs.
    - ``set_state_callback(callback)``: the pool registers a synchronous callback that the
      connection calls whenever ``capacity``, ``is_ready()`` or ``is_closed()`` changes, so
      waiters are woken or held at once.
    - ``async run_background()``: a task the connection needs while it lives (an HTTP/2
      reader). The pool runs it in its nursery and cancels it when it closes the connection;
      when it returns the connection counts as closed.
    """

    async def aclose(self) -> None:
        """Close the connection (the pool bounds it with ``close_timeout``)."""
        ...


def _probe_closed(connection: Any) -> bool:
    probe = getattr(connection, "is_closed", None)
    return bool(probe()) if probe is not None else False


def _probe_ready(connection: Any) -> bool:
    probe = getattr(connection, "is_ready", None)
    return bool(probe()) if probe is not None else True


def _probe_int(connection: Any, name: str) -> int:
    value = getattr(connection, name, 1)
    if isinstance(value, bool) or not isinstance(value, int):
        return 1
    return value


def _probe_clean(connection: Any) -> bool:
    probe = getattr(connection, "is_clean", None)
    return bool(probe()) if probe is not None else False


def _acquiring_frames() -> list[tuple[str, int, str, None]]:
    """The innermost ``_LEAK_STACK_DEPTH`` frames of the calling task outside this package
    (and the `contextlib` frames just outside it), oldest first. The walk stops at trio's run
    loop: what called the task's coroutine is the same for every lease. Only names and line
    numbers: source lines are read if the stack is ever shown (`traceback.extract_stack`
    reads them now and checks each file with a stat, at eight times the cost)."""
    frame = sys._getframe(2)  # pyright: ignore[reportPrivateUsage]
    package = _PACKAGE_DIR
    while frame is not None and (
        frame.f_code.co_filename.startswith(package)
        or frame.f_code.co_filename == _CONTEXTLIB  # the client's `async with stream()`
    ):
        frame = frame.f_back  # type: ignore[assignment]
    frames: list[tuple[str, int, str, None]] = []
    run_loop = _TRIO_RUN_LOOP
    while frame is not None and len(frames) < _LEAK_STACK_DEPTH:
        code = frame.f_code
        filename = code.co_filename
        if filename == run_loop:
            break
        frames.append((filename, frame.f_lineno, code.co_name, None))
        frame = frame.f_back  # type: ignore[assignment]
    frames.reverse()
    return frames


class _Lessor(Generic[K, C]):
    """The async context manager behind :meth:`Pool.lease` (a class: no generator per use)."""

    __slots__ = ("_key", "_lease", "_pool", "_timeout")

    def __init__(self, pool: Pool[K, C], key: K, timeout: float | None) -> None:
        self._pool = pool
        self._key = key
        self._timeout = timeout
        self._lease: Lease[K, C] | None = None

    async def __aenter__(self) -> C:
        if self._lease is not None:
            raise RuntimeError("a lease context manager can be entered only once")
        self._lease = await self._pool.acquire(self._key, timeout=self._timeout)
        return self._lease.connection

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        assert lease is not None
        if exc_type is None:
            self._pool.release(lease)
        else:
            self._pool.release(lease, discard=not _probe_clean(lease.connection))


class Pool(Generic[K, C]):
    """A keyed pool of connections shared by any number of trio tasks.

    Make one with :func:`open_pool` (which owns it) or :func:`create_pool` (which runs it in
    your nursery). Connections are opened by the ``connector`` on demand, one sub-pool per key,
    and lent out with :meth:`lease` or :meth:`acquire`/:meth:`release`.

    Mental model: each key has a line of waiting tasks (strictly first come, first served), a
    stack (LIFO) or queue (FIFO) of idle connections, and a budget; the whole pool has a budget
    too. A task that finds an idle connection takes it without waiting; otherwise it joins the
    line, and the first connection to free up or finish connecting is handed to the front of
    the line directly.

    What it is *not*: a connection's lock. A connection with ``capacity`` above 1 is leased to
    several tasks at once; making that safe is the connection's job.

    Its options are a :class:`PoolOptions`, given as ``options=`` or as keywords (not both);
    the ``options`` attribute holds them.
    """

    def __init__(
        self,
        connector: Callable[[K], Awaitable[C]],
        *,
        options: PoolOptions | None = None,
        **keywords: Unpack[PoolOptionArgs],
    ) -> None:
        if not callable(connector):
            raise TypeError("connector must be an async callable: await connector(key)")
        options = resolve_options(options, keywords)
        reserve: Callable[[K], Reservation] | None = options.reserve
        if reserve is None:
            # A connector that knows what its connects bring (HTTPConnector) says so itself.
            reserve = getattr(connector, "reserve", None)
            if not callable(reserve):
                reserve = None
        self.options: PoolOptions = options
        self._state: PoolState[K, C] = PoolState(
            options.replace(reserve=reserve) if reserve is not options.reserve else options,
            is_closed=_probe_closed,
            is_ready=_probe_ready,
        )
        self._connector = connector
        self.acquire_timeout: float | None = options.acquire_timeout
        self.close_timeout: float = options.close_timeout
        self._instruments = tuple(options.instruments)
        # Each hook's methods, of the instruments that override it: a hook an instrument
        # leaves as Instrument's no-op is never called, and costs a lease nothing.
        self._hooks = hooks_of(self._instruments)
        self._on_acquired = "lease_acquired" in self._hooks
        self._on_released = "lease_released" in self._hooks
        self._on_waiting = "waiting" in self._hooks
        self._on_waited = "waited" in self._hooks
        self._nursery: trio.Nursery | None = None
        # The run's clock, read directly once the pool serves (trio.current_time() finds it
        # through two more calls, on every release and wait).
        self._now: Callable[[], float] = trio.current_time
        self._timer_scope = trio.CancelScope()
        self._timer_at = math.inf  # the timer scope's deadline, read without a property call
        # Parked waiters' deadlines: (deadline, order, waiter, timeout), a heap. Entries of
        # waiters served or cancelled meanwhile are dropped when they reach the top, or when
        # the heap has grown to four times what it held at its last pruning.
        self._deadlines: list[tuple[float, int, Waiter[K, C], float]] = []
        self._deadline_order = 0  # breaks ties between equal deadlines
        self._prune_at = _PRUNE_MIN
        self._background: dict[int, trio.CancelScope] = {}
        self._early: dict[Waiter[K, C], outcome.Outcome[Lease[K, C]]] = {}
        self._close_requested = trio.Event()
        self._done = trio.Event()
        self._started = False
        # Leak detection (off: None). Traces of leases held, in acquire order, which is
        # deadline order too (one timeout for all): so the timer looks at the first only.
        self._leak_timeout: float | None = options.leak_timeout
        self._traces: OrderedDict[LeakTrace, None] = OrderedDict()
        self._token: trio.lowlevel.TrioToken | None = None
        self._min_idle = options.min_idle_per_key or 0
        self._refills = _Spares(refill=True)
        self._refill_due = False

    def __repr__(self) -> str:
        s = self._state.statistics()
        state = "closed" if s.closed else "open"
        return (
            f"<Pool {state} idle={s.idle} in_use={s.in_use} connecting={s.connecting} "
            f"waiting={s.waiting} keys={len(s.keys)} max_connections={s.max_connections}>"
        )

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        """True once the pool started closing: no more leases are handed out."""
        return self._state.closed

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool's counters, in total and per key."""
        return self._state.statistics()

    async def prewarm(self, key: K, n: int) -> int:
        """Open connections for ``key`` until it has ``n`` idle, or the limits say no.

        "Idle" counts capacity: an idle HTTP/1.1 connection serves one lease, an HTTP/2
        connection as many as its capacity, so one HTTP/2 connection covers ``n`` up to
        that capacity (and its weight fills the key's ``max_connections_per_key`` budget).
        Connects run concurrently in the pool's tasks, only in free room: within
        ``max_connections_per_key`` and ``max_connections``, never evicting another key's
        idle connection, and not while requests wait for room. Requests come first: one
        for this key that arrives meanwhile is served by one of them (the connection then
        counts as opened but is not idle), and one for another key that needs the room of
        a connect no request counts on cancels it (it then counts as not opened). Waits
        until every connect it started has finished.

        Args:
            key: The key to open connections for.
            n: How many idle connections (capacity) to have, 0 or more.

        Returns:
            How many connections it opened (0 if the key has ``n`` idle already).

        Raises:
            ConnectError: A connect failed (the first failure, once the others finished;
                connections that did open stay in the pool). Failures are also reported to
                the instruments' ``connect_failed``.
            PoolClosed: The pool is closed, or closed meanwhile.
            TypeError, ValueError: ``n`` is not an int of 0 or more.

        Cancelled, it withdraws the connects it started that no request has come to count
        on (as if they had never started) and cancels them; the counters are exact at once.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be 0 or more, got {n}")
        await trio.lowlevel.checkpoint_if_cancelled()
        state = self._state
        if state.closed or self._nursery is None:
            raise PoolClosed(
                "the pool is closed" if state.closed else "the pool is not running", key=key
            )
        spares = _Spares()
        try:
            state.prewarm(key, n, spares)  # reserve() may raise
        finally:
            self._apply()  # queued its connects: each has its scope in spares now
        if spares.scopes:
            try:
                await spares.done.wait()
            except BaseException:
                for record in list(spares.scopes):
                    state.abandon(record)
                self._apply()
                raise
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if spares.error is not None:
            raise self._connect_error(key, spares.error)
        if state.closed:
            raise PoolClosed("the pool closed while connections were opened", key=key)
        return spares.opened

    def lease(self, key: K, *, timeout: float | None = _DEFAULT) -> _Lessor[K, C]:
        """Lease a connection for ``key`` for the length of an ``async with`` block.

        ::

            async with pool.lease(key) as connection:
                await connection.send(...)

        Entering blocks until a connection is available (see :meth:`acquire`); leaving never
        blocks. If the block raises or is cancelled, the connection is closed unless it
        reports ``is_clean()``.
        """
        if timeout is not _DEFAULT:
            check_duration("timeout", timeout)
        return _Lessor(self, key, timeout)

    # A per-call bound that raises the typed PoolTimeout, like the pool-wide acquire_timeout.
    async def acquire(
        self,
        key: K,
        *,
        timeout: float | None = _DEFAULT,  # noqa: ASYNC109
    ) -> Lease[K, C]:
        """Lease a connection for ``key``, waiting if none is available.

        Always a checkpoint. Give the lease back with :meth:`release`.

        Args:
            key: Which sub-pool to lease from; any hashable value.
            timeout: Seconds to wait at most; defaults to the pool's ``acquire_timeout``.

        Returns:
            The lease; its ``connection`` attribute is the connection.

        Raises:
            PoolTimeout: No connection became available in time.
            TooManyWaiters: ``max_waiters`` tasks already wait for this key.
            ConnectError: The connect started for this task failed.
            PoolClosed: The pool is closed, or closed while this task waited.
        """
        if timeout is not _DEFAULT:
            # Checked before it can reach the deadline heap: a NaN there would hold up every
            # other waiter's timeout, a string would fail after the task joined the line.
            check_duration("timeout", timeout)
        await trio.lowlevel.checkpoint_if_cancelled()
        lease = self.try_acquire(key)
        if lease is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return lease
        return await self.acquire_in_line(
            key, self.acquire_timeout if timeout is _DEFAULT else timeout
        )

    def acquire_nowait(self, key: K) -> Lease[K, C]:
        """Lease an available connection for ``key`` without waiting.

        Never starts a connect and never jumps the queue: if tasks are already waiting for the
        key, they come first.

        Raises:
            trio.WouldBlock: No connection of ``key`` is available right now.
            PoolClosed: The pool is closed.
        """
        lease = self.try_acquire(key)
        if lease is None:
            raise trio.WouldBlock
        return lease

    def try_acquire(self, key: K) -> Lease[K, C] | None:
        """:meth:`acquire_nowait`, returning None instead of raising `trio.WouldBlock`.

        The first half of :meth:`acquire`, for a caller that does I/O on the connection next
        (that I/O is its checkpoint; the HTTP client is one): check for cancellation first
        (``trio.lowlevel.checkpoint_if_cancelled``), call this, and on None wait with
        :meth:`acquire_in_line`. Raising `trio.WouldBlock` would cost more than the rest of
        it, on the path of every request that has to wait.

        Raises:
            PoolClosed: The pool is closed.
        """
        state = self._state
        if state.closed or self._nursery is None:
            raise PoolClosed(
                "the pool is closed" if state.closed else "the pool is not running", key=key
            )
        lease = state.acquire_nowait(key)
        if state.effects:
            self._apply()
        if lease is not None:
            if self._on_acquired:
                self._hook("lease_acquired", key, lease.connection)
            if self._leak_timeout is not None:
                self._track(lease)
        return lease

    def release(self, lease: Lease[K, C], *, discard: bool = False) -> None:
        """Give a lease back. Synchronous; never blocks.

        Args:
            lease: What :meth:`acquire` returned. Releasing twice, or after the pool closed,
                does nothing.
            discard: Close the connection instead of keeping it (its exchange did not finish
                cleanly).
        """
        if lease.released:
            return
        state = self._state
        now = self._now()
        if self._leak_timeout is not None:
            self._untrack(lease, now)
        idle = state.release(lease, now, discard=discard)
        if self._on_released:
            self._hook("lease_released", lease.key, lease.connection)
        if state.effects:
            self._apply()
        idle_timeout = state.idle_timeout
        if idle and idle_timeout is not None:
            # The connection went idle: its expiry may be the timer's next wake-up. (Idle
            # deadlines only grow, so this is the one case that can move the timer earlier.)
            deadline = now + idle_timeout
            if deadline < self._timer_at:
                self._timer_scope.deadline = self._timer_at = deadline

    async def aclose(self) -> None:
        """Close the pool and every connection in it, leased ones included.

        Waiting tasks get :class:`PoolClosed`. Connections close gracefully in parallel within
        ``close_timeout``, then forcefully. Leases still held stay valid objects; releasing
        them later does nothing. Idempotent; completes even when cancelled.
        """
        await self._aclose_shielded()
        await trio.lowlevel.checkpoint()

    async def _aclose_shielded(self) -> None:
        self._begin_close()
        if self._started:
            with trio.CancelScope(shield=True):
                await self._done.wait()

    # ------------------------------------------------------------------ service

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the pool until :meth:`aclose` (or until the surrounding nursery is cancelled)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._started = True
                self._token = trio.lowlevel.current_trio_token()
                self._now = clock_reader()
                self._state.on_abandoned = self._notify_abandoned
                nursery.start_soon(self._run_timer)
                if self._instruments:
                    self._hook("pool_opened", self)
                task_status.started()
                try:
                    await self._close_requested.wait()
                finally:
                    # Reached by aclose() or by cancellation of the caller's nursery. The
                    # close tasks started here shield themselves (bounded by close_timeout);
                    # cancelling the nursery stops connects, the timer and background tasks.
                    self._begin_close()
                    self._timer_scope.cancel()
                    for scope in self._background.values():
                        scope.cancel()
                    nursery.cancel_scope.cancel()
        finally:
            if self._instruments:
                self._hook("pool_closed", self)
            self._done.set()

    def _begin_close(self) -> None:
        """Synchronously close the state: fail every waiter, queue every close."""
        if not self._state.closed:
            self._state.close()
            self._apply()
        self._close_requested.set()

    async def _run_timer(self) -> None:
        """Time out waiters, and expire idle and over-age connections, when their time comes."""
        state = self._state
        while True:
            self._timer_at = self._next_deadline()
            with trio.CancelScope(deadline=self._timer_at) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            self._expire_waiters(now)
            state.expire(now)
            if state.effects:
                self._apply()
            if self._traces:
                self._report_leaks(now)
            if self._min_idle and (self._refill_due or state.refill_due(now)):
                # On events only (a close, a key's first connection, a backoff's end), not
                # on every expiry: a key caught mid-lease is not topped up for that moment.
                self._refill_due = False
                state.refill(now, self._refills)
                if state.effects:
                    self._apply()

    def _next_deadline(self) -> float:
        deadline = self._state.next_deadline()
        if self._traces:
            leak_deadline = next(iter(self._traces)).deadline
            if leak_deadline < deadline:
                deadline = leak_deadline
        deadlines = self._deadlines
        while deadlines and not deadlines[0][2].waiting:
            heapq.heappop(deadlines)
        if deadlines and deadlines[0][0] < deadline:
            return deadlines[0][0]
        return deadline

    def _reschedule_timer(self) -> None:
        deadline = self._next_deadline()
        if deadline < self._timer_at:
            self._timer_scope.deadline = self._timer_at = deadline

    def _expire_waiters(self, now: float) -> None:
        """Withdraw every waiter whose deadline has passed and wake it with `PoolTimeout`."""
        deadlines = self._deadlines
        state = self._state
        while deadlines and deadlines[0][0] <= now:
            _, _, waiter, timeout = heapq.heappop(deadlines)
            if waiter.waiting:
                state.cancel(waiter)
                error = PoolTimeout(f"no connection within {timeout} s", key=waiter.key)
                self._wake(waiter, outcome.Error(error))

    # ------------------------------------------------------------------ waiting

    async def acquire_in_line(
        self,
        key: K,
        timeout: float | None,  # noqa: ASYNC109
        deadline: float | None = None,
    ) -> Lease[K, C]:
        """Join ``key``'s line and wait for a lease: the second half of :meth:`acquire`.

        For a caller that tried :meth:`try_acquire` first (see there). It waits at most
        ``timeout`` seconds (None: no limit). ``deadline``, when given, is when those seconds
        end, on ``trio.current_time()``: a caller that waits more than once within one
        budget (retries) passes it and spares a clock read; ``timeout`` then only names the
        budget in the `PoolTimeout` message. (Called without :meth:`try_acquire` first, it
        still takes an idle connection, the slower way, through the line.)

        Always a checkpoint: it parks, or, if it is served as it joins the line, checks for
        cancellation (giving the lease back if cancelled) and yields.

        Raises:
            PoolTimeout: No connection became available in time.
            TooManyWaiters: ``max_waiters`` tasks already wait for this key.
            ConnectError: The connect started for this task failed.
            PoolClosed: The pool is closed, or closed while this task waited.
            ValueError, TypeError: ``timeout`` or ``deadline`` is not a valid number.
        """
        if timeout is not None:
            # Checked before the task joins the line and its deadline the heap (see acquire).
            if deadline is None:
                check_duration("timeout", timeout)
                deadline = self._now() + timeout
            elif deadline != deadline or not isinstance(deadline, (int, float)):
                raise TypeError(f"deadline must be a time (a number, not NaN), not {deadline!r}")
        state = self._state
        waiter = state.enqueue(key)  # May raise TooManyWaiters: nothing was changed then.
        if self._on_waiting:
            self._hook("waiting", key)
        waiter.token = None
        if state.effects:
            self._apply()
        early = self._early.pop(waiter, None)
        if early is not None:
            # Served as it joined (rare: an idle connection and nobody ahead). Still a
            # checkpoint; a lease handed to a task that is cancelled meanwhile goes back.
            self._waited(key, 0.0)
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                if isinstance(early, outcome.Value):
                    self.release(early.value)
                raise
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._unwrap(early, key)
        waiter.token = trio.lowlevel.current_task()
        # Timed for the statistics: a task that parks pays this clock read (and one when it
        # wakes), next to the cost of parking; a task served without waiting pays nothing.
        since = self._now()

        def abort(_: Any) -> trio.lowlevel.Abort:
            state.cancel(waiter)
            if state.effects:
                self._apply()
            return trio.lowlevel.Abort.SUCCEEDED

        if timeout is not None and deadline is not None:  # the timer wakes it: see module doc
            deadlines = self._deadlines
            if len(deadlines) >= self._prune_at:
                deadlines[:] = [entry for entry in deadlines if entry[2].waiting]
                heapq.heapify(deadlines)
                self._prune_at = max(_PRUNE_MIN, 4 * len(deadlines))
            self._deadline_order += 1
            heapq.heappush(deadlines, (deadline, self._deadline_order, waiter, timeout))
            if deadline < self._timer_at:
                self._timer_scope.deadline = self._timer_at = deadline
        # wait_task_rescheduled unwraps what _wake passed: a lease, or an error.
        try:
            lease: Lease[K, C] = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._waited(key, self._now() - since)
        return self._acquired(key, lease)

    def _waited(self, key: K, seconds: float) -> None:
        state = self._state
        state.waits += 1
        state.wait_time += seconds
        if self._on_waited:
            self._hook("waited", key, seconds)

    def _unwrap(self, result: outcome.Outcome[Lease[K, C]], key: K) -> Lease[K, C]:
        return self._acquired(key, result.unwrap())

    def _acquired(self, key: K, lease: Lease[K, C]) -> Lease[K, C]:
        if self._on_acquired:
            self._hook("lease_acquired", key, lease.connection)
        if self._leak_timeout is not None:
            self._track(lease)
        return lease

    # ------------------------------------------------------------------ leaks

    def _track(self, lease: Lease[K, C]) -> None:
        """Note where and when ``lease`` was acquired (leak detection is on)."""
        assert self._leak_timeout is not None
        now = trio.current_time()
        trace = LeakTrace(
            lease.key,
            lease.connection,
            now,
            now + self._leak_timeout,
            trio.lowlevel.current_task().name,
            _acquiring_frames(),
        )
        lease._trace = trace  # pyright: ignore[reportPrivateUsage]
        self._traces[trace] = None
        if trace.deadline < self._timer_at:
            self._timer_scope.deadline = self._timer_at = trace.deadline

    def _untrack(self, lease: Lease[K, C], now: float) -> None:
        trace: LeakTrace | None = getattr(lease, "_trace", None)
        if trace is None:
            return
        trace.connection = None  # the trace may outlive the lease (a warning refers to it)
        if not trace.reported:
            del self._traces[trace]
        elif _logger.isEnabledFor(logging.DEBUG):
            _logger.debug(
                "lease released after %.3f s, reported as a possible leak: key=%r task=%r",
                now - trace.acquired_at,
                trace.key,
                trace.task_name,
                extra={"pool_event": "lease_released_late", "pool_key": trace.key},
            )

    def _report_leaks(self, now: float) -> None:
        """Report, once each, the leases held past their leak deadline."""
        traces = self._traces
        while traces:
            trace = next(iter(traces))
            if trace.deadline > now:
                return
            traces.popitem(last=False)
            trace.reported = True
            report = LeakReport(
                key=trace.key,
                connection=trace.connection,
                held_for=now - trace.acquired_at,
                acquired_at=trace.acquired_at,
                task_name=trace.task_name,
                stack=traceback.StackSummary.from_list(trace.frames),
            )
            _logger.warning(
                "lease held for %.3f s (leak_timeout is %s s), possibly leaked: key=%r "
                "connection=%r; acquired by %s",
                report.held_for,
                self._leak_timeout,
                report.key,
                report.connection,
                trace.format(),
                extra={"pool_event": "lease_leaked", "pool_key": report.key},
            )
            if self._instruments:
                self._hook("lease_leaked", report.key, report.connection, report)

    def _notify_abandoned(self) -> None:
        """`PoolState.on_abandoned`: called from ``Lease.__del__``, wherever the garbage
        collector runs. `TrioToken.run_sync_soon` is safe from anywhere (other threads,
        signal handlers, re-entrantly); it runs :meth:`_reclaim` in the pool's run."""
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nothing to do
                token.run_sync_soon(self._reclaim, idempotent=True)

    def _reclaim(self) -> None:
        state = self._state
        if state.closed:
            state.abandoned.clear()
            return
        for key, connection, trace in state.reclaim():
            if trace is not None:
                self._traces.pop(trace, None)
            if self._instruments:
                self._hook("lease_released", key, connection)
        if state.effects:
            self._apply()

    def _wake(self, waiter: Waiter[K, C], result: outcome.Outcome[Lease[K, C]]) -> None:
        if waiter.token is None:
            self._early[waiter] = result  # Served before it could park: see acquire_in_line.
        else:
            trio.lowlevel.reschedule(waiter.token, result)

    # ------------------------------------------------------------------ effects

    def _apply(self) -> None:
        """Carry out the effects the state machine queued."""
        state = self._state
        while state.effects:
            for effect in state.take_effects():
                self._do(effect)

    def _do(self, effect: Effect[K, C]) -> None:
        # Exhaustive: an effect type the state machine gains and this misses fails type
        # checking at assert_never. Deliver first: it is the one on every hand-off.
        match effect:
            case Deliver():
                self._wake(effect.waiter, outcome.Value(effect.lease))
            case StartConnect():
                if self._instruments:
                    self._hook("connect_started", effect.key)
                assert self._nursery is not None
                record = effect.record
                spares = record.spare_token
                if spares is None:
                    self._nursery.start_soon(self._connect, record)
                else:
                    spares.scopes[record] = trio.CancelScope()
                    spares.pending += 1
                    self._nursery.start_soon(self._connect_spare, record, spares)
            case Close():
                if self._min_idle:
                    self._refill_soon()
                scope = self._background.get(id(effect.connection))
                if scope is not None:
                    scope.cancel()
                if self._instruments:
                    self._hook("connection_closed", effect.key, effect.connection)
                assert self._nursery is not None
                self._nursery.start_soon(self._close_gracefully, effect)
            case Fail():
                self._wake(effect.waiter, outcome.Error(self._failure(effect)))
            case CancelConnect():
                record = effect.record
                spares = record.spare_token
                scope = spares.scopes.get(record) if spares is not None else None
                if scope is not None:
                    scope.cancel()
            case _:  # pragma: no cover - unreachable while every effect type is handled
                assert_never(effect)

    def _failure(self, fail: Fail[K, C]) -> PoolError:
        """The error a failed waiter is woken with."""
        key = fail.waiter.key
        if fail.reason is FailReason.POOL_CLOSED:
            return PoolClosed("the pool closed while this task waited", key=key)
        return self._connect_error(key, fail.cause)

    def _connect_error(self, key: K, cause: BaseException | None) -> PoolError:
        """The error for a failed connect to ``key`` (a new object per call)."""
        message = "connect failed" if cause is not None else "connect was cancelled"
        error_type = ConnectError
        if isinstance(cause, ConnectError):
            # The connector already said what went wrong (ConnectTimeout, say): keep its type
            # and words. Each waiter gets an exception object of its own.
            message = str(cause.args[0]) if cause.args else message
            error_type = type(cause)
        error = error_type(message, key=key)
        if cause is not None and error_type is not ConnectError:
            # A subclass's own attributes (a ProxyError's status_code) come along.
            for name, value in vars(cause).items():
                if name != "key":
                    setattr(error, name, value)
        error.__cause__ = cause
        return error

    # ------------------------------------------------------------------ connections

    async def _connect(self, record: _Record[K, C]) -> None:
        key = record.key
        state = self._state
        try:
            connection = await self._connect_alive(key)
        except Exception as exc:
            if self._instruments:
                self._hook("connect_failed", key, exc)
            state.connect_failed(record, exc)
            self._apply()
            return
        except BaseException:
            # Cancelled (the pool is closing) or KeyboardInterrupt: no connection to clean up.
            # The pool's nursery may be cancelled from outside before _serve has closed the
            # state: close it first, so waiters get PoolClosed and no new connect starts.
            if self._instruments:
                self._hook("connect_failed", key, None)
            self._begin_close()
            state.connect_failed(record, None)
            self._apply()
            raise
        self._connected(record, connection)

    def _connected(self, record: _Record[K, C], connection: C) -> None:
        """A connect brought ``connection``: into the pool with it."""
        state = self._state
        if self._instruments:
            self._hook("connect_succeeded", record.key, connection)
        closed = state.closed
        state.connect_succeeded(
            record,
            connection,
            trio.current_time(),
            weight=_probe_int(connection, "weight"),
            capacity=_probe_int(connection, "capacity"),
            ready=_probe_ready(connection),
        )
        if not closed:
            register = getattr(connection, "set_state_callback", None)
            if register is not None:
                register(lambda: self._refresh(record))
            if getattr(connection, "run_background", None) is not None:
                scope = trio.CancelScope()
                self._background[id(connection)] = scope
                assert self._nursery is not None
                self._nursery.start_soon(self._background_task, record, connection, scope)
        self._apply()
        self._reschedule_timer()
        if self._min_idle:
            self._refill_soon()  # A key leased for the first time, say.

    async def _connect_spare(self, record: _Record[K, C], spares: _Spares) -> None:
        """Run a connect that :meth:`prewarm` or ``min_idle_per_key`` started.

        Like :meth:`_connect`, but its scope in ``spares`` withdraws it: the state machine
        has forgotten it then (``abandon``), and a connection it brings anyway is closed.
        """
        key = record.key
        state = self._state
        connection: C | None = None
        try:
            try:
                with spares.scopes[record]:
                    connection = await self._connect_alive(key)
            except Exception as exc:
                if self._instruments:
                    self._hook("connect_failed", key, exc)
                if spares.error is None and not spares.refill:
                    spares.error = exc
                if record.in_flight:
                    state.connect_failed(record, exc)
                if spares.refill and not state.closed:
                    state.refill_failed(key, trio.current_time())
                    self._refill_soon()
                self._apply()
                return
            except BaseException:
                # The pool is closing (see _connect).
                if self._instruments:
                    self._hook("connect_failed", key, None)
                self._begin_close()
                if record.in_flight:
                    state.connect_failed(record, None)
                self._apply()
                raise
            if connection is None:  # Withdrawn by its scope: abandon() has forgotten it.
                if self._instruments:
                    self._hook("connect_failed", key, None)
                return
            if not record.in_flight:  # Withdrawn as it finished: never entered the pool.
                self._close_unpooled(key, connection)
                return
            spares.opened += 1
            if spares.refill:
                state.refill_succeeded(key)
            self._connected(record, connection)
        finally:
            spares.finished(record)

    def _refill_soon(self) -> None:
        """Have the timer task run ``min_idle_per_key`` refills as soon as it can."""
        self._refill_due = True
        now = trio.current_time()
        if now < self._timer_at:
            self._timer_scope.deadline = self._timer_at = now

    async def _connect_alive(self, key: K) -> C:
        """Run the connector until it brings a connection that is not closed already.

        A peer that accepts and closes at once (a server whose backend is down, a database
        that drops the login) would otherwise make the pool drop each new connection and
        dial again for the same waiter, for ever. Such a connection is closed, and the
        connect tried again after a pause, ``_DEAD_ON_ARRIVAL_ATTEMPTS`` times in all; then
        it fails with :class:`ConnectError`, which reaches the waiters it was started for.
        The one probe of a new connection is here: the state machine hands it out as it is.
        """
        attempt = 1
        while True:
            connection = await self._connector(key)
            try:
                dead = _probe_closed(connection)
            except BaseException:
                self._close_unpooled(key, connection)
                raise
            if not dead:
                return connection
            self._close_unpooled(key, connection)
            if attempt >= _DEAD_ON_ARRIVAL_ATTEMPTS:
                raise ConnectError(
                    f"the connection was closed as soon as it was opened ({attempt} connects)",
                    key=key,
                )
            await trio.sleep(_DEAD_ON_ARRIVAL_BACKOFF * 2 ** (attempt - 1))
            attempt += 1

    def _close_unpooled(self, key: K, connection: C) -> None:
        """Close a connection that never entered the pool's accounting."""
        assert self._nursery is not None
        self._nursery.start_soon(self._close_gracefully, Close(key, connection))

    def _refresh(self, record: _Record[K, C]) -> None:
        """A connection's state callback: re-read what it says of itself."""
        connection = record.connection
        if connection is None or self._state.closed:
            return
        self._state.refresh(
            record,
            closed=_probe_closed(connection),
            ready=_probe_ready(connection),
            capacity=_probe_int(connection, "capacity"),
        )
        if self._state.effects:
            self._apply()

    async def _background_task(
        self, record: _Record[K, C], connection: Any, scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                await connection.run_background()
        except Exception as exc:
            self._hook("hook_failed", "run_background", exc)
        finally:
            self._background.pop(id(connection), None)
        # The background task ended: the connection is finished.
        if not self._state.closed:
            self._state.refresh(record, closed=True, ready=False, capacity=0)
            self._apply()

    async def _close_gracefully(self, close: Close[K, C]) -> None:
        # One scope: shielded from the pool's own cancellation, bounded by its own deadline
        # (a shield does not stop a scope's own deadline). Closing is on the churn path.
        deadline = trio.current_time() + self.close_timeout
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                await close.connection.aclose()  # type: ignore[attr-defined]
            except Exception as exc:
                self._hook("hook_failed", "aclose", exc)
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True):
                await self._close_forcefully(close)

    async def _close_forcefully(self, close: Close[K, C]) -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await close.connection.aclose()  # type: ignore[attr-defined]
            except Exception as exc:
                self._hook("hook_failed", "aclose", exc)

    def _hook(self, name: str, *args: Any) -> None:
        for method in self._hooks.get(name, ()):
            try:
                method(*args)
            except Exception as exc:
                if name != "hook_failed":
                    self._hook("hook_failed", name, exc)


def hooks_of(instruments: Sequence[Instrument]) -> dict[str, tuple[Callable[..., object], ...]]:
    """Each hook's methods (by name), of the ``instruments`` that override it, in their
    order. A hook overridden on the instance (an attribute set in ``__init__``) counts too."""
    hooks: dict[str, tuple[Callable[..., object], ...]] = {}
    for name, base in vars(Instrument).items():
        if name.startswith("_") or not callable(base):
            continue
        methods = tuple(
            method
            for method in (getattr(instrument, name) for instrument in instruments)
            if getattr(method, "__func__", None) is not base
        )
        if methods:
            hooks[name] = methods
    return hooks


def clock_reader() -> Callable[[], float]:
    """The running clock's ``current_time``: the value of ``trio.current_time()`` in one
    call rather than three, for code that reads the time on every request. Outside a run
    (an object made before it starts), ``trio.current_time`` itself."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:
        return trio.current_time


def require_trio(entry: str) -> None:
    """Raise `TrioRequiredError` unless the caller runs in a trio task.

    Called once by each entry point (`open_pool`, `create_pool`, `open_client`, the httpx
    transport), never per request. Outside trio an entry point would otherwise fail deep
    inside, with a bare "must be called from async context" or worse.
    """
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise TrioRequiredError(_not_trio_message(entry)) from None


def _not_trio_message(entry: str) -> str:
    where = "outside a trio run"
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            where = "under asyncio"
    return (
        f"{entry} was called {where}, but trio_connpool runs under trio only (its "
        "httpx transport too): start the program with trio.run(main), or call it "
        "from asyncio through trio-asyncio"
    )


async def create_pool(
    nursery: trio.Nursery,
    connector: Callable[[K], Awaitable[C]],
    *,
    options: PoolOptions | None = None,
    **keywords: Unpack[PoolOptionArgs],
) -> Pool[K, C]:
    """Start a pool in ``nursery`` (yours) and return it: the lower tier of :func:`open_pool`.

    For an application that keeps one pool for its whole life. The pool's tasks run in
    ``nursery``; close the pool with ``await pool.aclose()`` (cancelling the nursery also
    closes it). Takes the same options as :func:`open_pool`.

    Raises:
        TrioRequiredError: Not called from a trio task (from asyncio, say).
        ValueError, TypeError: An option is out of range or of the wrong type.
    """
    require_trio("create_pool()")
    pool: Pool[K, C] = Pool(connector, options=options, **keywords)
    await nursery.start(pool._serve)  # pyright: ignore[reportPrivateUsage]
    return pool


@asynccontextmanager
async def open_pool(
    connector: Callable[[K], Awaitable[C]],
    *,
    options: PoolOptions | None = None,
    **keywords: Unpack[PoolOptionArgs],
) -> AsyncGenerator[Pool[K, C], None]:
    """Open a connection pool that lives for the ``async with`` block.

    ::

        async def connect(key):
            host, port = key
            return await trio.open_tcp_stream(host, port)

        async with open_pool(connect, max_connections=10) as pool:
            async with pool.lease(("example.com", 80)) as stream:
                ...

    Entering does not block (beyond a checkpoint); leaving closes every connection the pool
    opened (gracefully within ``close_timeout``, then forcefully), fails waiting tasks with
    :class:`PoolClosed`, and does not wait for leases held elsewhere. An exception raised in
    the block comes out as itself, not wrapped in an exception group.

    Args:
        connector: ``await connector(key)`` opens a connection for ``key``. Its errors reach
            the waiting task as :class:`ConnectError` (chained from the original), and so
            does a connection that is closed as soon as it is opened, three times running
            (0.1 s, then 0.2 s apart).
        options: The pool's options, a :class:`PoolOptions` (the limits, timeouts, expiry,
            release policy, ``reserve``, instruments); each is documented there.
        **keywords: The same options as keywords instead, e.g. ``max_connections=10``:
            ``open_pool(connect, max_connections=10)`` is
            ``open_pool(connect, options=PoolOptions(max_connections=10))``.

    Raises:
        TrioRequiredError: Not entered in a trio task (from asyncio, say).
        ValueError, TypeError: An option is out of range or of the wrong type (at once), or
            both ``options`` and keywords were given.
    """
    require_trio("open_pool()")
    pool: Pool[K, C] = Pool(connector, options=options, **keywords)
    async with _run_owned(pool) as running:
        yield running


def _leaf_ids(exc: BaseException) -> frozenset[int]:
    """The identities of the leaf exceptions of ``exc`` (itself, unless it is a group)."""
    if not isinstance(exc, BaseExceptionGroup):
        return frozenset((id(exc),))
    group = cast("BaseExceptionGroup[BaseException]", exc)
    ids: set[int] = set()
    for inner in group.exceptions:
        ids |= _leaf_ids(inner)
    return frozenset(ids)


@asynccontextmanager
async def _run_owned(pool: Pool[K, C]) -> AsyncGenerator[Pool[K, C], None]:
    """Run ``pool`` in a private nursery around the caller's block, unwrapping the block's
    own exception out of the nursery's exception group: an error of the user's own code
    comes out as itself, and only the pool's internal failures as one `PoolError`."""
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool._serve)  # pyright: ignore[reportPrivateUsage]
            try:
                yield pool
            except BaseException as exc:
                raised = exc
                raise
            finally:
                await pool._aclose_shielded()  # pyright: ignore[reportPrivateUsage]
    except BaseExceptionGroup as group:
        # The block's own exception is one member of the group. If it is a group itself (the
        # block's own nursery), trio may have rebuilt it on the way out, so it is recognised
        # by its leaves. Cancelled leaves elsewhere are a cancellation of the whole block
        # reaching the pool's own tasks too: they are not failures, and the cancelled scope
        # outside catches them.
        mine = None if raised is None else _leaf_ids(raised)
        others = [exc for exc in group.exceptions if _leaf_ids(exc) != mine]
        ours = len(others) < len(group.exceptions)
        failures = BaseExceptionGroup("", others).split(trio.Cancelled)[1] if others else None
        if failures is None and not ours:
            raise
        if raised is not None and failures is None:
            context = raised.__context__
            try:
                raise raised
            finally:
                raised.__context__ = context
                del raised, group
        raise PoolError("the pool's internal tasks failed") from group
