"""A hypothesis rule-based model of the HTTP/2 core against a real h2 server.

The machine interleaves everything one connection lives through: streams opened (GET, and
POST with a body sent as the windows allow), server responses (heads, malformed ones, DATA
in pieces, bodies that do or do not match their Content-Length, trailers), resets both ways,
bodies read, GOAWAY at any point with any last stream id, SETTINGS changes, PINGs both ways,
read timeouts, timer ticks, the transport failing and the connection closing. The server is
an `h2.connection.H2Connection` in the same thread; bytes move by hand in both directions,
batched and cut at arbitrary byte boundaries. GOAWAY and a few broken frames are written as
raw frames (h2 closes its own side when it sends GOAWAY, and a real server keeps serving the
streams up to its last stream id).

After every step the core's own invariants hold, and the model checks what a caller relies
on: every stream ends exactly once (its complete response, with the body the server sent,
or one typed error that never changes); only unprocessed requests are retryable; a complete
response is never failed afterwards; buffers stay within their bounds; the connection state
only moves forward; and no exception but the documented ones leaves a core method.

TRIO_CONNPOOL_H2_MODEL_EXAMPLES sets the number of examples for a longer run (100 by default).
"""

from __future__ import annotations

import os
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.settings
import hypothesis.strategies as st
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trio_connpool import PoolError, RemoteProtocolError, TransportError
from trio_connpool.http import Origin
from trio_connpool.http._h2core import (
    CONNECTION_WINDOW,
    MAX_UNSENT_REPLIES,
    STREAM_WINDOW,
    H2Core,
    H2Stream,
    State,
    StopSending,
)
from trio_connpool.http._h2patches import ENCODER_TABLE_LIMIT

ORIGIN: Final = Origin("https", "example.com", 443)
URL: Final = "https://example.com/"
RANK: Final = {State.ACTIVE: 0, State.DRAINING: 1, State.FAILED: 2, State.CLOSED: 3}
# Well-formed statuses four times in five.
STATUSES: Final = (b"200",) * 8 + (b"201", b"204", b"404", b"500") + (b"abc", b"2000", b"099")
RESET_CODES: Final = (
    ErrorCodes.NO_ERROR,
    ErrorCodes.PROTOCOL_ERROR,
    ErrorCodes.INTERNAL_ERROR,
    ErrorCodes.REFUSED_STREAM,
    ErrorCodes.CANCEL,
    ErrorCodes.ENHANCE_YOUR_CALM,
    0x99,  # an unknown code
)
BODY_SIZES: Final = (0, 1, 100, 20_000, 70_000, STREAM_WINDOW + 1000)
# Frames that break the connection, or must be ignored.
DATA_ON_STREAM_ZERO: Final = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
OVERSIZED_FRAME_HEAD: Final = (1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
UNKNOWN_FRAME: Final = b"\x00\x00\x02\xfa\x00\x00\x00\x00\x00ok"
_BASE: Final = bytes(range(251))
READ_SIZE: Final = 64 * 1024  # what the driver reads at most at once
# Rules that abandon a stream, reset one or send GOAWAY act only on some draws, else few
# responses would complete. (A middle value: hypothesis draws the ends of a range more often.)
RARE: Final = 12
rarely: Final = st.integers(0, RARE).map(lambda n: n == RARE // 2)
sometimes: Final = st.integers(0, 4).map(lambda n: n == 2)
# The connection is not ended on purpose in an example's first steps; after them it soon is,
# and the rest of the example drives a closed connection.
QUIET_STEPS: Final = 40


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ with ``seed`` (a stream's body, never all alike)."""
    start = seed % 251
    return (_BASE * (size // 251 + 2))[start : start + size]


class MStream:
    """One stream as the model sees it: the client's side, then the server's."""

    def __init__(self, stream: H2Stream, body: bytes) -> None:
        self.stream = stream
        self.sid = stream.stream_id
        # The client.
        self.body = body  # the request body
        self.sent = 0  # how much of it was queued
        self.uploading = bool(body)  # until END_STREAM, StopSending, an error or abandon
        self.read = bytearray()  # the response body as read by next_chunk
        self.error: TransportError | None = None  # the stream's outcome once seen
        self.ended = False
        self.gone = False  # released or abandoned
        # The server.
        self.seen = False  # the request head arrived
        self.received = bytearray()  # the request body as it arrived
        self.request_ended = False
        self.client_reset = False  # the client's RST_STREAM arrived
        self.status: bytes | None = None  # the final :status sent
        self.declared: int | None = None  # the content-length sent
        self.planned = 0  # the body length the server means to send
        self.sent_body = bytearray()
        self.response_ended = False
        self.reset_code: int | None = None
        self.refused_before_head = False
        self.touched = False  # the server sent anything at all on the stream

    def __repr__(self) -> str:
        return f"<stream {self.sid}>"

    @property
    def outcome(self) -> bool:
        return self.error is not None or self.ended


class H2CoreModel(RuleBasedStateMachine):
    core: H2Core
    server: h2.connection.H2Connection

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.streams: list[MStream] = []
        self.by_id: dict[int, MStream] = {}
        self.to_server = bytearray()  # written by the client, not yet read by the server
        self.server_buffer = bytearray()  # read by the server, not yet a whole frame
        self.to_client = bytearray()  # sent by the server, not yet received by the client
        self.sent_total = 0  # bytes the server sent so far
        self.delivered_total = 0  # bytes the client received so far
        # (offset in the server's byte stream, kind, value): checked once delivered.
        self.markers: list[tuple[int, str, int | bytes]] = []
        self.goaways: list[int] = []  # last_stream_id of every GOAWAY the server sent
        self.server_closed = False  # the server received the client's GOAWAY
        self.state = State.ACTIVE
        self.counter = 0
        self.steps = 0
        self.pings_acknowledged: set[bytes] = set()
        # Every SETTINGS frame of the server carries each setting that it ever changes: h2
        # applies an acknowledgement to each setting's own queue of pending values, not to
        # the frame, so a setting left out of one frame would take effect one frame early.
        self.server_settings_sent: dict[SettingCodes | int, int] = {
            SettingCodes.MAX_CONCURRENT_STREAMS: (1 << 31) - 1,
            SettingCodes.INITIAL_WINDOW_SIZE: 65_535,
            SettingCodes.HEADER_TABLE_SIZE: 4096,
            SettingCodes.MAX_FRAME_SIZE: 16_384,
        }

    # ------------------------------------------------------------------ set-up

    @initialize(
        max_streams=st.sampled_from([2, 100]),
        ping_interval=st.sampled_from([None, 2.0, 30.0, None]),
        ping_timeout=st.sampled_from([3.0, 10.0]),
        server_streams=st.sampled_from([None, 1, 3, 100]),
    )
    def setup(
        self,
        max_streams: int,
        ping_interval: float | None,
        ping_timeout: float,
        server_streams: int | None,
    ) -> None:
        self.core = H2Core(
            ORIGIN, max_streams=max_streams, ping_interval=ping_interval, ping_timeout=ping_timeout
        )
        self.server = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if server_streams is not None:
            self.server_settings_sent[SettingCodes.MAX_CONCURRENT_STREAMS] = server_streams
            self.server.local_settings = h2.settings.Settings(
                client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: server_streams}
            )
        # The handshake, as the driver does it before the connection is used.
        self.core.initiate(self.now)
        self.server.initiate_connection()
        self.server.receive_data(self.core.data_to_send())
        self.core.receive(self.server.data_to_send(), self.now)
        self.server.receive_data(self.core.data_to_send())
        assert not self.server.data_to_send()

    # ------------------------------------------------------------------ helpers

    def pick(self, data: st.DataObject, candidates: list[MStream]) -> MStream:
        return data.draw(st.sampled_from(candidates))

    def live(self) -> list[MStream]:
        return [m for m in self.streams if not m.gone]

    def server_sent(self, kind: str = "", value: int | bytes = 0, extra: bytes = b"") -> None:
        """Move what the server queued (and ``extra``, raw frames) into the wire."""
        data = self.server.data_to_send() + extra
        self.to_client += data
        self.sent_total += len(data)
        if kind:
            self.markers.append((self.sent_total, kind, value))

    def above_goaway(self, sid: int) -> bool:
        return any(sid > last for last in self.goaways)

    def serving(self) -> list[MStream]:
        """Streams the server may still send a response on."""
        return [
            m
            for m in self.streams
            if m.seen
            and not m.response_ended
            and m.reset_code is None
            and not m.client_reset
            and not self.above_goaway(m.sid)
        ]

    def abandon(self, m: MStream) -> None:
        self.core.abandon(m.stream)
        assert m.sid not in self.core.streams
        m.gone = True
        m.uploading = False

    def server_up(self) -> bool:
        return not self.server_closed and self.core.reading

    # ------------------------------------------------------------------ the client

    def open(self, method: bytes, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"example.com"),
            (b":path", b"/"),
            *extra,
        ]
        stream = self.core.open_stream(headers, end_stream=not body, url=URL, head_only=False)
        assert stream.stream_id not in self.by_id
        assert self.core.streams[stream.stream_id] is stream
        m = MStream(stream, body)
        self.streams.append(m)
        self.by_id[m.sid] = m

    @precondition(lambda self: self.core.state is not State.ACTIVE or self.core.has_free_slot())
    @rule(
        post=st.booleans(),
        size=st.sampled_from([0, 1, 70_000, 1_000_000, 200_000]),
        length=st.booleans(),
        unique=st.sampled_from([0, 10, 3000]),
    )
    def open_stream(self, post: bool, size: int, length: bool, unique: int) -> None:
        """A GET, or a POST with a body (with or without its content-length)."""
        self.counter += 1
        extra = [(b"x-unique", b"%d" % self.counter * unique)] if unique else []
        body = pattern(self.counter, size) if post else b""
        if post and length:
            extra.append((b"content-length", b"%d" % size))
        if self.core.state is State.ACTIVE:
            self.open(b"POST" if post else b"GET", body, extra)
            return
        count = len(self.core.streams)
        try:
            self.core.open_stream(
                [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
                end_stream=True,
                url=URL,
                head_only=False,
            )
        except RemoteProtocolError as exc:
            assert exc.retryable  # never sent: never processed
        else:
            raise AssertionError("a stream opened on a connection that takes none")
        assert len(self.core.streams) == count

    @precondition(lambda self: any(m.uploading for m in self.streams))
    @rule(data=st.data(), burst=st.sampled_from([1, 1000, 65_536, 1 << 20]))
    def upload(self, data: st.DataObject, burst: int) -> None:
        m = self.pick(data, [m for m in self.streams if m.uploading])
        stream = m.stream
        try:
            window = self.core.send_window(stream)
        except StopSending:
            assert stream.ended
            if not stream.local_closed:
                self.core.stop_upload(stream)
            assert stream.local_closed
            m.uploading = False
            return
        except TransportError as exc:
            assert exc is stream.error
            m.uploading = False
            self.abandon(m)  # as the driver does with a request that failed
            return
        if window <= 0:
            return
        view = memoryview(m.body)[m.sent :]
        sent = self.core.send_data(stream, view, burst)
        assert sent == min(window, burst, len(view)), (sent, window, burst, len(view))
        m.sent += sent
        if m.sent == len(m.body):
            self.core.end_request(stream)
            assert stream.local_closed
            m.uploading = False

    @precondition(lambda self: any(not m.gone and not m.uploading for m in self.streams))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        m = self.pick(data, [m for m in self.streams if not m.gone and not m.uploading])
        try:
            chunk = self.core.next_chunk(m.stream)
        except TransportError as exc:
            assert exc is m.stream.error
            self.abandon(m)
            return
        if chunk is None:
            assert not m.stream.ended
            return
        if chunk:
            m.read += chunk
            return
        assert m.stream.ended
        assert bytes(m.read) == bytes(m.sent_body), (len(m.read), len(m.sent_body))
        self.core.release(m.stream)
        assert m.sid not in self.core.streams
        m.gone = True

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data(), act=rarely)
    def abandon_stream(self, data: st.DataObject, act: bool) -> None:
        """Rarely: a request is cancelled, or its response closed early."""
        if act:
            self.abandon(self.pick(data, self.live()))

    @rule()
    def write(self) -> None:
        sending = self.core.can_send
        data = self.core.data_to_send()
        assert self.core.unsent_replies == 0
        if not sending:
            assert not data
        self.to_server += data

    @rule(
        step=st.sampled_from([0.0, 0.1, 0.5, 30.0, 0.5, 1.0, 1.0, 2.0, 0.1]),
        timed_out=st.sampled_from([False, False, False, True]),
        ping=st.sampled_from([False, False, True]),
    )
    def time_passes(self, step: float, timed_out: bool, ping: bool) -> None:
        """Time passes; a read that waited all along may time out; we may PING."""
        since = self.now
        self.now += step
        if self.now >= self.core.deadline:
            self.core.on_timer(self.now)
        if timed_out and self.core.read_timed_out(since, self.now):
            assert self.core.suspect
            assert not self.core.is_ready()
        if ping and not self.core.is_closed():
            self.core.start_ping()

    @precondition(lambda self: self.steps >= QUIET_STEPS)
    @rule(
        how=st.sampled_from(["fail", "close", "data on stream 0", "oversized frame"]),
    )
    def end_connection(self, how: str) -> None:
        """The transport breaks, we close, or the server breaks the protocol."""
        if how == "fail":
            closed = self.core.is_closed()
            assert self.core.fail("the transport broke", None) is not closed
            assert not self.core.can_send or closed
        elif how == "close":
            if self.core.close("closed locally"):
                self.to_server += self.core.data_to_send()
        elif self.server_up():
            frame = DATA_ON_STREAM_ZERO if how == "data on stream 0" else OVERSIZED_FRAME_HEAD
            self.server_sent(extra=frame)

    # ------------------------------------------------------------------ the wire

    def cut(self, data: st.DataObject, wire: bytearray) -> int:
        """Where to cut the bytes on ``wire`` (often all of them, else anywhere)."""
        return data.draw(st.one_of(st.just(len(wire)), st.integers(1, len(wire))))

    @precondition(lambda self: bool(self.to_server) and not self.server_closed)
    @rule(data=st.data())
    def server_reads(self, data: st.DataObject) -> None:
        self.server_read(self.cut(data, self.to_server))

    @precondition(lambda self: bool(self.to_client) and self.core.reading)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        self.receive(self.cut(data, self.to_client))

    @rule(data=st.data())
    def pump(self, data: st.DataObject) -> None:
        """Both ways at once: what the client queued is written and read, then the reply."""
        self.write()
        if self.to_server and not self.server_closed:
            self.server_read(len(self.to_server))
        if self.to_client and self.core.reading:
            self.receive(self.cut(data, self.to_client))
        if self.to_client and self.core.reading:
            self.receive(len(self.to_client))

    def server_read(self, size: int) -> None:
        wire = self.to_server
        self.server_buffer += wire[:size]
        del wire[:size]
        events: list[h2.events.Event] = []
        buffer = self.server_buffer
        # One frame per call: h2 applies a new maximum frame size of its own only from its
        # next receive_data, even when the acknowledgement came earlier in the same bytes.
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            end = 9 + int.from_bytes(buffer[:3], "big")
            events += self.server.receive_data(bytes(buffer[:end]))
            del buffer[:end]
        pings: list[bytes] = []
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.by_id[event.stream_id or 0].seen = True
            elif isinstance(event, h2.events.DataReceived):
                m = self.by_id[event.stream_id or 0]
                m.received += event.data or b""
                self.server.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id or 0
                )
            elif isinstance(event, h2.events.StreamEnded):
                m = self.by_id[event.stream_id or 0]
                m.request_ended = True
                assert bytes(m.received) == m.body  # the whole body, nothing else
            elif isinstance(event, h2.events.StreamReset):
                self.by_id[event.stream_id or 0].client_reset = True
            elif isinstance(event, h2.events.PingReceived):
                pings.append(bytes(event.ping_data or b""))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.server_closed = True
        self.server_sent()
        for payload in pings:
            self.markers.append((self.sent_total, "pingack", payload))

    def receive(self, size: int) -> None:
        wire = self.to_client
        size = min(size, READ_SIZE)
        chunk = bytes(wire[:size])
        del wire[:size]
        self.delivered_total += size
        due = [marker for marker in self.markers if marker[0] <= self.delivered_total]
        self.markers = [marker for marker in self.markers if marker[0] > self.delivered_total]
        self.observe()
        before = {m.sid for m in self.streams if m.outcome}
        probe = self.core.probe
        owed = self.core.unsent_replies
        result = self.core.receive(chunk, self.now)
        self.pings_acknowledged.update(result.pings)
        # Replies still owed from an earlier read and more: a flood. (What one read makes us
        # owe is bounded by the read, and goes out next.)
        assert not owed or self.core.unsent_replies <= MAX_UNSENT_REPLIES or self.core.closed
        if self.core.state is State.FAILED:
            if self.core.can_send:  # h2's GOAWAY goes out, then nothing more
                self.to_server += self.core.data_to_send()
                self.core.can_send = False
            return  # which frames counted before the failure is not checked here
        for _, kind, value in due:
            if kind == "pingack":
                assert value in self.pings_acknowledged
                if probe is not None and probe[0] == value:
                    assert not self.core.suspect
            elif kind == "goaway":
                # A stream above the last id that the server never answered was not
                # processed: retryable.
                for m in self.streams:
                    if m.sid > int(value) and m.sid not in before and not m.touched:
                        error = m.stream.error
                        assert error is not None and error.retryable, (m, error)
            elif kind == "refused":
                m = self.by_id[int(value)]
                if m.sid not in before:
                    assert m.stream.error is not None and m.stream.error.retryable, m

    # ------------------------------------------------------------------ the server

    @precondition(lambda self: self.server_up() and bool(self.serving()))
    @rule(
        data=st.data(),
        status=st.sampled_from(STATUSES),
        length=st.sampled_from(["none", "right", "less", "more"]),
        planned=st.sampled_from(BODY_SIZES),
        end=st.booleans(),
        informational=st.booleans(),
    )
    def server_head(
        self,
        data: st.DataObject,
        status: bytes,
        length: str,
        planned: int,
        end: bool,
        informational: bool,
    ) -> None:
        candidates = [m for m in self.serving() if m.status is None]
        if candidates:
            self.send_head(
                self.pick(data, candidates), status, length, planned, end, informational
            )

    @precondition(lambda self: self.server_up() and bool(self.serving()))
    @rule(
        data=st.data(),
        status=st.sampled_from(STATUSES),
        length=st.sampled_from(["none", "right", "right", "less", "more"]),
        planned=st.sampled_from(BODY_SIZES[:4]),
        end=st.sampled_from([True, True, False]),
    )
    def server_respond(
        self, data: st.DataObject, status: bytes, length: str, planned: int, end: bool
    ) -> None:
        """A whole response at once, as far as the windows allow."""
        candidates = [m for m in self.serving() if m.status is None]
        if not candidates:
            return
        m = self.pick(data, candidates)
        self.send_head(m, status, length, planned, end, informational=False)
        if not m.response_ended:
            self.send_body(m, 1000, 16_384, end)
        if end and not m.response_ended and len(m.sent_body) == m.planned:
            self.server.end_stream(m.sid)
            m.response_ended = True
            self.server_sent()

    def send_head(
        self, m: MStream, status: bytes, length: str, planned: int, end: bool, informational: bool
    ) -> None:
        if informational:
            self.server.send_headers(m.sid, [(b":status", b"103"), (b"link", b"</a>")])
        declared = {"none": None, "right": planned, "less": planned - 1, "more": planned + 7}
        m.declared = declared[length]
        if m.declared is not None and m.declared < 0:
            m.declared = None
        m.planned = planned
        headers = [(b":status", status), (b"server", b"model")]
        if m.declared is not None:
            headers.append((b"content-length", b"%d" % m.declared))
        end = end and planned == 0
        self.server.send_headers(m.sid, headers, end_stream=end)
        m.status = status
        m.touched = True
        m.response_ended = end
        self.server_sent()

    @precondition(lambda self: self.server_up() and bool(self.serving()))
    @rule(
        data=st.data(),
        frames=st.sampled_from([1, 3, 80]),
        size=st.sampled_from([1, 1000, 16_384]),
        end=st.booleans(),
    )
    def server_data(self, data: st.DataObject, frames: int, size: int, end: bool) -> None:
        candidates = [
            m for m in self.serving() if m.status is not None and len(m.sent_body) < m.planned
        ]
        if not candidates:
            return
        self.send_body(self.pick(data, candidates), frames, size, end)

    def send_body(self, m: MStream, frames: int, size: int, end: bool) -> None:
        for _ in range(frames):
            room = min(
                m.planned - len(m.sent_body),
                self.server.local_flow_control_window(m.sid),
                self.server.max_outbound_frame_size,
                size,
            )
            if room <= 0:
                break
            chunk = pattern(m.sid + len(m.sent_body), room)
            last = end and len(m.sent_body) + room == m.planned
            self.server.send_data(m.sid, chunk, end_stream=last)
            m.sent_body += chunk
            m.response_ended = last
            if last:
                break
        self.server_sent()

    @precondition(lambda self: self.server_up() and bool(self.serving()))
    @rule(data=st.data(), trailers=st.booleans())
    def server_end(self, data: st.DataObject, trailers: bool) -> None:
        candidates = [
            m for m in self.serving() if m.status is not None and len(m.sent_body) == m.planned
        ]
        if not candidates:
            return
        m = self.pick(data, candidates)
        if trailers:
            self.server.send_headers(m.sid, [(b"x-trailer", b"1")], end_stream=True)
        else:
            self.server.end_stream(m.sid)
        m.response_ended = True
        self.server_sent()

    @precondition(lambda self: self.server_up())
    @rule(data=st.data(), code=st.sampled_from(RESET_CODES), act=sometimes)
    def server_reset(self, data: st.DataObject, code: int, act: bool) -> None:
        if not act:
            return
        candidates = [
            m
            for m in self.streams
            if m.seen
            and m.reset_code is None
            and not m.client_reset
            and not (m.response_ended and m.request_ended)
        ]
        if not candidates:
            return
        m = self.pick(data, candidates)
        self.server.reset_stream(m.sid, code)
        m.reset_code = code
        m.touched = True
        if code == ErrorCodes.REFUSED_STREAM and m.status is None:
            m.refused_before_head = True
            self.server_sent("refused", m.sid)
        else:
            self.server_sent()

    @precondition(lambda self: self.server_up())
    @rule(
        data=st.data(),
        which=st.sampled_from(["zero", "below", "highest", "max"]),
        code=st.sampled_from([ErrorCodes.NO_ERROR, ErrorCodes.ENHANCE_YOUR_CALM]),
        act=rarely,
    )
    def server_goaway(self, data: st.DataObject, which: str, code: ErrorCodes, act: bool) -> None:
        if not act:
            return
        seen = [m.sid for m in self.streams if m.seen]
        if which == "zero" or not seen:
            last = 0
        elif which == "below":
            last = data.draw(st.sampled_from(seen)) - 2
        elif which == "highest":
            last = max(seen)
        else:
            last = (1 << 31) - 1
        last = max(last, 0)
        frame = GoAwayFrame(0, last_stream_id=last, error_code=code).serialize()
        self.goaways.append(last)
        self.server_sent("goaway", last, extra=frame)

    @precondition(lambda self: self.server_up())
    @rule(
        setting=st.sampled_from(
            [
                (SettingCodes.MAX_CONCURRENT_STREAMS, 0),
                (SettingCodes.MAX_CONCURRENT_STREAMS, 1),
                (SettingCodes.MAX_CONCURRENT_STREAMS, 3),
                (SettingCodes.MAX_CONCURRENT_STREAMS, 1000),
                (SettingCodes.MAX_CONCURRENT_STREAMS, 1000),
                (SettingCodes.INITIAL_WINDOW_SIZE, 0),
                (SettingCodes.INITIAL_WINDOW_SIZE, 100),
                (SettingCodes.INITIAL_WINDOW_SIZE, 65_535),
                (SettingCodes.INITIAL_WINDOW_SIZE, 1 << 20),
                (SettingCodes.HEADER_TABLE_SIZE, 0),
                (SettingCodes.HEADER_TABLE_SIZE, 2**32 - 1),
                (SettingCodes.MAX_FRAME_SIZE, (1 << 24) - 1),
            ]
        )
    )
    def server_settings(self, setting: tuple[SettingCodes, int]) -> None:
        self.server_settings_sent[setting[0]] = setting[1]
        self.server.update_settings(dict(self.server_settings_sent))
        self.server_sent()

    @precondition(lambda self: self.server_up())
    @rule(count=st.sampled_from([0, 1, 1, 400]))
    def server_ping(self, count: int) -> None:
        """PINGs (a flood if the client writes nothing meanwhile), or an unknown frame."""
        for _ in range(count):
            self.counter += 1
            self.server.ping(self.counter.to_bytes(8, "big"))
        self.server_sent(extra=b"" if count else UNKNOWN_FRAME)

    # ------------------------------------------------------------------ checks

    def observe(self) -> None:
        """Record each stream's outcome when it first appears; it never changes after."""
        for m in self.streams:
            stream = m.stream
            assert not (stream.error is not None and stream.ended), m
            if m.error is not None:
                assert stream.error is m.error, (m, m.error, stream.error)
                continue
            if m.ended:
                assert stream.ended and stream.error is None, (m, stream.error)
                continue
            if stream.error is not None:
                error = m.error = stream.error
                assert isinstance(error, PoolError)
                if error.retryable:
                    # Only a request the server did not process.
                    assert m.status is None, (m, error)
                    assert m.refused_before_head or self.above_goaway(m.sid), (m, error)
            elif stream.ended:
                m.ended = True
                # Complete: the server ended it, with a well-formed head, and its body
                # adds up to the Content-Length it announced.
                assert m.response_ended, m
                assert m.status is not None and stream.response is not None
                assert m.status.isdigit() and 100 <= int(m.status) <= 599, m
                assert stream.response[0] == int(m.status), m
                if m.status != b"204":  # whose Content-Length is not its body's
                    assert m.declared is None or m.declared == len(m.sent_body), m

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "core"):
            return
        self.steps += 1
        core = self.core
        core.check_invariants()
        self.observe()
        # The state only moves forward; only an ACTIVE connection is ready.
        assert RANK[core.state] >= RANK[self.state], (self.state, core.state)
        self.state = core.state
        if core.state is not State.ACTIVE:
            assert not core.is_ready()
        if core.is_closed():
            assert all(m.outcome for m in self.streams)
        # Bounds on what the server can make us hold.
        total = 0
        for stream in core.streams.values():
            buffered = sum(len(chunk) for chunk in stream.chunks)
            assert buffered == stream.unacknowledged <= STREAM_WINDOW
            total += buffered
        assert total <= CONNECTION_WINDOW
        assert core.unsent_replies <= MAX_UNSENT_REPLIES + 2 * READ_SIZE or core.closed
        table = core.h2.encoder.header_table
        assert sum(32 + len(n) + len(v) for n, v in table.dynamic_entries) <= ENCODER_TABLE_LIMIT
        for m in self.streams:
            if m.gone:
                assert m.sid not in core.streams

    def teardown(self) -> None:
        if not hasattr(self, "core"):
            return
        self.core.close("the model ended")
        self.consistent()
        assert all(m.outcome for m in self.streams)


H2CoreModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("TRIO_CONNPOOL_H2_MODEL_EXAMPLES", "100")),
    stateful_step_count=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestH2CoreModel = H2CoreModel.TestCase
