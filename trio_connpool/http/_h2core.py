"""The HTTP/2 client connection as a state machine: no I/O, no trio.

`H2Core` owns h2's connection (`PatchedH2Connection`) and the table of our streams. The trio
driver (`_http2.HTTP2Connection`) tells it what happened (bytes received, a request to open, a
body to send, a read that timed out, the clock passing `H2Core.deadline`, the transport
failing) and carries out what it answers: write `H2Core.data_to_send`, wake the tasks of the
streams in a `Received`, tell the pool when `H2Core.snapshot` changes, stop reading once
`H2Core.reading` is False. Time is always an argument.

Rules
    1. States (`State`) only move forward: ACTIVE takes new streams; DRAINING takes none and
       ends once its streams are done (after the server's GOAWAY, or retired by us: too many
       refusals in a row, stream ids running out, no stream allowed for a while); FAILED is
       broken, every open stream failed with the cause; CLOSED is closed locally. A SUSPECT
       connection (a PING is out after a read timed out with nothing received) is ACTIVE but
       takes no new stream until the PING is answered; unanswered, it fails.
    2. Every stream ends exactly once: with its complete response (``ended``), or with one
       typed error (``error``). A stream whose complete response arrived is never failed
       afterwards: not by GOAWAY, not by a reset, not by the connection breaking.
    3. An error is ``retryable`` only when the server cannot have processed the request: the
       stream was never opened, was refused (REFUSED_STREAM) or was above a GOAWAY's last
       stream id, with no response head received.
    4. A stream error stays the stream's: a malformed ``:status``, a body that does not add up
       to its Content-Length or a reset fail that stream only (we reset it); the connection
       fails only for what breaks it (the transport, connection errors, floods, timeouts).
    5. Bounds on what a peer can make us hold: received DATA by the windows we announce (1 MiB
       a stream, 16 MiB the connection); a frame by our SETTINGS_MAX_FRAME_SIZE, refused at its
       header; replies h2 queues (PING and SETTINGS acknowledgements, resets) not yet written
       by `MAX_UNSENT_REPLIES` bytes, beyond which the peer is flooding us; our HPACK table by
       `ENCODER_TABLE_LIMIT`; the server's header blocks by h2 (64 CONTINUATIONs, the header
       list size we announce).

Invariants (`H2Core.check_invariants`, run after every step of the model in the tests)
    - every stream in the table is not done on the network, or done and awaiting its reader;
    - a stream has ``error`` or ``ended``, never both;
    - FAILED and CLOSED connections hold no stream that is not done;
    - buffered DATA of a stream is within its window.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
from typing import TYPE_CHECKING, Final, final

import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.errors import ErrorCodes

from .._exceptions import (
    InvalidHeader,
    LocalProtocolError,
    RemoteProtocolError,
    ServerDisconnected,
    TransportError,
)
from ._h2patches import ENCODER_TABLE_LIMIT, PatchedH2Connection

if TYPE_CHECKING:
    from collections.abc import Hashable

    from ._models import Request

__all__ = ["H2Core", "H2Stream", "Received", "State", "StopSending", "parse_content_length"]

STREAM_WINDOW: Final = 1024 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
_DEFAULT_WINDOW: Final = 65535
MAX_FRAME_SIZE: Final = 16384
# Until the server's first SETTINGS arrive we assume this many concurrent streams (RFC 9113
# says "unlimited", which no client should believe).
ASSUMED_MAX_STREAMS: Final = 100
# Replies h2 queued while nothing was written (about 1,000 PING acknowledgements): a peer
# that makes us owe more, over several reads while it does not read, is flooding us (the
# 2019 "ping flood" and "settings flood" class). What one read makes us owe (at most about
# the read's size) is not counted against it alone: it is written before the next read.
MAX_UNSENT_REPLIES: Final = 1000 * 17
# DATA frames smaller than this, arriving behind unread data, are joined into chunks of up to
# _JOINED_CHUNK bytes.
_SMALL_CHUNK: Final = 1024
_JOINED_CHUNK: Final = 16 * 1024
# Frames that carry nothing (empty DATA without END_STREAM, PRIORITY, unknown types) in a
# row, with no response head, body byte or stream end between: beyond this the peer only
# burns our CPU (the 2019 "empty frames flood" class).
MAX_EMPTY_FRAMES: Final = 10_000
# Streams the server refused one after another, none completing between: then it is not a
# passing overload, and the connection is retired so that the pool dials a fresh one.
MAX_REFUSALS_IN_A_ROW: Final = 5
# A connection whose server allows no stream at all for this long is retired.
ZERO_CAPACITY_GRACE: Final = 1.0
# Stream ids are 31 bits, two per stream of ours: retire well before they run out.
RETIRE_AT_STREAM_ID: Final = (1 << 31) - 1 - 2 * 1024
# Connection-specific header fields are forbidden in HTTP/2 (RFC 9113 section 8.2.2); the Host
# header becomes the :authority pseudo-header.
_DROPPED_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)
_METHODS_WITH_CONTENT: Final = frozenset({"POST", "PUT", "PATCH"})
_SECRET_HEADERS: Final = frozenset({b"authorization", b"proxy-authorization"})
_DIGITS: Final = frozenset(b"0123456789")


class State(enum.Enum):
    """Where a connection is in its life (see the module's rules)."""

    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    FAILED = "FAILED"
    CLOSED = "CLOSED"


@final
class StopSending(Exception):
    """The complete response arrived: the rest of the request body is not needed."""


@final
class H2Stream:
    """What the core knows of one of our streams."""

    __slots__ = (
        "chunks",
        "ended",
        "error",
        "expected_length",
        "head_only",
        "local_closed",
        "received_length",
        "response",
        "stream_id",
        "unacknowledged",
        "url",
    )

    def __init__(self, stream_id: int, url: str, *, head_only: bool) -> None:
        self.stream_id = stream_id
        self.url = url
        self.head_only = head_only  # a HEAD request: the response has no content
        self.response: tuple[int, list[tuple[bytes, bytes]]] | None = None
        # Received DATA not read yet (small frames behind unread data join a bytearray).
        self.chunks: collections.deque[bytes | bytearray] = collections.deque()
        self.unacknowledged = 0  # bytes in `chunks`, not yet handed back to the windows
        self.expected_length: int | None = None  # the response's Content-Length, if any
        self.received_length = 0
        self.ended = False  # the complete response arrived (END_STREAM, lengths agree)
        self.local_closed = False  # we sent END_STREAM or RST_STREAM, or h2 closed it
        self.error: TransportError | None = None

    @property
    def network_done(self) -> bool:
        """Whether nothing more is expected from or sent to the network for this stream."""
        return self.error is not None or (self.ended and self.local_closed)


@final
class Received:
    """What the driver must do after `H2Core.receive`."""

    __slots__ = ("pings", "slots", "streams", "window")

    def __init__(self) -> None:
        self.streams: list[H2Stream] = []  # streams with news: wake their tasks
        self.window = False  # flow-control windows may have opened: wake senders
        self.slots = False  # stream slots may have freed: wake requests waiting for one
        self.pings: list[bytes] = []  # payloads of acknowledged PINGs


def _error_name(code: ErrorCodes | int) -> str:
    return code.name if isinstance(code, ErrorCodes) else str(code)


def parse_content_length(values: list[bytes]) -> int | None:
    """The one Content-Length that ``values`` agree on (None if none); raises ValueError."""
    length: int | None = None
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part or not _DIGITS.issuperset(part) or len(part) > 19:
                raise ValueError(f"malformed content-length {value!r}")
            number = int(part)
            if length is not None and number != length:
                raise ValueError(f"conflicting content-length values {length} and {number}")
            length = number
    return length


@final
class H2Core:
    """One HTTP/2 client connection's protocol state; see the module's rules.

    Args:
        key: What errors carry as their key (the origin).
        max_streams: Our cap on `capacity`, whatever the server allows.
        ping_interval: Send a keep-alive PING after this many seconds without receiving
            anything (None: never).
        ping_timeout: How long a PING (keep-alive, or after a read timeout) may go unanswered
            before the connection fails.
    """

    def __init__(
        self,
        key: Hashable,
        *,
        max_streams: int = 100,
        ping_interval: float | None = None,
        ping_timeout: float = 5.0,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        self.key = key
        self.max_streams = max_streams
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.h2 = PatchedH2Connection(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (
                    PatchedH2Connection.DEFAULT_MAX_HEADER_LIST_SIZE
                ),
            }
        )
        self.streams: dict[int, H2Stream] = {}
        self.state = State.ACTIVE
        self.closed = False  # FAILED or CLOSED (an attribute: read on every path)
        self.reason: str | None = None  # why the connection drains, failed or closed
        self.can_send = True  # False once the transport takes no bytes any more
        self.settings_received = False
        self.goaway_last_stream_id: int | None = None
        self.last_received = 0.0
        self.completed = 0
        self.refusals_in_a_row = 0
        self.unsent_replies = 0
        self.empty_frames = 0
        self._ping_counter = 0
        self.keepalive: tuple[bytes, float] | None = None  # (payload, deadline)
        self.probe: tuple[bytes, float] | None = None  # the suspect connection's PING
        self.zero_capacity_since: float | None = None
        self._received = Received()  # reused by every `receive`

    # ---- what the pool reads -------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (100 until known), capped by ours."""
        if self.settings_received:
            server = self.h2.remote_settings.max_concurrent_streams
        else:
            server = ASSUMED_MAX_STREAMS
        return min(server, self.max_streams)

    @property
    def suspect(self) -> bool:
        """Whether a PING is out to learn whether the server is still there."""
        return self.probe is not None

    def is_ready(self) -> bool:
        """Whether new streams are taken."""
        return self.state is State.ACTIVE and self.probe is None

    def is_closed(self) -> bool:
        """Whether the connection failed or was closed."""
        return self.closed

    def snapshot(self) -> tuple[int, bool, bool]:
        """What the pool is told about when it changes: capacity, readiness, closedness."""
        if self.settings_received:
            capacity = min(self.h2.remote_settings.max_concurrent_streams, self.max_streams)
        else:
            capacity = min(ASSUMED_MAX_STREAMS, self.max_streams)
        return (capacity, self.state is State.ACTIVE and self.probe is None, self.closed)

    @property
    def reading(self) -> bool:
        """Whether the driver should keep reading: not failed, closed or drained."""
        return self.state is State.ACTIVE or (not self.closed and not self.drained())

    def drained(self) -> bool:
        """Whether a DRAINING connection has no stream left that the network owes anything."""
        if self.state is not State.DRAINING:
            return False
        return all(stream.network_done for stream in self.streams.values())

    def __repr__(self) -> str:
        state = self.state.name
        if self.probe is not None and self.state is State.ACTIVE:
            state = "SUSPECT"
        return f"{state}, {len(self.streams)} streams, {self.completed} requests completed"

    # ---- writing -------------------------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Queue the client preface, our SETTINGS and the larger connection window."""
        self.last_received = now
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        """Everything queued for the server (empty once nothing can be sent)."""
        self.unsent_replies = 0
        if not self.can_send:
            return b""
        return self.h2.data_to_send()

    # ---- opening a stream ----------------------------------------------------------------

    def request_headers(self, request: Request, authority: str) -> list[tuple[bytes, bytes]]:
        """The header list of ``request`` (``authority`` unless it has a Host header).

        Raises:
            InvalidHeader: If the request has more than one Host header.
        """
        url = request.url
        hosts = request.headers.get_list("host")
        if len(hosts) > 1:
            # Two Hosts: a proxy and the server could each pick another one.
            raise InvalidHeader("more than one Host header: send one", key=self.key, url=str(url))
        if hosts:
            authority = hosts[0]
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

    def has_free_slot(self) -> bool:
        """Whether a new stream may be opened under the capacity now."""
        capacity = self.capacity
        # Every stream h2 counts as open is one of ours (we forget a stream only once h2
        # closed it, or after resetting it), so counting ours first spares h2's count, which
        # walks all its streams, on the common path.
        return len(self.streams) < capacity or self.h2.count_open_outbound_streams() < capacity

    def check_can_open(self, url: str) -> None:
        """Raise the retryable error of a connection that takes no new stream, if it is one."""
        if self.state is State.ACTIVE:
            return
        if self.state is State.DRAINING:
            if self.goaway_last_stream_id is not None:
                message = "the server is shutting the connection down (GOAWAY)"
            else:
                message = f"the connection takes no new request ({self.reason})"
        else:
            message = f"the connection is closed ({self.reason})"
        raise RemoteProtocolError(
            f"{message}; the request was not sent", key=self.key, url=url, retryable=True
        )

    def open_stream(
        self, headers: list[tuple[bytes, bytes]], *, end_stream: bool, url: str, head_only: bool
    ) -> H2Stream:
        """Open a stream with ``headers``; its request body (if any) follows.

        Raises:
            RemoteProtocolError: Retryable, if the connection takes no new stream.
            LocalProtocolError: If h2 refused the header list (the connection then fails).
        """
        if self.state is not State.ACTIVE:
            self.check_can_open(url)
        h2_connection = self.h2
        try:
            stream_id = h2_connection.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:  # pragma: no cover (retired before)
            self.retire("its stream ids ran out")
            self.check_can_open(url)
            raise
        try:
            h2_connection.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError as exc:  # pragma: no cover (we wait first)
            raise RemoteProtocolError(
                f"{exc}; the request was not sent", key=self.key, url=url, retryable=True
            ) from exc
        except h2.exceptions.ProtocolError as exc:
            # h2 validates while it encodes: the HPACK encoder may have changed its table for
            # a header block that is never sent, so the connection cannot be trusted any more.
            # (Our models reject what h2 would, so this should not happen.)
            self.fail(f"a request was refused by h2: {exc}", exc)
            raise LocalProtocolError(
                f"request cannot be sent: {exc}", key=self.key, url=url
            ) from exc
        stream = self.streams[stream_id] = H2Stream(stream_id, url, head_only=head_only)
        stream.local_closed = end_stream
        if stream_id >= RETIRE_AT_STREAM_ID:
            self.retire("its stream ids are running out")
        return stream

    # ---- the request body ----------------------------------------------------------------

    def check_sending(self, stream: H2Stream) -> None:
        """Raise what ends the upload of ``stream``: its error, or `StopSending` once the
        complete response arrived and the server reset the stream (RFC 9113 section 8.1) or
        the connection ended (nothing may be sent on it any more)."""
        if stream.error is not None:
            raise stream.error
        if stream.ended and (stream.local_closed or self.closed):
            raise StopSending

    def send_window(self, stream: H2Stream) -> int:
        """How much of ``stream``'s body may be queued now (0: wait for a window update).

        A complete response ends the upload when the server grants no more window: the
        client may go on sending while it does (RFC 9113 section 8.1), and a server that
        wants the rest resets the stream with NO_ERROR.

        Raises:
            StopSending: The upload is not needed any more.
            TransportError: The stream's error.
        """
        self.check_sending(stream)
        window = self.h2.local_flow_control_window(stream.stream_id)
        if window <= 0 and stream.ended:
            raise StopSending
        return window

    def send_data(self, stream: H2Stream, data: memoryview, burst: int) -> int:
        """Queue up to ``burst`` bytes of ``data`` (within the window): how many were queued."""
        h2_connection = self.h2
        window = min(h2_connection.local_flow_control_window(stream.stream_id), burst)
        frame_size = h2_connection.max_outbound_frame_size
        end = min(window, len(data))
        position = 0
        while position < end:
            step = min(position + frame_size, end)
            h2_connection.send_data(stream.stream_id, data[position:step])
            position = step
        return end

    def end_request(self, stream: H2Stream) -> None:
        """The request body is complete: END_STREAM."""
        self.check_sending(stream)
        self.h2.end_stream(stream.stream_id)
        stream.local_closed = True

    def stop_upload(self, stream: H2Stream) -> None:
        """The complete response arrived during the upload: reset the stream (CANCEL)."""
        if not stream.local_closed and self.can_send and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
        stream.local_closed = True

    # ---- the response body ---------------------------------------------------------------

    def next_chunk(self, stream: H2Stream) -> bytes | None:
        """The next chunk of the body (its window handed back), b"" at the end, None if none yet.

        Raises:
            TransportError: The stream's error.
        """
        if stream.error is not None:
            raise stream.error
        if stream.chunks:
            chunk = stream.chunks.popleft()
            if type(chunk) is not bytes:
                chunk = bytes(chunk)
            stream.unacknowledged -= len(chunk)
            self._acknowledge(len(chunk), stream.stream_id)
            return chunk
        if stream.ended:
            return b""
        return None

    def _acknowledge(self, size: int, stream_id: int) -> None:
        """Hand ``size`` consumed bytes back to the server's windows (queued in h2)."""
        if size and self.can_send and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)

    def release(self, stream: H2Stream) -> None:
        """Forget a stream whose response was read to the end."""
        if self.streams.pop(stream.stream_id, None) is not None and stream.error is None:
            self.completed += 1
            self.refusals_in_a_row = 0
        self.h2.forget_closed_stream(stream.stream_id)

    def abandon(self, stream: H2Stream) -> None:
        """Give up on ``stream`` (error, cancellation, early close): reset it if still open,
        hand its unread data back to the windows, forget it."""
        if stream.stream_id not in self.streams:
            return
        unread = stream.unacknowledged
        stream.chunks.clear()
        stream.unacknowledged = 0
        if self.can_send and not self.closed:
            self._acknowledge(unread, stream.stream_id)
            if not stream.local_closed or not stream.ended:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
        stream.local_closed = True
        if stream.error is None and not stream.ended:
            stream.error = TransportError(
                "the stream was reset locally", key=self.key, url=stream.url
            )
        self.streams.pop(stream.stream_id, None)
        self.h2.forget_closed_stream(stream.stream_id)

    # ---- PING, timers and timeouts -------------------------------------------------------

    def start_ping(self) -> bytes:
        """Queue a PING; its payload (acknowledged in a `Received`)."""
        self._ping_counter += 1
        payload = self._ping_counter.to_bytes(8, "big")
        self.h2.ping(payload)
        return payload

    @property
    def deadline(self) -> float:
        """When `on_timer` is due next (`math.inf`: never)."""
        deadline = math.inf
        if self.probe is not None:
            deadline = self.probe[1]
        if self.keepalive is not None:
            deadline = min(deadline, self.keepalive[1])
        elif self.ping_interval is not None:
            deadline = min(deadline, self.last_received + self.ping_interval)
        if self.zero_capacity_since is not None:
            deadline = min(deadline, self.zero_capacity_since + ZERO_CAPACITY_GRACE)
        return deadline

    def on_timer(self, now: float) -> None:
        """The clock reached (or passed) `deadline`: fail, PING or retire as due."""
        if self.closed:
            return
        if self.probe is not None and now >= self.probe[1]:
            self.fail(
                f"no PING acknowledgement within {self.ping_timeout} s after a read timed out "
                "with nothing received",
                None,
            )
            return
        if self.keepalive is not None:
            if now >= self.keepalive[1]:
                self.fail(f"no PING acknowledgement within {self.ping_timeout} s", None)
                return
        elif self.ping_interval is not None and now >= self.last_received + self.ping_interval:
            self.keepalive = (self.start_ping(), now + self.ping_timeout)
        since = self.zero_capacity_since
        if since is not None and now >= since + ZERO_CAPACITY_GRACE:
            self.zero_capacity_since = None
            if self.capacity == 0:
                self.retire(f"the server allowed no stream for {ZERO_CAPACITY_GRACE} s")

    def read_timed_out(self, since: float, now: float) -> bool:
        """A wait for data that began at ``since`` timed out: whether a PING was queued.

        If nothing at all arrived on the connection since, the server may be gone without a
        word: the connection turns suspect (no new stream) and PINGs; the answer makes it
        ready again, its absence within ``ping_timeout`` fails it.
        """
        if self.last_received >= since or self.probe is not None or self.closed:
            return False
        self.probe = (self.start_ping(), now + self.ping_timeout)
        return True

    def retire(self, reason: str) -> None:
        """Take no new stream; end once the streams in flight are done."""
        if self.state is State.ACTIVE:
            self.state = State.DRAINING
            self.reason = reason

    # ---- receiving -----------------------------------------------------------------------

    def receive(self, data: bytes | bytearray, now: float) -> Received:
        """Feed bytes from the server; what to wake (valid until the next call). May fail the
        connection."""
        self.last_received = now
        result = self._received
        result.streams.clear()
        result.pings.clear()
        result.window = result.slots = False
        events, replies, error = self.h2.receive_frames(data)
        for event in events:
            self._dispatch(event, result, now)
        if error is not None:
            # h2 queued a GOAWAY with the error code: the driver sends it on the way out.
            self.fail(f"the server broke the HTTP/2 protocol: {error}", error, goaway=True)
            return result
        if self.empty_frames > MAX_EMPTY_FRAMES:
            self.fail(
                f"the server flooded the connection with {self.empty_frames} frames in a row "
                "that carry nothing (empty DATA, PRIORITY, unknown types)",
                None,
            )
            return result
        # Replies owed from earlier reads were not written meanwhile: the server does not
        # read. (What one read makes us owe is bounded by the read; it goes out next.)
        owed = self.unsent_replies
        self.unsent_replies = owed + replies
        if owed and self.unsent_replies > MAX_UNSENT_REPLIES:
            self.fail(
                f"the server flooded the connection with frames that need an answer "
                f"({self.unsent_replies} bytes of replies owed while it did not read)",
                None,
            )
        return result

    def _dispatch(self, event: h2.events.Event, result: Received, now: float) -> None:
        """Apply one h2 event to the streams and the connection state.

        DATA and END_STREAM, the events of every response, are handled here, inline: a call
        per event is a measurable part of a small response's cost.
        """
        if isinstance(event, h2.events.DataReceived):
            stream_id = event.stream_id or 0
            stream = self.streams.get(stream_id)
            data = event.data or b""
            flow = event.flow_controlled_length or 0
            if stream is None or stream.error is not None or stream.response is None:
                # Nobody will read it: give the window back at once.
                self._acknowledge(flow, stream_id)
                if stream is not None and stream.error is None:
                    message = "the server sent DATA before a response head"
                    self._stream_error(stream, message, result)
                return
            if flow != len(data):
                self._acknowledge(flow - len(data), stream_id)  # padding
            if not data:
                if not event.stream_ended:
                    self.empty_frames += 1
                return
            self.empty_frames = 0
            size = len(data)
            received = stream.received_length = stream.received_length + size
            expected = stream.expected_length
            if expected is not None and received > expected:
                self._acknowledge(size, stream_id)
                message = f"the response body is longer than its content-length {expected}"
                self._stream_error(stream, message, result)
                return
            chunks = stream.chunks
            if size < _SMALL_CHUNK and chunks:
                # Small frames behind unread data join one growing chunk: a body sent a byte
                # a frame would otherwise hold about 40 times its size in objects.
                last = chunks[-1]
                if type(last) is bytearray and len(last) < _JOINED_CHUNK:
                    last += data
                else:
                    chunks.append(bytearray(data))
            else:
                chunks.append(bytes(data))
            stream.unacknowledged += size
            result.streams.append(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event, result)
        elif isinstance(event, h2.events.StreamEnded):
            result.slots = True
            stream = self.streams.get(event.stream_id or 0)
            if stream is None or stream.error is not None:
                return
            expected = stream.expected_length
            if stream.response is None:  # pragma: no cover (h2 refuses END_STREAM first)
                self._stream_error(stream, "the stream ended without a response", result)
            elif expected is not None and stream.received_length != expected:
                message = (
                    f"the response body ended after {stream.received_length} bytes, "
                    f"not its content-length {expected}"
                )
                self._stream_error(stream, message, result)
            else:
                stream.ended = True
                self.empty_frames = 0
                result.streams.append(stream)
                if not stream.local_closed:
                    result.window = True  # an upload waiting for window stops now
        elif isinstance(event, h2.events.StreamReset):
            self._on_stream_reset(event, result)
        elif isinstance(event, h2.events.WindowUpdated):
            result.window = True
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            result.window = result.slots = True
            if self.capacity == 0:
                if self.zero_capacity_since is None:
                    self.zero_capacity_since = now
            else:
                self.zero_capacity_since = None
        elif isinstance(event, h2.events.PingAckReceived):
            payload = bytes(event.ping_data or b"")
            if self.keepalive is not None and self.keepalive[0] == payload:
                self.keepalive = None
            if self.probe is not None and self.probe[0] == payload:
                self.probe = None
            result.pings.append(payload)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event, result)
        elif isinstance(event, (h2.events.UnknownFrameReceived, h2.events.PriorityUpdated)):
            self.empty_frames += 1
        # Others need nothing: h2 answers PING and SETTINGS itself; 1xx responses and
        # trailers are skipped; PRIORITY, ALTSVC and unknown frames are ignored.

    def _on_response(self, event: h2.events.ResponseReceived, result: Received) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is None or stream.error is not None:
            return
        status = -1
        headers: list[tuple[bytes, bytes]] = []
        length: bytes | None = None
        lengths: list[bytes] | None = None
        for name, value in event.headers or ():
            if name == b":status":
                # Exactly three ASCII digits (bytes.isdigit is ASCII only), 100 to 599.
                if len(value) == 3 and value.isdigit():
                    status = int(value)
            elif not name.startswith(b":"):
                field = (bytes(name), bytes(value))
                headers.append(field)
                if field[0] == b"content-length":
                    if length is None:
                        length = field[1]
                    else:
                        lengths = [*(lengths or [length]), field[1]]
        if not 100 <= status <= 599:
            message = "the response's :status is not three digits from 100 to 599"
            self._stream_error(stream, message, result)
            return
        if length is not None and not stream.head_only and status != 204 and status != 304:
            if lengths is None and length.isdigit() and len(length) < 19:
                stream.expected_length = int(length)
            else:
                try:
                    stream.expected_length = parse_content_length(lengths or [length])
                except ValueError as exc:
                    self._stream_error(stream, f"the response has a {exc}", result)
                    return
        stream.response = (status, headers)
        self.empty_frames = 0
        result.streams.append(stream)

    def _stream_error(self, stream: H2Stream, message: str, result: Received) -> None:
        """The server broke the protocol on this stream only: fail it, reset it."""
        self._fail_stream(stream, RemoteProtocolError(message, key=self.key, url=stream.url))
        self._acknowledge(stream.unacknowledged, stream.stream_id)
        stream.chunks.clear()
        stream.unacknowledged = 0
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream.stream_id, ErrorCodes.PROTOCOL_ERROR)
        stream.local_closed = True
        result.streams.append(stream)
        result.slots = result.window = True

    def _fail_stream(self, stream: H2Stream, error: TransportError) -> bool:
        """End ``stream`` with ``error`` unless it has ended already."""
        if stream.error is not None or stream.ended:
            return False
        stream.error = error
        return True

    def _on_stream_reset(self, event: h2.events.StreamReset, result: Received) -> None:
        result.slots = result.window = True
        stream = self.streams.get(event.stream_id or 0)
        if stream is None:
            return
        stream.local_closed = True
        result.streams.append(stream)
        if stream.ended or stream.error is not None:
            # The whole response arrived; the reset only stops our upload (RFC 9113 8.1).
            return
        code = event.error_code
        name = _error_name(code)
        if event.remote_reset:
            message = f"the server reset the stream ({name})"
        else:
            message = f"the server broke the protocol on this stream ({name})"
        refused = code == ErrorCodes.REFUSED_STREAM and stream.response is None
        if refused:
            message += "; the request was not processed"
            self.refusals_in_a_row += 1
            if self.refusals_in_a_row >= MAX_REFUSALS_IN_A_ROW:
                self.retire(f"the server refused {self.refusals_in_a_row} streams in a row")
        self._fail_stream(
            stream, RemoteProtocolError(message, key=self.key, url=stream.url, retryable=refused)
        )

    def _on_goaway(self, event: h2.events.ConnectionTerminated, result: Received) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        previous = self.goaway_last_stream_id
        # A second GOAWAY may only lower last_stream_id (RFC 9113 section 6.8).
        last = self.goaway_last_stream_id = last if previous is None else min(previous, last)
        name = _error_name(event.error_code if event.error_code is not None else 0)
        if self.state is State.ACTIVE:
            self.state = State.DRAINING
            self.reason = f"GOAWAY ({name})"
        result.slots = result.window = True
        for stream in self.streams.values():
            if stream.stream_id <= last or stream.ended or stream.error is not None:
                continue
            if stream.response is None:
                error = RemoteProtocolError(
                    f"the server is shutting the connection down (GOAWAY, {name}) and did not "
                    "process this request",
                    key=self.key,
                    url=stream.url,
                    retryable=True,
                )
            else:
                error = RemoteProtocolError(
                    f"the server is shutting the connection down (GOAWAY, {name}) in the "
                    "middle of this response",
                    key=self.key,
                    url=stream.url,
                )
            self._fail_stream(stream, error)
            stream.local_closed = True
            result.streams.append(stream)

    # ---- the end -------------------------------------------------------------------------

    def fail(self, message: str, cause: BaseException | None, *, goaway: bool = False) -> bool:
        """The connection is broken: fail every stream not done (whether it changed anything).

        Streams waiting for their head get `ServerDisconnected`, the others
        `RemoteProtocolError`, with ``cause`` as ``__cause__``. With ``goaway`` what h2 queued
        (its GOAWAY) may still be sent; `can_send` is left for the driver to clear.
        """
        if self.closed:
            return False
        self.state = State.FAILED
        self.closed = True
        self.reason = message
        self.can_send = goaway
        for stream in self.streams.values():
            if stream.network_done or stream.ended:
                continue
            error_class = ServerDisconnected if stream.response is None else RemoteProtocolError
            error = error_class(message, key=self.key, url=stream.url)
            error.__cause__ = cause
            self._fail_stream(stream, error)
        self.probe = self.keepalive = None
        return True

    def close(self, message: str) -> bool:
        """Closed locally: fail every stream not done; queue GOAWAY if we still can send.

        Returns whether GOAWAY was queued (the driver writes it before closing the transport).
        """
        if self.state is State.CLOSED:
            return False
        for stream in self.streams.values():
            if not stream.network_done and not stream.ended:
                self._fail_stream(stream, TransportError(message, key=self.key, url=stream.url))
        send_goaway = self.can_send and self.state is not State.FAILED
        self.state = State.CLOSED
        self.closed = True
        self.reason = self.reason or "closed"
        self.probe = self.keepalive = None
        if send_goaway:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
        return send_goaway

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring (for tests)."""
        for stream_id, stream in self.streams.items():
            assert stream.stream_id == stream_id
            assert not (stream.error is not None and stream.ended), stream_id
            assert stream.unacknowledged == sum(len(chunk) for chunk in stream.chunks)
            assert stream.unacknowledged <= STREAM_WINDOW
            if stream.expected_length is not None and stream.error is None:
                assert stream.received_length <= stream.expected_length
            if self.closed:
                assert stream.error is not None or stream.ended, stream_id
        assert self.unsent_replies <= MAX_UNSENT_REPLIES + 2 * 65536 or self.closed
        assert self.h2.encoder.header_table_size <= ENCODER_TABLE_LIMIT
        if self.state is not State.ACTIVE:
            assert self.reason is not None
