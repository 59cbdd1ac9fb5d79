"""The pool's state machine, driven directly: no event loop, no trio, plain functions.

Every transition is followed by ``check_invariants()`` (the ``effects`` helper does it) and
tests assert the exact effects a transition queued.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from trio_connpool import PoolError, TooManyWaiters
from trio_connpool._state import (
    Close,
    Deliver,
    Effect,
    Fail,
    FailReason,
    Lease,
    PoolState,
    ReleasePolicy,
    Reservation,
    StartConnect,
    Waiter,
    _Record,
)


class Conn:
    """A connection as the state machine sees it: a name, alive or dead, ready or not."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dead = False
        self.ready = True

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


State = PoolState[str, Conn]
Record = _Record[str, Conn]


def make(**options: Any) -> State:
    state: State = PoolState(is_closed=lambda c: c.dead, is_ready=lambda c: c.ready, **options)
    state.check_invariants()
    return state


def make_weighted(max_connections: int, weights: dict[str, int]) -> State:
    """A pool with a per-key budget of 4 whose connects reserve ``weights[key]`` (else 1),
    read at each connect, so a test may change it on the way."""
    return make(
        max_connections=max_connections,
        max_connections_per_key=4,
        reserve=lambda key: Reservation(weight=weights.get(key, 1)),
    )


def effects(state: State) -> list[Effect[str, Conn]]:
    """Check the invariants, then drain the queued effects."""
    state.check_invariants()
    return state.take_effects()


def only_start(state: State) -> Record:
    """The one effect queued is a StartConnect: return its record."""
    queued = effects(state)
    assert len(queued) == 1, queued
    (start,) = queued
    assert isinstance(start, StartConnect)
    return start.record


def connect_of(waiter: Waiter[str, Conn]) -> Record | None:
    """The connect a waiter is attributed to (a call, so mypy does not narrow it)."""
    return waiter.connect


def starts(queued: list[Effect[str, Conn]]) -> list[Record]:
    return [e.record for e in queued if isinstance(e, StartConnect)]


def delivered(queued: list[Effect[str, Conn]]) -> list[tuple[Waiter[str, Conn], Conn]]:
    return [(e.waiter, e.lease.connection) for e in queued if isinstance(e, Deliver)]


def closes(queued: list[Effect[str, Conn]]) -> list[Conn]:
    return [e.connection for e in queued if isinstance(e, Close)]


def fails(queued: list[Effect[str, Conn]]) -> list[tuple[Waiter[str, Conn], FailReason, object]]:
    return [(e.waiter, e.reason, e.cause) for e in queued if isinstance(e, Fail)]


def succeed(state: State, record: Record, name: str, now: float = 0.0, **kw: Any) -> Conn:
    connection = Conn(name)
    state.connect_succeeded(record, connection, now, **kw)
    state.check_invariants()
    return connection


def open_idle(state: State, key: str, names: list[str], now: float = 0.0) -> list[Conn]:
    """Open one connection per name for ``key`` and leave them all idle, released in order."""
    waiters = [state.enqueue(key) for _ in names]
    records = starts(effects(state))
    assert len(records) == len(names)
    for record, name in zip(records, names, strict=True):
        succeed(state, record, name, now)
    leases = [e.lease for e in effects(state) if isinstance(e, Deliver)]
    assert [lease.key for lease in leases] == [key] * len(names)
    assert all(not w.waiting for w in waiters)
    for lease in leases:
        state.release(lease, now)
        state.check_invariants()
    assert effects(state) == []
    return [lease.connection for lease in leases]


def counts(state: State) -> tuple[int, int, int, int, int, int]:
    s = state.statistics()
    return (s.idle, s.in_use, s.connecting, s.waiting, s.leases, s.weight)


# ---------------------------------------------------------------------- acquire and connect


def test_acquire_nowait_on_empty_pool() -> None:
    state = make()
    assert state.acquire_nowait("a") is None
    assert effects(state) == []
    assert counts(state) == (0, 0, 0, 0, 0, 0)
    assert dict(state.statistics().keys) == {}


def test_enqueue_starts_exactly_one_connect() -> None:
    state = make()
    waiter = state.enqueue("a")
    record = only_start(state)
    assert record.key == "a"
    assert waiter.waiting
    assert connect_of(waiter) is record
    assert counts(state) == (0, 0, 1, 1, 0, 1)
    # A second waiter needs a second connect (the reservation covers one lease).
    state.enqueue("a")
    assert only_start(state) is not record
    assert counts(state) == (0, 0, 2, 2, 0, 2)


def test_enqueue_counts_the_reserved_capacity_of_a_connect_in_flight() -> None:
    state = make(reserve=lambda key: Reservation(weight=1, capacity=3))
    state.enqueue("a")
    record = only_start(state)
    state.enqueue("a")
    state.enqueue("a")
    assert effects(state) == []  # Covered by the connect in flight.
    assert len(record.waiters) == 3
    state.enqueue("a")
    assert only_start(state) is not record


def test_connect_succeeded_delivers_to_the_oldest_waiter() -> None:
    state = make()
    first = state.enqueue("a")
    r1 = only_start(state)
    second = state.enqueue("a")
    r2 = only_start(state)
    conn = succeed(state, r2, "c2")  # The later connect finishes first...
    queued = effects(state)
    assert delivered(queued) == [(first, conn)]  # ...and serves the oldest waiter.
    assert starts(queued) == []
    assert second.waiting
    assert connect_of(second) is r1  # Hand-over: r1 now covers the second waiter.
    assert counts(state) == (0, 1, 1, 1, 1, 2)
    conn1 = succeed(state, r1, "c1")
    assert delivered(effects(state)) == [(second, conn1)]
    assert counts(state) == (0, 2, 0, 0, 2, 2)


def test_release_hands_straight_to_the_next_waiter_fifo() -> None:
    state = make(max_connections_per_key=1)
    state.enqueue("a")
    conn = succeed(state, only_start(state), "c")
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    lease = deliver.lease
    waiters = [state.enqueue("a") for _ in range(5)]
    assert effects(state) == []  # The per-key limit holds them; no connect.
    assert counts(state) == (0, 1, 0, 5, 1, 1)
    served = []
    for _ in range(5):
        state.release(lease, 1.0)
        queued = effects(state)
        assert len(queued) == 1
        (deliver,) = queued
        assert isinstance(deliver, Deliver)
        assert deliver.lease.connection is conn
        served.append(deliver.waiter)
        lease = deliver.lease
        assert counts(state) == (0, 1, 0, 5 - len(served), 1, 1)
    assert served == waiters
    state.release(lease, 2.0)
    assert effects(state) == []
    assert counts(state) == (1, 0, 0, 0, 0, 1)


@pytest.mark.parametrize(
    ("policy", "order"),
    [(ReleasePolicy.LIFO, ["c3", "c2", "c1"]), (ReleasePolicy.FIFO, ["c1", "c2", "c3"])],
)
def test_release_policy_reuse_order(policy: ReleasePolicy, order: list[str]) -> None:
    state = make(release_policy=policy)
    open_idle(state, "a", ["c1", "c2", "c3"])  # Released c1, then c2, then c3.
    leases = []
    for _ in range(3):
        lease = state.acquire_nowait("a")
        assert lease is not None
        assert lease.is_reused
        leases.append(lease)
        state.check_invariants()
    assert [lease.connection.name for lease in leases] == order
    assert state.acquire_nowait("a") is None
    assert effects(state) == []


def test_per_key_limit_holds_extra_waiters() -> None:
    state = make(max_connections_per_key=2)
    for _ in range(5):
        state.enqueue("a")
    assert len(starts(effects(state))) == 2
    assert counts(state) == (0, 0, 2, 5, 0, 2)
    assert state.statistics().keys["a"].weight == 2
    # Another key has its own budget.
    state.enqueue("b")
    assert only_start(state).key == "b"


def test_global_limit_evicts_the_lru_idle_connection_of_another_key() -> None:
    state = make(max_connections=2)
    c1, _ = open_idle(state, "a", ["a1", "a2"])  # a1 released first: least recently used.
    state.enqueue("b")
    queued = effects(state)
    assert closes(queued) == [c1]
    assert [r.key for r in starts(queued)] == ["b"]
    assert counts(state) == (1, 0, 1, 1, 0, 2)


def test_global_limit_counts_connections_whatever_their_weight() -> None:
    """max_connections counts connections and connects in flight; weight is per key only."""
    state = make_weighted(3, {"a": 1, "b": 4, "c": 4})
    state.enqueue("a")
    state.enqueue("b")
    state.enqueue("c")
    assert [r.key for r in starts(effects(state))] == ["a", "b", "c"]
    assert counts(state) == (0, 0, 3, 3, 0, 9)
    assert state.connections == 3
    state.enqueue("b")  # b's budget is spent by its one reservation: no second connect.
    assert effects(state) == []
    assert "b" not in state._blocked
    wd = state.enqueue("d")  # The global limit is spent: d waits for room.
    assert effects(state) == []
    assert list(state._blocked) == ["d"]
    assert wd.waiting


def test_one_eviction_makes_room_whatever_the_weight() -> None:
    state = make_weighted(2, {"a": 4})
    state.enqueue("a")
    ra = only_start(state)
    a1 = succeed(state, ra, "a1", weight=4)
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    state.release(deliver.lease, 1.0)
    (b1,) = open_idle(state, "b", ["b1"], now=2.0)
    assert counts(state) == (2, 0, 0, 0, 0, 5)
    state.enqueue("c")  # Evicts the least recently used idle connection, and only it.
    queued = effects(state)
    assert closes(queued) == [a1]
    assert [r.key for r in starts(queued)] == ["c"]
    assert counts(state) == (1, 0, 1, 1, 0, 2)
    assert state.connections == 2
    assert b1.name == "b1"


def test_blocked_keys_are_served_in_order_when_room_appears() -> None:
    state = make(max_connections=1)
    state.enqueue("a")
    succeed(state, only_start(state), "a1")
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    wb = state.enqueue("b")
    wc = state.enqueue("c")
    assert effects(state) == []  # Both blocked: no idle connection to evict.
    state.release(deliver.lease, 1.0)
    queued = effects(state)
    assert closes(queued) == [deliver.lease.connection]
    (rb,) = starts(queued)
    assert rb.key == "b"  # b arrived first.
    assert wc.waiting and connect_of(wc) is None
    b1 = succeed(state, rb, "b1")
    queued = effects(state)
    assert delivered(queued) == [(wb, b1)]
    (deliver_b,) = queued
    assert isinstance(deliver_b, Deliver)
    state.release(deliver_b.lease, 2.0)
    queued = effects(state)
    assert closes(queued) == [b1]
    assert [r.key for r in starts(queued)] == ["c"]


# ---------------------------------------------------------------------- capacity and weight


def test_capacity_above_one_raised_and_lowered_live() -> None:
    state = make(max_connections_per_key=1)
    state.enqueue("a")
    conn = succeed(state, only_start(state), "h2", capacity=3)
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    leases = [deliver.lease]
    for _ in range(2):
        lease = state.acquire_nowait("a")
        assert lease is not None and lease.connection is conn
        leases.append(lease)
    assert state.acquire_nowait("a") is None
    fourth = state.enqueue("a")
    assert effects(state) == []  # Per-key limit 1: it waits for the connection.
    assert counts(state) == (0, 1, 0, 1, 3, 1)
    # The server raises its stream limit: the waiter is served at once.
    state.refresh(leases[0]._record, closed=False, ready=True, capacity=5)
    assert delivered(effects(state)) == [(fourth, conn)]
    assert counts(state) == (0, 1, 0, 0, 4, 1)
    # Lowered below the leases in flight: no new lease until enough are released.
    state.refresh(leases[0]._record, closed=False, ready=True, capacity=2)
    state.check_invariants()
    assert state.acquire_nowait("a") is None
    fifth = state.enqueue("a")
    assert effects(state) == []
    assert counts(state) == (0, 1, 0, 1, 4, 1)
    # Nothing is lost: the four leases are released one by one; the waiter gets a lease
    # only once fewer than two are held.
    state.release(leases.pop(), 1.0)
    state.release(leases.pop(), 1.0)
    assert effects(state) == []
    assert counts(state) == (0, 1, 0, 1, 2, 1)
    state.release(leases.pop(), 1.0)
    assert delivered(effects(state)) == [(fifth, conn)]
    assert counts(state) == (0, 1, 0, 0, 2, 1)


def test_release_does_not_overfill_a_lowered_capacity() -> None:
    """Regression: a release made a connection available while its leases were still at or
    above a lowered capacity, so it was leased past its capacity."""
    state = make(max_connections_per_key=1)
    state.enqueue("a")
    conn = succeed(state, only_start(state), "h2", capacity=3)
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    leases = [deliver.lease]
    for _ in range(2):
        lease = state.acquire_nowait("a")
        assert lease is not None
        leases.append(lease)
    record = leases[0]._record
    state.refresh(record, closed=False, ready=True, capacity=1)
    waiter = state.enqueue("a")
    assert effects(state) == []
    state.release(leases.pop(), 1.0)  # 2 leases left, capacity 1: still full.
    assert effects(state) == []
    assert state.acquire_nowait("a") is None
    state.release(leases.pop(), 1.0)  # 1 lease left: still full.
    assert effects(state) == []
    assert waiter.waiting
    assert counts(state) == (0, 1, 0, 1, 1, 1)
    state.release(leases.pop(), 1.0)  # 0 leases: room for one.
    assert delivered(effects(state)) == [(waiter, conn)]
    assert counts(state) == (0, 1, 0, 0, 1, 1)


def test_reservation_weight_is_corrected_once_the_connection_answers() -> None:
    known: dict[str, Reservation] = {}

    def reserve(key: str) -> Reservation:
        return known.get(key, Reservation(weight=4, capacity=10))

    state = make(max_connections_per_key=4, reserve=reserve)
    waiters = [state.enqueue("a") for _ in range(10)]
    record = only_start(state)  # One connect, hoped to be multiplexed, covers everyone.
    assert counts(state) == (0, 0, 1, 10, 0, 4)
    # It turns out to be a plain connection: weight 1, one lease at a time.
    known["a"] = Reservation(weight=1, capacity=1)
    conn = succeed(state, record, "h1", weight=1, capacity=1)
    queued = effects(state)
    assert delivered(queued) == [(waiters[0], conn)]
    assert len(starts(queued)) == 3  # Up to the per-key limit: 1 + 3 = 4.
    assert counts(state) == (0, 1, 3, 9, 1, 4)


def test_a_heavy_reservation_does_not_hold_other_keys_back() -> None:
    state = make(max_connections=2, reserve=lambda key: Reservation(weight=4 if key == "a" else 1))
    state.enqueue("a")
    record = only_start(state)
    wb = state.enqueue("b")  # a's reservation weighs 4 but is one connect: room for b.
    assert [r.key for r in starts(effects(state))] == ["b"]
    assert connect_of(wb) is not None
    succeed(state, record, "a1", weight=1)
    assert counts(state) == (0, 1, 1, 1, 1, 2)


def test_weight_correction_frees_the_keys_own_budget_only() -> None:
    weights = {"a": 4}
    state = make_weighted(2, weights)
    state.enqueue("a")
    record = only_start(state)
    wa = state.enqueue("a")  # a's budget is spent by the reservation.
    assert effects(state) == []
    wc = state.enqueue("c")
    (rc,) = starts(effects(state))
    wd = state.enqueue("d")  # Two connects in flight: the global limit is spent.
    assert effects(state) == []
    assert list(state._blocked) == ["d"]
    weights["a"] = 1  # The origin answered HTTP/1.1: later connects reserve 1.
    conn = succeed(state, record, "a1", weight=1)
    queued = effects(state)
    # a1 serves a's first waiter; a's budget now has room, but the pool has none for a's
    # second waiter or for d until a connection closes or goes idle.
    assert len(delivered(queued)) == 1
    assert starts(queued) == []
    assert wa.waiting and wd.waiting and wc.waiting
    assert list(state._blocked) == ["d", "a"]
    state.connect_failed(rc, None)
    queued = effects(state)
    assert fails(queued) == [(wc, FailReason.CONNECT_FAILED, None)]
    assert [r.key for r in starts(queued)] == ["d"]  # d was blocked first.
    assert conn.name == "a1"


# ---------------------------------------------------------------------- failures, cancels


def test_connect_failed_fails_exactly_the_attributed_waiters() -> None:
    state = make(reserve=lambda key: Reservation(weight=1, capacity=2))
    w1, w2, w3 = (state.enqueue("a") for _ in range(3))
    r1, r2 = starts(effects(state))
    assert list(r1.waiters) == [w1, w2]
    assert list(r2.waiters) == [w3]
    cause = OSError("refused")
    state.connect_failed(r1, cause)
    queued = effects(state)
    assert len(queued) == 2
    assert fails(queued) == [
        (w1, FailReason.CONNECT_FAILED, cause),
        (w2, FailReason.CONNECT_FAILED, cause),
    ]
    assert w3.waiting and connect_of(w3) is r2
    assert counts(state) == (0, 0, 1, 1, 0, 1)


def test_connect_failed_starts_a_new_connect_for_the_other_waiters() -> None:
    state = make(max_connections_per_key=1)
    w1, w2, w3 = (state.enqueue("a") for _ in range(3))
    r1 = only_start(state)
    cause = OSError("refused")
    state.connect_failed(r1, cause)
    queued = effects(state)
    assert fails(queued) == [(w1, FailReason.CONNECT_FAILED, cause)]
    (r2,) = starts(queued)
    assert len(queued) == 2
    assert list(r2.waiters) == [w2]
    assert w3.waiting and connect_of(w3) is None
    assert counts(state) == (0, 0, 1, 2, 0, 1)


def test_connect_failed_frees_global_room_for_blocked_keys() -> None:
    state = make(max_connections=1)
    wa = state.enqueue("a")
    ra = only_start(state)
    state.enqueue("b")
    assert effects(state) == []
    cause = OSError()
    state.connect_failed(ra, cause)
    queued = effects(state)
    assert [type(e) for e in queued] == [Fail, StartConnect]
    assert fails(queued) == [(wa, FailReason.CONNECT_FAILED, cause)]
    assert [r.key for r in starts(queued)] == ["b"]


def test_cancelled_waiter_hands_its_attribution_on() -> None:
    state = make(max_connections_per_key=1)
    w1 = state.enqueue("a")
    record = only_start(state)
    w2 = state.enqueue("a")
    assert effects(state) == []
    assert connect_of(w2) is None
    state.cancel(w1)
    assert effects(state) == []  # No redundant connect: the one in flight covers w2 now.
    assert connect_of(w2) is record
    assert not w1.waiting
    state.cancel(w1)  # Idempotent.
    assert effects(state) == []
    conn = succeed(state, record, "c")
    assert delivered(effects(state)) == [(w2, conn)]


def test_connect_whose_waiter_left_goes_idle() -> None:
    state = make()
    waiter = state.enqueue("a")
    record = only_start(state)
    state.cancel(waiter)
    assert effects(state) == []
    assert counts(state) == (0, 0, 1, 0, 0, 1)
    conn = succeed(state, record, "c")
    assert effects(state) == []
    assert counts(state) == (1, 0, 0, 0, 0, 1)
    lease = state.acquire_nowait("a")
    assert lease is not None and lease.connection is conn
    assert not lease.is_reused


def test_dead_connection_is_dropped_at_hand_out() -> None:
    state = make()
    c1, c2 = open_idle(state, "a", ["c1", "c2"])
    c2.dead = True
    lease = state.acquire_nowait("a")
    assert lease is not None and lease.connection is c1
    assert closes(effects(state)) == [c2]
    c1.ready = False
    state.release(lease, 1.0)
    state.check_invariants()
    # Not ready: it is not handed out, a waiter gets a new connect instead.
    assert state.acquire_nowait("a") is None
    state.enqueue("a")
    assert only_start(state).key == "a"


def test_dead_connection_found_at_hand_out_frees_room_for_blocked_keys() -> None:
    """Regression: dropping a dead connection in acquire_nowait did not give its room to
    keys blocked by the global limit, which then waited for an unrelated event."""
    state = make(max_connections=2)
    state.enqueue("a")
    state.enqueue("a")
    r1, r2 = starts(effects(state))
    c1 = succeed(state, r1, "c1", capacity=2)  # Serves both waiters.
    _, second = (e.lease for e in effects(state) if isinstance(e, Deliver))
    c2 = succeed(state, r2, "c2", capacity=2)  # Goes idle.
    assert effects(state) == []
    on_c2 = state.acquire_nowait("a")
    assert on_c2 is not None and on_c2.connection is c2
    state.release(second, 1.0)  # c1: one lease, room for one more; c1 released last.
    assert effects(state) == []
    assert counts(state) == (0, 2, 0, 0, 2, 2)
    wb = state.enqueue("b")
    assert effects(state) == []  # Blocked: nothing is idle, nothing can be evicted.
    assert connect_of(wb) is None
    c1.dead = True  # Silently (no refresh); LIFO looks at c1 first.
    lease = state.acquire_nowait("a")
    assert lease is not None and lease.connection is c2
    queued = effects(state)
    assert closes(queued) == [c1]
    assert [r.key for r in starts(queued)] == ["b"]
    assert connect_of(wb) is not None


def test_refresh_closed_drops_a_leased_connection_and_its_release_is_a_no_op() -> None:
    state = make()
    state.enqueue("a")
    conn = succeed(state, only_start(state), "c")
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    conn.dead = True
    state.refresh(deliver.lease._record, closed=True, ready=False, capacity=0)
    assert closes(effects(state)) == [conn]
    assert counts(state) == (0, 0, 0, 0, 0, 0)
    state.release(deliver.lease, 1.0)
    assert effects(state) == []
    assert deliver.lease.released
    assert dict(state.statistics().keys) == {}


# ---------------------------------------------------------------------- expiry


def test_idle_expiry_and_next_deadline() -> None:
    state = make(idle_timeout=10.0)
    assert state.next_deadline() == math.inf
    state.enqueue("a")
    conn = succeed(state, only_start(state), "c", now=0.0)
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    assert state.next_deadline() == math.inf  # Leased: no idle clock running.
    state.release(deliver.lease, 5.0)
    assert state.next_deadline() == 15.0
    state.expire(14.999)
    assert effects(state) == []
    state.expire(15.0)
    assert closes(effects(state)) == [conn]
    assert state.next_deadline() == math.inf
    assert dict(state.statistics().keys) == {}


def test_idle_timeout_none_never_expires() -> None:
    state = make(idle_timeout=None)
    open_idle(state, "a", ["c"])
    assert state.next_deadline() == math.inf
    state.expire(1e9)
    assert effects(state) == []
    assert counts(state) == (1, 0, 0, 0, 0, 1)


def test_lifetime_expiry_retires_a_leased_connection_until_release() -> None:
    state = make(idle_timeout=None, max_lifetime=100.0, lifetime_jitter=0)
    state.enqueue("a")
    conn = succeed(state, only_start(state), "c", now=0.0)
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    assert state.next_deadline() == 100.0
    state.expire(99.0)
    assert effects(state) == []
    state.expire(100.0)
    assert effects(state) == []  # Leased: it retires, it is not closed under its user.
    assert state.acquire_nowait("a") is None  # And takes no new lease.
    assert counts(state) == (0, 1, 0, 0, 1, 1)
    state.release(deliver.lease, 101.0)
    assert closes(effects(state)) == [conn]
    assert counts(state) == (0, 0, 0, 0, 0, 0)


def test_lifetime_expiry_closes_an_idle_connection_and_respects_jitter() -> None:
    state = make(idle_timeout=50.0, max_lifetime=100.0, lifetime_jitter=0.5, rng=random.Random(7))
    expected = 100.0 * (1.0 - random.Random(7).random() * 0.5)
    (conn,) = open_idle(state, "a", ["c"], now=0.0)
    assert state.next_deadline() == min(50.0, expected)
    state.expire(expected - 0.001)
    if expected > 50.0:
        assert closes(effects(state)) == [conn]  # Idle timeout first.
        return
    assert effects(state) == []
    state.expire(expected)
    assert closes(effects(state)) == [conn]


def test_next_deadline_is_the_earliest_of_idle_and_lifetime() -> None:
    state = make(idle_timeout=30.0, max_lifetime=20.0, lifetime_jitter=0)
    open_idle(state, "a", ["c1"], now=0.0)
    open_idle(state, "b", ["c2"], now=5.0)
    assert state.next_deadline() == 20.0  # c1's lifetime
    state.expire(20.0)
    assert len(closes(effects(state))) == 1
    assert state.next_deadline() == 25.0  # c2's lifetime
    state.expire(25.0)
    assert len(closes(effects(state))) == 1
    assert state.next_deadline() == math.inf


# ---------------------------------------------------------------------- close and release


def test_close_fails_waiters_and_closes_everything() -> None:
    state = make(max_connections_per_key=2)
    state.enqueue("a")
    state.enqueue("a")
    r1, r2 = starts(effects(state))
    c1 = succeed(state, r1, "c1")
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    waiting = [state.enqueue("a") for _ in range(2)]
    state.enqueue("b")
    rb = only_start(state)
    assert effects(state) == []
    state.close()
    queued = effects(state)
    failed = fails(queued)
    assert {waiter for waiter, _, _ in failed} >= set(waiting)
    assert all(reason is FailReason.POOL_CLOSED for _, reason, _ in failed)
    assert len(failed) == 4  # The second waiter of r2, two later ones of a, the one of b.
    assert closes(queued) == [c1]  # Leased or not.
    assert state.statistics().closed
    assert state.acquire_nowait("a") is None
    with pytest.raises(RuntimeError):
        state.enqueue("a")
    # Connects in flight report back: a success is closed, a failure fails nobody.
    c2 = succeed(state, r2, "c2")
    queued = effects(state)
    assert [(e.key, e.connection) for e in queued if isinstance(e, Close)] == [("a", c2)]
    assert len(queued) == 1
    state.connect_failed(rb, None)
    assert effects(state) == []
    assert counts(state) == (0, 0, 0, 0, 0, 0)
    assert dict(state.statistics().keys) == {}
    state.release(deliver.lease, 1.0)  # Release after close: nothing happens.
    assert effects(state) == []
    state.close()  # Idempotent.
    assert effects(state) == []


def test_release_twice_is_a_no_op() -> None:
    state = make()
    (conn,) = open_idle(state, "a", ["c"])
    lease = state.acquire_nowait("a")
    assert lease is not None
    state.release(lease, 1.0)
    assert counts(state) == (1, 0, 0, 0, 0, 1)
    assert lease.released
    other = state.acquire_nowait("a")
    assert other is not None and other.connection is conn
    state.release(lease, 2.0)  # Must not release ``other``'s use of the connection.
    state.check_invariants()
    assert counts(state) == (0, 1, 0, 0, 1, 1)
    state.release(lease, 2.0, discard=True)  # Not even a discard.
    assert effects(state) == []
    assert counts(state) == (0, 1, 0, 0, 1, 1)


def test_release_with_discard_closes_and_serves_the_next_waiter() -> None:
    state = make(max_connections_per_key=1)
    (conn,) = open_idle(state, "a", ["c"])
    lease = state.acquire_nowait("a")
    assert lease is not None
    waiter = state.enqueue("a")
    assert effects(state) == []
    state.release(lease, 1.0, discard=True)
    queued = effects(state)
    assert closes(queued) == [conn]
    (record,) = starts(queued)
    assert connect_of(waiter) is record


def test_connect_reports_twice_are_errors() -> None:
    state = make()
    state.enqueue("a")
    record = only_start(state)
    succeed(state, record, "c")
    effects(state)
    with pytest.raises(RuntimeError):
        state.connect_succeeded(record, Conn("again"), 1.0)
    with pytest.raises(RuntimeError):
        state.connect_failed(record, None)


# ---------------------------------------------------------------------- construction, limits


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_connections": 0}, ValueError),
        ({"max_connections": -1}, ValueError),
        ({"max_connections": 1.5}, TypeError),
        ({"max_connections": True}, TypeError),
        ({"max_connections_per_key": 0}, ValueError),
        ({"max_connections_per_key": "2"}, TypeError),
        ({"max_waiters": -1}, ValueError),
        ({"max_waiters": 2.0}, TypeError),
        ({"idle_timeout": -1.0}, ValueError),
        ({"idle_timeout": math.nan}, ValueError),
        ({"idle_timeout": "60"}, TypeError),
        ({"max_lifetime": -0.5}, ValueError),
        ({"max_lifetime": math.nan}, ValueError),
        ({"lifetime_jitter": 1.0}, ValueError),
        ({"lifetime_jitter": -0.1}, ValueError),
        ({"release_policy": "lifo"}, TypeError),
    ],
)
def test_constructor_validation(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        PoolState(**options)


@pytest.mark.parametrize(("weight", "capacity"), [(0, 1), (1, 0), (-1, 1), (1.5, 1)])
def test_reservation_validation(weight: Any, capacity: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        Reservation(weight=weight, capacity=capacity)


def test_max_waiters_raises_too_many_waiters() -> None:
    state = make(max_waiters=2, max_connections_per_key=1)
    state.enqueue("a")
    state.enqueue("a")
    effects(state)
    with pytest.raises(TooManyWaiters) as info:
        state.enqueue("a")
    assert isinstance(info.value, PoolError)
    assert info.value.key == "a"
    assert effects(state) == []
    assert counts(state) == (0, 0, 1, 2, 0, 1)
    state.enqueue("b")  # Per key.
    assert only_start(state).key == "b"


def test_max_waiters_zero_leaves_no_empty_sub_pool() -> None:
    """Regression: max_waiters=0 created the key's sub-pool before refusing the waiter, so
    every refused key stayed in statistics().keys (and in memory) for ever."""
    state = make(max_waiters=0)
    for key in ("a", "b", "c"):
        with pytest.raises(TooManyWaiters):
            state.enqueue(key)
    state.check_invariants()
    assert dict(state.statistics().keys) == {}


def test_statistics_are_frozen_snapshots() -> None:
    state = make()
    before = state.statistics()
    state.enqueue("a")
    assert before.waiting == 0 and dict(before.keys) == {}
    after = state.statistics()
    assert after.waiting == 1 and after.keys["a"].waiting == 1
    with pytest.raises(TypeError):
        after.keys["b"] = after.keys["a"]  # type: ignore[index]
    assert after.connections == 0


def test_lease_repr_and_key() -> None:
    state = make()
    open_idle(state, "a", ["c"])
    lease: Lease[str, Conn] | None = state.acquire_nowait("a")
    assert lease is not None
    assert lease.key == "a"
    assert "held" in repr(lease)
    state.release(lease, 1.0)
    assert "released" in repr(lease)


def test_release_to_a_blocked_keys_waiter_unblocks_the_key() -> None:
    """Regression: a release that served the last uncovered waiter of a key held back by the
    global limit left the key on the blocked list (check_invariants failed; later room was
    offered to a key that no longer needed it)."""
    state = make(max_connections=1)
    state.enqueue("a")
    record = only_start(state)
    second = state.enqueue("a")
    assert effects(state) == []  # Blocked by the global limit.
    conn = succeed(state, record, "c")
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    state.release(deliver.lease, 1.0)
    assert delivered(effects(state)) == [(second, conn)]
    state.check_invariants()
    assert state._blocked == {}


@pytest.mark.parametrize("change", ["go_away", "lower_capacity"])
def test_release_of_an_unusable_connection_gives_its_room_to_blocked_keys(change: str) -> None:
    """Regression: a connection that went idle while not ready (or with its capacity lowered
    to nothing) could have been evicted for a key blocked by the global limit, but release
    returned early and the blocked key waited for an unrelated event."""
    state = make(max_connections=1)
    state.enqueue("a")
    record = only_start(state)
    conn = succeed(state, record, "c")
    (deliver,) = effects(state)
    assert isinstance(deliver, Deliver)
    wb = state.enqueue("b")
    assert effects(state) == []
    if change == "go_away":
        conn.ready = False
        state.refresh(record, closed=False, ready=False, capacity=1)
    else:
        state.refresh(record, closed=False, ready=True, capacity=0)
    assert effects(state) == []
    state.release(deliver.lease, 1.0)
    queued = effects(state)
    assert closes(queued) == [conn]
    assert [r.key for r in starts(queued)] == ["b"]
    assert connect_of(wb) is not None


def test_idle_expiry_at_next_deadline_despite_float_rounding() -> None:
    """Regression: expire() compared ``idle_since > now - idle_timeout`` while next_deadline()
    returned ``idle_since + idle_timeout``; for some times the two round differently, so at
    its deadline nothing expired and the pool's timer woke up again at once, for ever."""
    idle_since = 0.21060533511106927
    now = idle_since + 5.0
    assert now - 5.0 < idle_since  # The rounding this test is about.
    state = make(idle_timeout=5.0)
    (conn,) = open_idle(state, "a", ["c"], now=idle_since)
    assert state.next_deadline() == now
    state.expire(now)
    assert closes(effects(state)) == [conn]
    assert state.next_deadline() == math.inf


def test_evicting_a_keys_own_idle_connection_does_not_strand_its_waiters() -> None:
    """Regression: a key whose waiters were held by its per-key limit lost its idle (not
    ready) connection to another key's eviction; the room that freed was never offered back
    to it, so after the other key's connect failed its waiters waited for ever."""
    state = make(max_connections=1, max_connections_per_key=1)
    wb = state.enqueue("b")
    rb = only_start(state)
    wa = state.enqueue("a")
    assert effects(state) == []  # Blocked by the global limit.
    cb = succeed(state, rb, "b1", ready=False)  # Cannot serve wb; b's own limit holds wb.
    queued = effects(state)
    assert closes(queued) == [cb]  # Evicted for a.
    (ra,) = starts(queued)
    assert ra.key == "a"
    assert wb.waiting and connect_of(wb) is None
    cause = OSError("refused")
    state.connect_failed(ra, cause)
    queued = effects(state)
    assert fails(queued) == [(wa, FailReason.CONNECT_FAILED, cause)]
    (rb2,) = starts(queued)  # b gets the room back.
    assert rb2.key == "b"
    assert connect_of(wb) is rb2


def test_cancelling_the_head_blocked_key_gives_the_next_room_to_the_key_behind_it() -> None:
    """Keys held back by the global limit are served in arrival order; a key whose last
    waiter is cancelled leaves that line, and the next room goes to the key behind it."""
    weights = {"a": 1, "b": 1, "c": 2}
    state = make(max_connections=2, reserve=lambda key: Reservation(weight=weights[key]))
    state.enqueue("a")
    state.enqueue("a")
    ra1, ra2 = starts(effects(state))
    wc = state.enqueue("c")
    wb = state.enqueue("b")
    assert effects(state) == []
    assert list(state._blocked) == ["c", "b"]
    state.cancel(wc)
    assert effects(state) == []
    assert list(state._blocked) == ["b"]
    state.connect_failed(ra1, None)  # Room for one connection: b's, whatever c weighed.
    queued = effects(state)
    assert len(fails(queued)) == 1  # The Fail of ra1's waiter.
    (rb,) = starts(queued)
    assert rb.key == "b"
    assert connect_of(wb) is rb
    assert state._blocked == {}
    state.connect_failed(ra2, None)
    effects(state)
