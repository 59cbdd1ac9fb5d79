"""An HTTP/2 client connection: h2 over one `trio.abc.Stream`, as a pool connection.

h2 parses and frames, and does no I/O; this module moves bytes between the stream and an
`h2.connection.H2Connection` and multiplexes many concurrent requests on it.

Tasks and locks
    One reader task, `HTTP2Connection.run_background`, which the pool runs in its nursery, is
    the only task that reads from the transport. It feeds h2, dispatches the events to the
    per-stream state (`_H2Stream`: a buffer of DATA, the response head, the end, an error)
    and wakes the tasks parked on it. The requesting tasks never read; they *write* their
    own frames. Everything h2 wants to send is queued in its buffer; whoever flushes takes
    the whole buffer under one `trio.Lock` and writes it, and keeps writing until the buffer
    is empty before releasing the lock. So the reader (WINDOW_UPDATE, PING and SETTINGS
    acknowledgements) never waits for the lock: if someone holds it, that writer sends the
    reader's frames too. Every ``send_all`` runs in a shielded scope bounded by the write
    timeout: a request cancelled in the middle of a write cannot leave half a frame on the
    wire (which would break every other stream), and a write that times out breaks the
    connection (we cannot know how much of it went out).

Flow control
    Inbound: the stream window is 1 MiB and the connection window 16 MiB. Received DATA is
    acknowledged (`h2.connection.H2Connection.acknowledge_received_data`, for both the stream
    and the connection window) only when the application *consumes* it; unread data of a
    response that is closed early is acknowledged at once. So memory is bounded (never more
    than 16 MiB buffered per connection, 1 MiB per stream), and a slow consumer cannot stall
    the others: it holds at most its own 1 MiB of the connection window. (Sixteen stalled
    consumers together could; that is the price of the bound, and far beyond what a pool
    needs from one connection.) Padding is acknowledged on receipt. Outbound: a request body
    is sent in pieces no larger than ``min(stream window, connection window)`` and split into
    frames of the peer's maximum frame size; when the window is exhausted the sender parks
    until a WINDOW_UPDATE (or a SETTINGS change) arrives, bounded by the write timeout.

GOAWAY (the workaround for python-hyper/h2 issue 1181)
    RFC 9113 section 6.8: after a GOAWAY the server still completes the streams up to its
    ``last_stream_id``. h2 4.x, though, moves its connection state machine to CLOSED the
    moment it *receives* GOAWAY, and from then on every HEADERS or DATA frame for those
    streams raises `h2.exceptions.ProtocolError`; it also throws away its outbound buffer.
    This is why clients built on h2 fail against servers that rotate connections with a
    graceful GOAWAY (nginx's ``keepalive_requests``). We give our `H2Connection` a state
    machine whose only difference is that receiving GOAWAY keeps the connection open
    (`_GracefulStateMachine`), and make its ``clear_outbound_data_buffer`` a no-op, so the
    frames already queued (acknowledgements, resets) still go out. Nothing else in h2 reads
    the state to decide anything, and no further stream can be opened because we refuse to
    open one ourselves once GOAWAY arrived (`is_ready` turns False, `send_request` raises a
    retryable error). Frames are fed in the normal way, so this also holds when GOAWAY and
    the last responses arrive in the same read. The alternatives were worse: resetting the
    state after ``receive_data`` returns is too late for frames in the same read, and
    parsing frames ourselves would duplicate h2. The connection closes once the streams
    the server still serves are done.

Errors
    A stream's failure is only that stream's: a server RST_STREAM raises
    `RemoteProtocolError` from that request or body; a cancellation, timeout or early
    `Response.aclose` resets the stream with RST_STREAM(CANCEL). The connection stays usable
    (`HTTP2Connection.is_clean`). A connection failure (EOF, reset, a protocol error, a
    failed write, an unanswered keep-alive PING) reaches every open stream at once. Errors
    that mean "the server did not process this request, send it again elsewhere" are
    `RemoteProtocolError` instances with a true ``retryable`` attribute: REFUSED_STREAM, and
    streams above a GOAWAY's ``last_stream_id``; check with ``getattr(exc, "retryable",
    False)``.
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import TYPE_CHECKING, Final, final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import trio
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.errors import ErrorCodes

from .._exceptions import (
    InvalidHeader,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    ServerDisconnected,
    TransportError,
    WriteTimeout,
)
from ._models import Headers, Origin, Request, Response, Timeouts, format_authority

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable

    from hpack.table import HeaderTable

__all__ = ["HTTP2Connection"]

_READ_SIZE: Final = 64 * 1024
_CLOSE_TIMEOUT: Final = 1.0
_STREAM_WINDOW: Final = 1024 * 1024
_CONNECTION_WINDOW: Final = 16 * 1024 * 1024
_DEFAULT_WINDOW: Final = 65535
# Until the server's first SETTINGS arrive we assume this many concurrent streams (RFC 9113
# says "unlimited", which no client should believe).
_ASSUMED_MAX_STREAMS: Final = 100
# Request body bytes queued per flush: large enough for few writes, small enough for fairness.
_MAX_BODY_BURST: Final = 256 * 1024
# How many scheduler passes a request write may wait for other requests to join it.
_MAX_FLUSH_DEFERRALS: Final = 16
# Connection-specific header fields are forbidden in HTTP/2 (RFC 9113 section 8.2.2); the Host
# header becomes the :authority pseudo-header.
_DROPPED_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)
_METHODS_WITH_CONTENT: Final = frozenset({"POST", "PUT", "PATCH"})
_SECRET_HEADERS: Final = frozenset({b"authorization", b"proxy-authorization"})


class _RetryableError(RemoteProtocolError):
    """A `RemoteProtocolError` for a request the server did not process: safe to retry.

    Private on purpose: the public hierarchy stays small; callers test the ``retryable``
    attribute.
    """

    retryable = True


class _GracefulStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that receiving GOAWAY does not close it.

    See the module docstring (python-hyper/h2 issue 1181).
    """

    _transitions = {  # noqa: RUF012 (same shape as the base class attribute)
        **H2ConnectionStateMachine._transitions,
        (ConnectionState.IDLE, ConnectionInputs.RECV_GOAWAY): (None, ConnectionState.IDLE),
        (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY): (
            None,
            ConnectionState.CLIENT_OPEN,
        ),
    }


@final
class _RepeatingBlockDecoder(hpack.Decoder):
    """hpack's decoder, remembering the last header block whose decoding left it unchanged.

    A server answers with the same response head again and again (nginx changes only its
    Date, once a second, and keeps our dynamic table empty), and decoding that head (Huffman
    strings and all) was the largest single cost of a small response. Decoding is a function
    of the block, the dynamic table, the table's size limit and the two limits checked on
    the way. A block that left the table as it found it therefore decodes to the same headers
    again as long as those are unchanged, and its headers are reused instead of decoded anew.

    The table is compared by its size limit, its length and the *identity* of its newest
    entry: every insertion puts a new tuple in front and nothing else puts an entry there,
    while evictions remove entries from the back, so a table whose front entry is still the
    same object and whose length is the same holds the same entries. Blocks that insert or
    resize are decoded every time, and decoding any other block forgets the remembered one,
    so that comparison only guards against changes made from outside.
    """

    # Long blocks are rare and seldom repeat; do not keep them alive.
    _MAX_REMEMBERED: Final = 4096

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self._block = b""
        self._state: tuple[int, int, int, int, bool] | None = None
        self._front: tuple[bytes, bytes] | None = None
        self._headers: list[hpack.HeaderTuple] = []

    def _table_state(self, raw: bool) -> tuple[int, int, int, int, bool]:
        table = self.header_table
        return (
            len(table.dynamic_entries),
            table.maxsize,
            self.max_header_list_size,
            self.max_allowed_table_size,
            raw,
        )

    def decode(self, data: bytes, raw: bool = False) -> list[hpack.HeaderTuple]:
        state = self._table_state(raw)
        front = _newest_entry(self.header_table)
        if data == self._block and state == self._state and front is self._front:
            return list(self._headers)
        self._state = None  # forget the block unless it repeats under the new state
        headers = list(super().decode(data, raw))
        if (
            len(data) <= self._MAX_REMEMBERED
            and self._table_state(raw) == state
            and _newest_entry(self.header_table) is front
        ):
            self._block, self._state, self._front = bytes(data), state, front
            self._headers = list(headers)
        return headers


@final
class _RepeatingBlockEncoder(hpack.Encoder):
    """hpack's encoder, remembering the last header list whose encoding left it unchanged.

    The counterpart of `_RepeatingBlockDecoder` for requests: repeated requests (the same
    method, authority, path and headers) encode, once their fields are in the dynamic table,
    to the same block of table references without changing the table, and that block is
    reused instead of encoded anew. The same rules decide when the table is unchanged; a
    table size change still to be announced, `hpack.HeaderTuple` instances (never-indexed
    fields among them) and anything but plain ``bytes`` pairs are always encoded.
    """

    def __init__(self) -> None:
        super().__init__()
        self._headers: list[tuple[bytes, bytes]] = []
        self._state: tuple[int, int, bool] | None = None
        self._front: tuple[bytes, bytes] | None = None
        self._block = b""

    def _table_state(self, huffman: bool) -> tuple[int, int, bool] | None:
        table = self.header_table
        if table.resized:
            return None
        return (len(table.dynamic_entries), table.maxsize, huffman)

    def encode(self, headers: object, huffman: bool = True) -> bytes:
        if type(headers) is not list or not _plain_fields(headers):  # pyright: ignore[reportUnknownArgumentType]
            return super().encode(headers, huffman)  # type: ignore[arg-type]
        fields: list[tuple[bytes, bytes]] = headers  # pyright: ignore[reportUnknownVariableType]
        state = self._table_state(huffman)
        front = _newest_entry(self.header_table)
        if (
            state is not None
            and state == self._state
            and front is self._front
            and fields == self._headers
        ):
            return self._block
        self._state = None
        block = super().encode(fields, huffman)
        if (
            state is not None
            and self._table_state(huffman) == state
            and _newest_entry(self.header_table) is front
        ):
            self._headers, self._state, self._front = list(fields), state, front
            self._block = block
        return block


def _newest_entry(table: HeaderTable) -> tuple[bytes, bytes] | None:
    """The dynamic table's newest entry (the object itself, compared by identity), or None."""
    entries = table.dynamic_entries
    return entries[0] if entries else None


def _plain_fields(headers: list[object]) -> bool:
    """Whether every field is a plain ``(bytes, bytes)`` tuple (no never-indexed marker)."""
    for field in headers:
        if type(field) is not tuple or len(field) != 2:  # pyright: ignore[reportUnknownArgumentType]
            return False
        name, value = field  # pyright: ignore[reportUnknownVariableType]
        if type(name) is not bytes or type(value) is not bytes:  # pyright: ignore[reportUnknownArgumentType]
            return False
    return True


class _H2Connection(h2.connection.H2Connection):
    """The h2 connection we use: our settings, and graceful GOAWAY (h2 issue 1181)."""

    def __init__(self) -> None:
        # Outbound headers are built by `HTTP2Connection._request_headers` from headers our
        # models validated (names lower-cased, no CR/LF/NUL, hop-by-hop ones dropped,
        # pseudo-headers first): h2's own outbound checks would repeat that work on every
        # request. What the server sends is still validated by h2.
        super().__init__(
            config=h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.state_machine = _GracefulStateMachine()
        self.decoder = _RepeatingBlockDecoder(self.DEFAULT_MAX_HEADER_LIST_SIZE)
        self.encoder = _RepeatingBlockEncoder()
        self.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (self.DEFAULT_MAX_HEADER_LIST_SIZE),
            },
        )

    def clear_outbound_data_buffer(self) -> None:
        """Keep the queued frames: h2 drops them on GOAWAY, but we still send (issue 1181)."""

    @property
    def open_outbound_streams(self) -> int:
        """What h2's `send_headers` compares with the server's limit before opening a stream.

        h2 counts the open streams by walking all of its streams (and forgets the closed ones
        on the way), once per new stream: a cost that grows with the streams in flight, paid
        by every request. Every open stream is among the streams h2 holds, so while
        their number leaves room under the server's limit it is returned as it is: an upper
        bound of the open streams that passes h2's check, as the exact count would. Only at
        the limit does h2 walk and count. Our own slot accounting reads
        `count_open_outbound_streams`, which is always exact.
        """
        held = len(self.streams)
        if held < self.remote_settings.max_concurrent_streams:
            return held
        return self.count_open_outbound_streams()

    def count_open_outbound_streams(self) -> int:
        """h2's exact count of our open streams (it walks them all)."""
        return super().open_outbound_streams

    def forget_closed_stream(self, stream_id: int) -> None:
        """Drop a closed stream from h2's table at once, as h2's own count would later.

        h2 forgets closed streams only while it counts them; the stream's way of closing is
        kept (h2 reads it to answer frames that arrive late for it), exactly as h2 does.
        Keeps the table at the streams in flight, so that `open_outbound_streams` stays cheap.
        """
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by


@final
class _StopSending(Exception):
    """The server sent its whole response and reset the stream: stop sending the body."""


@final
class _H2Stream:
    """What the reader knows of one stream, and where its request tasks park."""

    __slots__ = (
        "chunks",
        "ended",
        "error",
        "local_closed",
        "lot",
        "response",
        "stop_sending",
        "stream_id",
        "url",
    )

    def __init__(self, stream_id: int, url: str) -> None:
        self.stream_id = stream_id
        self.url = url
        self.lot = trio.lowlevel.ParkingLot()
        self.response: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.ended = False  # END_STREAM received
        self.local_closed = False  # we sent END_STREAM or RST_STREAM, or h2 closed it
        self.stop_sending = False  # complete response, then RST_STREAM: drop the upload
        self.error: TransportError | None = None

    def fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
        self.lot.unpark_all()

    @property
    def network_done(self) -> bool:
        """Whether nothing more is expected from or sent to the network for this stream."""
        return self.error is not None or (self.ended and self.local_closed)


def _deadline_after(seconds: float | None) -> float:
    return math.inf if seconds is None else trio.current_time() + seconds


@final
class HTTP2Connection:
    """One HTTP/2 connection to one origin, serving many concurrent requests.

    Build it on an open stream that negotiated ``h2``, call `start` (sends the preface and
    our settings), and run `run_background` in a nursery for as long as the connection lives:
    it is the reader that every request depends on. `send_request` may then be called from
    any number of tasks at once, up to `capacity`.

    What it is not: a pool. It never reconnects, and once the server sent GOAWAY it takes no
    new request (`is_ready` is False) and closes when the last stream is done.

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
        ping_timeout: See ``ping_interval``.
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
        if max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        if weight < 1:
            raise ValueError("weight must be at least 1")
        self._weight = weight
        self._stream = stream
        self._origin = origin
        self._timeouts = timeouts
        self._max_streams = max_concurrent_streams
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._h2 = _H2Connection()
        self._streams: dict[int, _H2Stream] = {}
        self._write_lock = trio.Lock()
        self._flush_due = False  # a task will write h2's buffer after this scheduler pass
        self._reads = 0  # how many reads the reader has handled
        self._window_lot = trio.lowlevel.ParkingLot()  # senders waiting for window
        self._slot_lot = trio.lowlevel.ParkingLot()  # requests waiting for a stream slot
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_counter = 0
        self._keepalive: tuple[bytes, float] | None = None  # (payload, deadline)
        self._last_received = 0.0
        self._settings_received = False
        self._goaway_last_stream_id: int | None = None
        self._failure: str | None = None  # why the connection broke, if it did
        self._can_send = True  # False once the transport cannot take bytes any more
        self._closed = False
        self._transport_closed = False
        self._reader_scope: trio.CancelScope | None = None
        self._reader_started = False
        self._callback: Callable[[], None] | None = None
        self._notified: tuple[int, bool, bool] = (self.capacity, True, False)
        self._completed = 0

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
        if self._settings_received:
            server = self._h2.remote_settings.max_concurrent_streams
        else:
            server = _ASSUMED_MAX_STREAMS
        return min(server, self._max_streams)

    @property
    def weight(self) -> int:
        """How much of the pool's limits this connection uses (the ``weight`` given)."""
        return self._weight

    @property
    def requests_completed(self) -> int:
        """How many streams completed on this connection."""
        return self._completed

    @property
    def last_activity(self) -> float:
        """When the reader last received anything (`trio.current_time`), or started."""
        return self._last_received

    def is_ready(self) -> bool:
        """Whether new requests are taken: False after GOAWAY (either way) or once closed."""
        return not self.is_closed() and self._goaway_last_stream_id is None

    def is_closed(self) -> bool:
        """Whether the connection is closed or broken. Synchronous, no I/O."""
        return self._closed or self._failure is not None

    def is_clean(self) -> bool:
        """Whether the connection itself is intact.

        A stream that was reset or cancelled leaves the connection clean; a broken
        transport, a protocol error or a closed connection does not.
        """
        return self._failure is None and not self._closed

    def set_state_callback(self, callback: Callable[[], None]) -> None:
        """Register ``callback``, called synchronously when capacity, readiness or closedness
        change (SETTINGS, GOAWAY, close, failure)."""
        self._callback = callback
        self._notified = self._snapshot()

    def _snapshot(self) -> tuple[int, bool, bool]:
        return (self.capacity, self.is_ready(), self.is_closed())

    def _notify(self) -> None:
        snapshot = self._snapshot()
        if snapshot != self._notified:
            self._notified = snapshot
            if self._callback is not None:
                self._callback()

    def __repr__(self) -> str:
        if self._closed:
            state = "CLOSED"
        elif self._goaway_last_stream_id is not None:
            state = "DRAINING"
        else:
            state = "ACTIVE"
        return (
            f"<HTTP2Connection [{self._origin}, {state}, {len(self._streams)} streams, "
            f"{self._completed} requests completed]>"
        )

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Send the client preface, our SETTINGS and a larger connection window.

        Does not wait for the server's SETTINGS: the reader handles them.

        Raises:
            RemoteProtocolError: If the transport broke.
            WriteTimeout: If the write did not complete within ``timeouts.write``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._last_received = trio.current_time()
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_CONNECTION_WINDOW - _DEFAULT_WINDOW)
        await self._flush()

    async def run_background(self) -> None:
        """Read frames until the connection ends; the one task this connection needs.

        It feeds h2, wakes the streams, and flushes h2's automatic answers (SETTINGS and
        PING acknowledgements, WINDOW_UPDATEs). On EOF, a transport error or a protocol
        error it fails every open stream and returns; it also returns once a GOAWAY'd
        connection has finished its last stream. When it returns the connection is closed.
        Never raises except `trio.Cancelled`.
        """
        if self._reader_started:
            raise RuntimeError("run_background() is already running or has run")
        self._reader_started = True
        self._last_received = trio.current_time()
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
        payload = self._next_ping_payload()
        acked = self._pings[payload] = trio.Event()
        try:
            self._h2.ping(payload)
            started = trio.current_time()
            await self._flush()
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
            ReadTimeout: If the response head did not arrive within ``timeouts.read``.
            WriteTimeout: If a write, or a wait for window, exceeded ``timeouts.write``.
            TransportError: If the connection was closed locally meanwhile.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        url = str(request.url)
        try:
            headers = self._request_headers(request)
        except InvalidHeader:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        await self._wait_for_slot(url)
        content = request.content
        end_now = content is None or content == b""
        stream_id = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_now)
        except h2.exceptions.TooManyStreamsError as exc:  # pragma: no cover (we wait first)
            raise _RetryableError(str(exc), key=self._origin, url=url) from exc
        except h2.exceptions.ProtocolError as exc:
            # h2 validates while it encodes: the HPACK encoder may have changed its table for
            # a header block that is never sent, so the connection cannot be trusted any
            # more. (Our models reject what h2 would, so this should not happen.)
            self._connection_failed(f"a request was refused by h2: {exc}", exc)
            raise LocalProtocolError(
                f"request cannot be sent: {exc}", key=self._origin, url=url
            ) from exc
        stream = self._streams[stream_id] = _H2Stream(stream_id, url)
        stream.local_closed = end_now
        try:
            await self._flush_batched()
            if content is not None and not end_now:
                with contextlib.suppress(_StopSending):
                    await self._send_body(stream, content)
            return await self._receive_head(stream, request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abandon(stream)
            raise

    def _request_headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        url = request.url
        hosts = request.headers.get_list("host")
        if len(hosts) > 1:
            # Two Hosts: a proxy and the server could each pick another one.
            raise InvalidHeader(
                "more than one Host header: send one", key=self._origin, url=str(url)
            )
        authority = hosts[0] if hosts else format_authority(url.host, url.port, url.scheme)
        headers: list[tuple[bytes, bytes]] = [
            (b":method", request.method.encode("ascii")),
            (b":scheme", url.scheme.encode("ascii")),
            (b":authority", authority.encode("latin-1")),
            (b":path", url.target),
        ]
        for name, value in request.headers.raw:
            name = name.lower()
            if name in _DROPPED_HEADERS or (name == b"te" and value.lower() != b"trailers"):
                continue
            if name in _SECRET_HEADERS or (name == b"cookie" and len(value) < 20):
                # Never put credentials in the HPACK table, where a compression oracle could
                # guess them (RFC 7541 section 7.1.3).
                headers.append(hpack.NeverIndexedHeaderTuple(name, value))
                continue
            headers.append((name, value))
        if "content-length" not in request.headers:
            content = request.content
            if isinstance(content, bytes):
                if content or request.method not in ("GET", "HEAD"):
                    headers.append((b"content-length", str(len(content)).encode("ascii")))
            elif content is None and request.method in _METHODS_WITH_CONTENT:
                headers.append((b"content-length", b"0"))
        return headers

    async def _wait_for_slot(self, url: str) -> None:
        """Wait until a new stream may be opened (bounded by the write timeout)."""
        deadline = _deadline_after(self._timeouts.write)
        while True:
            self._raise_if_closed(url)
            # Every stream h2 counts as open is one of ours (we forget a stream only once h2
            # closed it, or after resetting it), so counting ours first spares h2's count,
            # which walks all its streams, on the common path.
            capacity = self.capacity
            if len(self._streams) < capacity or self._h2.count_open_outbound_streams() < capacity:
                return
            with trio.move_on_at(deadline):
                await self._slot_lot.park()
                continue
            raise WriteTimeout(
                f"no stream slot became free within {self._timeouts.write} s",
                key=self._origin,
                url=url,
            )

    def _raise_if_broken(self) -> None:
        if self._closed or self._failure is not None:
            raise RemoteProtocolError(
                f"the connection is closed ({self._failure or 'closed'})", key=self._origin
            )

    def _raise_if_closed(self, url: str) -> None:
        if self._closed or self._failure is not None:
            raise _RetryableError(
                f"the connection is closed ({self._failure or 'closed'}); "
                "the request was not sent",
                key=self._origin,
                url=url,
            )
        if self._goaway_last_stream_id is not None:
            raise _RetryableError(
                "the server is shutting the connection down (GOAWAY); the request was not sent",
                key=self._origin,
                url=url,
            )

    async def _send_body(self, stream: _H2Stream, content: bytes | AsyncIterable[bytes]) -> None:
        if isinstance(content, bytes):
            await self._send_data(stream, content)
        else:
            iterator = aiter(content)
            try:
                async for chunk in iterator:
                    if not isinstance(chunk, (bytes, bytearray, memoryview)):  # pyright: ignore[reportUnnecessaryIsInstance]
                        raise TypeError(
                            f"request content must yield bytes, not {type(chunk).__name__}"
                        )
                    if chunk:
                        await self._send_data(stream, bytes(chunk))
            finally:
                # We started this iteration, so we end it (see _http11.py).
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                        await aclose()
        self._check_stream(stream)
        self._h2.end_stream(stream.stream_id)
        stream.local_closed = True
        await self._flush()

    async def _send_data(self, stream: _H2Stream, data: bytes) -> None:
        """Send ``data`` on ``stream`` as the flow-control windows allow."""
        view = memoryview(data)
        position = 0
        while position < len(data):
            window = await self._wait_for_window(stream)
            burst_end = position + min(window, _MAX_BODY_BURST)
            frame_size = self._h2.max_outbound_frame_size
            while position < len(data) and position < burst_end:
                end = min(position + frame_size, burst_end, len(data))
                self._h2.send_data(stream.stream_id, view[position:end])
                position = end
            await self._flush()

    async def _wait_for_window(self, stream: _H2Stream) -> int:
        """The outbound window of ``stream`` once it is open (bounded by the write timeout)."""
        deadline = _deadline_after(self._timeouts.write)
        while True:
            self._check_stream(stream)
            window = self._h2.local_flow_control_window(stream.stream_id)
            if window > 0:
                return window
            with trio.move_on_at(deadline):
                await self._window_lot.park()
                continue
            raise WriteTimeout(
                f"the server opened no flow-control window within {self._timeouts.write} s",
                key=self._origin,
                url=stream.url,
            )

    def _check_stream(self, stream: _H2Stream) -> None:
        if stream.error is not None:
            raise stream.error
        if stream.stop_sending:
            raise _StopSending

    async def _receive_head(self, stream: _H2Stream, request: Request) -> Response:
        deadline = _deadline_after(self._timeouts.read)
        while stream.response is None:
            if stream.error is not None:
                raise stream.error
            with trio.move_on_at(deadline):
                await stream.lot.park()
                continue
            raise ReadTimeout(
                f"no response within the read timeout of {self._timeouts.read} s",
                key=self._origin,
                url=stream.url,
            )
        status, headers = stream.response
        return Response(
            status,
            request=request,
            headers=Headers._from_trusted(headers),  # pyright: ignore[reportPrivateUsage]
            http_version="HTTP/2",
            stream=_HTTP2Body(self, stream),
        )

    # ---- the body, driven by _HTTP2Body ---------------------------------------------------

    async def _receive_chunk(self, stream: _H2Stream) -> tuple[bytes, bool]:
        """The next chunk of ``stream``'s body (``b""`` at its end), and whether we parked."""
        deadline = _deadline_after(self._timeouts.read)
        parked = False
        while True:
            if stream.error is not None:
                raise stream.error
            if stream.chunks:
                chunk = stream.chunks.popleft()
                self._acknowledge(stream, len(chunk))
                await self._flush_unless_busy()
                return chunk, parked
            if stream.ended:
                return b"", parked
            # Our acknowledgements must be out before we wait for the data they allow.
            await self._flush_unless_busy()
            if stream.chunks or stream.ended or stream.error is not None:
                continue
            parked = True
            with trio.move_on_at(deadline):
                await stream.lot.park()
                continue
            raise ReadTimeout(
                f"no data within the read timeout of {self._timeouts.read} s",
                key=self._origin,
                url=stream.url,
            )

    def _receive_buffered(self, stream: _H2Stream) -> bytes | None:
        if stream.error is not None:
            return None
        if stream.chunks:
            chunk = stream.chunks.popleft()
            self._acknowledge(stream, len(chunk))  # flushed by the next flush of anyone
            return chunk
        if stream.ended:
            self._release(stream)
            return b""
        return None

    def _acknowledge(self, stream: _H2Stream | None, size: int, stream_id: int = 0) -> None:
        """Hand ``size`` consumed bytes back to the server's windows (queued in h2)."""
        if size and self._failure is None and not self._closed:
            self._h2.acknowledge_received_data(
                size, stream.stream_id if stream is not None else stream_id
            )

    def _release(self, stream: _H2Stream) -> None:
        """Forget a finished stream (synchronous); may complete a GOAWAY drain."""
        if self._streams.pop(stream.stream_id, None) is not None and stream.error is None:
            self._completed += 1
        self._h2.forget_closed_stream(stream.stream_id)
        if self._slot_lot:
            self._slot_lot.unpark_all()
        self._check_drained()

    async def _abandon(self, stream: _H2Stream) -> None:
        """Give up on ``stream``: reset it if still open, return its window, forget it.

        Used on errors, cancellation and early `Response.aclose`. Bounded; never raises a
        transport error (the caller is already leaving with its own exception, or closing).
        """
        if stream.stream_id not in self._streams:
            return
        unread = sum(len(chunk) for chunk in stream.chunks)
        stream.chunks.clear()
        if self._failure is None and not self._closed:
            self._acknowledge(stream, unread)
            if not stream.local_closed or not stream.ended:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
        stream.local_closed = True
        if stream.error is None and not stream.ended:
            stream.error = TransportError(
                "the stream was reset locally", key=self._origin, url=stream.url
            )
        self._streams.pop(stream.stream_id, None)
        self._h2.forget_closed_stream(stream.stream_id)
        self._slot_lot.unpark_all()
        await self._flush_unless_busy(_CLOSE_TIMEOUT)
        self._check_drained()

    # ---- writing -------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Write everything h2 has queued, waiting for the write lock if someone writes.

        Raises:
            WriteTimeout, RemoteProtocolError, TransportError: The write failed; the
                connection is then broken and every other stream failed too.
        """
        async with self._write_lock:
            await self._write_out(self._timeouts.write)

    async def _flush_batched(self) -> None:
        """See that what h2 has queued is written, together with what others are queueing.

        Many requests start together: the reader wakes their tasks one read at a time (a
        TLS stream yields one record per read, often one response). The first task to get
        here becomes the due writer: it yields, so the others add their frames to h2's
        buffer meanwhile, until the reader has been idle for two scheduler passes (or a
        bounded number of passes went by), and then writes everything with one
        ``send_all``. The others return at once: the due writer, or the task holding the
        write lock, sends their frames. One write per batch of requests instead of one each
        saves syscalls and lets the server answer in batches too, which keeps the batches
        large. A request alone on the connection writes at once: no response is coming
        that could start another request meanwhile.

        Not a checkpoint when another task writes; the yields cannot be cancelled (the
        others rely on this task). Raises what `_flush` raises.
        """
        if self._flush_due:
            return
        if len(self._streams) > 1:  # else no response due can wake a request meanwhile
            await self._wait_for_batch()
        if self._write_lock.locked():
            return  # its holder writes until the buffer stays empty: ours too
        self._write_lock.acquire_nowait()
        try:
            await self._write_out(self._timeouts.write)
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
        """Write what h2 has queued unless another task is writing (it writes ours too).

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
        """Write h2's buffer until it stays empty; the caller holds the write lock.

        What was queued while a write was in progress is left to a due batched write
        (`_flush_batched`) if there is one, so that it goes out with the rest of its batch.
        Each write is shielded (half a frame on the wire would break every stream) and
        bounded by ``limit``. Not a checkpoint when there is nothing to write.
        """
        first = True
        while True:
            if not first and self._flush_due:
                return
            first = False
            data = self._h2.data_to_send()
            if not data or not self._can_send:
                return
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = _deadline_after(limit)
                try:
                    await self._stream.send_all(data)
                except trio.ClosedResourceError as exc:
                    self._connection_failed("the connection was closed locally", exc)
                    raise TransportError(
                        "the connection was closed locally while in use", key=self._origin
                    ) from exc
                except (trio.BrokenResourceError, OSError) as exc:
                    self._connection_failed(f"the connection broke while sending: {exc!r}", exc)
                    raise RemoteProtocolError(
                        f"the connection broke while sending: {exc!r}", key=self._origin
                    ) from exc
            if scope.cancelled_caught:
                self._connection_failed(f"a write did not complete within {limit} s", None)
                raise WriteTimeout(f"write did not complete within {limit} s", key=self._origin)

    # ---- reading (the background task) ---------------------------------------------------

    async def _read_loop(self) -> None:
        while not self._closed and self._failure is None:
            if self._check_drained():
                return
            deadline = self._keepalive_deadline()
            data: bytes | bytearray | None
            if deadline == math.inf:
                # No keep-alive timer: a cancel scope per read would only cost time.
                data = await self._receive()
            else:
                data = b""
                with trio.move_on_at(deadline) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    if not await self._keepalive_due():
                        return
                    continue
            if data is None:
                return
            if not data:
                self._connection_failed("the server closed the connection", None)
                return
            self._last_received = trio.current_time()
            self._reads += 1
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 queued a GOAWAY with the error code: send it on the way out.
                self._connection_failed(f"the server broke the HTTP/2 protocol: {exc}", exc)
                self._can_send = True
                try:
                    await self._flush_unless_busy(_CLOSE_TIMEOUT, now=True)
                finally:
                    self._can_send = False
                return
            for event in events:
                self._dispatch(event)
            self._notify()
            await self._flush_unless_busy()

    async def _receive(self) -> bytes | bytearray | None:
        """One read from the transport; None if it is closed or broke (the connection failed)."""
        try:
            return await self._stream.receive_some(_READ_SIZE)
        except trio.ClosedResourceError:
            return None  # closed by aclose()
        except (trio.BrokenResourceError, OSError) as exc:
            self._connection_failed(f"the connection broke: {exc!r}", exc)
            return None

    def _keepalive_deadline(self) -> float:
        if self._ping_interval is None:
            return math.inf
        if self._keepalive is not None:
            return self._keepalive[1]
        return self._last_received + self._ping_interval

    async def _keepalive_due(self) -> bool:
        """Send the keep-alive PING, or fail the connection if it went unanswered."""
        if self._keepalive is not None:
            self._connection_failed(f"no PING acknowledgement within {self._ping_timeout} s", None)
            return False
        payload = self._next_ping_payload()
        self._keepalive = (payload, trio.current_time() + self._ping_timeout)
        self._h2.ping(payload)
        await self._flush_unless_busy()
        return self._failure is None

    def _next_ping_payload(self) -> bytes:
        self._ping_counter += 1
        return self._ping_counter.to_bytes(8, "big")

    def _dispatch(self, event: h2.events.Event) -> None:
        """Apply one h2 event to the streams and the connection state."""
        if isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.response = self._parse_head(event.headers)
                if stream.lot:  # (a ParkingLot is true when a task is parked in it)
                    stream.lot.unpark_all()
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            data = event.data
            if stream is None or stream.error is not None:
                # Nobody will read it: give the window back at once.
                self._acknowledge(None, event.flow_controlled_length, event.stream_id)
                return
            self._acknowledge(stream, event.flow_controlled_length - len(data))  # padding
            if data:
                stream.chunks.append(bytes(data))
                if stream.lot:
                    stream.lot.unpark_all()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                if stream.lot:
                    stream.lot.unpark_all()
            if self._slot_lot:
                self._slot_lot.unpark_all()
        elif isinstance(event, h2.events.StreamReset):
            self._on_stream_reset(event)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self._settings_received = True
                self._slot_lot.unpark_all()
            self._window_lot.unpark_all()
        elif isinstance(event, h2.events.PingAckReceived):
            payload = bytes(event.ping_data)
            if self._keepalive is not None and self._keepalive[0] == payload:
                self._keepalive = None
            acked = self._pings.get(payload)
            if acked is not None:
                acked.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        # Others need nothing: h2 answers PING and SETTINGS itself; 1xx responses and
        # trailers are skipped; PRIORITY, ALTSVC and unknown frames are ignored.

    def _parse_head(self, raw: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            if name == b":status":
                status = int(value)  # h2 has validated it
            elif not name.startswith(b":"):
                headers.append((bytes(name), bytes(value)))
        return status, headers

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        self._slot_lot.unpark_all()
        self._window_lot.unpark_all()
        if stream is None:
            return
        stream.local_closed = True
        if stream.ended:
            # The whole response arrived; the reset only stops our upload (RFC 9113 8.1).
            stream.stop_sending = True
            stream.lot.unpark_all()
            return
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        if event.remote_reset:
            message = f"the server reset the stream ({name})"
        else:
            message = f"the server broke the protocol on this stream ({name})"
        error_class = _RetryableError if code == ErrorCodes.REFUSED_STREAM else RemoteProtocolError
        stream.fail(error_class(message, key=self._origin, url=stream.url))

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        previous = self._goaway_last_stream_id
        # A second GOAWAY may only lower last_stream_id (RFC 9113 section 6.8).
        self._goaway_last_stream_id = last if previous is None else min(previous, last)
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        for stream in self._streams.values():
            if stream.stream_id > self._goaway_last_stream_id:
                stream.fail(
                    _RetryableError(
                        f"the server is shutting the connection down (GOAWAY, {name}) and "
                        "did not process this request",
                        key=self._origin,
                        url=stream.url,
                    )
                )
        self._slot_lot.unpark_all()
        self._window_lot.unpark_all()
        self._notify()

    def _check_drained(self) -> bool:
        """After GOAWAY: whether every stream is done; if so, stop the reader."""
        if self._goaway_last_stream_id is None:
            return False
        if any(not stream.network_done for stream in self._streams.values()):
            return False
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        return True

    def _connection_failed(self, message: str, cause: BaseException | None) -> None:
        """The connection is broken: fail every open stream at once (synchronous)."""
        if self._failure is not None or self._closed:
            return
        self._failure = message
        self._can_send = False
        for stream in self._streams.values():
            if stream.network_done:
                continue
            error_class = ServerDisconnected if stream.response is None else RemoteProtocolError
            error = error_class(message, key=self._origin, url=stream.url)
            error.__cause__ = cause
            stream.fail(error)
        if self._reader_scope is not None:
            self._reader_scope.cancel()  # it closes the transport on its way out
        self._wake_everyone()
        self._notify()

    def _wake_everyone(self) -> None:
        self._window_lot.unpark_all()
        self._slot_lot.unpark_all()
        for acked in self._pings.values():
            acked.set()

    async def _shutdown(self, message: str) -> None:
        """Close for good: fail what is open, GOAWAY if possible, close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        for stream in self._streams.values():
            if not stream.network_done:
                stream.fail(TransportError(message, key=self._origin, url=stream.url))
        self._closed = True
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._wake_everyone()
        self._notify()
        if self._transport_closed:  # pragma: no cover (only _shutdown closes it)
            return
        self._transport_closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT):
                if self._can_send:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        self._h2.close_connection()
                    async with self._write_lock:
                        with contextlib.suppress(TransportError):
                            await self._write_out(_CLOSE_TIMEOUT)
                self._can_send = False
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self._stream.aclose()
            await trio.aclose_forcefully(self._stream)


@final
class _HTTP2Body:
    """The `ResponseStream` of one HTTP/2 stream."""

    __slots__ = ("_connection", "_done", "_stream")

    def __init__(self, connection: HTTP2Connection, stream: _H2Stream) -> None:
        self._connection = connection
        self._stream = stream
        self._done = False

    async def receive_some(self) -> bytes:
        if self._done:
            await trio.lowlevel.checkpoint()
            return b""
        connection = self._connection
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            chunk, parked = await connection._receive_chunk(self._stream)
        except BaseException:
            self._done = True
            with trio.CancelScope(shield=True):
                await connection._abandon(self._stream)
            raise
        if not chunk:
            self._done = True
            connection._release(self._stream)
        if not parked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    def receive_buffered(self) -> bytes | None:
        if self._done:
            return b""
        chunk = self._connection._receive_buffered(self._stream)
        if chunk == b"":
            self._done = True
        return chunk

    async def aclose(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._done = True
        await self._connection._abandon(self._stream)
        await trio.lowlevel.checkpoint()
