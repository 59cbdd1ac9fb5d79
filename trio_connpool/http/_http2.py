"""An HTTP/2 client connection over one `trio.abc.Stream`, as a pool connection: the driver.

The protocol lives in `_h2core.H2Core` (no I/O, no trio): states, streams, what a frame
means, what is retryable, every bound. This module moves bytes between the transport and
the core, parks and wakes the tasks that wait on it, and runs its timers; it is the only
place that awaits.

Tasks and locks
    One reader task, `HTTP2Connection.run_background`, which the pool runs in its nursery, is
    the only task that reads from the transport. It feeds the core and wakes the tasks parked
    on the streams the core names. The requesting tasks never read; they *write* their own
    frames. Everything the core wants to send is queued in it; whoever flushes takes the
    whole queue under one `trio.Lock` and writes it, and keeps writing until the queue is
    empty before releasing the lock. So the reader (WINDOW_UPDATE, PING and SETTINGS
    acknowledgements) never waits for the lock: if someone holds it, that writer sends the
    reader's frames too. Every ``send_all`` runs in a shielded scope bounded by the write
    timeout: a request cancelled in the middle of a write cannot leave half a frame on the
    wire (which would break every other stream), and a write that times out breaks the
    connection (we cannot know how much of it went out). A connection that fails while a
    write is blocked cancels that write.

Timers
    The reader reads inside one cancel scope whose deadline is the core's next timer
    (keep-alive PING, the PING of a suspect connection, retiring a connection the server
    allows no stream), not a scope per read; a task that moves the timer earlier moves the
    scope's deadline.

Flow control
    Inbound: the stream window is 1 MiB and the connection window 16 MiB. Received DATA is
    acknowledged only when the application *consumes* it; unread data of a response that is
    closed early is acknowledged at once. So memory is bounded (never more than 16 MiB
    buffered per connection, 1 MiB per stream), and a slow consumer cannot stall the others:
    it holds at most its own 1 MiB of the connection window. Outbound: a request body is sent
    in pieces no larger than the windows and split into frames of the peer's maximum frame
    size; when the window is exhausted the sender parks until a WINDOW_UPDATE (or a SETTINGS
    change) arrives, bounded by the write timeout. A complete response that arrives meanwhile
    ends the upload (the stream is reset) and is returned.

Errors
    A stream's failure is only that stream's: a server RST_STREAM, a malformed head or a body
    that does not match its Content-Length raises `RemoteProtocolError` from that request or
    body; a cancellation, timeout or early `Response.aclose` resets the stream with
    RST_STREAM(CANCEL). The connection stays usable (`HTTP2Connection.is_clean`). A
    connection failure (EOF, reset, a protocol error, a flood, a failed write, an unanswered
    PING) reaches every open stream at once. Errors that mean "the server did not process
    this request, send it again elsewhere" have a true ``retryable`` attribute.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Final, final

import trio

from .._exceptions import (
    InvalidHeader,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    WriteTimeout,
    words_for,
)
from ._h2core import H2Core, H2Stream, Received, State, StopSending
from ._models import Headers, Origin, Request, Response, Timeouts, format_authority

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable

# Private names used across classes and modules of this package, on purpose (each use
# silences pyright's reportPrivateUsage): ``Headers._from_trusted`` builds headers without a
# second check of what h2 checked; and `_HTTP2Body` is the connection's own body stream,
# calling the connection's underscored methods, which are not API.

__all__ = ["HTTP2Connection"]

_READ_SIZE: Final = 64 * 1024
_CLOSE_TIMEOUT: Final = 1.0
# Request body bytes queued per flush: large enough for few writes, small enough for fairness.
_MAX_BODY_BURST: Final = 256 * 1024
# How many scheduler passes a request write may wait for other requests to join it.
_MAX_FLUSH_DEFERRALS: Final = 16


def _deadline_after(seconds: float | None) -> float:
    return math.inf if seconds is None else trio.current_time() + seconds


@final
class HTTP2Connection:
    """One HTTP/2 connection to one origin, serving many concurrent requests.

    Build it on an open stream that negotiated ``h2``, call `start` (sends the preface and
    our settings), and run `run_background` in a nursery for as long as the connection lives:
    it is the reader that every request depends on. `send_request` may then be called from
    any number of tasks at once, up to `capacity`.

    What it is not: a pool. It never reconnects, and once it drains (the server sent GOAWAY,
    or it retired itself) it takes no new request (`is_ready` is False) and closes when the
    last stream is done.

    Args:
        stream: The open transport (TLS with ALPN ``h2``, or a memory stream in tests).
        origin: The origin the stream is connected to (for :authority and errors).
        timeouts: ``read`` bounds the wait for a response head and for each body chunk;
            ``write`` bounds each write and each wait for flow-control window or a free
            stream slot.
        max_concurrent_streams: Our cap on `capacity`, whatever the server allows.
        ping_interval: If set, the reader sends a PING after this many seconds without
            receiving anything, and closes the connection when no acknowledgement comes
            within ``ping_timeout``.
        ping_timeout: See ``ping_interval``; also how long the PING sent after a read timed
            out with nothing received (the connection is suspect meanwhile) may go unanswered.
        weight: What the connection reports as its `weight` to the pool (an HTTP/2 connection
            may count as several HTTP/1.1 ones against the limits).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        origin: Origin,
        *,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 (a frozen value)
        max_concurrent_streams: int = 100,
        ping_interval: float | None = None,
        ping_timeout: float = 5.0,
        weight: int = 1,
    ) -> None:
        if weight < 1:
            raise ValueError("weight must be at least 1")
        self._core = H2Core(
            origin,
            max_streams=max_concurrent_streams,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        self._weight = weight
        self._stream = stream
        self._origin = origin
        self._timeouts = timeouts
        self._lots: dict[int, trio.lowlevel.ParkingLot] = {}  # tasks parked on a stream
        self._write_lock = trio.Lock()
        self._write_scope: trio.CancelScope | None = None  # the write in progress
        self._flush_due = False  # a task will write the core's queue after this pass
        self._reads = 0  # how many reads the reader has handled
        self._window_lot = trio.lowlevel.ParkingLot()  # senders waiting for window
        self._slot_lot = trio.lowlevel.ParkingLot()  # requests waiting for a stream slot
        self._pings: dict[bytes, trio.Event] = {}
        self._transport_closed = False
        self._reader_scope: trio.CancelScope | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._reader_started = False
        self._callback: Callable[[], None] | None = None
        self._notified: tuple[int, bool, bool] = self._core.snapshot()

    # ---- what the pool reads -------------------------------------------------------------

    @property
    def origin(self) -> Origin:
        """The origin this connection is connected to."""
        return self._origin

    @property
    def http_version(self) -> str:
        """``"HTTP/2"``."""
        return "HTTP/2"

    @property
    def capacity(self) -> int:
        """How many requests may run at once.

        The server's SETTINGS_MAX_CONCURRENT_STREAMS capped by ``max_concurrent_streams``;
        before the server's first SETTINGS arrive, 100 (capped). It changes live; the state
        callback tells the pool.
        """
        return self._core.capacity

    @property
    def weight(self) -> int:
        """How much of the pool's limits this connection uses (the ``weight`` given)."""
        return self._weight

    @property
    def requests_completed(self) -> int:
        """How many streams completed on this connection."""
        return self._core.completed

    @property
    def last_activity(self) -> float:
        """When the reader last received anything (`trio.current_time`), or started."""
        return self._core.last_received

    def is_ready(self) -> bool:
        """Whether new requests are taken: False once draining, suspect or closed."""
        core = self._core
        return core.state is State.ACTIVE and core.probe is None

    def is_closed(self) -> bool:
        """Whether the connection is closed or broken. Synchronous, no I/O."""
        return self._core.closed

    def is_clean(self) -> bool:
        """Whether the connection itself is intact.

        A stream that was reset or cancelled leaves the connection clean; a broken
        transport, a protocol error or a closed connection does not.
        """
        return not self._core.closed

    def set_state_callback(self, callback: Callable[[], None]) -> None:
        """Register ``callback``, called synchronously when capacity, readiness or closedness
        change (SETTINGS, GOAWAY, suspicion, close, failure)."""
        self._callback = callback
        self._notified = self._core.snapshot()

    def _notify(self) -> None:
        snapshot = self._core.snapshot()
        if snapshot != self._notified:
            if snapshot[1] != self._notified[1] and self._slot_lot:
                # Requests waiting for a slot learn at once that no stream will be opened.
                self._slot_lot.unpark_all()
            self._notified = snapshot
            if self._callback is not None:
                self._callback()

    def __repr__(self) -> str:
        return f"<HTTP2Connection [{self._origin}, {self._core!r}]>"

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Send the client preface, our SETTINGS and a larger connection window.

        Does not wait for the server's SETTINGS: the reader handles them.

        Raises:
            RemoteProtocolError: If the transport broke.
            WriteTimeout: If the write did not complete within ``timeouts.write``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._core.initiate(trio.current_time())
        await self._flush(self._timeouts.write)

    async def run_background(self) -> None:
        """Read frames until the connection ends; the one task this connection needs.

        It feeds the core, wakes the streams, runs the timers and flushes the core's
        automatic answers. On EOF, a transport error or a protocol error it fails every open
        stream and returns; it also returns once a draining connection has finished its last
        stream. When it returns the connection is closed. Never raises except
        `trio.Cancelled`.
        """
        if self._reader_started:
            raise RuntimeError("run_background() is already running or has run")
        self._reader_started = True
        self._core.last_received = trio.current_time()
        try:
            with trio.CancelScope() as self._reader_scope:
                await trio.lowlevel.checkpoint()
                await self._read_loop()
        finally:
            self._reader_scope = None
            await self._shutdown("the connection was closed while in use")

    async def aclose(self) -> None:
        """Close the connection. Idempotent; never raises.

        Open streams fail with `TransportError`. GOAWAY is sent if possible and the transport
        closed gracefully, shielded and bounded by one second, then forcefully.
        """
        await self._shutdown("the connection was closed locally while in use")
        await trio.lowlevel.checkpoint()

    async def ping(self) -> float:
        """Send a PING and wait for its acknowledgement: a health check.

        Returns:
            The round-trip time in seconds.

        Raises:
            ReadTimeout: If no acknowledgement came within ``timeouts.read``.
            TransportError: If the connection is closed or broke meanwhile.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_broken()
        payload = self._core.start_ping()
        acked = self._pings[payload] = trio.Event()
        try:
            started = trio.current_time()
            await self._flush(self._timeouts.write)
            with trio.move_on_at(_deadline_after(self._timeouts.read)):
                await acked.wait()
            if not acked.is_set():
                raise ReadTimeout(
                    f"no PING acknowledgement within {self._timeouts.read} s", key=self._origin
                )
            self._raise_if_broken()
            return trio.current_time() - started
        finally:
            self._pings.pop(payload, None)

    def _raise_if_broken(self) -> None:
        core = self._core
        if core.closed:
            raise RemoteProtocolError(
                f"the connection is closed ({core.reason or 'closed'})", key=self._origin
            )

    # ---- one request ---------------------------------------------------------------------

    async def send_request(self, request: Request) -> Response:
        """Send ``request`` on a new stream; return the response once its head has arrived.

        Safe to call from many tasks at once. If all stream slots are taken (the server
        lowered its limit), waits for one, bounded by the write timeout.

        Args:
            request: The request; its origin should be this connection's.

        Returns:
            The `Response`, its body still to be read (as it arrives).

        Raises:
            RemoteProtocolError: If the server reset the stream, broke the protocol or the
                connection; with ``retryable`` True when the server did not process the
                request (REFUSED_STREAM, GOAWAY, or the connection was already shutting
                down). `ServerDisconnected` if the connection broke before any response.
            LocalProtocolError: If the request cannot be sent as given.
            ReadTimeout: If the response head did not arrive within ``timeouts.read`` (the
                request's own `Request.timeouts` if it has them, else the connection's; they
                also bound each wait for a chunk of the response body).
            WriteTimeout: If a write, or a wait for window or a stream slot, exceeded
                ``timeouts.write`` (likewise). A write is shared by the streams whose frames
                it carries, and one that times out fails the connection (half a frame may be
                out), as a timed-out write of the connection's own does.
            TransportError: If the connection was closed locally meanwhile.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        core = self._core
        timeouts = request.timeouts
        if timeouts is None:
            timeouts = self._timeouts
        url = str(request.url)
        try:
            headers = core.request_headers(
                request, format_authority(request.url.host, request.url.port, request.url.scheme)
            )
        except InvalidHeader:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        await self._wait_for_slot(url, timeouts.write)
        content = request.content
        end_now = content is None or content == b""
        stream = core.open_stream(
            headers, end_stream=end_now, url=url, head_only=request.method == "HEAD"
        )
        if core.state is not State.ACTIVE:
            self._notify()  # retired: its stream ids run out
        self._lots[stream.stream_id] = trio.lowlevel.ParkingLot()
        try:
            await self._flush_batched(timeouts.write)
            if content is not None and not end_now:
                await self._upload(stream, content, timeouts.write)
            return await self._receive_head(stream, request, timeouts.read)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abandon(stream)
            raise

    async def _upload(
        self, stream: H2Stream, content: bytes | AsyncIterable[bytes], write: float | None
    ) -> None:
        """Send the request body; stop early, without error, once the response is complete."""
        core = self._core
        try:
            await self._send_body(stream, content, write)
        except StopSending:
            pass
        except TransportError as exc:
            if stream.error is not None and stream.error is not exc:
                # The stream's own end came first (GOAWAY, a reset): that is the cause.
                raise stream.error from exc
            if not stream.ended:
                raise
            # The write failed, but the server answered in full before: that answer counts.
        if stream.ended and not stream.local_closed:
            core.stop_upload(stream)
            await self._flush_unless_busy()

    async def _wait_for_slot(self, url: str, write: float | None) -> None:
        """Wait until a new stream may be opened (bounded by the write timeout)."""
        core = self._core
        deadline = _deadline_after(write)
        while True:
            if core.state is not State.ACTIVE:
                core.check_can_open(url)
            if core.has_free_slot():
                return
            with trio.move_on_at(deadline):
                await self._slot_lot.park()
                continue
            raise WriteTimeout(
                f"no stream slot became free within {write} s",
                key=self._origin,
                url=url,
            )

    async def _send_body(
        self, stream: H2Stream, content: bytes | AsyncIterable[bytes], write: float | None
    ) -> None:
        if isinstance(content, bytes):
            await self._send_data(stream, content, write)
        else:
            iterator = aiter(content)
            try:
                async for chunk in iterator:
                    if not isinstance(chunk, (bytes, bytearray, memoryview)):  # pyright: ignore[reportUnnecessaryIsInstance]
                        raise TypeError(
                            f"request content must yield bytes, not {type(chunk).__name__}"
                        )
                    if chunk:
                        await self._send_data(stream, bytes(chunk), write)
            finally:
                # We started this iteration, so we end it (see _http11.py).
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                        await aclose()
        self._core.end_request(stream)
        await self._flush(write)

    async def _send_data(self, stream: H2Stream, data: bytes, write: float | None) -> None:
        """Send ``data`` on ``stream`` as the flow-control windows allow."""
        view = memoryview(data)
        core = self._core
        while view:
            await self._wait_for_window(stream, write)
            sent = core.send_data(stream, view, _MAX_BODY_BURST)
            view = view[sent:]
            await self._flush(write)

    async def _wait_for_window(self, stream: H2Stream, write: float | None) -> None:
        """Wait until ``stream`` may send (bounded by the write timeout)."""
        core = self._core
        deadline = _deadline_after(write)
        while core.send_window(stream) <= 0:
            with trio.move_on_at(deadline):
                await self._window_lot.park()
                continue
            raise WriteTimeout(
                f"the server opened no flow-control window within {write} s",
                key=self._origin,
                url=stream.url,
            )

    async def _receive_head(
        self, stream: H2Stream, request: Request, read_timeout: float | None
    ) -> Response:
        timeout = read_timeout
        started = trio.current_time()
        deadline = math.inf if timeout is None else started + timeout
        lot = self._lots[stream.stream_id]
        while stream.response is None or stream.error is not None:
            if stream.error is not None:
                raise stream.error
            with trio.move_on_at(deadline):
                await lot.park()
                continue
            self._read_timed_out(started)
            raise ReadTimeout(
                f"no response within the read timeout of {timeout} s",
                key=self._origin,
                url=stream.url,
            )
        status, headers = stream.response
        return Response(
            status,
            request=request,
            headers=Headers._from_trusted(headers),  # pyright: ignore[reportPrivateUsage]
            http_version="HTTP/2",
            stream=_HTTP2Body(self, stream, timeout),
        )

    def _read_timed_out(self, since: float) -> None:
        """A read timed out: tell the core; it may PING a connection that went silent."""
        core = self._core
        if core.read_timed_out(since, trio.current_time()):
            # The PING goes out with the reset that follows (`_abandon` flushes).
            self._timers_changed()
            self._notify()

    # ---- the body, driven by _HTTP2Body ---------------------------------------------------

    async def _receive_chunk(
        self, stream: H2Stream, read_timeout: float | None
    ) -> tuple[bytes, bool]:
        """The next chunk of ``stream``'s body (``b""`` at its end), and whether we parked
        (waiting at most ``read_timeout`` seconds for each chunk)."""
        timeout = read_timeout
        core = self._core
        started = trio.current_time()
        deadline = math.inf if timeout is None else started + timeout
        parked = False
        while True:
            chunk = core.next_chunk(stream)
            if chunk is not None:
                if chunk:
                    await self._flush_unless_busy()
                return chunk, parked
            # Our acknowledgements must be out before we wait for the data they allow.
            await self._flush_unless_busy()
            if stream.chunks or stream.ended or stream.error is not None:
                continue
            parked = True
            with trio.move_on_at(deadline):
                await self._lots[stream.stream_id].park()
                continue
            self._read_timed_out(started)
            raise ReadTimeout(
                f"no data within the read timeout of {timeout} s",
                key=self._origin,
                url=stream.url,
            )

    def _receive_buffered(self, stream: H2Stream) -> bytes | None:
        if stream.error is not None:
            return None
        chunk = self._core.next_chunk(stream)  # acknowledged by the next flush of anyone
        if chunk == b"":
            self._release(stream)
        return chunk

    def _release(self, stream: H2Stream) -> None:
        """Forget a finished stream (synchronous); may complete a drain."""
        self._core.release(stream)
        self._lots.pop(stream.stream_id, None)
        if self._slot_lot:
            self._slot_lot.unpark_all()
        self._check_drained()

    async def _abandon(self, stream: H2Stream) -> None:
        """Give up on ``stream``: reset it if still open, return its window, forget it.

        Used on errors, cancellation and early `Response.aclose`. Bounded; never raises a
        transport error (the caller is already leaving with its own exception, or closing).
        """
        if stream.stream_id not in self._core.streams:
            self._lots.pop(stream.stream_id, None)
            return
        self._core.abandon(stream)
        self._lots.pop(stream.stream_id, None)
        self._slot_lot.unpark_all()
        await self._flush_unless_busy(_CLOSE_TIMEOUT)
        self._check_drained()

    # ---- writing -------------------------------------------------------------------------

    async def _flush(self, write: float | None) -> None:
        """Write everything the core has queued, waiting for the write lock if someone writes
        (each write bounded by ``write`` seconds).

        Raises:
            WriteTimeout, RemoteProtocolError, TransportError: The write failed; the
                connection is then broken and every other stream failed too.
        """
        async with self._write_lock:
            await self._write_out(write)

    async def _flush_batched(self, write: float | None) -> None:
        """See that what the core has queued is written, together with what others queue.

        Many requests start together: the reader wakes their tasks one read at a time (a
        TLS stream yields one record per read, often one response). The first task to get
        here becomes the due writer: it yields, so the others add their frames to the queue
        meanwhile, until the reader has been idle for two scheduler passes (or a bounded
        number of passes went by), and then writes everything with one ``send_all``. The
        others return at once: the due writer, or the task holding the write lock, sends
        their frames. One write per batch of requests instead of one each saves syscalls and
        lets the server answer in batches too, which keeps the batches large. A request
        alone on the connection writes at once: no response is coming that could start
        another request meanwhile.

        Not a checkpoint when another task writes; the yields cannot be cancelled (the
        others rely on this task). Raises what `_flush` raises.
        """
        if self._flush_due:
            return
        if len(self._core.streams) > 1:  # else no response due can wake a request meanwhile
            await self._wait_for_batch()
        if self._write_lock.locked():
            return  # its holder writes until the queue stays empty: ours too
        self._write_lock.acquire_nowait()
        try:
            await self._write_out(write)
        finally:
            self._write_lock.release()

    async def _wait_for_batch(self) -> None:
        """Yield while the reader delivers responses (bounded): they start more requests."""
        self._flush_due = True
        try:
            # The reader runs once per scheduler pass while it has data, before or after us
            # (trio varies the order): one pass without a read may be chance, two in a row
            # mean that it waits for the network.
            quiet = 0
            for _ in range(_MAX_FLUSH_DEFERRALS):
                reads = self._reads
                await trio.lowlevel.cancel_shielded_checkpoint()
                quiet = quiet + 1 if self._reads == reads else 0
                if quiet == 2:
                    break
        finally:
            self._flush_due = False

    async def _flush_unless_busy(self, limit: float | None = None, *, now: bool = False) -> None:
        """Write what the core has queued unless another task is writing (it writes ours too).

        Unless ``now``, a batched write that is due (`_flush_batched`) also takes ours: it
        comes within a few scheduler passes, and writing first would split its batch.

        Not a checkpoint when there is nothing to write or someone else is writing. Never
        raises a transport error: a failure breaks the connection and thereby fails every
        stream, which is how it is reported.
        """
        if self._flush_due and not now:
            return
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            write = self._timeouts.write
            if limit is not None:
                write = limit if write is None else min(write, limit)
            await self._write_out(write)
        except TransportError:
            pass
        finally:
            self._write_lock.release()

    async def _write_out(self, limit: float | None) -> None:
        """Write the core's queue until it stays empty; the caller holds the write lock.

        What was queued while a write was in progress is left to a due batched write
        (`_flush_batched`) if there is one, so that it goes out with the rest of its batch.
        Each write is shielded (half a frame on the wire would break every stream) and
        bounded by ``limit``; a connection that fails meanwhile cancels it. Not a checkpoint
        when there is nothing to write.
        """
        core = self._core
        first = True
        while True:
            if not first and self._flush_due:
                return
            first = False
            data = core.data_to_send()
            if not data:
                return
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = _deadline_after(limit)
                self._write_scope = scope
                try:
                    await self._stream.send_all(data)
                except trio.ClosedResourceError as exc:
                    self._connection_failed("the connection was closed locally", exc)
                    raise TransportError(
                        "the connection was closed locally while in use", key=self._origin
                    ) from exc
                except (trio.BrokenResourceError, OSError) as exc:
                    self._connection_failed(
                        f"the connection broke while sending: {words_for(exc)}", exc
                    )
                    raise RemoteProtocolError(
                        "the connection broke while sending", key=self._origin
                    ) from exc
                finally:
                    self._write_scope = None
            if scope.cancelled_caught:
                if core.closed:
                    # Failed meanwhile (a flood, an unanswered PING): that is the cause.
                    raise RemoteProtocolError(
                        f"the connection failed while sending ({core.reason})", key=self._origin
                    )
                self._connection_failed(f"a write did not complete within {limit} s", None)
                raise WriteTimeout(f"write did not complete within {limit} s", key=self._origin)

    # ---- reading (the background task) ---------------------------------------------------

    async def _read_loop(self) -> None:
        core = self._core
        while core.reading:
            with trio.CancelScope(deadline=core.deadline) as scope:
                self._timer_scope = scope
                while core.reading:
                    data = await self._receive()
                    if data is None:
                        return
                    if not data:
                        self._connection_failed("the server closed the connection", None)
                        return
                    self._reads += 1
                    received = core.receive(data, trio.current_time())
                    self._wake(received)
                    if core.closed:
                        if core.can_send:
                            # A protocol error: h2 queued a GOAWAY with its code; send it.
                            try:
                                await self._flush_unless_busy(_CLOSE_TIMEOUT, now=True)
                            finally:
                                core.can_send = False
                        return
                    # The reader's own writes are bounded even without a write timeout:
                    # blocked in one, it could not run the timers (a suspect PING's).
                    await self._flush_unless_busy(core.ping_timeout)
                    if self._check_drained():
                        return
                    if core.deadline < scope.deadline:
                        scope.deadline = core.deadline
            self._timer_scope = None
            if scope.cancelled_caught:
                await self._on_timer()

    async def _on_timer(self) -> None:
        """The reader's timer fired: let the core act (it may PING, retire or fail)."""
        core = self._core
        core.on_timer(trio.current_time())
        if core.closed:
            self._after_failure()
            return
        self._notify()
        await self._flush_unless_busy(core.ping_timeout)
        self._check_drained()

    def _timers_changed(self) -> None:
        """The core's next timer may be earlier than the reader's scope: move the scope."""
        scope = self._timer_scope
        if scope is not None:
            deadline = self._core.deadline
            if deadline < scope.deadline:
                scope.deadline = deadline

    async def _receive(self) -> bytes | bytearray | None:
        """One read from the transport; None if it is closed or broke (the connection failed)."""
        try:
            return await self._stream.receive_some(_READ_SIZE)
        except trio.ClosedResourceError:
            return None  # closed by aclose()
        except (trio.BrokenResourceError, OSError) as exc:
            self._connection_failed(f"the connection broke: {words_for(exc)}", exc)
            return None

    def _wake(self, received: Received) -> None:
        """Wake the tasks of what the core says changed; tell the pool."""
        lots = self._lots
        for stream in received.streams:
            lot = lots.get(stream.stream_id)
            if lot:  # (a ParkingLot is true when a task is parked in it)
                lot.unpark_all()
        if received.window and self._window_lot:
            self._window_lot.unpark_all()
        if received.slots and self._slot_lot:
            self._slot_lot.unpark_all()
        for payload in received.pings:
            acked = self._pings.get(payload)
            if acked is not None:
                acked.set()
        if self._core.closed:
            self._after_failure()
        else:
            self._notify()

    def _check_drained(self) -> bool:
        """Whether a draining connection is done; if so, stop the reader."""
        core = self._core
        if core.state is not State.DRAINING or not core.drained():
            return False
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        return True

    def _connection_failed(self, message: str, cause: BaseException | None) -> None:
        """The connection is broken: fail every open stream at once (synchronous)."""
        if self._core.fail(message, cause):
            self._after_failure()

    def _after_failure(self) -> None:
        """Wake everyone, stop the reader and any blocked write, tell the pool."""
        if self._reader_scope is not None and not self._core.can_send:
            self._reader_scope.cancel()  # it closes the transport on its way out
        if self._write_scope is not None:
            self._write_scope.cancel()
        self._wake_everyone()
        self._notify()

    def _wake_everyone(self) -> None:
        for lot in self._lots.values():
            lot.unpark_all()
        self._window_lot.unpark_all()
        self._slot_lot.unpark_all()
        for acked in self._pings.values():
            acked.set()

    async def _shutdown(self, message: str) -> None:
        """Close for good: fail what is open, GOAWAY if possible, close the transport."""
        core = self._core
        if self._transport_closed:
            core.close(message)
            await trio.lowlevel.checkpoint()
            return
        send_goaway = core.close(message)
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._wake_everyone()
        self._notify()
        self._transport_closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT):
                if send_goaway:
                    async with self._write_lock:
                        with contextlib.suppress(TransportError):
                            await self._write_out(_CLOSE_TIMEOUT)
                core.can_send = False
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self._stream.aclose()
            await trio.aclose_forcefully(self._stream)


@final
class _HTTP2Body:
    """The `ResponseStream` of one HTTP/2 stream."""

    __slots__ = ("_connection", "_done", "_read_timeout", "_stream")

    def __init__(
        self, connection: HTTP2Connection, stream: H2Stream, read_timeout: float | None
    ) -> None:
        self._connection = connection
        self._stream = stream
        self._read_timeout = read_timeout  # the exchange's: its request's or the connection's
        self._done = False

    async def receive_some(self) -> bytes:
        if self._done:
            await trio.lowlevel.checkpoint()
            return b""
        connection = self._connection
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            chunk, parked = await connection._receive_chunk(self._stream, self._read_timeout)  # pyright: ignore[reportPrivateUsage]
        except BaseException:
            self._done = True
            with trio.CancelScope(shield=True):
                await connection._abandon(self._stream)  # pyright: ignore[reportPrivateUsage]
            raise
        if not chunk:
            self._done = True
            connection._release(self._stream)  # pyright: ignore[reportPrivateUsage]
        if not parked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    def receive_buffered(self) -> bytes | None:
        if self._done:
            return b""
        chunk = self._connection._receive_buffered(self._stream)  # pyright: ignore[reportPrivateUsage]
        if chunk == b"":
            self._done = True
        return chunk

    async def aclose(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._done = True
        await self._connection._abandon(self._stream)  # pyright: ignore[reportPrivateUsage]
        await trio.lowlevel.checkpoint()
