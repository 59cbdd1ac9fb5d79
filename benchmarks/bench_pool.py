"""Pool core benchmark: acquire + release throughput under trio.

Each point runs the same work three ways, interleaved in one process:

- ``limiter``: ``trio.CapacityLimiter(M)``, acquire + release. No keys, no connections: the
  floor for any trio pool (every trio pool at least parks and wakes tasks like this).
- ``pool``: trio_connpool's ``Pool`` with in-memory connections, ``max_connections=M``.
- ``httpcore``: httpcore's ``AsyncConnectionPool`` on its in-memory mock backend (a request
  with a canned response per operation), the pool trio users have today. It does more work
  per operation (h11 parsing), which is why the comparison is the whole operation.

C tasks share N operations; every operation holds its lease across one checkpoint, so tasks
contend whenever C > M. With K keys, task ``t`` uses key ``t % K``. When K > M the working set
is larger than the pool and every miss evicts an idle connection of another key and connects
anew: that row measures churn (an in-memory connect), not lookup.

Run: ``python benchmarks/bench_pool.py`` (``--quick`` for a short run). ``--leak`` measures
only what leak detection costs: the pool with and without ``leak_timeout`` at C=64, M=16.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import trio

from trio_connpool import open_pool


class MemoryConnection:
    """The cheapest possible connection."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def _connect(key: int) -> MemoryConnection:
    await trio.lowlevel.checkpoint()
    return MemoryConnection()


async def _spread(ops: int, tasks: int, op: Callable[[int], Awaitable[None]]) -> float:
    per_task, extra = divmod(ops, tasks)

    async def worker(t: int) -> None:
        for _ in range(per_task + (1 if t < extra else 0)):
            await op(t)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(worker, t)
    return ops / (time.perf_counter() - start)


async def run_limiter(ops: int, tasks: int, conns: int, keys: int) -> float:
    limiter = trio.CapacityLimiter(conns)

    async def op(t: int) -> None:
        async with limiter:
            await trio.lowlevel.checkpoint()

    return await _spread(ops, tasks, op)


async def run_pool(ops: int, tasks: int, conns: int, keys: int) -> float:
    async with open_pool(_connect, max_connections=conns, idle_timeout=None) as pool:

        async def op(t: int) -> None:
            async with pool.lease(t % keys):
                await trio.lowlevel.checkpoint()

        return await _spread(ops, tasks, op)


async def run_httpcore(ops: int, tasks: int, conns: int, keys: int) -> float:
    import httpcore

    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    backend = httpcore.AsyncMockBackend([response] * (ops + 1))
    async with httpcore.AsyncConnectionPool(
        max_connections=conns, max_keepalive_connections=conns, network_backend=backend
    ) as pool:
        urls = [f"http://k{k}.test/" for k in range(keys)]

        async def op(t: int) -> None:
            async with pool.stream("GET", urls[t % keys]) as r:
                await r.aread()
                await trio.lowlevel.checkpoint()

        return await _spread(ops, tasks, op)


async def run_pool_leak_timeout(
    ops: int, tasks: int, conns: int, keys: int, leak_timeout: float | None
) -> float:
    """``pool`` with leak detection set (None: off, as ``pool``)."""
    async with open_pool(
        _connect, max_connections=conns, idle_timeout=None, leak_timeout=leak_timeout
    ) as pool:

        async def op(t: int) -> None:
            async with pool.lease(t % keys):
                await trio.lowlevel.checkpoint()

        return await _spread(ops, tasks, op)


def leak_table(ops: int, rounds: int) -> None:
    """The pool with and without ``leak_timeout`` (60 s, never reached: what is measured is
    the tracking of every lease, its stack included), C=64, M=16, interleaved; medians."""
    import statistics

    tasks, conns = 64, 16
    print(f"leak detection: acquire+release, C={tasks} M={conns}, {ops} operations per run")
    print(f"median of {rounds} runs each, interleaved (ops/s)")
    print(f"{'K':>5} {'off':>10} {'on':>10} {'on/off':>7}")
    for keys in (1, 10):
        off: list[float] = []
        on: list[float] = []
        for i in range(rounds):
            pair = [(off, None), (on, 60.0)]
            for found, leak in pair if i % 2 == 0 else pair[::-1]:
                found.append(trio.run(run_pool_leak_timeout, ops, tasks, conns, keys, leak))
        a, b = statistics.median(off), statistics.median(on)
        print(f"{keys:>5} {a:>10,.0f} {b:>10,.0f} {b / a:>7.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations and rounds")
    parser.add_argument("--no-httpcore", action="store_true", help="skip the httpcore column")
    parser.add_argument(
        "--leak", action="store_true", help="only the cost of leak detection (C=64, M=16)"
    )
    args = parser.parse_args()
    if args.leak:
        leak_table(5_000 if args.quick else 20_000, 3 if args.quick else 9)
        return
    ops = 5_000 if args.quick else 20_000
    httpcore_ops = 1_000 if args.quick else 3_000
    rounds = 1 if args.quick else 3
    try:
        import httpcore  # noqa: F401
    except ImportError:
        args.no_httpcore = True

    print(f"acquire+release, {ops} operations per run, best of {rounds} (ops/s)")
    header = f"{'C':>5} {'M':>4} {'K':>5} {'limiter':>10} {'pool':>10} {'pool/lim':>9}"
    if not args.no_httpcore:
        header += f" {'httpcore':>10} {'pool/hc':>8}"
    print(header)
    for tasks in (1, 100, 1000):
        for conns in (10, 100):
            for keys in (1, 10, 1000):
                lim: list[float] = []
                ours: list[float] = []
                hc: list[float] = []
                for _ in range(rounds):
                    lim.append(trio.run(run_limiter, ops, tasks, conns, keys))
                    ours.append(trio.run(run_pool, ops, tasks, conns, keys))
                    if not args.no_httpcore:
                        hc.append(trio.run(run_httpcore, httpcore_ops, tasks, conns, keys))
                best_lim, best_ours = max(lim), max(ours)
                line = (
                    f"{tasks:>5} {conns:>4} {keys:>5} {best_lim:>10,.0f} {best_ours:>10,.0f}"
                    f" {best_ours / best_lim:>9.2f}"
                )
                if hc:
                    best_hc = max(hc)
                    line += f" {best_hc:>10,.0f} {best_ours / best_hc:>8.1f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
