"""The HTTP/2 core without an event loop: each rule of `_h2core` against a real h2 server.

The server is an `h2.connection.H2Connection` in the same thread; bytes move between it and
the core by hand, so every test says exactly what arrived in which read. Time is a number.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hpack.table import HeaderTable
from hyperframe.frame import PingFrame, SettingsFrame

from trio_connpool import RemoteProtocolError, ServerDisconnected
from trio_connpool.http import Origin
from trio_connpool.http._h2core import (
    MAX_REFUSALS_IN_A_ROW,
    MAX_UNSENT_REPLIES,
    RETIRE_AT_STREAM_ID,
    ZERO_CAPACITY_GRACE,
    H2Core,
    H2Stream,
    Received,
    State,
    StopSending,
    parse_content_length,
)
from trio_connpool.http._h2patches import ENCODER_TABLE_LIMIT, PatchedH2Connection

ORIGIN = Origin("https", "example.com", 443)
GET = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"example.com"),
    (b":path", b"/"),
]


class Pair:
    """Our core and an h2 server, bytes moved by hand."""

    def __init__(
        self, settings: dict[h2.settings.SettingCodes, int] | None = None, **core: float
    ) -> None:
        self.core = H2Core(ORIGIN, **core)  # type: ignore[arg-type]
        self.server = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if settings:
            self.server.local_settings = h2.settings.Settings(
                client=False, initial_values=settings
            )
        self.now = 0.0
        self.core.initiate(self.now)
        self.server.initiate_connection()
        self.to_server()
        self.to_client()
        self.to_server()

    def to_server(self) -> list[h2.events.Event]:
        return self.server.receive_data(self.core.data_to_send())

    def to_client(self, extra: bytes = b"") -> Received:
        result = self.core.receive(self.server.data_to_send() + extra, self.now)
        self.core.check_invariants()
        return result

    def open(
        self, headers: list[tuple[bytes, bytes]] = GET, *, end: bool = True, head: bool = False
    ) -> H2Stream:
        stream = self.core.open_stream(
            headers, end_stream=end, url="https://example.com/", head_only=head
        )
        self.to_server()
        return stream

    def respond(
        self,
        stream_id: int,
        status: bytes = b"200",
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.server.send_headers(
            stream_id, [(b":status", status), *(headers or [])], end_stream=not body
        )
        if body:
            self.server.send_data(stream_id, body, end_stream=True)


def read_all(core: H2Core, stream: H2Stream) -> bytes:
    body = b""
    while (chunk := core.next_chunk(stream)) is not None and chunk:
        body += chunk
    assert chunk == b""
    core.release(stream)
    return body


@pytest.mark.parametrize(
    ("status", "valid"),
    [
        (b"200", True),
        (b"204", True),
        (b"599", True),
        (b" 200 ", True),  # h2 strips surrounding blanks before anything else sees it
        (b"abc", False),
        (b"-1", False),
        (b"+200", False),
        (b"2_00", False),
        (b"0", False),
        (b"99999", False),
        (b"099", False),
        (b"20", False),
        (b"2000", False),
        (b"600", False),
        (b"\xd9\xa2\xd9\xa0\xd9\xa0", False),  # Arabic-Indic digits: not ASCII
    ],
)
def test_status_is_exactly_three_ascii_digits_from_200_to_599(status: bytes, valid: bool) -> None:
    pair = Pair()
    stream = pair.open()
    pair.server.send_headers(stream.stream_id, [(b":status", status)], end_stream=True)
    pair.to_client()
    if valid:
        assert stream.response is not None
        assert stream.response[0] == int(status)
    else:
        assert isinstance(stream.error, RemoteProtocolError)
        assert ":status" in str(stream.error)


def test_parse_content_length() -> None:
    assert parse_content_length([]) is None
    assert parse_content_length([b"10"]) == 10
    assert parse_content_length([b"10", b"10, 10"]) == 10
    for bad in ([b"-1"], [b"1 0"], [b"10", b"11"], [b""], [b"+5"], [b"9" * 20]):
        with pytest.raises(ValueError):
            parse_content_length(bad)


def test_a_complete_exchange() -> None:
    pair = Pair()
    stream = pair.open()
    pair.respond(stream.stream_id, body=b"hello")
    result = pair.to_client()
    assert stream in result.streams
    assert stream.response == (200, [])
    assert read_all(pair.core, stream) == b"hello"
    assert pair.core.completed == 1
    assert not pair.core.streams


@pytest.mark.parametrize("status", [b"abc", b"-1", b"+200", b"2_00", b"099", b"2000", b"600"])
def test_malformed_status_fails_only_its_stream(status: bytes) -> None:
    pair = Pair()
    bad, good = pair.open(), pair.open()
    pair.server.send_headers(bad.stream_id, [(b":status", status)])
    pair.respond(good.stream_id, body=b"fine")
    pair.to_client()
    assert isinstance(bad.error, RemoteProtocolError)
    assert not bad.error.retryable
    assert ":status" in str(bad.error)
    assert read_all(pair.core, good) == b"fine"
    assert pair.core.state is State.ACTIVE
    events = pair.to_server()
    assert any(
        isinstance(e, h2.events.StreamReset) and e.error_code == ErrorCodes.PROTOCOL_ERROR
        for e in events
    )


@pytest.mark.parametrize(
    ("length", "body", "end_with_head"),
    [(b"100", b"", True), (b"10", b"short", False), (b"3", b"too long", False), (b"x", b"", True)],
)
def test_content_length_mismatch_fails_only_its_stream(
    length: bytes, body: bytes, end_with_head: bool
) -> None:
    pair = Pair()
    bad, good = pair.open(), pair.open()
    pair.server.send_headers(
        bad.stream_id,
        [(b":status", b"200"), (b"content-length", length)],
        end_stream=end_with_head,
    )
    if not end_with_head:
        pair.server.send_data(bad.stream_id, body, end_stream=True)
    pair.respond(good.stream_id, body=b"fine", headers=[(b"content-length", b"4")])
    pair.to_client()
    assert isinstance(bad.error, RemoteProtocolError), bad.error
    assert "content-length" in str(bad.error)
    assert read_all(pair.core, good) == b"fine"
    assert pair.core.state is State.ACTIVE


def test_head_and_204_304_responses_are_exempt_from_content_length() -> None:
    pair = Pair()
    head = pair.open(head=True)
    pair.server.send_headers(
        head.stream_id, [(b":status", b"200"), (b"content-length", b"100")], end_stream=True
    )
    pair.to_client()
    assert read_all(pair.core, head) == b""
    for status in (b"204", b"304"):
        stream = pair.open()
        pair.server.send_headers(
            stream.stream_id, [(b":status", status), (b"content-length", b"100")], end_stream=True
        )
        pair.to_client()
        assert read_all(pair.core, stream) == b""


def test_refused_stream_is_retryable_and_too_many_in_a_row_retire_the_connection() -> None:
    pair = Pair()
    for count in range(1, MAX_REFUSALS_IN_A_ROW + 1):
        assert pair.core.is_ready()
        stream = pair.open()
        pair.server.reset_stream(stream.stream_id, ErrorCodes.REFUSED_STREAM)
        pair.to_client()
        assert isinstance(stream.error, RemoteProtocolError)
        assert stream.error.retryable
        pair.core.abandon(stream)
        assert pair.core.refusals_in_a_row == count
    assert not pair.core.is_ready()
    assert pair.core.state is State.DRAINING
    assert "refused" in (pair.core.reason or "")
    assert pair.core.drained()
    with pytest.raises(RemoteProtocolError) as info:
        pair.open()
    assert info.value.retryable


def test_a_completed_stream_resets_the_refusal_count() -> None:
    pair = Pair()
    for _ in range(3):
        for _ in range(MAX_REFUSALS_IN_A_ROW - 1):
            stream = pair.open()
            pair.server.reset_stream(stream.stream_id, ErrorCodes.REFUSED_STREAM)
            pair.to_client()
            pair.core.abandon(stream)
        stream = pair.open()
        pair.respond(stream.stream_id, body=b"ok")
        pair.to_client()
        assert read_all(pair.core, stream) == b"ok"
    assert pair.core.is_ready()


def test_refused_after_the_response_head_is_not_retryable() -> None:
    pair = Pair()
    stream = pair.open()
    pair.server.send_headers(stream.stream_id, [(b":status", b"200")])
    pair.server.reset_stream(stream.stream_id, ErrorCodes.REFUSED_STREAM)
    pair.to_client()
    assert isinstance(stream.error, RemoteProtocolError)
    assert not stream.error.retryable
    assert pair.core.refusals_in_a_row == 0


def test_goaway_keeps_a_complete_response_above_its_last_stream() -> None:
    pair = Pair()
    first, second, third = pair.open(), pair.open(), pair.open()
    pair.respond(second.stream_id, body=b"done")
    pair.server.send_headers(third.stream_id, [(b":status", b"200")])
    pair.server.close_connection(last_stream_id=first.stream_id)
    pair.to_client()
    assert pair.core.state is State.DRAINING
    assert first.error is None  # below the last id: still served
    assert read_all(pair.core, second) == b"done"
    assert isinstance(third.error, RemoteProtocolError)
    assert not third.error.retryable  # a response had started: it was processed


def test_goaway_fails_unanswered_streams_above_its_last_as_retryable() -> None:
    pair = Pair()
    stream = pair.open()
    pair.server.close_connection(last_stream_id=0)
    pair.to_client()
    assert isinstance(stream.error, RemoteProtocolError)
    assert stream.error.retryable
    assert type(stream.error).__name__ == "RemoteProtocolError"


def test_responses_before_a_protocol_error_are_kept() -> None:
    pair = Pair()
    done, pending = pair.open(), pair.open()
    pair.respond(done.stream_id, body=b"complete")
    # DATA on stream 0 is a connection error.
    result = pair.to_client(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert pair.core.state is State.FAILED
    assert pair.core.can_send  # the GOAWAY h2 queued may go out
    assert done in result.streams
    assert read_all(pair.core, done) == b"complete"
    assert isinstance(pending.error, ServerDisconnected)


def test_oversized_frame_is_refused_at_its_header() -> None:
    pair = Pair()
    stream = pair.open()
    header = (
        (4 * 1024 * 1024).to_bytes(3, "big") + bytes([0, 0]) + stream.stream_id.to_bytes(4, "big")
    )
    pair.core.receive(header, pair.now)
    assert pair.core.state is State.FAILED
    assert "frame" in (pair.core.reason or "")
    assert isinstance(stream.error, ServerDisconnected)


def test_encoder_table_is_capped() -> None:
    pair = Pair(settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**32 - 1})
    for i in range(200):
        stream = pair.open([*GET, (b"x-unique", b"%d" % i * 50)])
        pair.respond(stream.stream_id)
        pair.to_client()
        read_all(pair.core, stream)
    assert pair.core.h2.encoder.header_table_size == ENCODER_TABLE_LIMIT
    assert _table_size(pair.core.h2.encoder.header_table) <= ENCODER_TABLE_LIMIT
    # The server's decoder mirrors our table: it agrees.
    assert _table_size(pair.server.decoder.header_table) <= ENCODER_TABLE_LIMIT
    assert pair.server.decoder.header_table.maxsize == ENCODER_TABLE_LIMIT


def _table_size(table: HeaderTable) -> int:
    """The size of an HPACK dynamic table as RFC 7541 section 4.1 counts it."""
    return sum(32 + len(name) + len(value) for name, value in table.dynamic_entries)


def test_ping_flood_while_nothing_is_written_fails_the_connection() -> None:
    pair = Pair()
    stream = pair.open()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    sent = 0
    # Nothing is written meanwhile: data_to_send() is not called.
    while pair.core.state is State.ACTIVE:
        pair.core.receive(ping * 100, pair.now)
        sent += 100
        assert sent < 10 * MAX_UNSENT_REPLIES
    assert "flood" in (pair.core.reason or "")
    assert isinstance(stream.error, ServerDisconnected)
    assert not pair.core.data_to_send()  # nothing more goes out to a flooding peer


def test_settings_flood_is_bounded_too() -> None:
    pair = Pair()
    settings = SettingsFrame(
        0, settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10}
    ).serialize()
    for _ in range(10 * MAX_UNSENT_REPLIES // len(settings)):
        pair.core.receive(settings, pair.now)
        if pair.core.state is not State.ACTIVE:
            break
    assert "flood" in (pair.core.reason or "")


def test_replies_written_in_time_are_no_flood() -> None:
    pair = Pair()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    for _ in range(100):
        pair.core.receive(ping * 100, pair.now)
        assert pair.core.data_to_send()
    assert pair.core.state is State.ACTIVE


def test_a_read_timeout_with_nothing_received_makes_the_connection_suspect() -> None:
    pair = Pair(ping_timeout=2.0)
    stream = pair.open()
    pair.now = 5.0
    assert pair.core.read_timed_out(since=0.5, now=pair.now)
    assert not pair.core.is_ready()
    assert pair.core.state is State.ACTIVE
    assert pair.core.deadline == 7.0
    assert not pair.core.read_timed_out(since=0.5, now=pair.now)  # one PING at a time
    events = pair.to_server()
    assert any(isinstance(e, h2.events.PingReceived) for e in events)
    pair.to_client()  # the acknowledgement
    assert pair.core.is_ready()
    assert stream.error is None
    pair.core.on_timer(7.0)
    assert pair.core.state is State.ACTIVE


def test_an_unanswered_suspect_ping_fails_the_connection() -> None:
    pair = Pair(ping_timeout=2.0)
    stream = pair.open()
    assert pair.core.read_timed_out(since=0.5, now=5.0)
    pair.core.on_timer(6.9)
    assert not pair.core.is_closed()
    pair.core.on_timer(7.0)
    assert pair.core.state is State.FAILED
    assert "PING" in (pair.core.reason or "")
    assert isinstance(stream.error, ServerDisconnected)


def test_a_read_timeout_after_data_arrived_is_no_suspicion() -> None:
    pair = Pair()
    pair.open()
    pair.now = 3.0
    pair.server.ping(b"serverpg")
    pair.to_client()
    assert not pair.core.read_timed_out(since=2.0, now=5.0)
    assert pair.core.is_ready()


def test_keepalive_ping_then_failure_without_answer() -> None:
    pair = Pair(ping_interval=10.0, ping_timeout=2.0)
    assert pair.core.deadline == 10.0
    pair.core.on_timer(10.0)
    assert pair.core.keepalive is not None
    assert pair.core.deadline == 12.0
    pair.core.on_timer(12.0)
    assert pair.core.state is State.FAILED


def test_zero_capacity_for_the_grace_period_retires_the_connection() -> None:
    pair = Pair(settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    assert pair.core.capacity == 0
    assert pair.core.zero_capacity_since == 0.0
    assert pair.core.deadline == ZERO_CAPACITY_GRACE
    pair.core.on_timer(ZERO_CAPACITY_GRACE / 2)
    assert pair.core.is_ready()
    pair.core.on_timer(ZERO_CAPACITY_GRACE)
    assert pair.core.state is State.DRAINING
    assert pair.core.drained()


def test_capacity_raised_in_time_keeps_the_connection() -> None:
    pair = Pair(settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    pair.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 5})
    pair.to_client()
    assert pair.core.capacity == 5
    assert pair.core.zero_capacity_since is None
    pair.core.on_timer(ZERO_CAPACITY_GRACE)
    assert pair.core.is_ready()


def test_the_connection_retires_before_its_stream_ids_run_out() -> None:
    pair = Pair()
    pair.core.h2.highest_outbound_stream_id = RETIRE_AT_STREAM_ID - 4
    pair.server.highest_inbound_stream_id = RETIRE_AT_STREAM_ID - 4
    first = pair.open()
    assert pair.core.is_ready()
    last = pair.open()
    assert last.stream_id >= RETIRE_AT_STREAM_ID
    assert pair.core.state is State.DRAINING
    with pytest.raises(RemoteProtocolError) as info:
        pair.open()
    assert info.value.retryable
    for stream in (first, last):
        pair.respond(stream.stream_id, body=b"ok")
    pair.to_client()
    assert read_all(pair.core, first) == read_all(pair.core, last) == b"ok"
    assert pair.core.drained()


def test_a_complete_response_ends_an_upload_only_when_the_window_is_spent() -> None:
    pair = Pair()
    stream = pair.open([(b":method", b"POST"), *GET[1:]], end=False)
    body = memoryview(b"x" * 100_000)
    sent = pair.core.send_data(stream, body, 1 << 20)
    assert sent == 65535  # the server's default window
    pair.to_server()
    pair.respond(stream.stream_id, status=b"413", body=b"too big")
    pair.to_client()
    assert stream.ended
    with pytest.raises(StopSending):
        pair.core.send_window(stream)
    pair.core.stop_upload(stream)
    events = pair.to_server()
    assert any(
        isinstance(e, h2.events.StreamReset) and e.error_code == ErrorCodes.CANCEL for e in events
    )
    assert read_all(pair.core, stream) == b"too big"


def test_a_complete_response_survives_the_connection_failing() -> None:
    pair = Pair()
    stream = pair.open([(b":method", b"POST"), *GET[1:]], end=False)
    pair.respond(stream.stream_id, status=b"413", body=b"no")
    pair.to_client()
    pair.core.fail("the connection broke", None)
    assert stream.error is None
    assert stream.ended


def test_close_fails_open_streams_once_and_queues_goaway() -> None:
    pair = Pair()
    stream = pair.open()
    assert pair.core.close("closed locally")
    assert stream.error is not None
    error = stream.error
    assert not pair.core.close("again")
    pair.core.fail("later", None)
    assert stream.error is error
    assert pair.core.state is State.CLOSED
    events = pair.to_server()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def test_closed_streams_are_remembered_within_a_bound() -> None:
    pair = Pair()
    for _ in range(5000):
        stream = pair.open()
        pair.respond(stream.stream_id)
        pair.to_client()
        assert read_all(pair.core, stream) == b""
    remembered = pair.core.h2._closed_streams  # pyright: ignore[reportPrivateUsage]
    assert len(remembered) == PatchedH2Connection.MAX_CLOSED_STREAMS == 4096
