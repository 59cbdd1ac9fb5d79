"""A TCP proxy that injects faults between a client and a real server (loopback, port 0).

`FaultProxy` listens on 127.0.0.1 and forwards each accepted connection to its target. For
each connection it first draws a `Plan` from a `random.Random` seeded by the test, so the
n-th accepted connection gets the same plan in every run with the same seed:

- ``PASS``: forward both ways untouched (half-closes passed on);
- ``STALL``: once ``after`` bytes went one way, stop forwarding that way (or both ways) and
  keep both sockets open until the proxy's block ends: a peer that hangs;
- ``RESET``: once ``after`` bytes went one way, abort both sockets (SO_LINGER 0, then
  close), so each side reads a reset;
- ``TRUNCATE``: once ``after`` bytes went one way, end both ways cleanly (FIN, no reset:
  what still arrives is read and dropped until each side closes);
- ``DELAY``: hold every chunk ``delay`` seconds before forwarding it (one way or both).

Faults are drawn from a bag: each fault appears in the bag as often as its weight, the bag
is shuffled, and the next connection takes the next fault; an empty bag is refilled. So
the first ``sum(weights)`` connections (and each ``sum(weights)`` after them) get every
fault as often as its weight, whatever the seed. The connections a fault is planned for
alternate between the two directions (the first one drawn), so a fault planned twice runs
both ways. ``after`` is drawn log-uniformly from the range given for its direction
(``after_down``, ``after_up``: the client-to-server way carries fewer bytes).

The proxy counts, per fault, the connections it was ``planned`` for and those it ``fired``
on: a fault fires when it really changed something (a byte forwarded for ``PASS``, a chunk
held for ``DELAY``, bytes past ``after`` withheld or cut off for the others), so a test can
assert that each fault happened. Every loop is bounded; when its block ends the proxy
closes every socket it opened (``open_sockets`` is then 0).
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType

import attrs
import trio

__all__ = ["Direction", "Fault", "FaultProxy", "Plan", "ProxiedConnection"]

_READ = 64 * 1024


class Fault(enum.Enum):
    PASS = "pass"
    STALL = "stall"
    RESET = "reset"
    TRUNCATE = "truncate"
    DELAY = "delay"


_BREAKS = (Fault.STALL, Fault.RESET, Fault.TRUNCATE)  # the faults that strike after bytes


class Direction(enum.Enum):
    UP = "up"  # client to server
    DOWN = "down"  # server to client


@attrs.frozen
class Plan:
    """What the proxy does to one connection.

    ``direction`` is the way whose bytes count towards ``after`` (STALL, RESET, TRUNCATE)
    and the way that is stalled or delayed; ``both`` stalls or delays both ways.
    """

    fault: Fault
    direction: Direction
    after: int
    both: bool
    delay: float


@attrs.define(eq=False)
class ProxiedConnection:
    """One proxied connection: its plan and what was done to it (``fired``: the plan's fault
    really happened; ``forwarded``: bytes forwarded each way)."""

    index: int
    plan: Plan
    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    forwarded: dict[Direction, int] = attrs.field(factory=lambda: dict.fromkeys(Direction, 0))
    fired: bool = False
    truncated: bool = False
    stalled: set[Direction] = attrs.field(factory=set)


class FaultProxy:
    """A fault-injecting TCP proxy in front of ``target_port`` on 127.0.0.1.

    Use it as ``async with FaultProxy(port, seed=...) as proxy:``; it listens on
    ``proxy.port`` for the block, then closes every socket it opened.

    Args:
        target_port: The real server's port on 127.0.0.1.
        seed: Seeds the proxy's `random.Random`.
        weights: How often each fault is planned (bag counts; a fault absent or 0 never is).
        after_down: The range ``(low, high)`` of ``after`` for faults counted on
            server-to-client bytes (drawn log-uniformly).
        after_up: The same for faults counted on client-to-server bytes.
        delay: The range ``(low, high)`` a DELAY connection's per-chunk delay is drawn from.
        max_connections: Connections accepted at most (the accept loop's bound); later
            ones are refused (closed at once) and counted in ``refused``.
        max_chunks: Chunks forwarded at most each way on one connection (the pump's bound);
            a connection that reaches it is closed.
    """

    def __init__(
        self,
        target_port: int,
        *,
        seed: int,
        weights: Mapping[Fault, int] | None = None,
        after_down: tuple[int, int] = (1, 16384),
        after_up: tuple[int, int] = (1, 2048),
        delay: tuple[float, float] = (0.01, 0.1),
        max_connections: int = 10_000,
        max_chunks: int = 1_000_000,
    ) -> None:
        self.target_port = target_port
        self.port = 0
        if not 1 <= after_down[0] <= after_down[1] or not 1 <= after_up[0] <= after_up[1]:
            raise ValueError(f"bad after ranges {after_down!r}, {after_up!r}")
        self.after = {Direction.DOWN: after_down, Direction.UP: after_up}
        self.delay = delay
        self.max_connections = max_connections
        self.max_chunks = max_chunks
        self.accepted = 0
        self.refused = 0
        self.upstream_failed = 0
        self.planned: Counter[Fault] = Counter()
        self.fired: Counter[Fault] = Counter()
        self.connections: list[ProxiedConnection] = []  # in the order accepted
        self._rng = random.Random(seed)
        self._bag: list[Fault] = []
        self._first_way: dict[Fault, Direction] = {}
        self._weights: dict[Fault, int] = {}
        self.set_weights(weights or {fault: 1 for fault in Fault})
        self._open: set[trio.SocketStream] = set()
        self._manager: AbstractAsyncContextManager[FaultProxy] | None = None

    # ---- configuration and counters ----------------------------------------------------------

    def set_weights(self, weights: Mapping[Fault, int]) -> None:
        """Plan new connections with these weights from now on (the bag is emptied)."""
        if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, not {weights!r}")
        self._weights = dict(weights)
        self._bag = []

    @property
    def open_sockets(self) -> int:
        """Sockets the proxy opened and has not closed yet."""
        return len(self._open)

    def summary(self) -> str:
        """One line for assertion messages."""
        faults = ", ".join(
            f"{fault.value} {self.fired[fault]}/{self.planned[fault]}" for fault in Fault
        )
        return (
            f"proxy: {self.accepted} accepted, {self.refused} refused, "
            f"{self.upstream_failed} upstream failed; fired/planned: {faults}"
        )

    def _draw(self) -> Plan:
        if not self._bag:
            self._bag = [fault for fault, weight in self._weights.items() for _ in range(weight)]
            self._rng.shuffle(self._bag)
        fault = self._bag.pop()
        rng = self._rng
        # Each fault's connections alternate between the two ways, so a fault planned twice
        # has run both ways (the first way is the seed's).
        first = self._first_way.setdefault(fault, rng.choice(list(Direction)))
        direction = first if self.planned[fault] % 2 == 0 else _other(first)
        # Draw every field whatever the fault, so a plan's fields do not shift the sequence.
        low, high = self.after[direction]
        after = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        both = rng.random() < 0.5
        delay = rng.uniform(*self.delay)
        return Plan(fault, direction, after, both, delay)

    # ---- the context manager -----------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        if self._manager is not None:
            raise RuntimeError("a FaultProxy runs once")
        self._manager = self._serving()
        return await self._manager.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._manager is not None
        return await self._manager.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[FaultProxy]:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._accept_loop, nursery)
                yield self
                nursery.cancel_scope.cancel()
        finally:
            # Every link closes its sockets when cancelled; this only makes sure of it.
            for stream in list(self._open):
                self._close_now(stream)

    async def _accept_loop(
        self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None]
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        assert len(listeners) == 1, listeners
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        async with listener:
            task_status.started()
            for _ in range(self.max_connections):
                client = await listener.accept()
                self._open.add(client)
                plan = self._draw()  # before counting it: the count picks its direction
                self.planned[plan.fault] += 1
                link = ProxiedConnection(self.accepted, plan, client)
                self.connections.append(link)
                self.accepted += 1
                nursery.start_soon(self._run_link, link)
            for _ in range(1_000_000):  # bounded: refuse the rest until the block ends
                client = await listener.accept()
                self.refused += 1
                await trio.aclose_forcefully(client)

    # ---- one connection ----------------------------------------------------------------------

    async def _run_link(self, link: ProxiedConnection) -> None:
        try:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                self.upstream_failed += 1
                return
            self._open.add(upstream)
            link.upstream = upstream
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, link, Direction.UP, nursery.cancel_scope)
                nursery.start_soon(self._pump, link, Direction.DOWN, nursery.cancel_scope)
        finally:
            self._close_now(link.client)
            if link.upstream is not None:
                self._close_now(link.upstream)

    def _ends(
        self, link: ProxiedConnection, direction: Direction
    ) -> tuple[trio.SocketStream, trio.SocketStream]:
        assert link.upstream is not None
        if direction is Direction.UP:
            return link.client, link.upstream
        return link.upstream, link.client

    def _applies(self, link: ProxiedConnection, direction: Direction) -> bool:
        return link.plan.both or link.plan.direction is direction

    def _fire(self, link: ProxiedConnection) -> None:
        if not link.fired:
            link.fired = True
            self.fired[link.plan.fault] += 1

    async def _pump(
        self, link: ProxiedConnection, direction: Direction, scope: trio.CancelScope
    ) -> None:
        """Forward ``direction``'s bytes, applying the link's plan; end the link on errors."""
        source, sink = self._ends(link, direction)
        plan = link.plan
        counted = plan.direction is direction
        try:
            for _ in range(self.max_chunks):
                data = await source.receive_some(_READ)
                if direction in link.stalled:
                    # Stalled by the other way's pump: forward nothing more, not even an EOF;
                    # the sockets stay open.
                    await trio.sleep_forever()
                if link.truncated:
                    if not data:
                        return  # both ways read to their end: the link closes
                    continue  # truncated: what still comes is read and dropped
                if not data:
                    await sink.send_eof()
                    return
                if plan.fault is Fault.DELAY and self._applies(link, direction):
                    self._fire(link)
                    await trio.sleep(plan.delay)
                room = plan.after - link.forwarded[direction]
                if counted and plan.fault in _BREAKS and len(data) > room:
                    if room > 0:
                        await sink.send_all(data[:room])
                        link.forwarded[direction] += room
                    self._fire(link)
                    self._break(link, direction, scope)
                    if plan.fault is Fault.STALL:
                        await trio.sleep_forever()
                    continue
                await sink.send_all(data)
                link.forwarded[direction] += len(data)
                if plan.fault is Fault.PASS:
                    self._fire(link)
            # The bound was reached: end the link.
            scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()  # one side failed or went away: end the link

    def _break(
        self, link: ProxiedConnection, direction: Direction, scope: trio.CancelScope
    ) -> None:
        """Strike the link's fault, now that ``after`` bytes went ``direction``."""
        plan = link.plan
        assert link.upstream is not None
        if plan.fault is Fault.STALL:
            link.stalled.add(direction)
            if plan.both:
                link.stalled.add(_other(direction))
        elif plan.fault is Fault.TRUNCATE:
            # FIN both ways, then read and drop until each side closes: closing a socket with
            # unread bytes would send a reset instead. Shut down the socket itself, not the
            # stream: the other way's pump may be writing to it (its write then fails, which
            # ends the link).
            link.truncated = True
            for stream in (link.client, link.upstream):
                with contextlib.suppress(OSError):
                    stream.socket.shutdown(socket.SHUT_WR)
        else:
            _reset(link.client)
            _reset(link.upstream)
            self._close_now(link.client)
            self._close_now(link.upstream)
            scope.cancel()

    def _close_now(self, stream: trio.SocketStream) -> None:
        # SocketStream.aclose only closes the socket (then checkpoints): close it here, in
        # synchronous code, so no cancellation can leave it open.
        stream.socket.close()
        self._open.discard(stream)


def _other(direction: Direction) -> Direction:
    return Direction.DOWN if direction is Direction.UP else Direction.UP


def _reset(stream: trio.SocketStream) -> None:
    """Make the next close abort the connection (RST) instead of closing it cleanly."""
    sock = stream.socket
    if sock.fileno() >= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
