"""Decoding a response body: ``Content-Encoding`` (gzip, deflate), text, and lines. No I/O.

`ContentDecoder` undoes the codings a server applied, in reverse order, with a stated bound:
each `ContentDecoder.read` returns at most `MAX_DECODED_STEP` bytes (64 KiB), whatever the
input, because every stage decompresses with zlib's ``max_length`` and keeps the input it has
not used yet. So a few compressed bytes that expand to gigabytes (a "zip bomb") come out 64 KiB
at a time, and a streaming reader holds no more than that plus its input chunk. Reading the
whole body (`Response.aread`) still builds the whole decoded content: that is what it asks for.

Codings, as httpx names and reads them: ``gzip`` (and ``x-gzip``), ``deflate`` (zlib-wrapped
as RFC 9110 says, or raw deflate as some servers send it: the first bytes decide) and
``identity`` (nothing to do). An unknown coding (``br``, ``zstd``, ``compress``) is not
decoded: decoding stops at the last coding we cannot undo and the body comes out as it is
from there on (a body with only unknown codings comes out raw). A body with more than
`MAX_CODINGS` (5) codings to undo is a `DecodingError`: each would cost a zlib stream (and,
here, a stack frame), and a header of a few KiB can list thousands. Like httpx, bytes after the end
of a compressed stream are ignored; unlike httpx, a compressed stream that stops before its
end is an error (`DecodingError`), not a silently shortened body.

`LineDecoder` splits text on ``\\n``, ``\\r\\n`` and ``\\r`` (also when a ``\\r\\n`` is cut
between two chunks). httpx splits on everything `str.splitlines` does (form feed, U+2028, ...);
we don't, because those may appear inside a line of JSON or server-sent events. It holds the
line being read until its end arrives, up to `MAX_LINE_SIZE` characters by default: a longer
line, whether it arrives in pieces or whole, is a `DecodingError` (a server that sends one
endless line would otherwise take all the memory there is).
"""

from __future__ import annotations

import codecs
import re
import sys
import zlib
from typing import TYPE_CHECKING, Final, final

from .._exceptions import DecodingError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "MAX_DECODED_STEP",
    "MAX_LINE_SIZE",
    "ContentDecoder",
    "LineDecoder",
    "content_decoder",
]

MAX_DECODED_STEP: Final = 64 * 1024
"""The most decoded bytes one `ContentDecoder.read` returns."""

MAX_LINE_SIZE: Final = 1024 * 1024
"""The longest line, in characters, `LineDecoder` (so `Response.aiter_lines`) accepts by
default: what it may hold while the line's end has not arrived."""

MAX_CODINGS: Final = 5
"""The most codings one body may stack (as urllib3): each costs a zlib stream, and more than
a few are a server's attack or error, not a body to decode."""

# The codings we undo, by their lowercased name; "identity" is none at all.
_GZIP: Final = "gzip"
_DEFLATE: Final = "deflate"
_KNOWN: Final = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _DEFLATE}
_NEWLINE: Final = re.compile("\r\n|\r|\n")


@final
class _ZlibStage:
    """One coding to undo (gzip or deflate), fed compressed bytes, giving decoded ones."""

    __slots__ = ("_decompressor", "_kind", "_probing", "_seen", "_tail")

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._decompressor = zlib.decompressobj(
            zlib.MAX_WBITS | 16 if kind == _GZIP else zlib.MAX_WBITS
        )
        self._tail = b""  # input not used yet (zlib's unconsumed_tail, or a short first piece)
        self._seen = False  # any input at all
        # deflate only: the first bytes have not decided between zlib-wrapped and raw yet.
        self._probing = kind == _DEFLATE

    def feed(self, data: bytes) -> None:
        """Add input; only called once `step` has returned ``b""`` (all input used)."""
        if data:
            self._seen = True
            self._tail = self._tail + data if self._tail else data

    def step(self, limit: int, *, at_end: bool = False) -> bytes:
        """Decode at most ``limit`` bytes from the input; ``b""`` when it needs more input."""
        data = self._tail
        if self._probing:
            # A zlib header is two bytes: wait for both (unless the body ended).
            if len(data) < 2 and not at_end:
                return b""
            self._probing = False
            if data:
                try:
                    return self._decompress(data, limit)
                except zlib.error:
                    # Not zlib-wrapped: raw deflate, as httpx also accepts.
                    self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
        if not data and self._decompressor.eof:
            return b""
        try:
            return self._decompress(data, limit)
        except zlib.error as exc:
            raise DecodingError(f"invalid {self._kind} data in the response body: {exc}") from exc

    def _decompress(self, data: bytes, limit: int) -> bytes:
        decompressor = self._decompressor
        if decompressor.eof:
            self._tail = b""  # bytes after the end of the stream: ignored (as httpx)
            return b""
        out = decompressor.decompress(data, limit)
        self._tail = decompressor.unconsumed_tail
        return out

    def finish(self) -> None:
        """The input has ended (and `step` has returned ``b""``): check that the stream did."""
        if self._seen and not self._decompressor.eof:
            raise DecodingError(f"the {self._kind} data in the response body is truncated")


@final
class _TooManyCodings:
    """The stage of a body with more than `MAX_CODINGS` codings: its first read fails."""

    __slots__ = ("_count",)

    def __init__(self, count: int) -> None:
        self._count = count

    def feed(self, data: bytes) -> None:
        pass

    def step(self, limit: int, *, at_end: bool = False) -> bytes:
        raise DecodingError(
            f"the response body has {self._count} content codings; we undo at most {MAX_CODINGS}"
        )

    def finish(self) -> None:
        pass


@final
class ContentDecoder:
    """Undoes a body's content codings, at most `MAX_DECODED_STEP` bytes per `read`.

    Use: `feed` a chunk, then `read` until it returns ``b""`` (it needs more input); at the
    body's end call `finish`, `read` until ``b""`` again (a short first piece held back comes
    out now), then `check_end`. `decode_all` feeds and reads one chunk in one call.

    Args:
        codings: The codings in the order they were applied (``"gzip"`` or ``"deflate"``).
        limit: The most bytes one `read` returns.

    Raises:
        DecodingError: From `read` or `check_end`, if the data is corrupt or truncated, or
            from `read` if there are more than `MAX_CODINGS` codings.
    """

    __slots__ = ("_ended", "_limit", "_stages")

    def __init__(self, codings: list[str], *, limit: int = MAX_DECODED_STEP) -> None:
        # In the order they were applied; decoded in reverse.
        self._stages: list[_ZlibStage | _TooManyCodings] = (
            [_ZlibStage(kind) for kind in reversed(codings)]
            if len(codings) <= MAX_CODINGS
            else [_TooManyCodings(len(codings))]
        )
        self._limit = limit
        self._ended = False

    def feed(self, data: bytes) -> None:
        """Add a chunk of the encoded body (after `read` returned ``b""``)."""
        self._stages[0].feed(data)

    def read(self) -> bytes:
        """The next decoded piece, at most the limit; ``b""`` when more input is needed (or,
        after `finish`, when everything has come out)."""
        return self._pull(len(self._stages) - 1)

    def _pull(self, index: int) -> bytes:
        stage = self._stages[index]
        limit = self._limit
        while True:
            out = stage.step(limit)
            if out:
                return out
            # This stage needs input: from the stage before it, or from `feed`.
            upstream = self._pull(index - 1) if index else b""
            if not upstream:
                # Nothing more can come; at the body's end a stage still holding a short
                # first piece (see _ZlibStage.step) must decode it now.
                return stage.step(limit, at_end=True) if self._ended else b""
            stage.feed(upstream)

    def finish(self) -> None:
        """The body has ended: `read` now also drains what short first pieces held back."""
        self._ended = True

    def check_end(self) -> None:
        """After `finish` and a `read` that returned ``b""``: each stream must have ended."""
        for stage in self._stages:
            stage.finish()

    def decode_all(self, data: bytes) -> list[bytes]:
        """`feed` ``data`` and `read` everything it gives (unbounded: for a whole body)."""
        self.feed(data)
        pieces: list[bytes] = []
        while piece := self.read():
            pieces.append(piece)
        return pieces


def content_decoder(content_encoding: str) -> ContentDecoder | None:
    """The decoder for a ``Content-Encoding`` value, or None when there is nothing to undo.

    Codings are undone from the last one applied backwards, up to the first we don't know
    (the rest of the body is passed on as it is); ``identity`` is skipped.
    """
    codings: list[str] = []
    for name in content_encoding.split(","):
        name = name.strip().lower()
        if not name or name == "identity":
            continue
        kind = _KNOWN.get(name)
        if kind is None:
            codings.clear()  # what was applied before an unknown coding stays encoded
            continue
        codings.append(kind)
    return ContentDecoder(codings) if codings else None


@final
class LineDecoder:
    """Splits text arriving in pieces into lines ending with ``\\n``, ``\\r\\n`` or ``\\r``.

    Lines come out without their ending. A ``\\r`` at the end of a piece is held back until
    the next piece says whether a ``\\n`` follows. Holds the current unfinished line, up to
    ``max_line_size`` characters (None: no bound). A longer line raises `DecodingError`, as
    soon as the part of it received is longer; the lines before it come out first (the call
    that meets it returns them, and the next call raises), whatever the pieces were.
    """

    __slots__ = ("_buffer", "_held", "_max", "_overflowed", "_trailing_cr")

    def __init__(self, max_line_size: int | None = MAX_LINE_SIZE) -> None:
        self._buffer: list[str] = []
        self._held = 0  # the characters in _buffer
        self._max = max_line_size
        self._overflowed = False
        self._trailing_cr = False

    def decode(self, text: str) -> list[str]:
        """The lines that ``text`` completes."""
        if self._overflowed:
            self._too_long()
        if self._trailing_cr:
            text = "\r" + text
            self._trailing_cr = False
        if text.endswith("\r"):
            self._trailing_cr = True
            text = text[:-1]
        lines = _NEWLINE.split(text)
        limit = self._max
        if len(lines) == 1:
            if text:
                self._buffer.append(text)
                self._held += len(text)
                if limit is not None and self._held > limit:
                    self._too_long()
            return []
        if self._buffer:
            self._buffer.append(lines[0])
            lines[0] = "".join(self._buffer)
        last = lines.pop()
        self._buffer = [last] if last else []
        self._held = len(last)
        if limit is not None and (self._held > limit or max(map(len, lines)) > limit):
            self._buffer = []
            self._held = 0
            self._overflowed = True
            for index, line in enumerate(lines):
                if len(line) > limit:
                    del lines[index:]
                    break
            if not lines:
                self._too_long()
        return lines

    @property
    def overflowed(self) -> bool:
        """A line longer than the bound was met: the next call raises `DecodingError`."""
        return self._overflowed

    def _too_long(self) -> None:
        self._overflowed = True
        self._buffer = []
        self._held = 0
        bound = f"{self._max:,} characters"
        raise DecodingError(f"a line of the response body is longer than max_line_size ({bound})")

    def flush(self) -> list[str]:
        """At the end of the text: the last line, if it did not end with a line ending."""
        if self._overflowed:
            self._too_long()
        if not self._buffer and not self._trailing_cr:
            return []
        line = "".join(self._buffer)
        self._buffer = []
        self._held = 0
        self._trailing_cr = False
        return [line]


def text_decoder(encoding: str) -> codecs.IncrementalDecoder:
    """An incremental decoder for ``encoding`` that replaces invalid bytes (as httpx).

    For ``utf-16`` and ``utf-32`` a body without a byte order mark is decoded in the native
    order, as `bytes.decode` (so `Response.text`) does; Python's incremental decoders raise
    `UnicodeError` there instead.
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    name = codecs.lookup(encoding).name
    if name in _BOM_REQUIRED:
        return _NativeWithoutBom(decoder, name)
    return decoder


# Whose incremental decoders raise UnicodeError when the text starts without a BOM.
_BOM_REQUIRED: Final = frozenset({"utf-16", "utf-32"})


@final
class _NativeWithoutBom(codecs.IncrementalDecoder):
    """A utf-16 or utf-32 decoder that takes text without a BOM as native byte order."""

    def __init__(self, inner: codecs.IncrementalDecoder, name: str) -> None:
        super().__init__(errors="replace")
        self._inner = inner
        self._name = name
        self._switched = False

    def decode(self, input: Buffer, final: bool = False) -> str:
        try:
            return self._inner.decode(input, final)
        except UnicodeError:
            if self._switched:
                raise
            # Raised before it consumed anything: what it held is still in its state.
            held = self._inner.getstate()[0]
            order = "le" if sys.byteorder == "little" else "be"
            self._inner = codecs.getincrementaldecoder(f"{self._name}-{order}")(errors="replace")
            self._switched = True
            return self._inner.decode(held + input, final)
