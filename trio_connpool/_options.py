"""The pool's options, written once.

Each option is named, typed, defaulted, checked and documented in :class:`PoolOptions`, and
every entry point builds one or takes one: ``open_pool``, ``create_pool``, ``Pool``, the state
machine, ``open_client`` and the httpx transport. They still take the options as keywords
(``open_pool(connect, max_connections=10)``) or one ``PoolOptions`` (``options=``), never both.

Python cannot type ``**kwargs`` from a class's fields, so the options' names and types are
listed once more in :class:`PoolOptionArgs`, just below the class, for the keywords. Each
entry point calls ``PoolOptions(**kwargs)``, so a type checker refuses a key that is not a
field; a test refuses a field that is not a key.

This module is the bottom layer of the package: no trio, no I/O, nothing of the package
imported. The values the options take (:class:`ReleasePolicy`, :class:`Reservation`,
:class:`Instrument`) live here for that reason.
"""

from __future__ import annotations

import enum
import math
import random
import traceback
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import attrs

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_RESERVATION",
    "Instrument",
    "LeakReport",
    "PoolOptionArgs",
    "PoolOptions",
    "ReleasePolicy",
    "Reservation",
    "check_duration",
    "resolve_options",
]


def check_duration(name: str, value: object, *, allow_none: bool = True) -> None:
    """Refuse ``value`` unless it is a number of seconds, 0 or more (or None if allowed).

    The one check of every duration the package takes (timeouts, lifetimes, intervals), so
    each says the same. NaN is refused (it compares false with every deadline, so a NaN
    timeout would never fire and would hold up the heap of the others), and so is a bool.
    Infinity is accepted: it means no limit, like None.

    Raises:
        TypeError: ``value`` is not an int or a float (or None, if allowed).
        ValueError: ``value`` is negative or NaN.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if allow_none else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, not {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be 0 or more seconds, not {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


class ReleasePolicy(enum.Enum):
    """Which idle connection of a key is handed out next.

    ``LIFO`` (the default) reuses the most recently released connection, so a burst's
    surplus connections stay idle and expire. ``FIFO`` reuses the one idle the longest,
    spreading requests evenly over every open connection.
    """

    LIFO = "lifo"
    FIFO = "fifo"


@attrs.frozen
class Reservation:
    """What a connect in flight is expected to bring, before the connection says.

    Attributes:
        weight: The weight to reserve against the key's ``max_connections_per_key`` while
            connecting (against ``max_connections`` a connect counts as one connection). It
            must be an upper bound of the weight the connection will report (HTTP/2 reserves
            the weight of a multiplexed connection; an HTTP/1.1 answer corrects it
            downwards).
        capacity: How many waiters the connect is expected to serve at once; waiters beyond
            that start further connects.
    """

    weight: int = 1
    capacity: int = 1

    def __attrs_post_init__(self) -> None:
        _check_positive_int("weight", self.weight)
        _check_positive_int("capacity", self.capacity)


DEFAULT_RESERVATION = Reservation()


@attrs.frozen
class LeakReport:
    """A lease held longer than ``leak_timeout``: what :meth:`Instrument.lease_leaked` gets.

    A record rather than more arguments, so that later releases can add fields without
    breaking an instrument that overrides the hook.

    Attributes:
        key: The key the connection was made for.
        connection: The leased connection.
        held_for: Seconds the lease had been held when it was reported (on
            ``trio.current_time()``), ``leak_timeout`` or a little more.
        acquired_at: When it was acquired, on ``trio.current_time()``.
        task_name: The name of the trio task that acquired it.
        stack: Where it was acquired: the innermost frames outside trio_connpool, oldest
            first, as `traceback.extract_stack` gives them.
    """

    key: Hashable
    connection: object
    held_for: float
    acquired_at: float
    task_name: str
    stack: traceback.StackSummary

    def format_stack(self) -> str:
        """The stack as `traceback.format_list` lays it out, one string."""
        return "".join(self.stack.format())


class Instrument:
    """Hooks into the pool's life. Subclass it and override what you need.

    Every method does nothing by default. Hooks run synchronously inside the pool's
    bookkeeping: keep them fast and never let them raise (an exception from a hook is
    reported with ``hook_failed`` and otherwise ignored). A pool (and the HTTP client) looks
    up each instrument's hooks once, when it is made, and calls only those that differ from
    this class's no-ops (overridden in a subclass, or set on the instance in ``__init__``).
    """

    def connect_started(self, key: Hashable) -> None:
        """A connect to ``key`` started."""

    def connect_succeeded(self, key: Hashable, connection: object) -> None:
        """A connect to ``key`` produced ``connection``."""

    def connect_failed(self, key: Hashable, error: BaseException | None) -> None:
        """A connect to ``key`` failed with ``error`` (None: it was cancelled)."""

    def waiting(self, key: Hashable) -> None:
        """A task started waiting for a connection to ``key``."""

    def waited(self, key: Hashable, seconds: float) -> None:
        """A task stopped waiting for a connection to ``key`` after ``seconds``: it was
        served, failed, timed out or was cancelled (each ``waiting`` ends in one of these)."""

    def lease_acquired(self, key: Hashable, connection: object) -> None:
        """A task leased ``connection``."""

    def lease_released(self, key: Hashable, connection: object) -> None:
        """A lease of ``connection`` was given back."""

    def connection_closed(self, key: Hashable, connection: object) -> None:
        """The pool is closing ``connection`` (idle expiry, eviction, dead, pool exit)."""

    def lease_leaked(self, key: Hashable, connection: object, report: LeakReport) -> None:
        """A lease of ``connection`` has been held longer than ``leak_timeout`` (once per
        lease; it stays leased: nothing is cancelled or closed). See :class:`LeakReport`."""

    def pool_opened(self, pool: object) -> None:
        """``pool`` started serving with this instrument (read ``pool.statistics()`` from
        here on, until ``pool_closed``)."""

    def pool_closed(self, pool: object) -> None:
        """``pool`` stopped: every connection of it is closed."""

    # The HTTP client's hooks: it calls them only if some instrument overrides one of them,
    # so they cost a request nothing otherwise.

    def request_started(self, key: Hashable, request: object) -> None:
        """The HTTP client started sending ``request`` (a `Request`; each redirect hop is a
        request of its own) on a connection for ``key``."""

    def request_finished(
        self,
        key: Hashable,
        request: object,
        response: object | None,
        error: BaseException | None,
        seconds: float,
    ) -> None:
        """``request`` ended, ``seconds`` after ``request_started``: with ``response``
        (a `Response` whose head arrived; its body may still be unread) or with ``error``
        (an exception or a cancellation; ``response`` is then None)."""

    def hook_failed(self, hook: str, error: Exception) -> None:
        """Another hook raised ``error``; or a connection's background task failed."""


# Field validators: attrs calls them with the instance, the field and the value.


def _positive_int(_: object, field: attrs.Attribute[Any], value: object) -> None:
    _check_positive_int(field.name, value)


def _positive_int_or_none(_: object, field: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _check_positive_int(field.name, value)


def _count_or_none(_: object, field: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field.name} must be an int or None, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{field.name} must be 0 or more, got {value}")


def _duration_or_none(_: object, field: attrs.Attribute[Any], value: object) -> None:
    check_duration(field.name, value)


def _duration(_: object, field: attrs.Attribute[Any], value: object) -> None:
    check_duration(field.name, value, allow_none=False)


def _fraction(_: object, field: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field.name} must be a number, not {value!r}")
    if not 0 <= value < 1:  # NaN fails this too
        raise ValueError(f"{field.name} must be in [0, 1), got {value!r}")


def _release_policy(_: object, field: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, ReleasePolicy):
        raise TypeError(f"{field.name} must be a ReleasePolicy, not {value!r}")


def _callable_or_none(_: object, field: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{field.name} must be a callable or None, not {value!r}")


def _instruments(_: object, field: attrs.Attribute[Any], value: Sequence[object]) -> None:
    for instrument in value:
        if not isinstance(instrument, Instrument):
            raise TypeError(f"{field.name} must be Instrument objects, not {instrument!r}")


def _as_tuple(value: Iterable[Instrument]) -> tuple[Instrument, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class PoolOptions:
    """Every option of a pool, checked when it is made; pass it as ``open_pool(connector,
    options=...)``.

    Each entry point also takes these options as keywords (``open_pool(connector,
    max_connections=10)``) and builds one of these from them; give either the keywords or
    ``options``, not both (`TypeError`). Frozen: make a changed copy with :meth:`replace`.

    ::

        options = PoolOptions(max_connections=10, idle_timeout=30)
        async with open_pool(connect, options=options) as pool:
            ...

    Durations are seconds, an int or a float, 0 or more; ``math.inf`` means no limit, as
    None does where None is allowed.

    Attributes:
        max_connections: The pool's global limit: open connections plus connects in flight,
            whatever their weight. When it is reached, the least recently used idle
            connection of another key is closed to make room.
        max_connections_per_key: Per-key budget, in weight units (a plain connection weighs
            1; an HTTP/2 connection may weigh the whole budget); None for none.
        release_policy: ``ReleasePolicy.LIFO`` (default) or ``ReleasePolicy.FIFO``.
        acquire_timeout: Seconds a task waits for a connection before
            :class:`~trio_connpool.PoolTimeout`; None waits forever.
        max_waiters: Most tasks waiting per key; one more gets
            :class:`~trio_connpool.TooManyWaiters` at once. None: no bound.
        idle_timeout: Seconds an unleased connection stays open; None for ever.
        max_lifetime: Seconds a connection lives at most (minus up to ``lifetime_jitter`` of
            it, at random); a leased one is closed when its last lease ends. None: no limit.
        lifetime_jitter: Fraction of ``max_lifetime`` randomly taken off each connection's,
            in [0, 1), so a burst of connections does not expire at one instant.
        close_timeout: Seconds a graceful close may take before it is made forceful.
        reserve: ``reserve(key) -> Reservation``: the weight and capacity a connect in flight
            reserves. None: the connector's own ``reserve`` method if it has one (an HTTP
            connector reserves for HTTP/2), else weight 1 and capacity 1.
        instruments: :class:`Instrument` objects whose hooks see the pool's events (any
            iterable; kept as a tuple).
        rng: Random source for the lifetime jitter (seed one in tests); None: a new one.
        leak_timeout: Seconds a lease may be held before it is reported as a possible leak
            (once, through :meth:`Instrument.lease_leaked` and a WARNING on the
            ``trio_connpool`` logger, with the acquiring task and stack). None (default):
            leak detection is off and no stack is captured.
        min_idle_per_key: Keep at least this many idle connections (idle capacity: an
            HTTP/2 connection with room for 100 streams counts 100) for every key leased
            within the last ``idle_timeout`` seconds, reopening them in the pool's own tasks
            after expiry or a peer's close, within the limits and without evicting other
            keys' connections (requests come first: one that needs the room of a refill
            connect in flight cancels it). While a key is in use, idle expiry keeps its last
            ``min_idle_per_key`` connections open; once it has not been leased for
            ``idle_timeout`` seconds, they expire and are not reopened. A key whose refill
            connects fail (or are closed by the peer before any use) is tried again with one
            connect after 1 s, then 2, 4, ... up to 60 s. None or 0: off. Needs an
            ``idle_timeout`` above 0 (with None, a key once leased stays in use for ever).

    Raises:
        ValueError, TypeError: An option is out of range or of the wrong type.
    """

    max_connections: int = attrs.field(default=100, validator=_positive_int)
    max_connections_per_key: int | None = attrs.field(
        default=None, validator=_positive_int_or_none
    )
    release_policy: ReleasePolicy = attrs.field(
        default=ReleasePolicy.LIFO, validator=_release_policy
    )
    acquire_timeout: float | None = attrs.field(default=None, validator=_duration_or_none)
    max_waiters: int | None = attrs.field(default=None, validator=_count_or_none)
    idle_timeout: float | None = attrs.field(default=60.0, validator=_duration_or_none)
    max_lifetime: float | None = attrs.field(default=None, validator=_duration_or_none)
    lifetime_jitter: float = attrs.field(default=0.1, validator=_fraction)
    close_timeout: float = attrs.field(default=5.0, validator=_duration)
    reserve: Callable[[Any], Reservation] | None = attrs.field(
        default=None, validator=_callable_or_none
    )
    instruments: Sequence[Instrument] = attrs.field(
        default=(), converter=_as_tuple, validator=_instruments
    )
    rng: random.Random | None = attrs.field(default=None)
    leak_timeout: float | None = attrs.field(default=None, validator=_duration_or_none)
    min_idle_per_key: int | None = attrs.field(default=None, validator=_count_or_none)

    def __attrs_post_init__(self) -> None:
        if self.min_idle_per_key and self.idle_timeout == 0:
            raise ValueError(
                "min_idle_per_key needs an idle_timeout above 0: a key counts as in use for "
                "idle_timeout seconds after its last lease"
            )

    def replace(self, **changes: Unpack[PoolOptionArgs]) -> PoolOptions:
        """A copy with ``changes`` made (checked like the original)."""
        return attrs.evolve(self, **changes)


class PoolOptionArgs(TypedDict, total=False):
    """The options of :class:`PoolOptions` as keyword arguments (see it for each one)."""

    max_connections: int
    max_connections_per_key: int | None
    release_policy: ReleasePolicy
    acquire_timeout: float | None
    max_waiters: int | None
    idle_timeout: float | None
    max_lifetime: float | None
    lifetime_jitter: float
    close_timeout: float
    reserve: Callable[[Any], Reservation] | None
    instruments: Sequence[Instrument]
    rng: random.Random | None
    leak_timeout: float | None
    min_idle_per_key: int | None


DEFAULT_OPTIONS = PoolOptions()


def resolve_options(
    options: PoolOptions | None,
    keywords: PoolOptionArgs,
    *,
    name: str = "options",
    defaults: PoolOptions = DEFAULT_OPTIONS,
) -> PoolOptions:
    """The options an entry point was given: ``options``, or else ``defaults`` changed by
    ``keywords``.

    Raises:
        TypeError: Both were given (the keywords would silently lose, or win), or
            ``options`` is not a :class:`PoolOptions`.
        ValueError, TypeError: From :class:`PoolOptions`, for a keyword.
    """
    if options is None:
        return defaults.replace(**keywords) if keywords else defaults
    if not isinstance(options, PoolOptions):
        raise TypeError(f"{name} must be a PoolOptions, not {options!r}")
    if keywords:
        raise TypeError(
            f"give the pool's options as keywords or as {name}=PoolOptions(...), not both "
            f"(got {', '.join(sorted(keywords))} as keywords too); "
            f"{name}.replace(...) makes a changed copy"
        )
    return options
