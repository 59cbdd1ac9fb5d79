"""Regression tests for bugs found in review, each named for what went wrong."""

from __future__ import annotations

import pytest
import trio

from trio_connpool import PoolError, Reservation, open_pool
from trio_connpool._state import PoolState


class _Conn:
    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


def _reserve(key: str) -> Reservation:
    if key == "bad":
        raise RuntimeError("reserve failed")
    return Reservation()


def test_reserve_that_raises_leaves_no_waiter_behind_in_the_state() -> None:
    state: PoolState[str, _Conn] = PoolState(reserve=_reserve)
    with pytest.raises(RuntimeError, match="reserve failed"):
        state.enqueue("bad")
    state.check_invariants()
    stats = state.statistics()
    assert stats.waiting == 0
    assert dict(stats.keys) == {}
    # The pool still works for other keys.
    waiter = state.enqueue("good")
    assert waiter.waiting
    assert state.statistics().connecting == 1


async def test_reserve_that_raises_surfaces_from_acquire_and_leaks_nothing() -> None:
    made: list[_Conn] = []

    async def connect(key: str) -> _Conn:
        await trio.lowlevel.checkpoint()
        made.append(_Conn())
        return made[-1]

    async with open_pool(connect, reserve=_reserve) as pool:
        with pytest.raises(RuntimeError, match="reserve failed"):
            await pool.acquire("bad")
        assert pool.statistics().waiting == 0
        async with pool.lease("good") as conn:
            assert conn is made[0]
    assert all(c.closed for c in made)


def test_build_request_keeps_every_value_of_a_repeated_header() -> None:
    """A header given several times kept only its last value; defaults are still replaced."""
    from trio_connpool.http import Client, NoPoolSender

    client = Client(NoPoolSender(), headers={"X-Default": "d", "Accept": "*/*"})
    request = client.build_request(
        "GET",
        "http://127.0.0.1/",
        headers=[("X-Dup", "a"), ("x-dup", "b"), ("ACCEPT", "text/plain")],
    )
    assert request.headers.get_list("x-dup") == ["a", "b"]
    assert request.headers.get_list("accept") == ["text/plain"]
    assert request.headers.get_list("x-default") == ["d"]


async def test_an_exception_group_raised_in_the_block_comes_out_as_itself() -> None:
    """A group from the block's own nursery came out as PoolError (split() rebuilt it, so the
    identity check that recognises the block's own exception failed)."""

    async def broken_pipe() -> None:
        raise BrokenPipeError

    with pytest.RaisesGroup(BrokenPipeError) as info:
        async with open_pool(_connect_conn) as pool, trio.open_nursery() as nursery:
            assert not pool.closed
            nursery.start_soon(broken_pipe)
    assert not isinstance(info.value, PoolError)
    assert info.value.__cause__ is None


async def _connect_conn(key: str) -> _Conn:
    await trio.lowlevel.checkpoint()
    return _Conn()
