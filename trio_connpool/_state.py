"""The pool's state machine: every decision the pool makes, with no I/O and no trio.

Theory of operation
===================

The trio driver (``_pool.py``) owns tasks, sockets and clocks. This module owns the
*bookkeeping*: which connections exist for which key, who holds them, who is waiting, what
is being dialled, and how much of each limit is spent. Every transition is a plain synchronous
method. Under trio no other task runs while synchronous code runs, so each transition is atomic
with respect to the whole program, and it can be tested without an event loop (the tests drive
it directly, including with a hypothesis rule-based model).

A transition never performs a side effect. It appends :class:`Effect` values to
:attr:`PoolState.effects`, which the caller drains with :meth:`PoolState.take_effects` and
carries out afterwards: wake a waiter with a lease, fail a waiter, start a connect, close a
connection. (The hot paths, :meth:`PoolState.acquire_nowait` and a release that goes straight
back to idle, produce no effects and allocate nothing beyond the lease.)

Rules
-----

Rule 1 (accounting). The pool's open connections plus its connects in flight never exceed
``max_connections``: the global limit counts connections, whatever they weigh, because that is
what a user who writes ``max_connections=20`` means. Weight is a per-key budget: a key's
*usage* is the weight of its open connections plus the reserved weight of its connects in
flight, and never exceeds ``max_connections_per_key``. (An HTTP/2 connection that weighs the
whole budget keeps its origin from also opening HTTP/1.1 connections; a connect reserves the
weight it hopes for and corrects it when the protocol is known. A connection whose real
weight is larger than its reservation is the one exception: the reservation is documented to
be an upper bound.) A connection leaves the accounting the moment it is closed, dropped or
found dead.

Rule 2 (fairness). Waiters of a key are served strictly in arrival order. A connection that
becomes available goes to the oldest waiter of its key first, and only to the idle store when
nobody waits. Idle connections are handed out by the release policy: LIFO (newest first, so
surplus connections age out) or FIFO (oldest first, spreading load).

Rule 3 (late binding). A connect is *attributed* to the waiters it was started for (as many as
its reserved capacity covers) but does not belong to them: when it finishes, its connection
serves whoever is first in line, or goes idle. If it fails, exactly its attributed waiters get
the error and any other waiter is re-evaluated (maybe a new connect starts for it); nobody hangs.
A waiter served by another source, or cancelled, hands its attribution to the oldest
unattributed waiter, so a connect in flight keeps covering demand and no redundant connect
starts (Envoy's "count the capacity of connects in flight" rule).

Rule 4 (room). When a key needs a connection and the pool's global limit is spent, the least
recently used idle connection of any key is closed to make room (one is always enough: every
connection counts as one). If there is none, the key joins a FIFO of *blocked* keys that is
served as soon as room appears (a connection closes, a connect fails, or a connection goes
idle and can be evicted).

Rule 5 (exactly once). A lease is released at most once; releasing it again, or after the pool
closed, does nothing. A waiter is either served, failed or cancelled, exactly once.

Rule 6 (abandoned leases). A lease the garbage collector finds unreleased (``Lease.__del__``)
gives its slot back, but not at once: the collector runs in the middle of any code, even of a
transition here, and on any thread. So ``__del__`` only appends the lease's record to
:attr:`PoolState.abandoned` (``list.append`` is atomic) and calls
:attr:`PoolState.on_abandoned`, which the driver sets to something safe to call from anywhere;
the driver then calls :meth:`PoolState.reclaim` (with no ``on_abandoned``, no pool runs this
state and a collected lease is ignored). The connection is retired, not reused: the
exchange that was abandoned on it left it in an unknown state (half a response unread,
say). It takes no new lease and closes when its last lease ends, at once for a connection of
capacity 1.

Rule 7 (spare connections). :meth:`PoolState.prewarm` starts connects nobody waits for, until
the key's *spare capacity* reaches a number: the spare capacity of its ready open connections
(capacity minus leases, so one HTTP/2 connection counts as many) plus the reserved capacity of
its connects in flight that no waiter is attributed to, minus the waiters nothing covers. It
takes only free room: it never evicts (Rule 4) and starts nothing while a key is blocked, and
stops at the key's own budget. Its connects are late-bound like any other (Rule 3): a waiter
that arrives meanwhile is attributed to one and served first. One that has no waiter
attributed can be withdrawn (:meth:`PoolState.abandon`, a :class:`CancelConnect` effect),
leaving the counters as if it had never started; and requests come first: when a key needs
room and no idle connection can be evicted, such a connect is withdrawn to make it.

With ``min_idle_per_key``, :meth:`PoolState.refill` does the same for every key *in use*: a
key leased within the last ``idle_timeout`` seconds (a lease held, a waiter, or a lease that
ended that recently). The driver calls it on events, not on a schedule: a connection closed,
a connect finished, a backoff ran out. Keys not in use are not refilled, keys with waiters
are left to their own connects, and a key whose refill connects fail (or whose refill
connections the peer closes before they serve anything) waits 1 s before the next try, then
2, 4, ... up to 60 s, each try one connect (its success brings the rest); the wait restarts
at 1 s once a refill connection has served a lease. Idle expiry spares a
key in use its last ``min_idle_per_key`` of spare capacity: an expired idle connection that
the key needs for its minimum stays open and its idle clock restarts (it is looked at again
``idle_timeout`` later), so a refilled connection is never expired and reopened in a loop.
Once the key has not been leased for ``idle_timeout`` seconds its connections expire as usual.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import math
import random
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

from ._exceptions import TooManyWaiters
from ._options import (
    DEFAULT_RESERVATION as DEFAULT_RESERVATION,
    PoolOptionArgs,
    PoolOptions,
    ReleasePolicy as ReleasePolicy,
    Reservation as Reservation,
    resolve_options,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

# One private name is used across classes here, on purpose (that use silences pyright's
# reportPrivateUsage): ``Lease._record``, the state machine's handle that a lease carries back
# to `PoolState.release`; it is not for users.

__all__ = [
    "CancelConnect",
    "Close",
    "LeakTrace",
    "Deliver",
    "Effect",
    "Fail",
    "FailReason",
    "KeyStatistics",
    "Lease",
    "PoolState",
    "PoolStatistics",
    "ReleasePolicy",
    "Reservation",
    "StartConnect",
    "Waiter",
]

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")

# Rule 7: a key whose refill connects fail waits this long before the next try, doubling up
# to the maximum.
_REFILL_BACKOFF = 1.0
_REFILL_BACKOFF_MAX = 60.0


class _RecState(enum.Enum):
    """Where a connection's record is in its life."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"


class _Record(Generic[K, C]):
    """One connection, from the moment its connect starts until it is closed."""

    __slots__ = (
        "available",
        "capacity",
        "connection",
        "created_at",
        "expires_at",
        "idle_since",
        "kept_uses",
        "key",
        "leases",
        "ready",
        "reserved_capacity",
        "retiring",
        "spare_token",
        "state",
        "sub",
        "uses",
        "waiters",
        "weight",
    )

    def __init__(self, sub: _SubPool[K, C], reservation: Reservation) -> None:
        self.sub: _SubPool[K, C] = sub
        self.key: K = sub.key
        self.connection: C | None = None
        self.state: _RecState = _RecState.CONNECTING
        self.weight: int = reservation.weight
        self.reserved_capacity: int = reservation.capacity
        self.capacity: int = 0
        self.leases: int = 0
        self.uses: int = 0
        self.ready: bool = False
        self.retiring: bool = False
        self.available: bool = False
        self.created_at: float = 0.0
        self.expires_at: float = math.inf
        self.idle_since: float = 0.0
        # ``uses`` when idle expiry last kept it open (Rule 7): ``idle_since`` marks the end of
        # a lease only if it has been leased since.
        self.kept_uses: int = 0
        # The driver's token for a connect started by prewarm() or refill() (Rule 7).
        self.spare_token: Any = None
        # Waiters this connect was started for (Rule 3). Insertion-ordered.
        self.waiters: dict[Waiter[K, C], None] = {}

    def __repr__(self) -> str:
        return (
            f"<connection key={self.key!r} {self.state.value} "
            f"leases={self.leases}/{self.capacity} weight={self.weight}>"
        )

    @property
    def in_flight(self) -> bool:
        """True while its connect runs and counts in the pool (not failed or abandoned)."""
        return self.state is _RecState.CONNECTING


class _WaiterState(enum.Enum):
    WAITING = "waiting"
    SERVED = "served"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Waiter(Generic[K, C]):
    """A task waiting for a connection to ``key``.

    ``token`` is the driver's: the trio task to wake. The state machine never looks at it.
    """

    __slots__ = ("connect", "key", "state", "token")

    def __init__(self, key: K) -> None:
        self.key: K = key
        self.state: _WaiterState = _WaiterState.WAITING
        self.connect: _Record[K, C] | None = None
        self.token: Any = None

    @property
    def waiting(self) -> bool:
        """True until the waiter is served, failed or cancelled."""
        return self.state is _WaiterState.WAITING

    def __repr__(self) -> str:
        return f"<Waiter key={self.key!r} {self.state.value}>"


class Lease(Generic[K, C]):
    """One use of a pooled connection, from acquire to release.

    Give it back with :meth:`Pool.release` (or use :meth:`Pool.lease`, which does). Releasing
    twice, or after the pool closed, does nothing. A lease garbage-collected while its pool
    runs, unreleased, gives a `ResourceWarning` saying where it was acquired (with
    ``leak_timeout`` set) and its slot back; its connection is closed, not reused.

    Attributes:
        key: The key the connection was made for.
        connection: The connection itself.
        is_reused: True if the connection served an earlier lease (a keep-alive connection
            that the peer may have closed meanwhile).
    """

    __slots__ = ("_record", "_trace", "connection", "is_reused", "key", "released")

    # Where it was acquired, set by the pool only when leak detection is on (unset otherwise:
    # nothing is stored on the hot path).
    _trace: LeakTrace

    def __init__(self, record: _Record[K, C], connection: C) -> None:
        self._record = record
        self.key: K = record.key
        self.connection: C = connection
        self.is_reused: bool = record.uses > 1
        self.released: bool = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Lease key={self.key!r} {state} connection={self.connection!r}>"

    def __del__(self) -> None:
        # Collected without a release (see Rule 6). This runs wherever the collector runs:
        # in any task, inside any other code, on any thread, at interpreter exit. So it only
        # reads, appends to a list and calls the owner's thread-safe notifier.
        if self.released:
            return
        self.released = True
        record = self._record
        if record.state is not _RecState.OPEN:
            return  # The pool closed it (or it died) meanwhile: no slot is held.
        owner = record.sub.owner
        notify = owner.on_abandoned
        if notify is None:
            return  # No running pool drives this state (a test, say): nobody to return it to.
        trace: LeakTrace | None = getattr(self, "_trace", None)
        owner.abandoned.append((record, trace))
        with contextlib.suppress(Exception):  # nothing could be reported from here
            notify()
        message = _abandoned_message(self.key, trace)
        warnings.warn(message, ResourceWarning, stacklevel=1, source=self)


class LeakTrace:
    """Where and when a lease was acquired, kept while leak detection is on."""

    __slots__ = (
        "acquired_at",
        "connection",
        "deadline",
        "frames",
        "key",
        "reported",
        "task_name",
    )

    def __init__(
        self,
        key: Hashable,
        connection: object,
        acquired_at: float,
        deadline: float,
        task_name: str,
        frames: list[tuple[str, int, str, None]],
    ) -> None:
        self.key = key
        self.connection = connection
        self.acquired_at = acquired_at
        self.deadline = deadline
        self.task_name = task_name
        # (filename, line number, function, None), oldest first: what
        # traceback.StackSummary.from_list takes. The source lines are looked up only if
        # the stack is ever shown.
        self.frames = frames
        self.reported = False

    def format(self) -> str:
        """The task and the stack, as a traceback shows them."""
        stack = "".join(traceback.StackSummary.from_list(self.frames).format())
        return f"task {self.task_name!r}, at (most recent call last):\n{stack}"


def _abandoned_message(key: Hashable, trace: LeakTrace | None) -> str:
    head = (
        f"a lease of key {key!r} was garbage-collected without release(): its connection "
        "is closed and its slot returned to the pool; release leases with pool.release(), "
        "or use 'async with pool.lease(key)'"
    )
    if trace is None:
        return f"{head}. Enable leak_timeout to see where it was acquired"
    return f"{head}. It was acquired by {trace.format()}"


class FailReason(enum.Enum):
    """Why a waiter is failed."""

    CONNECT_FAILED = "connect failed"
    POOL_CLOSED = "pool closed"


class Deliver(Generic[K, C]):
    """Wake ``waiter`` with ``lease``."""

    __slots__ = ("lease", "waiter")

    def __init__(self, waiter: Waiter[K, C], lease: Lease[K, C]) -> None:
        self.waiter = waiter
        self.lease = lease

    def __repr__(self) -> str:
        return f"Deliver({self.waiter!r}, {self.lease!r})"


class Fail(Generic[K, C]):
    """Wake ``waiter`` with an error: its connect failed with ``cause``, or the pool closed."""

    __slots__ = ("cause", "reason", "waiter")

    def __init__(
        self, waiter: Waiter[K, C], reason: FailReason, cause: BaseException | None = None
    ) -> None:
        self.waiter = waiter
        self.reason = reason
        self.cause = cause

    def __repr__(self) -> str:
        return f"Fail({self.waiter!r}, {self.reason.name}, {self.cause!r})"


class StartConnect(Generic[K, C]):
    """Run the connector for ``record.key``; report back with ``connect_succeeded`` or
    ``connect_failed``."""

    __slots__ = ("record",)

    def __init__(self, record: _Record[K, C]) -> None:
        self.record = record

    @property
    def key(self) -> K:
        return self.record.key

    def __repr__(self) -> str:
        return f"StartConnect({self.record!r})"


class Close(Generic[K, C]):
    """Close ``connection`` (it has left the pool's accounting already)."""

    __slots__ = ("connection", "key")

    def __init__(self, key: K, connection: C) -> None:
        self.key = key
        self.connection = connection

    def __repr__(self) -> str:
        return f"Close({self.key!r}, {self.connection!r})"


class CancelConnect(Generic[K, C]):
    """Cancel the connect of ``record``, which has left the pool's accounting already (Rule
    6); a connection it brings anyway is closed without entering the pool."""

    __slots__ = ("record",)

    def __init__(self, record: _Record[K, C]) -> None:
        self.record = record

    def __repr__(self) -> str:
        return f"CancelConnect({self.record!r})"


Effect = Deliver[K, C] | Fail[K, C] | StartConnect[K, C] | Close[K, C] | CancelConnect[K, C]


@attrs.frozen
class KeyStatistics:
    """A snapshot of one key's sub-pool.

    Attributes:
        idle: Open connections with no lease.
        in_use: Open connections with at least one lease.
        connecting: Connects in flight.
        waiting: Tasks waiting for a connection.
        leases: Leases held (more than ``in_use`` when connections take several at once).
        weight: The key's weight, spent against ``max_connections_per_key``: its open
            connections' weights plus the weights its connects in flight reserve.
    """

    idle: int = 0
    in_use: int = 0
    connecting: int = 0
    waiting: int = 0
    leases: int = 0
    weight: int = 0


@attrs.frozen
class PoolStatistics:
    """A snapshot of the whole pool: totals over every key, and each key's own numbers.

    Attributes:
        idle: Open connections with no lease.
        in_use: Open connections with at least one lease.
        connecting: Connects in flight.
        waiting: Tasks waiting for a connection.
        leases: Leases held.
        weight: The keys' weights added up (each key's is spent against
            ``max_connections_per_key``; ``max_connections`` counts connections, see
            ``connections`` and ``connecting``).
        max_connections: The pool's global limit on open connections plus connects in
            flight.
        keys: Per-key statistics, for every key with anything open, in flight or waiting.
        closed: True once the pool is closed.
        connects: Connects that succeeded since the pool was made (cumulative, like the
            counts below; pool-wide only: a key's figures are forgotten when it empties).
        connect_failures: Connects that failed or were cancelled, since the pool was made.
            ``connects + connect_failures + connecting`` is every connect ever started.
        leases_served: Leases handed out since the pool was made, with or without waiting.
        waits: Waits for a connection that ended (a task that found none available joined
            its key's line, and was served, failed, timed out or was cancelled).
        wait_time: Seconds those waits took, added up (``wait_time / waits`` is the mean
            wait). A wait is counted when it ends.
    """

    idle: int
    in_use: int
    connecting: int
    waiting: int
    leases: int
    weight: int
    max_connections: int
    keys: Mapping[Hashable, KeyStatistics]
    closed: bool = False
    connects: int = 0
    connect_failures: int = 0
    leases_served: int = 0
    waits: int = 0
    wait_time: float = 0.0

    @property
    def connections(self) -> int:
        """Open connections (idle plus in use)."""
        return self.idle + self.in_use


class _SubPool(Generic[K, C]):
    """Everything the pool knows about one key."""

    __slots__ = (
        "available",
        "connecting",
        "key",
        "owner",
        "records",
        "unattributed",
        "usage",
        "waiters",
    )

    def __init__(self, key: K, owner: PoolState[K, C]) -> None:
        self.key: K = key
        self.owner: PoolState[K, C] = owner  # for an abandoned lease's way back (Rule 6)
        # Open, ready connections with spare capacity, in release order (newest last).
        self.available: OrderedDict[_Record[K, C], None] = OrderedDict()
        # Every open connection of this key.
        self.records: dict[_Record[K, C], None] = {}
        self.connecting: dict[_Record[K, C], None] = {}
        # Waiting tasks, oldest first; and the subset no connect is attributed to.
        self.waiters: OrderedDict[Waiter[K, C], None] = OrderedDict()
        self.unattributed: OrderedDict[Waiter[K, C], None] = OrderedDict()
        self.usage: int = 0

    def is_empty(self) -> bool:
        """Whether the sub-pool holds nothing (it can then be forgotten)."""
        return not (self.records or self.connecting or self.waiters)


def _never(_connection: object) -> bool:
    return False


def _always(_connection: object) -> bool:
    return True


class PoolState(Generic[K, C]):
    """The bookkeeping of a keyed connection pool (see the module docstring for the rules).

    Args:
        options: The pool's options (:class:`~trio_connpool.PoolOptions`); this reads the
            limits, the release policy, the idle and lifetime expiry and ``reserve`` (called
            with a key when a connect starts, it says what to reserve). Or give them as
            keywords.
        is_closed: Tells whether a connection is dead (checked on the one connection about to
            be handed out, and on release).
        is_ready: Tells whether a connection may take new leases now.
    """

    def __init__(
        self,
        options: PoolOptions | None = None,
        *,
        is_closed: Callable[[C], bool] = _never,
        is_ready: Callable[[C], bool] = _always,
        **keywords: Unpack[PoolOptionArgs],
    ) -> None:
        options = resolve_options(options, keywords)
        # Copied out of the options: the hot paths read them as attributes of their own.
        self.options = options
        self.max_connections: int = options.max_connections
        self.max_connections_per_key: int | None = options.max_connections_per_key
        self.lifo: bool = options.release_policy is ReleasePolicy.LIFO
        self.release_policy: ReleasePolicy = options.release_policy
        self.max_waiters: int | None = options.max_waiters
        self.idle_timeout: float | None = options.idle_timeout
        self.max_lifetime: float | None = options.max_lifetime
        self.lifetime_jitter: float = float(options.lifetime_jitter)
        self._reserve: Callable[[K], Reservation] | None = options.reserve
        self._is_closed = is_closed
        self._is_ready = is_ready
        self._rng = options.rng if options.rng is not None else random.Random()

        self.closed: bool = False
        # Open connections plus connects in flight, against max_connections (Rule 1).
        self.connections: int = 0
        self.effects: list[Effect[K, C]] = []
        self._subpools: dict[K, _SubPool[K, C]] = {}
        # Open connections with no lease, least recently released first (Rule 4; idle expiry).
        self._idle: OrderedDict[_Record[K, C], None] = OrderedDict()
        # (expires_at, sequence, record): lifetime expiry, lazily cleaned.
        self._lifetimes: list[tuple[float, int, _Record[K, C]]] = []
        self._sequence = 0
        # Keys with waiters no connect covers, held back by the global limit (Rule 4).
        self._blocked: OrderedDict[K, None] = OrderedDict()
        # Leases collected unreleased, and who to tell (Rule 6): appended to from anywhere.
        self.abandoned: list[tuple[_Record[K, C], LeakTrace | None]] = []
        self.on_abandoned: Callable[[], None] | None = None
        # Rule 7: min_idle_per_key (0: off); each key's latest known end of a lease, folded
        # in from connections that closed or whose idle clock restarted; the refill backoff
        # per key, (next try, current delay); keys whose unused refill connection died.
        self.min_idle: int = options.min_idle_per_key or 0
        self._last_used: dict[K, float] = {}
        self._retry: dict[K, tuple[float, float]] = {}
        self._died_unused: list[K] = []
        # Connects started by prewarm() or refill() still in flight, oldest first.
        self._spares: dict[_Record[K, C], None] = {}
        # Cumulative counts (PoolStatistics); the driver adds the waits, which it times.
        self.connects: int = 0
        self.connect_failures: int = 0
        self.leases_served: int = 0
        self.waits: int = 0
        self.wait_time: float = 0.0

    # ------------------------------------------------------------------ effects

    def take_effects(self) -> list[Effect[K, C]]:
        """Return the effects queued so far and forget them."""
        effects = self.effects
        self.effects = []
        return effects

    # ------------------------------------------------------------------ acquire

    def acquire_nowait(self, key: K) -> Lease[K, C] | None:
        """Lease an available connection of ``key`` at once, or return None.

        Never starts a connect and never queues: returns None if waiters are already queued
        for the key (they come first) or no open connection has spare capacity. Dead
        connections met on the way are dropped (queued as :class:`Close` effects).
        """
        sub = self._subpools.get(key)
        if sub is None or sub.waiters or self.closed:
            return None
        available = sub.available
        connections = self.connections
        lease = None
        while available:
            record = next(reversed(available)) if self.lifo else next(iter(available))
            if self._usable(record):
                lease = self._lease(record)
                break
        if self.connections < connections and self._blocked:
            self._unblock()  # Dead connections were dropped: their room goes to blocked keys.
        return lease

    def enqueue(self, key: K) -> Waiter[K, C]:
        """Queue a waiter for ``key`` and do what it takes to serve it.

        The waiter may be served or failed at once (see the effects). Raises
        :class:`TooManyWaiters` if ``max_waiters`` are already queued for the key.
        """
        if self.closed:
            raise RuntimeError("enqueue on a closed pool state")
        sub = self._subpools.get(key)
        waiting = len(sub.waiters) if sub is not None else 0
        if self.max_waiters is not None and waiting >= self.max_waiters:
            raise TooManyWaiters(
                f"{waiting} tasks already wait for this key (max_waiters)", key=key
            )
        if sub is None:
            sub = self._subpools[key] = _SubPool(key, self)
        waiter: Waiter[K, C] = Waiter(key)
        sub.waiters[waiter] = None
        sub.unattributed[waiter] = None
        try:
            self._pump(sub)
        except BaseException:
            # The user's reserve() raised: the caller will never park, so withdraw the waiter
            # (connects already started for it stay, late-bound, for whoever comes next).
            if waiter.state is _WaiterState.WAITING:
                waiter.state = _WaiterState.CANCELLED
                self._unqueue(sub, waiter)
                self._forget_if_empty(sub)
            raise
        return waiter

    def cancel(self, waiter: Waiter[K, C]) -> None:
        """Withdraw a waiter that gave up (cancelled, timed out). Idempotent.

        A waiter that was already served or failed is left alone: the lease it was handed is
        the caller's to release.
        """
        if waiter.state is not _WaiterState.WAITING:
            return
        waiter.state = _WaiterState.CANCELLED
        sub = self._subpools[waiter.key]
        self._unqueue(sub, waiter)
        self._pump(sub)
        self._forget_if_empty(sub)
        if self._blocked:
            self._unblock()  # The key may have left the head of the blocked keys' line.

    # ------------------------------------------------------------------ release

    def release(self, lease: Lease[K, C], now: float, *, discard: bool = False) -> bool:
        """Give a lease back. With ``discard`` (or if the connection is retiring) close it.

        Returns True if the connection is now idle (its idle expiry is ``now`` plus the idle
        timeout, which may be the earliest deadline the driver's timer knows of).
        """
        if lease.released:
            return False
        lease.released = True
        record = lease._record  # pyright: ignore[reportPrivateUsage]
        if record.state is not _RecState.OPEN:
            return False  # Dropped meanwhile (closed pool, dead connection): nothing to return.
        record.leases -= 1
        sub = record.sub
        # No liveness probe here: the connection is checked when it is next handed out
        # (a probe costs a syscall, so only the connection being handed out is ever probed).
        if discard or (record.retiring and record.leases == 0):
            record.idle_since = now
            self._drop(record)
            self._after_drop(sub)
            return False
        if record.leases == 0:
            record.idle_since = now
            self._idle[record] = None
        # A connection retiring, not ready, or whose capacity was lowered under its leases
        # takes no new lease; if it went idle it can still be evicted for a blocked key.
        if not record.retiring and record.ready and record.leases < record.capacity:
            if record.available:
                sub.available.move_to_end(record)
            else:
                record.available = True
                sub.available[record] = None
            if sub.waiters:
                self._pump(sub)  # Serve; and take the key off the blocked list if served.
                return record.leases == 0
        if self._blocked and record.leases == 0:
            self._unblock()
        return record.leases == 0

    def reclaim(self) -> list[tuple[K, C, LeakTrace | None]]:
        """Take back the slots of leases collected unreleased (Rule 6).

        Each connection is retired: no new lease, closed when its last lease ends. Returns
        the key, connection and trace of each lease taken back (one whose connection closed
        meanwhile is skipped).
        """
        abandoned = self.abandoned
        reclaimed: list[tuple[K, C, LeakTrace | None]] = []
        while True:
            try:
                record, trace = abandoned.pop()  # atomic, like the appends
            except IndexError:
                return reclaimed
            if record.state is not _RecState.OPEN:
                continue
            assert record.connection is not None
            reclaimed.append((record.key, record.connection, trace))
            record.leases -= 1
            record.retiring = True
            if record.available:
                record.available = False
                del record.sub.available[record]
            if record.leases == 0:
                self._drop(record)
                self._after_drop(record.sub)

    # ------------------------------------------------------------------ connects

    def connect_succeeded(
        self,
        record: _Record[K, C],
        connection: C,
        now: float,
        *,
        weight: int = 1,
        capacity: int = 1,
        ready: bool = True,
    ) -> None:
        """A connect finished. Its connection serves the first waiter, or goes idle.

        The caller has checked that ``connection`` is not closed; it is handed out without
        another check. (A connection closed on arrival is a failed connect: report it with
        :meth:`connect_failed`.) If the pool closed meanwhile, a :class:`Close` effect is
        queued for it instead.
        """
        if record.state is not _RecState.CONNECTING:
            raise RuntimeError(f"connect_succeeded on {record!r}")
        sub = record.sub
        del sub.connecting[record]
        if record.spare_token is not None:
            self._spares.pop(record, None)
        self.connects += 1
        if self.closed:
            record.state = _RecState.CLOSED
            sub.usage -= record.weight
            self.connections -= 1
            self.effects.append(Close(record.key, connection))
            self._forget_if_empty(sub)
            return
        for waiter in record.waiters:
            waiter.connect = None
            sub.unattributed[waiter] = None
        record.waiters.clear()
        record.state = _RecState.OPEN
        record.connection = connection
        record.created_at = record.idle_since = now
        # The real weight corrects the reservation in the key's budget (Rule 1); the global
        # count is unchanged: it was one connection in flight and is one open connection.
        sub.usage += weight - record.weight
        record.weight = weight
        record.capacity = max(capacity, 0)
        record.ready = ready
        sub.records[record] = None
        self._idle[record] = None
        if self.max_lifetime is not None:
            jitter = self._rng.random() * self.lifetime_jitter if self.lifetime_jitter else 0.0
            record.expires_at = now + self.max_lifetime * (1.0 - jitter)
            self._sequence += 1
            heapq.heappush(self._lifetimes, (record.expires_at, self._sequence, record))
        if ready and record.capacity > 0:
            record.available = True
            sub.available[record] = None
            # Serve from it without asking is_closed() again: the caller just did. A second
            # probe could find it dead and start another connect for the same waiters, which
            # is the loop the caller's bounded retries exist to end.
            waiters = sub.waiters
            while waiters and record.available:
                waiter = next(iter(waiters))
                self._unqueue(sub, waiter)
                waiter.state = _WaiterState.SERVED
                self.effects.append(Deliver(waiter, self._lease(record)))
        self._pump(sub)
        if self._blocked:
            self._unblock()  # It may have gone idle: evictable for a key blocked elsewhere.

    def connect_failed(self, record: _Record[K, C], cause: BaseException | None) -> None:
        """A connect failed (or was cancelled). Its attributed waiters get the error."""
        if record.state is not _RecState.CONNECTING:
            raise RuntimeError(f"connect_failed on {record!r}")
        sub = record.sub
        del sub.connecting[record]
        if record.spare_token is not None:
            self._spares.pop(record, None)
        self.connect_failures += 1
        record.state = _RecState.CLOSED
        sub.usage -= record.weight
        self.connections -= 1
        for waiter in record.waiters:
            waiter.connect = None
            waiter.state = _WaiterState.FAILED
            del sub.waiters[waiter]
            self.effects.append(Fail(waiter, FailReason.CONNECT_FAILED, cause))
        record.waiters.clear()
        if not self.closed:
            self._pump(sub)
            self._unblock()
        self._forget_if_empty(sub)

    # ------------------------------------------------------------------ live changes

    def refresh(self, record: _Record[K, C], *, closed: bool, ready: bool, capacity: int) -> None:
        """A connection says its state changed: closed, ready again, new capacity."""
        if record.state is not _RecState.OPEN:
            return
        sub = record.sub
        if closed:
            if self.min_idle and record.uses == 0 and record.spare_token is not None:
                self._died_unused.append(record.key)
            self._drop(record)
            self._after_drop(sub)
            return
        record.ready = ready
        record.capacity = max(capacity, 0)
        want = ready and not record.retiring and record.leases < record.capacity
        if want and not record.available:
            record.available = True
            sub.available[record] = None
            self._pump(sub)
        elif not want and record.available:
            record.available = False
            del sub.available[record]

    def expire(self, now: float) -> None:
        """Close idle connections past the idle timeout and retire those past their lifetime.

        A connection past its lifetime that still has leases takes no new ones and is closed
        when the last is released.
        """
        if self.idle_timeout is not None:
            idle_timeout = self.idle_timeout
            kept: list[_Record[K, C]] = []
            while self._idle:
                record = next(iter(self._idle))
                # The same sum as next_deadline(): ``now - idle_timeout`` can round the other
                # way, and the timer would then wake up at its deadline for ever.
                if record.idle_since + idle_timeout > now:
                    break
                if self.min_idle and self._keep(record, now):
                    del self._idle[record]
                    kept.append(record)
                    continue
                self._drop(record)
                self._after_drop(record.sub)
            for record in kept:  # Rule 7: their idle clock restarts
                self._note_use(record)
                record.kept_uses = record.uses
                record.idle_since = now
                self._idle[record] = None
        lifetimes = self._lifetimes
        while lifetimes and lifetimes[0][0] <= now:
            record = heapq.heappop(lifetimes)[2]
            if record.state is not _RecState.OPEN:
                continue
            if record.leases == 0:
                self._drop(record)
                self._after_drop(record.sub)
            else:
                record.retiring = True
                if record.available:
                    record.available = False
                    del record.sub.available[record]

    def next_deadline(self) -> float:
        """When :meth:`expire` next has something to do (``math.inf`` for never)."""
        deadline = math.inf
        if self.idle_timeout is not None and self._idle:
            deadline = next(iter(self._idle)).idle_since + self.idle_timeout
        for retry_at, _ in self._retry.values():
            if retry_at > -math.inf:  # -inf: due, waiting for room (a close wakes it)
                deadline = min(deadline, retry_at)
        lifetimes = self._lifetimes
        while lifetimes and lifetimes[0][2].state is not _RecState.OPEN:
            heapq.heappop(lifetimes)
        if lifetimes and lifetimes[0][0] < deadline:
            deadline = lifetimes[0][0]
        return deadline

    def close(self) -> None:
        """Close the pool: fail every waiter, close every open connection.

        Connects in flight are left to the driver to cancel; each reports back with
        :meth:`connect_failed` or :meth:`connect_succeeded` (which then closes it).
        """
        if self.closed:
            return
        self.closed = True
        self._blocked.clear()
        self._spares.clear()
        self._retry.clear()
        self._last_used.clear()
        for sub in list(self._subpools.values()):
            for waiter in sub.waiters:
                waiter.state = _WaiterState.FAILED
                if waiter.connect is not None:
                    del waiter.connect.waiters[waiter]
                    waiter.connect = None
                self.effects.append(Fail(waiter, FailReason.POOL_CLOSED))
            sub.waiters.clear()
            sub.unattributed.clear()
            for record in list(sub.records):
                self._drop(record)
            self._forget_if_empty(sub)

    # ------------------------------------------------------------------ spare connections

    def spare(self, key: K) -> int:
        """The key's spare capacity (Rule 7): what it can serve at once without a new
        connect. An idle HTTP/1.1 connection counts 1, an HTTP/2 one its free streams."""
        sub = self._subpools.get(key)
        if sub is None:
            return 0
        spare = -len(sub.unattributed)
        for record in sub.available:
            spare += record.capacity - record.leases
        for record in sub.connecting:
            spare += record.reserved_capacity - len(record.waiters)
        return spare

    def prewarm(self, key: K, n: int, token: Any) -> list[_Record[K, C]]:
        """Start connects for ``key`` until its spare capacity reaches ``n`` or a limit says
        no (Rule 7); return them. Each carries ``token`` (the driver's) as its
        ``spare_token``; their :class:`StartConnect` effects are queued as usual."""
        if self.closed:
            raise RuntimeError("prewarm on a closed pool state")
        sub = self._subpools.get(key)
        if sub is None:
            sub = self._subpools[key] = _SubPool(key, self)
        started: list[_Record[K, C]] = []
        per_key = self.max_connections_per_key
        try:
            spare = self.spare(key)
            while spare < n and not self._blocked and self.connections < self.max_connections:
                reservation = self._reserve(key) if self._reserve else DEFAULT_RESERVATION
                if per_key is not None and sub.usage + reservation.weight > per_key:
                    break
                record: _Record[K, C] = _Record(sub, reservation)
                record.spare_token = token
                self._spares[record] = None
                sub.connecting[record] = None
                sub.usage += reservation.weight
                self.connections += 1
                self.effects.append(StartConnect(record))
                started.append(record)
                spare += reservation.capacity
            self._attribute(sub)
        finally:
            self._forget_if_empty(sub)
        return started

    def abandon(self, record: _Record[K, C]) -> bool:
        """Withdraw a connect in flight that no waiter is attributed to, as if it had never
        started; the driver cancels it (and closes what it brings anyway). False, and
        nothing done, if it has finished or waiters count on it."""
        if record.state is not _RecState.CONNECTING or record.waiters:
            return False
        self._withdraw(record)
        sub = record.sub
        if not self.closed:
            self._pump(sub)
            self._unblock()
        self._forget_if_empty(sub)
        return True

    def _withdraw(self, record: _Record[K, C]) -> None:
        sub = record.sub
        del sub.connecting[record]
        self._spares.pop(record, None)
        record.state = _RecState.CLOSED
        sub.usage -= record.weight
        self.connections -= 1
        self.effects.append(CancelConnect(record))

    def refill(self, now: float, token: Any) -> None:
        """Start connects for every key in use below ``min_idle_per_key`` (Rule 7)."""
        if not self.min_idle or self.closed:
            return
        for key in self._died_unused:
            self.refill_failed(key, now)
        self._died_unused.clear()
        idle_timeout = math.inf if self.idle_timeout is None else self.idle_timeout
        # Keys with a backoff too: one whose refill connection died unused may be in use no
        # more (or never was), and its backoff must go, or its time, passed, stays the
        # timer's next deadline.
        keys = dict.fromkeys(self._last_used)
        keys.update(dict.fromkeys(self._subpools))
        keys.update(dict.fromkeys(self._retry))
        for key in keys:
            sub = self._subpools.get(key)
            last = self._key_used(key, sub, now)
            if last == -math.inf or last + idle_timeout <= now:
                # Not in use (or never leased): no refill, no backoff to remember.
                self._last_used.pop(key, None)
                self._retry.pop(key, None)
                continue
            retry = self._retry.get(key)
            if (
                retry is not None
                and sub is not None
                and any(record.uses and record.spare_token is not None for record in sub.records)
            ):
                self._retry.pop(key)  # A refill connection served: the host is fine.
                retry = None
            if retry is not None and now < retry[0]:
                continue  # Backing off, or its refill connect is in flight.
            if sub is not None and sub.waiters:
                # Requests' own connects come first (Rule 3); a close or a connect wakes
                # this again.
                if retry is not None:
                    self._retry[key] = (-math.inf, retry[1])
                continue
            # After a failure, one connect probes the host; its success brings the rest.
            target = self.min_idle if retry is None else min(self.min_idle, self.spare(key) + 1)
            started = self.prewarm(key, target, token)
            if retry is not None:
                # In flight: its outcome sets the next try. Nothing started (no room): due
                # as soon as room appears, with the same delay if it fails.
                self._retry[key] = (math.inf if started else -math.inf, retry[1])

    def refill_failed(self, key: K, now: float) -> None:
        """A refill connect for ``key`` failed: back off, 1 s doubling up to 60 s."""
        retry = self._retry.get(key)
        if retry is not None and now < retry[0] < math.inf:
            return  # Another connect of the same round failed: one step per round.
        delay = _REFILL_BACKOFF if retry is None else min(2 * retry[1], _REFILL_BACKOFF_MAX)
        self._retry[key] = (now + delay, delay)

    def refill_due(self, now: float) -> bool:
        """Whether a key's refill backoff has run out (the driver then calls refill())."""
        return any(-math.inf < retry_at <= now for retry_at, _ in self._retry.values())

    def refill_succeeded(self, key: K) -> None:
        """A refill connect for ``key`` succeeded: the next refill may start at once (the
        delay stays until a refill connection serves a lease)."""
        retry = self._retry.get(key)
        if retry is not None:
            self._retry[key] = (-math.inf, retry[1])

    def _key_used(self, key: K, sub: _SubPool[K, C] | None, now: float) -> float:
        """When ``key`` was last leased: ``now`` if it is, ``-inf`` if never."""
        last = self._last_used.get(key, -math.inf)
        if sub is None:
            return last
        if sub.waiters:
            return now
        for record in sub.records:
            if record.leases:
                return now
            if record.uses > record.kept_uses and record.idle_since > last:
                last = record.idle_since
        return last

    def _note_use(self, record: _Record[K, C]) -> None:
        """Fold the end of ``record``'s last lease into its key's last use (Rule 7)."""
        if record.uses > record.kept_uses and record.leases == 0:
            key = record.key
            if record.idle_since > self._last_used.get(key, -math.inf):
                self._last_used[key] = record.idle_since

    def _keep(self, record: _Record[K, C], now: float) -> bool:
        """Whether idle expiry keeps ``record`` open for its key's minimum (Rule 7)."""
        sub = record.sub
        assert self.idle_timeout is not None
        if self._key_used(sub.key, sub, now) + self.idle_timeout <= now:
            return False
        mine = record.capacity - record.leases if record.available else 0
        return self.spare(sub.key) - mine < self.min_idle

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of every counter."""
        keys: dict[Hashable, KeyStatistics] = {}
        # The pool's figures: each key's, added up.
        total_idle = total_in_use = total_connecting = total_waiting = 0
        total_leases = total_weight = 0
        for key, sub in self._subpools.items():
            idle = in_use = leases = 0
            for record in sub.records:
                leases += record.leases
                if record.leases:
                    in_use += 1
                else:
                    idle += 1
            stats = KeyStatistics(
                idle=idle,
                in_use=in_use,
                connecting=len(sub.connecting),
                waiting=len(sub.waiters),
                leases=leases,
                weight=sub.usage,
            )
            keys[key] = stats
            total_idle += idle
            total_in_use += in_use
            total_connecting += stats.connecting
            total_waiting += stats.waiting
            total_leases += leases
            total_weight += stats.weight
        return PoolStatistics(
            idle=total_idle,
            in_use=total_in_use,
            connecting=total_connecting,
            waiting=total_waiting,
            leases=total_leases,
            weight=total_weight,
            max_connections=self.max_connections,
            keys=MappingProxyType(keys),
            closed=self.closed,
            connects=self.connects,
            connect_failures=self.connect_failures,
            leases_served=self.leases_served,
            waits=self.waits,
            wait_time=self.wait_time,
        )

    def open_connections(self) -> list[tuple[K, C]]:
        """Every open connection with its key (for tests and diagnostics)."""
        result: list[tuple[K, C]] = []
        for sub in self._subpools.values():
            for record in sub.records:
                assert record.connection is not None
                result.append((record.key, record.connection))
        return result

    def check_invariants(self) -> None:
        """Assert the internal consistency of every counter and index (used by tests)."""
        total = 0
        idle_records: set[_Record[K, C]] = set()
        for key, sub in self._subpools.items():
            assert sub.key == key
            usage = 0
            for record in sub.records:
                assert record.state is _RecState.OPEN, record
                assert record.sub is sub
                assert record.leases >= 0
                assert record.leases <= max(record.capacity, record.leases)
                assert record.available == (record in sub.available)
                if record.available:
                    assert record.ready
                    assert not record.retiring
                    assert record.leases < record.capacity
                if record.leases == 0:
                    idle_records.add(record)
                usage += record.weight
            for record in sub.available:
                assert record in sub.records
            for record in sub.connecting:
                assert record.state is _RecState.CONNECTING
                assert len(record.waiters) <= record.reserved_capacity
                for waiter in record.waiters:
                    assert waiter.connect is record
                    assert waiter in sub.waiters
                usage += record.weight
            for waiter in sub.waiters:
                assert waiter.state is _WaiterState.WAITING
                assert (waiter in sub.unattributed) == (waiter.connect is None)
            for waiter in sub.unattributed:
                assert waiter in sub.waiters
            if sub.waiters:
                # Nobody waits while a usable connection of the key sits available.
                assert not sub.available, sub
            assert usage == sub.usage, (usage, sub.usage)
            if self.max_connections_per_key is not None:
                assert sub.usage <= self.max_connections_per_key
            total += len(sub.records) + len(sub.connecting)
            assert not sub.is_empty() or sub.available == OrderedDict()
        assert total == self.connections, (total, self.connections)
        assert self.connections <= self.max_connections
        assert set(self._idle) == idle_records
        for record in self._spares:
            assert record.state is _RecState.CONNECTING
            assert record in record.sub.connecting
        for key in self._blocked:
            assert self._subpools[key].unattributed

    # ------------------------------------------------------------------ internals

    def _usable(self, record: _Record[K, C]) -> bool:
        """Check the one connection about to be handed out. Drops or parks it if not."""
        connection = record.connection
        if self._is_closed(connection):  # type: ignore[arg-type]
            if self.min_idle and record.uses == 0 and record.spare_token is not None:
                self._died_unused.append(record.key)
            self._drop(record)
            return False
        if not self._is_ready(connection):  # type: ignore[arg-type]
            record.ready = False
            record.available = False
            del record.sub.available[record]
            return False
        return True

    def _lease(self, record: _Record[K, C]) -> Lease[K, C]:
        if record.leases == 0:
            del self._idle[record]
        record.leases += 1
        record.uses += 1
        self.leases_served += 1
        if record.leases >= record.capacity:
            record.available = False
            del record.sub.available[record]
        return Lease(record, record.connection)  # type: ignore[arg-type]

    def _unqueue(self, sub: _SubPool[K, C], waiter: Waiter[K, C]) -> None:
        """Take a waiter out of the queues; hand its attribution on (Rule 3)."""
        del sub.waiters[waiter]
        record = waiter.connect
        if record is None:
            del sub.unattributed[waiter]
        else:
            waiter.connect = None
            del record.waiters[waiter]

    def _serve(self, sub: _SubPool[K, C]) -> None:
        """Hand available connections to waiters, oldest waiter first."""
        waiters = sub.waiters
        available = sub.available
        while waiters and available:
            record = next(reversed(available)) if self.lifo else next(iter(available))
            if not self._usable(record):
                continue
            waiter = next(iter(waiters))
            self._unqueue(sub, waiter)
            waiter.state = _WaiterState.SERVED
            self.effects.append(Deliver(waiter, self._lease(record)))

    def _attribute(self, sub: _SubPool[K, C]) -> None:
        """Attribute unattributed waiters to connects in flight with spare reserved capacity."""
        if not sub.unattributed:
            return
        for record in sub.connecting:
            while len(record.waiters) < record.reserved_capacity and sub.unattributed:
                waiter = sub.unattributed.popitem(last=False)[0]
                waiter.connect = record
                record.waiters[waiter] = None
            if not sub.unattributed:
                return

    def _pump(self, sub: _SubPool[K, C]) -> None:
        """Serve, attribute, and start connects for whatever demand is left (Rules 2-4)."""
        if sub.waiters:
            self._serve(sub)
        self._attribute(sub)
        if not sub.unattributed or self.closed:
            self._blocked.pop(sub.key, None)
            return
        per_key = self.max_connections_per_key
        if per_key is not None and sub.usage >= per_key:
            # No reservation fits (each weighs at least 1): skip asking reserve() for one.
            self._blocked.pop(sub.key, None)
            return
        while sub.unattributed:
            reservation = self._reserve(sub.key) if self._reserve else DEFAULT_RESERVATION
            weight = reservation.weight
            if per_key is not None and sub.usage + weight > per_key:
                self._blocked.pop(sub.key, None)
                return  # Wait for this key's own connections.
            if not self._make_room():
                if sub.key not in self._blocked:
                    self._blocked[sub.key] = None
                return
            record: _Record[K, C] = _Record(sub, reservation)
            sub.connecting[record] = None
            sub.usage += weight
            self.connections += 1
            self.effects.append(StartConnect(record))
            self._attribute(sub)
        self._blocked.pop(sub.key, None)

    def _make_room(self) -> bool:
        """Make room for one more connection, evicting the least recently used idle
        connection if the global limit is spent (Rule 4). False if there is none to evict.

        Called only for a key with unattributed waiters, which has no available connection
        of its own (they would have been served), so every idle connection is fair game.
        Every connection counts as one, whatever its weight, so one eviction is enough.
        """
        if self.connections < self.max_connections:
            return True
        idle = self._idle
        if not idle:
            # Requests come first (Rule 7): withdraw a spare connect nobody counts on.
            for spare in self._spares:
                if not spare.waiters:
                    other = spare.sub
                    self._withdraw(spare)
                    self._forget_if_empty(other)
                    return True
            return False
        record = next(iter(idle))
        other = record.sub
        self._drop(record)
        if other.unattributed and other.key not in self._blocked:
            # Its waiters were held by its own limit, which this frees: now they need
            # global room like any blocked key.
            self._blocked[other.key] = None
        self._forget_if_empty(other)
        return True

    def _unblock(self) -> None:
        """Give newly freed room to the keys held back by the global limit, in order."""
        while self._blocked:
            key = next(iter(self._blocked))
            self._pump(self._subpools[key])
            if key in self._blocked:
                return  # Still no room for the first key: later keys wait behind it.

    def _drop(self, record: _Record[K, C]) -> None:
        """Take an open connection out of every index and queue its close."""
        sub = record.sub
        if self.min_idle:
            self._note_use(record)
        record.state = _RecState.CLOSED
        del sub.records[record]
        if record.available:
            record.available = False
            del sub.available[record]
        self._idle.pop(record, None)
        sub.usage -= record.weight
        self.connections -= 1
        assert record.connection is not None
        self.effects.append(Close(record.key, record.connection))

    def _after_drop(self, sub: _SubPool[K, C]) -> None:
        self._pump(sub)
        self._unblock()
        self._forget_if_empty(sub)

    def _forget_if_empty(self, sub: _SubPool[K, C]) -> None:
        if sub.is_empty() and self._subpools.get(sub.key) is sub:
            del self._subpools[sub.key]
            self._blocked.pop(sub.key, None)
