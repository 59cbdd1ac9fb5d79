"""Where we lean on h2's and hpack's internals: every such place, in one module.

Each patch says what it changes, why, which versions it was checked against (h2 4.4.1,
hpack 4.2.0; ``pyproject.toml`` bounds both below their next major version), and which test
fails if a new version changes what it relies on. Nothing else in the package touches a
private attribute of h2 or hpack. The HTTP/2 core (`_h2core`) uses `PatchedH2Connection`
as it would use `h2.connection.H2Connection`, plus the few methods added here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import hpack
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import InformationalResponseReceived
from hyperframe.exceptions import InvalidPaddingError

if TYPE_CHECKING:
    from h2.events import Event
    from h2.stream import H2Stream
    from hpack.table import HeaderTable

__all__ = ["ENCODER_TABLE_LIMIT", "MAX_INFORMATIONAL", "PatchedH2Connection"]

# More 1xx responses than this on one stream are a protocol error (as in the HTTP/1.1 core).
MAX_INFORMATIONAL: Final = 5
# Our HPACK encoder's dynamic table never grows beyond this, whatever the server allows
# (the default of RFC 7541; a table the server sized at 4 GiB would keep every header value
# we ever sent).
ENCODER_TABLE_LIMIT: Final = 4096


class _GracefulStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that receiving GOAWAY does not close it.

    RFC 9113 section 6.8: after a GOAWAY the server still completes the streams up to its
    ``last_stream_id``. h2 4.x moves its connection state to CLOSED the moment it receives
    GOAWAY, and from then on every HEADERS or DATA frame for those streams raises
    `h2.exceptions.ProtocolError`. This is why clients built on h2 fail against servers that
    rotate connections with a graceful GOAWAY. Receiving GOAWAY here keeps the state as it
    was; the core opens no stream after GOAWAY itself.

    Relies on: the ``_transitions`` class dictionary of `H2ConnectionStateMachine` (h2 4.4.1).
    Fails if changed: ``test_goaway_then_last_response_succeeds_1181`` and
    ``test_goaway_workaround_is_needed_1181`` in ``tests/test_http2.py``.
    """

    _transitions = {  # noqa: RUF012 (same shape as the base class attribute)
        **H2ConnectionStateMachine._transitions,  # pyright: ignore[reportPrivateUsage]
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

    Relies on: ``HeaderTable.dynamic_entries`` (a deque, newest first) and ``maxsize``
    (hpack 4.2.0). Fails if changed: ``test_decoder_*`` in ``tests/test_http2.py``.
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
class _CappedRepeatingBlockEncoder(hpack.Encoder):
    """hpack's encoder with a capped dynamic table, remembering its last unchanging block.

    The cap: h2 sets ``header_table_size`` to whatever the server announces in
    SETTINGS_HEADER_TABLE_SIZE; we keep at most `ENCODER_TABLE_LIMIT` (an encoder may always
    use less than the decoder allows; the size update tells the server).

    The memory: the counterpart of `_RepeatingBlockDecoder` for requests. Repeated requests
    (the same method, authority, path and headers) encode, once their fields are in the
    dynamic table, to the same block of table references without changing the table, and
    that block is reused instead of encoded anew. The same rules decide when the table is
    unchanged; a table size change still to be announced, `hpack.HeaderTuple` instances
    (never-indexed fields among them) and anything but plain ``bytes`` pairs are always
    encoded.

    Relies on: the ``header_table_size`` property h2 assigns to, ``table_size_changes``, and
    ``HeaderTable.resized``/``dynamic_entries``/``maxsize`` (hpack 4.2.0, h2 4.4.1). Fails if
    changed: ``test_encoder_table_is_capped`` in ``tests/test_h2core.py`` and
    ``test_encoder_*`` in ``tests/test_http2.py``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._headers: list[tuple[bytes, bytes]] = []
        self._state: tuple[int, int, bool] | None = None
        self._front: tuple[bytes, bytes] | None = None
        self._block = b""

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        value = min(value, ENCODER_TABLE_LIMIT)
        if value == self.header_table.maxsize:
            return
        self.header_table.maxsize = value
        if self.header_table.resized:
            self.table_size_changes.append(value)

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


def _no_length_check(*_args: object) -> None:
    """Stands in for h2's per-stream content-length bookkeeping (see `PatchedH2Connection`)."""


class PatchedH2Connection(h2.connection.H2Connection):
    """The h2 connection the core drives: our settings and the patches listed here.

    - Graceful GOAWAY (`_GracefulStateMachine`), and ``clear_outbound_data_buffer`` a no-op:
      h2 drops its queued frames on GOAWAY, but acknowledgements and resets still go out.
    - `receive_frames` instead of ``receive_data``: the events of the frames before a bad
      one are kept, a frame header announcing more than our maximum frame size is refused
      before its body arrives, more than `MAX_INFORMATIONAL` 1xx responses on a stream are
      refused as they arrive, and the bytes h2 queued in reply are counted.
    - Content-Length is not checked by h2: h2 raises a *connection* error for a response body
      that does not match it, where RFC 9113 section 8.1.1 makes it a stream error. The core
      checks it per stream.
    - The HPACK encoder table is capped (`_CappedRepeatingBlockEncoder`), and both HPACK ends
      remember their last repeating block.
    - `forget_closed_stream` and a cheap ``open_outbound_streams`` keep h2's stream table at
      the streams in flight.
    - h2 remembers how each of the last `MAX_CLOSED_STREAMS` streams closed (to answer
      frames that arrive late for them): 65,536 by default, about 6 MiB on a long-lived
      connection. 4,096 cover any frame still in flight when a stream closed (the server
      would have to lag thousands of streams behind), in about 400 KiB. Relies on: h2 4.4.1
      sizing ``_closed_streams`` from this class attribute in ``__init__``. Fails if changed:
      ``test_closed_streams_are_remembered_within_a_bound`` in ``tests/test_h2core.py``.
    """

    MAX_CLOSED_STREAMS = 4096

    def __init__(self, local_settings: dict[h2.settings.SettingCodes, int]) -> None:
        # Outbound headers are built by the core from headers our models validated (names
        # lower-cased, no CR/LF/NUL, hop-by-hop ones dropped, pseudo-headers first): h2's
        # own outbound checks would repeat that work on every request. What the server sends
        # is still validated by h2.
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
        self.encoder = _CappedRepeatingBlockEncoder()
        self.local_settings = h2.settings.Settings(client=True, initial_values=local_settings)
        self.informational: dict[int, int] = {}  # 1xx responses so far, by open stream

    def clear_outbound_data_buffer(self) -> None:
        """Keep the queued frames: h2 drops them on GOAWAY, but we still send them.

        Relies on: h2 4.4.1 calling this method from its GOAWAY handling. Fails if changed:
        ``test_frames_queued_before_goaway_still_go_out_1181`` in ``tests/test_http2.py``.
        """

    def receive_frames(self, data: bytes | bytearray) -> tuple[list[Event], int, Exception | None]:
        """Feed ``data``; the events, the bytes queued in reply, and the error if any.

        Like ``receive_data``, but a `h2.exceptions.ProtocolError` is returned together with
        the events of the frames before it, not raised (h2 has queued its GOAWAY then), so
        complete responses that arrived in the same read are not lost. After the complete
        frames, a partial frame whose header announces more than our maximum frame size is
        refused at once (h2 would buffer all of it first).

        Relies on: ``incoming_buffer`` (a `h2.frame_buffer.FrameBuffer` iterated for frames,
        its unparsed bytes in ``_data``), ``_receive_frame``, ``_terminate_connection`` and the
        outbound buffer ``_data_to_send`` (h2 4.4.1). Fails if changed:
        ``tests/test_h2core.py::test_oversized_frame_is_refused_at_its_header`` and
        ``test_responses_before_a_protocol_error_are_kept``, and
        ``tests/test_http2_attacks.py::test_informational_flood_costs_bounded_cpu_per_byte_at_the_core``.
        """
        events: list[Event] = []
        outbound = self._data_to_send  # pyright: ignore[reportPrivateUsage]
        queued = len(outbound)
        buffer = self.incoming_buffer
        buffer.add_data(data)
        limit = buffer.max_frame_size = self.max_inbound_frame_size
        error: Exception | None = None
        try:
            for frame in buffer:
                produced = self._receive_frame(frame)  # pyright: ignore[reportPrivateUsage]
                events.extend(produced)
                if produced and type(produced[0]) is InformationalResponseReceived:
                    self._count_informational(produced[0].stream_id or 0)
            pending = buffer._data  # pyright: ignore[reportPrivateUsage]
            if len(pending) >= 9:
                length = int.from_bytes(pending[:3], "big")
                if length > limit:
                    raise h2.exceptions.FrameTooLargeError(
                        f"a frame announced {length} bytes, more than the {limit} allowed"
                    )
        except h2.exceptions.ProtocolError as exc:
            self._terminate_connection(exc.error_code)  # pyright: ignore[reportPrivateUsage]
            error = exc
        except InvalidPaddingError as exc:  # pragma: no cover (a ProtocolError)
            self._terminate_connection(ErrorCodes.PROTOCOL_ERROR)  # pyright: ignore[reportPrivateUsage]
            error = exc
        return events, len(self._data_to_send) - queued, error  # pyright: ignore[reportPrivateUsage]

    def _count_informational(self, stream_id: int) -> None:
        """Refuse more than `MAX_INFORMATIONAL` 1xx responses on a stream, as they arrive.

        A 1xx head of a few bytes can refer to the HPACK table for a header list of our full
        limit, which h2 validates byte by byte: thousands of them in one read would block
        the event loop for seconds. The check runs frame by frame, inside the read.
        """
        count = self.informational[stream_id] = self.informational.get(stream_id, 0) + 1
        if count > MAX_INFORMATIONAL:
            raise h2.exceptions.ProtocolError(
                f"more than {MAX_INFORMATIONAL} informational responses on stream {stream_id}"
            )

    def _begin_new_stream(self, stream_id: int, allowed_ids: object) -> H2Stream:
        """h2's stream, without its content-length bookkeeping (the core checks per stream).

        Relies on: `h2.stream.H2Stream` calling ``self._initialize_content_length(headers)``
        and ``self._track_content_length(length, end_stream)`` (h2 4.4.1). Fails if changed:
        ``test_content_length_mismatch_fails_only_its_stream`` in ``tests/test_h2core.py``.
        """
        stream = super()._begin_new_stream(stream_id, allowed_ids)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        stream._initialize_content_length = _no_length_check  # type: ignore[method-assign,assignment]  # pyright: ignore[reportAttributeAccessIssue]
        stream._track_content_length = _no_length_check  # type: ignore[method-assign,assignment]  # pyright: ignore[reportAttributeAccessIssue]
        return stream

    @property
    def open_outbound_streams(self) -> int:
        """What h2's `send_headers` compares with the server's limit before opening a stream.

        h2 counts the open streams by walking all of its streams (and forgets the closed ones
        on the way), once per new stream: a cost that grows with the streams in flight, paid
        by every request. Every open stream is among the streams h2 holds, so while their
        number leaves room under the server's limit it is returned as it is: an upper bound of
        the open streams that passes h2's check, as the exact count would. Only at the limit
        does h2 walk and count. Our own slot accounting reads `count_open_outbound_streams`,
        which is always exact.
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

        Relies on: ``_closed_streams`` (h2 4.4.1). Fails if changed:
        ``test_stream_count_is_right_however_streams_close`` in ``tests/test_http2.py``.
        """
        if self.informational:
            self.informational.pop(stream_id, None)
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by  # pyright: ignore[reportPrivateUsage]
