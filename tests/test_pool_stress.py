"""A bounded stress run: thousands of tasks, random cancellations and failures, virtual time.

Every random choice is drawn up front from a seeded ``random.Random`` (tasks run in an order
trio's scheduler picks, so drawing inside them would not be reproducible). The clock is
pytest-trio's ``autojump_clock``: minutes of virtual time take a second or two of real time.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable

import attrs
import pytest
import trio
import trio.testing
from _fakes import FakeConnection, FakeConnector, Step, assert_balanced, assert_stats

from trio_connpool import ConnectError, Pool, PoolTimeout, open_pool

FakePool = Pool[Hashable, FakeConnection]

TASKS = 3000
KEYS = [f"key{i}" for i in range(10)]
MAX_CONNECTIONS = 20
PER_KEY = 4


@attrs.frozen
class Plan:
    key: str
    start: float
    hold: float
    cancel_after: float | None
    timeout: float | None
    body_fails: bool


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(TASKS):
        plans.append(
            Plan(
                key=rng.choice(KEYS),
                start=rng.uniform(0, 60),
                hold=rng.choice([0.0, 0.05, 0.2, 1.0]),
                cancel_after=rng.uniform(0, 3) if rng.random() < 0.2 else None,
                timeout=rng.choice([None, 2.0, 10.0]),
                body_fails=rng.random() < 0.05,
            )
        )
    return plans


def make_steps(rng: random.Random, count: int) -> list[Step]:
    return [
        Step(
            delay=rng.choice([0.0, 0.1, 0.5, 2.0]),
            fail=OSError("refused") if rng.random() < 0.1 else None,
            capacity=rng.randint(1, 2),
        )
        for _ in range(count)
    ]


@pytest.mark.slow
async def test_stress_thousands_of_tasks(autojump_clock: trio.testing.MockClock) -> None:
    rng = random.Random(20250101)
    plans = make_plans(rng)
    connector = FakeConnector(Step(delay=0.1))
    connector.script(*make_steps(rng, TASKS))
    outcomes: Counter[str] = Counter()
    active: Counter[int] = Counter()  # Leases in use per connection id.
    violations: list[str] = []

    async def user(pool: FakePool, plan: Plan) -> None:
        await trio.sleep(plan.start)
        deadline = trio.current_time() + (
            plan.cancel_after if plan.cancel_after is not None else 1e9
        )
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                async with pool.lease(plan.key, timeout=plan.timeout) as conn:
                    # (One sharing a connection may close it under us: only check singles.)
                    if conn.key != plan.key or (conn.capacity == 1 and conn.is_closed()):
                        violations.append(
                            f"bad hand-out {conn} cap={conn.capacity} for {plan.key}"
                        )
                    active[conn.id] += 1
                    if active[conn.id] > conn.capacity:
                        violations.append(f"{conn} over capacity")
                    try:
                        await trio.sleep(plan.hold)
                        if plan.body_fails:
                            raise KeyError(plan.key)
                    finally:
                        active[conn.id] -= 1
            except ConnectError as exc:
                assert isinstance(exc.__cause__, OSError)
                assert exc.key == plan.key
                outcomes["connect_error"] += 1
            except PoolTimeout:
                outcomes["timeout"] += 1
            except KeyError:
                outcomes["body_error"] += 1
            else:
                outcomes["ok"] += 1
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1

    async def monitor(pool: FakePool) -> None:
        for _ in range(10_000):  # Bounded: 10 000 virtual half-seconds at most.
            stats = pool.statistics()
            if stats.connections + stats.connecting > MAX_CONNECTIONS:
                violations.append(f"global limit exceeded: {stats}")
            for key, key_stats in stats.keys.items():
                if key_stats.weight > PER_KEY:
                    violations.append(f"per-key limit exceeded for {key}: {key_stats}")
            if stats.leases < stats.in_use:
                violations.append(f"fewer leases than connections in use: {stats}")
            await trio.sleep(0.5)

    async with open_pool(
        connector,
        max_connections=MAX_CONNECTIONS,
        max_connections_per_key=PER_KEY,
        idle_timeout=5.0,
        max_lifetime=30.0,
        rng=random.Random(7),
    ) as pool:
        async with trio.open_nursery() as outer:
            outer.start_soon(monitor, pool)
            async with trio.open_nursery() as users:
                for plan in plans:
                    users.start_soon(user, pool, plan)
            outer.cancel_scope.cancel()
        assert violations == []
        assert sum(outcomes.values()) == TASKS
        assert outcomes["ok"] > TASKS // 2
        for name in ("connect_error", "timeout", "body_error", "cancelled"):
            assert outcomes[name] > 0, (name, outcomes)
        # Connects whose requesters left finish in the pool's nursery; let them land.
        await trio.sleep(10)
        assert_stats(pool, connector, waiting=0, leases=0, in_use=0, connecting=0)
        assert connector.in_flight == 0
        assert len(connector.calls) < TASKS  # Connections were reused.
    assert_balanced(pool, connector)
    assert len(connector.made) > len(KEYS)
