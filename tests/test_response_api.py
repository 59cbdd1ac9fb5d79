"""The response side of the httpx-like API: json, raise_for_status, the status tests, elapsed,
encoding, aiter_text / aiter_lines / aiter_raw, and Content-Encoding decoding (gzip, deflate)
with its per-step bound.

The decoders are tested without an event loop; everything else against real servers on
127.0.0.1 (hypercorn over HTTP/1.1 and h2c, and the scripted FaultServer for exact bytes), plus
a fake stream where exact chunk boundaries matter (TCP does not keep them).
"""

from __future__ import annotations

import datetime
import gzip
import itertools
import json
import math
import re
import tracemalloc
import zlib
from typing import Any

import h11
import pytest
import trio
import trio.testing
from _servers import (
    WAIT,
    CountingApp,
    Receive,
    Scope,
    Send,
    ServerConnection,
    assert_pool_balanced,
    run_fault_server,
    serve_hypercorn,
)
from hypothesis import given, strategies as st

import trio_connpool
from trio_connpool import DecodingError, HTTPStatusError, PoolError, RemoteProtocolError
from trio_connpool.http import NoPoolSender, Request, Response, open_client
from trio_connpool.http._decoders import (
    MAX_DECODED_STEP,
    ContentDecoder,
    LineDecoder,
    content_decoder,
)

MiB = 1024 * 1024
TEXT = "Grüße, naïve café — ✓\n" * 50


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _decode(decoder: ContentDecoder, chunks: list[bytes]) -> list[bytes]:
    """Feed ``chunks`` one by one and read everything, as a streaming reader does."""
    out: list[bytes] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while piece := decoder.read():
            out.append(piece)
    decoder.finish()
    while piece := decoder.read():
        out.append(piece)
    decoder.check_end()
    return out


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _decoder(value: str) -> ContentDecoder:
    decoder = content_decoder(value)
    assert decoder is not None
    return decoder


# ---- the decoders, no event loop -------------------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 says
        ("deflate", _raw_deflate),  # raw, as some servers send it
        ("identity, gzip", gzip.compress),
    ],
)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_decoder_round_trip(coding: str, encode: Any, split: str) -> None:
    body = TEXT.encode() * 20
    encoded = encode(body)
    chunks = [encoded] if split == "whole" else _bytewise(encoded)
    assert b"".join(_decode(_decoder(coding), chunks)) == body


def test_several_codings_are_undone_last_first() -> None:
    body = b"layers " * 10_000
    # "deflate, gzip": deflate was applied first, then gzip.
    encoded = gzip.compress(zlib.compress(body))
    assert b"".join(_decode(_decoder("deflate, gzip"), [encoded])) == body
    twice = gzip.compress(gzip.compress(body))
    assert b"".join(_decode(_decoder("gzip, gzip"), _bytewise(twice))) == body
    # The same header given as two fields joins to the same value.
    assert b"".join(_decode(_decoder("gzip ,  GZIP"), [twice])) == body


@pytest.mark.parametrize("value", ["identity", "", "br", "zstd", "gzip, br", "compress"])
def test_nothing_to_undo_means_no_decoder(value: str) -> None:
    # Unknown codings are not decoded, and neither is anything applied before them.
    assert content_decoder(value) is None


def test_decoding_stops_at_an_unknown_coding() -> None:
    # "br, gzip": br first, then gzip: we undo the gzip and pass the br data on.
    inner = b"\x8b\x02\x80pretend-brotli\x03"
    decoder = _decoder("br, gzip")
    assert b"".join(_decode(decoder, [gzip.compress(inner)])) == inner


def test_a_bomb_comes_out_in_bounded_pieces() -> None:
    size = 10 * MiB
    bomb = gzip.compress(bytes(size))
    assert len(bomb) < 20_000  # a few KiB expanding 500-fold
    decoder = _decoder("gzip, gzip")
    pieces = _decode(decoder, [gzip.compress(bomb)])
    assert max(len(piece) for piece in pieces) == MAX_DECODED_STEP == 64 * 1024
    assert sum(len(piece) for piece in pieces) == size
    # One read: one bounded piece, even though the whole input is already there.
    decoder = _decoder("gzip")
    decoder.feed(bomb)
    assert len(decoder.read()) == MAX_DECODED_STEP


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", b"this is not gzip at all"),
        ("gzip", gzip.compress(b"abc" * 1000)[:10] + b"\xff" * 64),
        ("deflate", b"\xff\xfe\xfd not deflate either"),
    ],
)
def test_corrupt_data_is_a_decoding_error(coding: str, data: bytes) -> None:
    with pytest.raises(DecodingError, match=f"invalid {coding} data"):
        _decode(_decoder(coding), [data])


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_truncated_data_is_a_decoding_error(coding: str) -> None:
    encoded = (gzip.compress if coding == "gzip" else zlib.compress)(b"abc" * 10_000)
    with pytest.raises(DecodingError, match="truncated"):
        _decode(_decoder(coding), [encoded[:-6]])


def test_empty_body_and_trailing_bytes() -> None:
    # A HEAD, 204 or 304 response says gzip and sends nothing: nothing to complain about.
    assert _decode(_decoder("gzip"), []) == []
    assert _decode(_decoder("deflate"), [b""]) == []
    # Bytes after the end of the compressed stream are ignored, as httpx does.
    assert b"".join(_decode(_decoder("gzip"), [gzip.compress(b"x") + b"junk"])) == b"x"
    # A one-byte first chunk of deflate waits for the second before choosing zlib or raw.
    assert b"".join(_decode(_decoder("deflate"), _bytewise(_raw_deflate(b"y" * 9)))) == b"y" * 9


def test_decoding_error_is_a_remote_protocol_error() -> None:
    assert issubclass(DecodingError, RemoteProtocolError)
    assert issubclass(HTTPStatusError, PoolError)
    assert trio_connpool.DecodingError is DecodingError
    assert DecodingError.__module__ == HTTPStatusError.__module__ == "trio_connpool"


def _lines(pieces: list[str]) -> list[str]:
    decoder = LineDecoder()
    lines: list[str] = []
    for piece in pieces:
        lines += decoder.decode(piece)
    return lines + decoder.flush()


@pytest.mark.parametrize(
    ("pieces", "lines"),
    [
        (["a\nb\r\nc\rd"], ["a", "b", "c", "d"]),
        (["a\r", "\nb"], ["a", "b"]),  # \r\n cut between chunks: one ending
        (["a\r", "b\r", "\r\n"], ["a", "b", ""]),
        (["a\n\n", "\n"], ["a", "", ""]),
        (["par", "tial", " line"], ["partial line"]),
        (["ends\n"], ["ends"]),
        (["ends\r"], ["ends"]),
        (["\r"], [""]),
        ([], []),
        # Unlike str.splitlines (and httpx), only \n, \r\n and \r end a line.
        (['{"s": "a\u2028b\x0cc"}\n'], ['{"s": "a\u2028b\x0cc"}']),
    ],
)
def test_line_decoder(pieces: list[str], lines: list[str]) -> None:
    assert _lines(pieces) == lines


@given(
    text=st.text(alphabet="ab\r\n", max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    limit=st.integers(1, 8),
)
def test_line_decoder_bound_does_not_depend_on_the_pieces(
    text: str, cuts: list[int], limit: int
) -> None:
    """Whatever the pieces, the lines that come out are those before the first line longer
    than the bound; then DecodingError, if there is such a line (a last line without an
    ending counts)."""
    expected = re.split("\r\n|\r|\n", text)
    if expected[-1] == "":
        expected.pop()
    first_long = next((i for i, line in enumerate(expected) if len(line) > limit), None)
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    decoder = LineDecoder(limit)
    got: list[str] = []
    try:
        for piece in pieces:
            got += decoder.decode(piece)
        got += decoder.flush()
    except DecodingError:
        assert first_long is not None
        assert got == expected[:first_long]
        with pytest.raises(DecodingError, match=f"max_line_size \\({limit:,}"):
            decoder.flush()  # and it stays failed
    else:
        assert first_long is None
        assert got == expected


# ---- status, without an event loop -----------------------------------------------------------


def _response(status: int, headers: list[tuple[str, str]] | None = None) -> Response:
    request = Request("GET", "http://127.0.0.1:9/some/path?q=1")
    return Response(status, request=request, headers=headers)


@pytest.mark.parametrize(
    ("status", "flags"),
    [
        (101, "informational"),
        (200, "success"),
        (299, "success"),
        (304, "redirect"),
        (404, "client_error error"),
        (503, "server_error error"),
    ],
)
def test_status_properties(status: int, flags: str) -> None:
    response = _response(status)
    names = ["informational", "success", "redirect", "client_error", "server_error", "error"]
    assert {name for name in names if getattr(response, f"is_{name}")} == set(flags.split())


def test_redirect_location_needs_a_followable_status_and_a_location() -> None:
    assert _response(302, [("Location", "/next")]).has_redirect_location
    assert not _response(302).has_redirect_location
    assert not _response(304, [("Location", "/next")]).has_redirect_location
    assert _response(304, [("Location", "/next")]).is_redirect  # 3xx, as httpx's


def test_raise_for_status() -> None:
    ok = _response(204)
    assert ok.raise_for_status() is ok
    response = _response(404)
    with pytest.raises(HTTPStatusError) as caught:
        response.raise_for_status()
    error = caught.value
    assert error.response is response
    assert error.request is response.request
    assert error.url == "http://127.0.0.1:9/some/path?q=1"
    assert str(error).splitlines() == [
        "Client error '404 Not Found' for url 'http://127.0.0.1:9/some/path?q=1'",
        "For more information check: https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/404",
    ]
    # A redirect raises too (as httpx's), naming where it points.
    with pytest.raises(HTTPStatusError, match="Redirect response '301 Moved Permanently'") as c:
        _response(301, [("Location", "/elsewhere")]).raise_for_status()
    assert "Redirect location: '/elsewhere'" in str(c.value)
    with pytest.raises(HTTPStatusError, match="Server error '599 '"):
        _response(599).raise_for_status()


def test_elapsed_and_encoding_before_the_body() -> None:
    response = _response(200, [("Content-Type", "text/plain; charset=ISO-8859-1")])
    with pytest.raises(RuntimeError, match="read or closed"):
        _ = response.elapsed
    response.elapsed = datetime.timedelta(seconds=1.5)  # settable, as httpx's
    assert response.elapsed == datetime.timedelta(seconds=1.5)
    assert response.encoding == "iso8859-1"
    response.encoding = "utf-16"
    assert response.encoding == "utf-16"
    with pytest.raises(LookupError):
        response.encoding = "no-such-codec"
    assert _response(200).encoding == "utf-8"
    assert _response(200, [("Content-Type", "text/x; charset=bogus")]).encoding == "utf-8"


# ---- a fake stream: exact chunk boundaries ----------------------------------------------------


class ChunkStream:
    """A `ResponseStream` that yields exactly the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.closed = False
        self.closed_without_waiting = False

    async def receive_some(self) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    def receive_buffered(self) -> bytes | None:
        return None

    async def aclose(self) -> None:
        self.closed = True  # released even when cancelled, as trio's aclose contract says
        # Asked to close at once: a connection's stream then drains only what has arrived.
        self.closed_without_waiting = trio.current_effective_deadline() == -math.inf
        await trio.lowlevel.checkpoint()


def _streamed(chunks: list[bytes], headers: list[tuple[str, str]] | None = None) -> Response:
    request = Request("GET", "http://127.0.0.1:9/")
    return Response(200, request=request, headers=headers, stream=ChunkStream(chunks))


async def test_aiter_text_joins_characters_cut_between_chunks() -> None:
    data = "é✓".encode()  # 2 + 3 bytes
    response = _streamed([*_bytewise(data), b"\xff", b"ok"])
    texts = [text async for text in response.aiter_text()]
    assert texts == ["é", "✓", "\ufffd", "ok"]
    latin = _streamed([b"caf\xe9"], [("Content-Type", "text/plain; charset=latin-1")])
    assert [text async for text in latin.aiter_text()] == ["café"]
    chosen = _streamed([b"caf\xe9"])
    chosen.encoding = "cp1252"
    assert [text async for text in chosen.aiter_text()] == ["café"]


async def test_aiter_lines_across_chunks() -> None:
    response = _streamed([b"one\r", b"\ntwo\rthr", b"ee\n\nfo", "ür".encode()])
    assert [line async for line in response.aiter_lines()] == ["one", "two", "three", "", "foür"]


async def test_every_step_is_a_checkpoint_even_from_one_chunk() -> None:
    # One received chunk that decodes into several pieces, text and lines: each step of
    # each iterator is a checkpoint, also when no I/O was needed.
    body = b"line\n" * 30_000  # 150 000 bytes: 3 decoded pieces
    for kind, steps in (("bytes", 3), ("text", 3), ("lines", 30_000)):
        response = _streamed([gzip.compress(body)], [("Content-Encoding", "gzip")])
        iterator = {
            "bytes": response.aiter_bytes,
            "text": response.aiter_text,
            "lines": response.aiter_lines,
        }[kind]()
        for _ in range(steps):
            with trio.testing.assert_checkpoints():
                await iterator.__anext__()
        for _ in range(2):  # the end, and asking again after it
            with trio.testing.assert_checkpoints(), pytest.raises(StopAsyncIteration):
                await iterator.__anext__()


async def test_aread_after_corrupt_data_closes_the_stream_and_names_the_url() -> None:
    response = _streamed([b"garbage!", b"more"], [("Content-Encoding", "gzip")])
    with pytest.raises(DecodingError, match="invalid gzip data") as caught:
        await response.aread()
    assert caught.value.url == "http://127.0.0.1:9/"
    assert response.is_closed
    stream = response.stream
    assert isinstance(stream, ChunkStream)
    assert stream.closed
    assert stream.closed_without_waiting
    assert stream.chunks == [b"more"]  # stopped at once: the rest was never read


async def test_aiter_raw_then_nothing_else() -> None:
    encoded = gzip.compress(b"raw")
    response = _streamed([encoded], [("Content-Encoding", "gzip")])
    assert b"".join([chunk async for chunk in response.aiter_raw()]) == encoded
    with pytest.raises(RuntimeError, match="already been read"):
        await response.aread()
    read = _streamed([encoded], [("Content-Encoding", "gzip")])
    assert await read.aread() == b"raw"
    # After aread the decoded content is kept; the raw bytes are not.
    assert [chunk async for chunk in read.aiter_bytes()] == [b"raw"]
    assert [text async for text in read.aiter_text()] == ["raw"]
    with pytest.raises(RuntimeError):
        await read.aiter_raw().__anext__()


# ---- real servers ----------------------------------------------------------------------------


class EncodingApp(CountingApp):
    """Routes: ``/gzip`` `TEXT` gzipped, ``/deflate`` zlib-wrapped, ``/json`` gzipped JSON,
    ``/lines`` lines with every ending, ``/bomb/{MiB}`` that many MiB of zeros gzipped,
    ``/plain`` `TEXT` as it is, ``/status/{code}``, ``/slow/{ms}``."""

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        body: bytes
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if path == "/gzip":
            body = gzip.compress(TEXT.encode())
            headers.append((b"content-encoding", b"gzip"))
        elif path == "/deflate":
            body = zlib.compress(TEXT.encode())
            headers.append((b"content-encoding", b"deflate"))
        elif path == "/json":
            body = gzip.compress(json.dumps({"ok": True, "n": [1, 2]}).encode())
            headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        elif path == "/lines":
            body = b"one\r\ntwo\nthree\rfour"
        elif path.startswith("/bomb/"):
            body = gzip.compress(bytes(int(path.removeprefix("/bomb/")) * MiB))
            headers.append((b"content-encoding", b"gzip"))
        elif path == "/plain":
            body = TEXT.encode()
        elif path == "/corrupt":
            # A gzip header, then bytes that are no deflate data, then more of the body.
            start = {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-encoding", b"gzip")],
            }
            await send(start)
            corrupt = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 100
            await send({"type": "http.response.body", "body": corrupt, "more_body": True})
            await trio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"rest" * 1000})
            return
        else:
            await super()._route(scope, receive, send)
            return
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("http2", [False, True], ids=["http11", "h2c"])
async def test_decoded_bodies_end_to_end(http2: bool) -> None:
    app = EncodingApp()
    async with (
        serve_hypercorn(app) as base,
        open_client(http2=http2, http1=not http2) as client,
    ):
        version = "HTTP/2" if http2 else "HTTP/1.1"
        for path in ("/gzip", "/deflate", "/plain"):
            response = await client.get(base + path)
            assert response.http_version == version
            assert response.content == TEXT.encode()
            assert response.text == TEXT
            assert response.raise_for_status() is response
        json_response = await client.get(base + "/json")
        assert json_response.json() == {"ok": True, "n": [1, 2]}
        assert json_response.json(parse_int=str) == {"ok": True, "n": ["1", "2"]}

        async with client.stream("GET", base + "/gzip") as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        assert raw == gzip.compress(TEXT.encode())  # exactly as sent
        async with client.stream("GET", base + "/gzip") as response:
            text = "".join([piece async for piece in response.aiter_text()])
        assert text == TEXT
        async with client.stream("GET", base + "/lines") as response:
            lines = [line async for line in response.aiter_lines()]
        assert lines == ["one", "two", "three", "four"]
        async with client.stream("GET", base + "/gzip") as response:
            lines = [line async for line in response.aiter_lines()]
        assert lines == TEXT.splitlines()

        with pytest.raises(HTTPStatusError, match="'404 Not Found' for url") as caught:
            (await client.get(base + "/status/404")).raise_for_status()
        assert caught.value.response.is_client_error
        slow = await client.get(base + "/slow/100")
        assert datetime.timedelta(seconds=0.1) <= slow.elapsed < datetime.timedelta(seconds=WAIT)
        assert_pool_balanced(client.pool, idle=1)
    assert app.connections == 1


@pytest.mark.parametrize("http2", [False, True], ids=["http11", "h2c"])
async def test_corrupt_body_end_to_end(http2: bool) -> None:
    app = EncodingApp()
    async with (
        serve_hypercorn(app) as base,
        open_client(http2=http2, http1=not http2) as client,
    ):
        with trio.fail_after(WAIT), pytest.raises(DecodingError, match="invalid gzip data"):
            await client.get(base + "/corrupt")
        async with client.stream("GET", base + "/corrupt") as response:
            with trio.fail_after(WAIT), pytest.raises(DecodingError):
                await response.aiter_text().__anext__()
            assert response.is_closed
        assert_pool_balanced(client.pool)
        assert (await client.get(base + "/plain")).text == TEXT


async def test_elapsed_without_a_pool() -> None:
    app = EncodingApp()
    async with serve_hypercorn(app) as base, open_client(pool=NoPoolSender()) as client:
        response = await client.get(base + "/slow/100")
        assert datetime.timedelta(seconds=0.1) <= response.elapsed
        assert response.elapsed < datetime.timedelta(seconds=WAIT)
        assert response.text == "slow"


@pytest.mark.parametrize("http2", [False, True], ids=["http11", "h2c"])
async def test_a_streamed_bomb_stays_within_the_bound(http2: bool) -> None:
    # 10 MiB of zeros, gzipped to about 10 KiB: the server sends it in one piece, and the
    # client turns it into 64 KiB pieces one at a time, never the whole.
    size = 10 * MiB
    app = EncodingApp()
    async with (
        serve_hypercorn(app) as base,
        open_client(http2=http2, http1=not http2) as client,
    ):
        tracemalloc.start()
        try:
            total = 0
            biggest = 0
            async with client.stream("GET", base + "/bomb/10") as response:
                assert response.headers["content-encoding"] == "gzip"
                tracemalloc.reset_peak()
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    biggest = max(biggest, len(chunk))
                    del chunk
                _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == size
        assert biggest <= MAX_DECODED_STEP
        assert peak < 1 * MiB, peak  # a few pieces at most, never the 10 MiB
        # aread builds the whole content: that is what it is for.
        assert await client.get(base + "/bomb/1") is not None
        assert_pool_balanced(client.pool, idle=1)


async def _corrupt_then_stall(conn: ServerConnection) -> None:
    """Answer the first request with a gzip body whose first bytes are corrupt, then send
    nothing more (the rest of the declared 1 MiB never comes); answer others with 200."""
    if await conn.receive_request() is None:
        return
    if conn.index == 0:
        await conn.send_raw(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nContent-Encoding: gzip\r\n\r\n"
            + b"\x1f\x8b\x08\x00garbage-that-is-not-deflate" * 8
        )
        await conn.wait_peer_closed()
        return
    await conn.send_response(200, b"fresh")
    await conn.serve()


@pytest.mark.parametrize("how", ["request", "stream"])
async def test_corrupt_body_raises_and_the_connection_is_not_reused(how: str) -> None:
    async with run_fault_server(_corrupt_then_stall) as server, open_client() as client:
        with trio.fail_after(WAIT):
            with pytest.raises(DecodingError, match="invalid gzip data") as caught:
                if how == "request":
                    await client.get(server.url("/bad"))
                else:
                    async with client.stream("GET", server.url("/bad")) as response:
                        async for _ in response.aiter_bytes():
                            raise AssertionError("nothing decodable arrived")  # pragma: no cover
            # Raised at once, without waiting for the rest of the body (or the read timeout).
            assert caught.value.url == server.url("/bad")
            await server.wait_peer_closed(1)
        assert_pool_balanced(client.pool, idle=0)
        assert (await client.get(server.url("/next"))).content == b"fresh"
        assert server.accepted == 2


async def _head_then_body(conn: ServerConnection) -> None:
    """Send each response's head at once and its (gzipped) body once `release_body` is set."""
    body = gzip.compress(b"late")
    for _ in range(10):
        if await conn.receive_request() is None:
            return
        head = h11.Response(
            status_code=200,
            headers=[("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))],
        )
        await conn.send_raw(conn.h11.send(head) or b"")
        await release_body.wait()
        await conn.send_raw(
            (conn.h11.send(h11.Data(data=body)) or b"")
            + (conn.h11.send(h11.EndOfMessage()) or b"")
        )


release_body = trio.Event()


async def test_elapsed_runs_from_the_request_to_the_end_of_the_body() -> None:
    global release_body
    release_body = trio.Event()
    async with run_fault_server(_head_then_body) as server, open_client() as client:
        async with client.stream("GET", server.url("/")) as response:
            with pytest.raises(RuntimeError, match="read or closed"):
                _ = response.elapsed
            await trio.sleep(0.2)
            release_body.set()
            assert await response.aread() == b"late"
            elapsed = response.elapsed
        assert datetime.timedelta(seconds=0.2) <= elapsed < datetime.timedelta(seconds=WAIT)
        assert response.elapsed == elapsed  # fixed once the body ended
        quick = await client.get(server.url("/"))  # the body is released at once now
        assert datetime.timedelta(0) < quick.elapsed < datetime.timedelta(seconds=0.2)
        # Closed early: measured to the close.
        async with client.stream("GET", server.url("/")) as early:
            pass
        assert early.elapsed < datetime.timedelta(seconds=WAIT)
    # A response that arrives whole in one read ends on the client's fast path: timed too.
    async with run_fault_server() as server, open_client() as client:
        for _ in range(3):
            response = await client.get(server.url("/"))
            assert datetime.timedelta(0) < response.elapsed < datetime.timedelta(seconds=WAIT)


async def test_a_plain_body_costs_one_header_pass() -> None:
    # The client's hot path asks nothing else of the response headers: the name index that
    # a Headers lookup builds is never built for a body without Content-Encoding.
    app = EncodingApp()
    async with serve_hypercorn(app) as base, open_client() as client:
        response = await client.get(base + "/plain")
        assert response.content == TEXT.encode()
        assert response.headers._names is None  # pyright: ignore[reportPrivateUsage]
        gzipped = await client.get(base + "/gzip")
        assert gzipped.content == TEXT.encode()


async def test_the_httpx_transport_hands_httpx_the_raw_bytes() -> None:
    # httpx undoes the content coding itself: the transport must not do it first.
    httpx = pytest.importorskip("httpx")
    from trio_connpool.contrib.httpx import AsyncPoolTransport

    app = EncodingApp()
    async with (
        serve_hypercorn(app) as base,
        AsyncPoolTransport() as transport,
        httpx.AsyncClient(transport=transport) as client,
    ):
        for path in ("/gzip", "/deflate"):
            response = await client.get(base + path)
            assert response.text == TEXT
