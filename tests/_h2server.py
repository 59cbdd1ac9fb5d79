"""A scripted HTTP/2 server for tests: a real `h2` server connection over any trio stream.

The server is driven step by step by the test (no task of its own): every method reads or
writes what the script asks for and records what it saw, so tests can assert on the frames
the client sent (pseudo-headers, RST_STREAM codes, GOAWAY, WINDOW_UPDATEs). Received DATA is
acknowledged at once by default, and the server keeps h2's default 65535-byte windows, so
flow control is exercised in both directions. Every loop is bounded.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import attrs
import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["ClientGone", "H2Server", "ServerStream"]

_MAX_STEPS = 100_000


class ClientGone(Exception):
    """The client closed the connection (EOF)."""


@attrs.define
class ServerStream:
    """What the server received on one stream."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytearray = attrs.field(factory=bytearray)
    ended: bool = False  # the request is complete (END_STREAM received)
    reset: ErrorCodes | int | None = None  # the client's RST_STREAM code
    responded: bool = False

    def header(self, name: bytes) -> bytes | None:
        """The value of ``name`` (a pseudo-header too), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class H2Server:
    """A real `h2.connection.H2Connection` server on ``stream``, driven by the test script.

    Args:
        stream: The server's end of the connection.
        settings: Extra local settings announced in the server preface.
        auto_ack: Acknowledge received DATA at once (WINDOW_UPDATE back to the client).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        settings: dict[h2.settings.SettingCodes, int] | None = None,
        auto_ack: bool = True,
    ) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if settings:
            values: dict[h2.settings.SettingCodes, int] = {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                **settings,
            }
            self.h2.local_settings = h2.settings.Settings(client=False, initial_values=values)
        self.auto_ack = auto_ack
        self.streams: dict[int, ServerStream] = {}
        self.events: list[h2.events.Event] = []
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.pings_acked: list[bytes] = []
        self.client_gone = False

    # ---- low level ---------------------------------------------------------------------

    async def start(self) -> None:
        """Send the server preface (our SETTINGS)."""
        self.h2.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        """Write what h2 has queued."""
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes h2 does not know about, after what it has queued, in one write."""
        await self.stream.send_all(self.h2.data_to_send() + data)

    async def receive(self) -> list[h2.events.Event]:
        """Read once, feed h2, record and return the events, flush h2's answers.

        Raises:
            ClientGone: At EOF.
        """
        data = await self.stream.receive_some(65536)
        if not data:
            self.client_gone = True
            raise ClientGone
        events = self.h2.receive_data(data)
        for event in events:
            self._record(event)
        await self.flush()
        return events

    def _record(self, event: h2.events.Event) -> None:
        self.events.append(event)
        if isinstance(event, h2.events.RequestReceived):
            headers = [(bytes(n), bytes(v)) for n, v in event.headers]
            self.streams[event.stream_id] = ServerStream(event.stream_id, headers)
            if event.stream_ended is not None:
                self.streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.DataReceived):
            self.streams[event.stream_id].body += event.data
            if self.auto_ack:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            if event.stream_id in self.streams:
                self.streams[event.stream_id].reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked.append(bytes(event.ping_data))

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Receive until ``condition()`` holds.

        Raises:
            ClientGone: If the client closed first.
        """
        for _ in range(_MAX_STEPS):
            if condition():
                return
            await self.receive()
        raise AssertionError("condition never became true")  # pragma: no cover

    async def receive_until_gone(self) -> None:
        """Keep receiving (answering PINGs, acknowledging data) until the client closes."""
        with contextlib.suppress(ClientGone):
            await self.wait_until(lambda: False)

    # ---- requests ----------------------------------------------------------------------

    def pending(self) -> list[ServerStream]:
        """Complete requests not answered yet, oldest first."""
        return [s for s in self.streams.values() if s.ended and not s.responded and not s.reset]

    async def wait_requests(self, count: int, *, complete: bool = True) -> list[ServerStream]:
        """Wait for ``count`` unanswered requests (complete ones if ``complete``)."""

        def ready() -> list[ServerStream]:
            return [
                s
                for s in self.streams.values()
                if not s.responded and s.reset is None and (s.ended or not complete)
            ]

        await self.wait_until(lambda: len(ready()) >= count)
        return ready()[:count]

    async def wait_request(self, *, complete: bool = True) -> ServerStream:
        """Wait for the next unanswered request."""
        (stream,) = await self.wait_requests(1, complete=complete)
        return stream

    async def send_headers(
        self,
        stream_id: int,
        status: int = 200,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        end_stream: bool = False,
    ) -> None:
        """Send a response head."""
        self.streams[stream_id].responded = True
        self.h2.send_headers(
            stream_id, [(b":status", str(status).encode()), *headers], end_stream=end_stream
        )
        await self.flush()

    async def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Send ``data`` as the client's windows allow, reading WINDOW_UPDATEs as needed."""
        view = memoryview(data)
        position = 0
        for _ in range(_MAX_STEPS):
            if position >= len(data):
                break
            position += await self.send_available(stream_id, bytes(view[position:]))
            if position < len(data):
                await self.receive()
        if end_stream:
            self.h2.end_stream(stream_id)
            await self.flush()

    async def send_available(self, stream_id: int, data: bytes) -> int:
        """Send as much of ``data`` as the windows allow now; return how much was sent."""
        window = self.h2.local_flow_control_window(stream_id)
        size = min(window, len(data))
        position = 0
        while position < size:
            end = min(position + self.h2.max_outbound_frame_size, size)
            self.h2.send_data(stream_id, data[position:end])
            position = end
        await self.flush()
        return size

    async def respond(
        self,
        stream_id: int,
        status: int = 200,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> None:
        """Send a whole response."""
        await self.send_headers(stream_id, status, headers, end_stream=not body)
        if body:
            await self.send_data(stream_id, body, end_stream=True)

    async def reply(
        self, status: int = 200, headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b""
    ) -> ServerStream:
        """The plain exchange: wait for the next request, then answer it whole."""
        request = await self.wait_request()
        await self.respond(request.stream_id, status, headers, body)
        return request

    async def reply_partly(self, part: bytes) -> ServerStream:
        """Wait for the next request, then send a head and ``part`` of a body, not its end."""
        request = await self.wait_request()
        await self.send_headers(request.stream_id)
        await self.send_data(request.stream_id, part)
        return request

    async def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.INTERNAL_ERROR) -> None:
        """Send RST_STREAM."""
        self.streams[stream_id].responded = True
        self.h2.reset_stream(stream_id, code)
        await self.flush()

    async def send_goaway(
        self,
        last_stream_id: int,
        code: ErrorCodes = ErrorCodes.NO_ERROR,
        *,
        ahead_of_queued: bool = False,
    ) -> None:
        """Send GOAWAY *behind h2's back*, so this server can still answer afterwards.

        (h2 closes its own state machine when it sends GOAWAY, as it does on receipt.) The
        frame goes in one write with what h2 has queued: after it, or ahead of it if
        ``ahead_of_queued``.
        """
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = code
        if ahead_of_queued:
            await self.stream.send_all(frame.serialize() + self.h2.data_to_send())
        else:
            await self.send_raw(frame.serialize())

    async def update_settings(self, settings: dict[h2.settings.SettingCodes | int, int]) -> None:
        """Send a SETTINGS frame."""
        self.h2.update_settings(settings)
        await self.flush()

    async def ping(self, payload: bytes = b"serverpg") -> None:
        """Send a PING (the client must acknowledge it)."""
        self.h2.ping(payload)
        await self.flush()

    async def serve(self, body: Callable[[ServerStream], bytes] | None = None) -> None:
        """Answer every complete request with 200 and ``body(request)`` until the client goes."""
        try:
            for _ in range(_MAX_STEPS):
                for stream in self.pending():
                    await self.respond(
                        stream.stream_id, body=body(stream) if body is not None else b"ok"
                    )
                await self.receive()
        except ClientGone:
            pass
