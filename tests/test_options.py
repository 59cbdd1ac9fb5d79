"""PoolOptions: every entry point builds one or takes one, and says the same of a bad one."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
from _fakes import FakeConnector
from httpx import AsyncClient

from trio_connpool import (
    Instrument,
    Pool,
    PoolOptions,
    ReleasePolicy,
    Reservation,
    create_pool,
    open_client,
    open_pool,
)
from trio_connpool._options import PoolOptionArgs, check_duration
from trio_connpool._state import PoolState
from trio_connpool.contrib.httpx import AsyncPoolTransport
from trio_connpool.http import CLIENT_POOL_OPTIONS, Timeouts

CUSTOM = PoolOptions(
    max_connections=3,
    max_connections_per_key=2,
    release_policy=ReleasePolicy.FIFO,
    acquire_timeout=1.5,
    max_waiters=4,
    idle_timeout=7,
    max_lifetime=30.0,
    lifetime_jitter=0.25,
    close_timeout=2.0,
    reserve=lambda key: Reservation(weight=2),
    instruments=[Instrument()],
    rng=random.Random(1),
)


def _type_text(annotation: object) -> str:
    return str(getattr(annotation, "__forward_arg__", annotation))


def test_the_keywords_are_exactly_the_fields() -> None:
    """The keywords' TypedDict is the one other listing of the options: the type checker
    refuses a key that is not a field (the entry points call PoolOptions(**keywords)); this
    refuses a field that is not a key, or a key whose type differs."""
    fields = {field.name: _type_text(field.type) for field in attrs.fields(PoolOptions)}
    keys = {name: _type_text(kind) for name, kind in PoolOptionArgs.__annotations__.items()}
    assert keys == fields
    assert PoolOptionArgs.__total__ is False


def test_defaults_and_a_frozen_checked_copy() -> None:
    options = PoolOptions()
    assert (options.max_connections, options.max_connections_per_key) == (100, None)
    assert options.release_policy is ReleasePolicy.LIFO
    assert (options.idle_timeout, options.close_timeout, options.lifetime_jitter) == (60, 5, 0.1)
    assert options.acquire_timeout is options.max_waiters is options.max_lifetime is None
    assert options.reserve is None
    assert options.rng is None
    assert options.instruments == ()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.max_connections = 1  # type: ignore[misc]
    changed = options.replace(max_connections=5, idle_timeout=None)
    assert (changed.max_connections, changed.idle_timeout) == (5, None)
    assert options.max_connections == 100
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        options.replace(max_connections=0)
    # Instruments are kept as a tuple, so an options object is a hashable value.
    assert isinstance(CUSTOM.instruments, tuple)
    assert hash(CUSTOM) == hash(attrs.evolve(CUSTOM))
    with pytest.raises(TypeError):
        PoolOptions(100)  # type: ignore[call-arg]  # keywords only


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"max_connections": 0}, ValueError, "max_connections must be at least 1, got 0"),
        ({"max_connections": 2.0}, TypeError, "max_connections must be an int, not float"),
        ({"max_connections_per_key": True}, TypeError, "max_connections_per_key must be an"),
        ({"release_policy": "lifo"}, TypeError, "release_policy must be a ReleasePolicy"),
        ({"max_waiters": -1}, ValueError, "max_waiters must be 0 or more, got -1"),
        ({"max_waiters": "1"}, TypeError, "max_waiters must be an int or None, not str"),
        ({"acquire_timeout": -1}, ValueError, "acquire_timeout must be 0 or more seconds, not -1"),
        (
            {"idle_timeout": math.nan},
            ValueError,
            "idle_timeout must be 0 or more seconds, not nan",
        ),
        ({"max_lifetime": "9"}, TypeError, "max_lifetime must be a number of seconds or None"),
        (
            {"close_timeout": None},
            TypeError,
            "close_timeout must be a number of seconds, not None",
        ),
        ({"lifetime_jitter": 1}, ValueError, r"lifetime_jitter must be in \[0, 1\), got 1"),
        ({"lifetime_jitter": math.nan}, ValueError, "lifetime_jitter must be in"),
        ({"lifetime_jitter": "0"}, TypeError, "lifetime_jitter must be a number"),
        ({"reserve": 1}, TypeError, "reserve must be a callable or None"),
        ({"instruments": [object()]}, TypeError, "instruments must be Instrument objects"),
    ],
)
def test_every_option_is_checked_when_made(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PoolOptions(**changes)
    with pytest.raises(error, match=message):
        PoolOptions().replace(**changes)


@pytest.mark.parametrize(
    "make",
    [
        lambda value: check_duration("d", value),
        lambda value: PoolOptions(idle_timeout=value),
        lambda value: PoolOptions(close_timeout=value),
        lambda value: Timeouts(read=value),
    ],
)
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, ValueError, r"^\S+ must be 0 or more seconds, not -1$"),
        (-0.5, ValueError, r"^\S+ must be 0 or more seconds, not -0.5$"),
        (math.nan, ValueError, r"^\S+ must be 0 or more seconds, not nan$"),
        ("1", TypeError, r"^\S+ must be a number of seconds( or None)?, not '1'$"),
        (True, TypeError, r"^\S+ must be a number of seconds( or None)?, not True$"),
    ],
)
def test_one_duration_check_says_one_thing(
    make: Callable[[object], object], value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make(value)


def test_a_duration_may_be_zero_or_infinite() -> None:
    for value in (0, 0.0, 3, math.inf):
        check_duration("d", value)
        check_duration("d", value, allow_none=False)
        assert PoolOptions(close_timeout=value).close_timeout == value
    check_duration("d", None)
    with pytest.raises(TypeError, match=r"^d must be a number of seconds, not None$"):
        check_duration("d", None, allow_none=False)


# ---------------------------------------------------------------------- the entry points

BOTH = "give the pool's options as keywords or as options=PoolOptions"


def test_pool_state_takes_options_or_keywords() -> None:
    state: PoolState[str, object] = PoolState(CUSTOM)
    assert state.options is CUSTOM
    assert (state.max_connections, state.max_connections_per_key) == (3, 2)
    assert (state.max_waiters, state.idle_timeout, state.max_lifetime) == (4, 7, 30.0)
    assert not state.lifo and state.lifetime_jitter == 0.25
    keyworded: PoolState[str, object] = PoolState(max_connections=3, max_waiters=4)
    assert keyworded.options == PoolOptions(max_connections=3, max_waiters=4)
    with pytest.raises(TypeError, match=BOTH):
        PoolState(CUSTOM, max_connections=3)


async def test_open_pool_and_create_pool_take_options_or_keywords() -> None:
    connector = FakeConnector()
    async with open_pool(connector, options=CUSTOM) as pool:
        assert pool.options is CUSTOM
        assert pool.statistics().max_connections == 3
        assert (pool.acquire_timeout, pool.close_timeout) == (1.5, 2.0)
    async with open_pool(connector, max_connections=3, close_timeout=2) as pool:
        assert pool.options == PoolOptions(max_connections=3, close_timeout=2)
    async with open_pool(connector) as pool:
        assert pool.options == PoolOptions()
    async with trio.open_nursery() as nursery:
        created = await create_pool(nursery, connector, options=CUSTOM)
        assert created.options is CUSTOM
        await created.aclose()
        created = await create_pool(nursery, connector, max_waiters=4)
        assert created.options == PoolOptions(max_waiters=4)
        await created.aclose()
    assert connector.calls == []


async def test_both_options_and_keywords_are_refused_at_once() -> None:
    connector = FakeConnector()
    message = BOTH + r".*\(got max_connections as keywords too\)"
    with pytest.raises(TypeError, match=message):
        Pool(connector, options=CUSTOM, max_connections=3)
    with pytest.raises(TypeError, match=message):
        async with open_pool(connector, options=CUSTOM, max_connections=3):
            pytest.fail("unreachable")  # pragma: no cover
    async with trio.open_nursery() as nursery:
        with pytest.raises(TypeError, match=message):
            await create_pool(nursery, connector, options=CUSTOM, max_connections=3)
    with pytest.raises(TypeError, match=r"options must be a PoolOptions, not \{\}"):
        Pool(connector, options={})  # type: ignore[arg-type]
    assert connector.calls == []


async def test_the_connectors_reserve_is_the_default_reserve() -> None:
    """reserve=None in the options means the connector's own reserve(); the options the
    pool keeps are the ones it was given."""
    asked: list[str] = []

    class Reserving(FakeConnector):
        def reserve(self, key: str) -> Reservation:
            asked.append(key)
            return Reservation(weight=2)

    connector: Callable[[str], Awaitable[object]] = Reserving()
    async with open_pool(connector, max_connections_per_key=2) as pool:
        assert pool.options.reserve is None
        async with pool.lease("a"):
            assert pool.statistics().keys["a"].weight == 1  # the connection's own weight
    assert asked == ["a"]


async def test_open_client_builds_its_pools_options() -> None:
    async with open_client() as client:
        assert client.pool is not None
        assert client.pool.options is CLIENT_POOL_OPTIONS
    assert PoolOptions(max_connections_per_key=10, idle_timeout=5.0) == CLIENT_POOL_OPTIONS
    async with open_client(max_connections=7, max_waiters=2) as client:
        assert client.pool is not None
        assert client.pool.options == CLIENT_POOL_OPTIONS.replace(max_connections=7, max_waiters=2)
    given = PoolOptions(max_connections=5)
    async with open_client(pool_options=given) as client:
        assert client.pool is not None
        assert client.pool.options is given
    with pytest.raises(TypeError, match="as keywords or as pool_options=PoolOptions"):
        async with open_client(pool_options=given, idle_timeout=1):
            pytest.fail("unreachable")  # pragma: no cover
    with pytest.raises(TypeError, match=r"timeouts\.pool"):
        async with open_client(acquire_timeout=1):
            pytest.fail("unreachable")  # pragma: no cover
    with pytest.raises(ValueError, match="max_connections_per_key must be at least 1"):
        async with open_client(max_connections_per_key=0):
            pytest.fail("unreachable")  # pragma: no cover


async def test_the_httpx_transport_passes_them_on() -> None:
    given = PoolOptions(max_connections=5)
    async with AsyncPoolTransport(pool_options=given) as transport:
        assert transport.pool is not None
        assert transport.pool.options is given
    async with (
        AsyncPoolTransport(max_connections=5) as transport,
        AsyncClient(transport=transport),
    ):
        assert transport.pool is not None
        assert transport.pool.options == CLIENT_POOL_OPTIONS.replace(max_connections=5)
    transport = AsyncPoolTransport(pool_options=given, max_connections=5)
    with pytest.raises(TypeError, match="as keywords or as pool_options=PoolOptions"):
        async with transport:
            pytest.fail("unreachable")  # pragma: no cover
