"""The command line: ``python -m trio_connpool demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import trio

from ._pool import open_pool


class _EchoConnection:
    """An in-memory connection: each exchange takes a little (real) time, like a round trip."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.exchanges = 0

    async def exchange(self, payload: bytes) -> bytes:
        await trio.sleep(0.001)
        self.exchanges += 1
        return payload

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def _memory_demo(tasks: int, keys: int, quiet: bool) -> int:
    made: list[_EchoConnection] = []

    async def connect(key: int) -> _EchoConnection:
        await trio.sleep(0.005)  # a connect costs more than an exchange
        connection = _EchoConnection(len(made))
        made.append(connection)
        return connection

    start = time.perf_counter()
    async with open_pool(connect, max_connections=32, max_connections_per_key=8) as pool:

        async def worker(i: int) -> None:
            async with pool.lease(i % keys) as connection:
                assert await connection.exchange(b"ping") == b"ping"

        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(worker, i)
        stats = pool.statistics()
    elapsed = time.perf_counter() - start
    exchanges = sum(c.exchanges for c in made)
    print(f"{tasks} tasks, {keys} keys: {exchanges} exchanges in {elapsed:.3f} s")
    print(f"connections opened: {len(made)} (limits: 8 per key, 32 in all)")
    print(f"after the run: idle={stats.idle} in_use={stats.in_use} waiting={stats.waiting}")
    if not quiet:
        for key, key_stats in sorted(stats.keys.items(), key=lambda kv: repr(kv[0])):
            print(f"  key {key!r}: idle={key_stats.idle}")
    print(f"all closed on exit: {all(c.closed for c in made)}")
    return 0 if exchanges == tasks and all(c.closed for c in made) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trio_connpool`` and the ``trio-connpool`` script."""
    parser = argparse.ArgumentParser(prog="trio-connpool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a self-contained demonstration")
    demo.add_argument("--tasks", type=int, default=2000, help="concurrent tasks")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    return trio.run(_memory_demo, args.tasks, 4, args.quiet)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
