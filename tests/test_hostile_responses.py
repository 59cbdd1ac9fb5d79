"""Responses a hostile server can send to the httpx-like API, each against a real socket:
what the client must do is raise a PoolError (or ignore the nonsense), never let another
exception out, and keep every buffer within its stated bound.
"""

from __future__ import annotations

import gzip
import sys
import tracemalloc

import pytest
import trio
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

from trio_connpool import DecodingError
from trio_connpool.http import Response, open_client
from trio_connpool.http._decoders import text_decoder

MiB = 1024 * 1024


def _answer_with(headers: list[tuple[str, str]], body: bytes):  # type: ignore[no-untyped-def]
    async def script(conn: ServerConnection) -> None:
        while await conn.receive_request() is not None:
            await conn.send_response(200, body, headers=headers)

    return script


# ---- Content-Encoding ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["request", "stream"])
async def test_thousands_of_codings_raise_a_decoding_error(how: str) -> None:
    # A header of 3000 "gzip" codings fits in 16 KiB; undoing them took a Python frame (and
    # a zlib stream) each: RecursionError. Too many codings is a DecodingError.
    encoding = ", ".join(["gzip"] * 3000)
    script = _answer_with([("Content-Encoding", encoding)], b"x" * 10)
    async with run_fault_server(script) as server, open_client() as client:
        with trio.fail_after(WAIT), pytest.raises(DecodingError, match="codings"):
            if how == "request":
                await client.get(server.url())
            else:
                async with client.stream("GET", server.url()) as response:
                    async for _ in response.aiter_bytes():
                        pass  # pragma: no cover
        assert_pool_balanced(client.pool)


class _ManyCodingsApp(CountingApp):
    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        many = scope["path"] == "/many"
        headers = [(b"content-encoding", b", ".join([b"gzip"] * 2000))] if many else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"x" * 10})


async def test_thousands_of_codings_over_http2_raise_a_decoding_error() -> None:
    async with (
        serve_hypercorn(_ManyCodingsApp()) as base,
        open_client(http2=True, http1=False) as client,
    ):
        with trio.fail_after(WAIT), pytest.raises(DecodingError, match="codings"):
            await client.get(base + "/many")
        # The stream was reset; the connection serves the next request.
        assert (await client.get(base + "/plain")).content == b"x" * 10
        assert_pool_balanced(client.pool, idle=1)


async def test_a_few_stacked_codings_still_decode() -> None:
    body = gzip.compress(gzip.compress(gzip.compress(b"three times")))
    script = _answer_with([("Content-Encoding", "gzip, gzip, gzip")], body)
    async with run_fault_server(script) as server, open_client() as client:
        assert (await client.get(server.url())).content == b"three times"


# ---- charset -------------------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["zlib", "base64", "rot13", "undefined", "idna", "punycode"])
async def test_a_charset_that_cannot_decode_text_falls_back_to_utf8(charset: str) -> None:
    # Python knows these names, but they are not text encodings (zlib, base64: bytes to
    # bytes; rot13: str to str) or cannot decode with replacement (undefined, idna,
    # punycode): text raised LookupError or UnicodeError, aiter_text AssertionError.
    body = "héllo\n".encode()
    script = _answer_with([("Content-Type", f"text/plain; charset={charset}")], body + b"\xff")
    async with run_fault_server(script) as server, open_client() as client:
        response = await client.get(server.url())
        assert response.charset is None
        assert response.encoding == "utf-8"
        assert response.text == "héllo\n\ufffd"
        async with client.stream("GET", server.url()) as streamed:
            assert [text async for text in streamed.aiter_text()] == ["héllo\n\ufffd"]


# ---- redirects -----------------------------------------------------------------------------


def _redirect_bomb(body: bytes):  # type: ignore[no-untyped-def]
    async def script(conn: ServerConnection) -> None:
        while (received := await conn.receive_request()) is not None:
            if received[0].target == b"/next":
                await conn.send_response(200, b"landed")
                continue
            await conn.send_response(
                302, body, headers=[("Location", "/next"), ("Content-Encoding", "gzip, gzip")]
            )

    return script


@pytest.mark.parametrize("how", ["request", "stream"])
async def test_a_redirect_body_that_decodes_to_a_bomb_is_not_built(how: str) -> None:
    # 32 MiB of zeros gzipped twice is a few hundred bytes: a declared length far below the
    # 64 KiB a followed redirect's body may have, but reading it whole built the 32 MiB
    # (a third gzip makes that terabytes). The bound is on what the body decodes to.
    bomb = gzip.compress(gzip.compress(bytes(32 * MiB)))
    assert len(bomb) < 1024
    async with (
        run_fault_server(_redirect_bomb(bomb)) as server,
        open_client(follow_redirects=True) as client,
    ):
        tracemalloc.start()
        try:
            with trio.fail_after(WAIT):
                if how == "request":
                    response = await client.get(server.url("/start"))
                    assert response.content == b"landed"
                else:
                    async with client.stream("GET", server.url("/start")) as response:
                        assert await response.aread() == b"landed"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB, peak
        assert [r.status_code for r in response.history] == [302]
        assert_pool_balanced(client.pool)


@pytest.mark.parametrize("charset", ["utf-16", "utf-32"])
async def test_utf16_without_a_bom_streams_as_text_reads_it(charset: str) -> None:
    # bytes.decode takes a BOM-less utf-16 body in native order; Python's incremental
    # decoder raised UnicodeError from aiter_text and aiter_lines instead.
    native = f"{charset}-{'le' if sys.byteorder == 'little' else 'be'}"
    body = "línea uno\nlínea dos\n".encode(native)
    script = _answer_with([("Content-Type", f"text/plain; charset={charset}")], body)
    async with run_fault_server(script) as server, open_client() as client:
        response = await client.get(server.url())
        assert response.text == "línea uno\nlínea dos\n"
        async with client.stream("GET", server.url()) as streamed:
            assert [line async for line in streamed.aiter_lines()] == ["línea uno", "línea dos"]
    # With a BOM it is read as the BOM says.
    with_bom = "\ufeffhi".encode(f"{charset}-be")
    decoder = text_decoder(charset)
    assert decoder.decode(with_bom[:1]) + decoder.decode(with_bom[1:], True) == "hi"


@pytest.mark.parametrize(("charset", "opening"), [("utf-7", b"+"), ("unicode_escape", b"\\N{")])
async def test_a_charset_whose_decoder_holds_everything_is_not_used(
    charset: str, opening: bytes
) -> None:
    # A utf-7 shift run ("+AAAA...") or a "\N{..." escape that never ends is held whole by
    # Python's incremental decoder, and decoded again from its start with every chunk:
    # aiter_text gave nothing and took quadratic time (13 MiB: 13 s of blocked event loop).
    # Neither is a charset a web server means; the body is read as utf-8.
    half = 1024 * 1024

    async def script(conn: ServerConnection) -> None:
        if await conn.receive_request() is None:
            return
        await conn.send_raw(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
            b"Content-Type: text/plain; charset=%s\r\n\r\n" % (2 * half, charset.encode())
        )
        await conn.send_raw(opening + b"A" * (half - len(opening)))
        await conn.wait_peer_closed()  # the rest never comes

    async with run_fault_server(script) as server, open_client() as client:
        with trio.fail_after(WAIT):
            async with client.stream("GET", server.url()) as response:
                assert response.encoding == "utf-8"
                async for text in response.aiter_text():
                    assert text.startswith(opening.decode())
                    break


async def test_setting_an_encoding_that_is_not_for_text_is_refused_at_once() -> None:
    async with run_fault_server() as server, open_client() as client:
        response = await client.get(server.url())
        with pytest.raises(LookupError, match="not a text encoding"):
            response.encoding = "zlib"
        response.encoding = "latin-1"
        assert response.text == "ok"


# ---- aiter_lines ---------------------------------------------------------------------------


def _endless_line(total: int):  # type: ignore[no-untyped-def]
    """A chunked body of ``total`` bytes of "x" and no line ending, sent in 64 KiB chunks
    (a server that would go on for ever, up to the test's bound)."""

    async def script(conn: ServerConnection) -> None:
        if await conn.receive_request() is None:
            return
        await conn.stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * (64 * 1024))
        for _ in range(total // (64 * 1024)):
            await conn.stream.send_all(chunk)
        await conn.stream.send_all(b"0\r\n\r\n")

    return script


async def test_a_line_without_end_is_bounded_by_max_line_size() -> None:
    # aiter_lines held the unfinished line however long it grew: a server sending one
    # endless line took all the memory there was. The default bound is 1 MiB of text;
    # past it, DecodingError, and the response is closed.
    async with run_fault_server(_endless_line(32 * MiB)) as server, open_client() as client:
        streamed: list[Response] = []
        tracemalloc.start()
        try:
            with trio.fail_after(WAIT), pytest.raises(DecodingError, match="max_line_size"):
                async with client.stream("GET", server.url()) as response:
                    streamed.append(response)
                    async for _ in response.aiter_lines():
                        pass  # pragma: no cover
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB, peak
        assert streamed[0].is_closed
        assert_pool_balanced(client.pool)


async def test_max_line_size_is_the_callers_to_set() -> None:
    # A smaller bound applies to every line, whole in one chunk or not; None lifts it.
    lines = b"short\n" + b"y" * 5000 + b"\nend"
    script = _answer_with([], lines)
    async with run_fault_server(script) as server, open_client() as client:
        async with client.stream("GET", server.url()) as response:
            got: list[str] = []
            with pytest.raises(DecodingError, match="4,096"):
                async for line in response.aiter_lines(max_line_size=4096):
                    got.append(line)
            assert got == ["short"]
        async with client.stream("GET", server.url()) as response:
            got = [line async for line in response.aiter_lines(max_line_size=None)]
            assert got == ["short", "y" * 5000, "end"]

        async with (
            client.stream("GET", server.url(), timeout=None) as response,
        ):
            with pytest.raises(ValueError, match="max_line_size"):
                response.aiter_lines(max_line_size=0)
        assert_pool_balanced(client.pool)


async def test_a_last_line_without_end_past_the_bound_is_reported_like_the_others() -> None:
    # The body ends inside the long line: the error, raised when the body's end is met,
    # names the request as one raised before the end does.
    script = _answer_with([], b"ok\n" + b"y" * 5000)
    async with run_fault_server(script) as server, open_client() as client:
        async with client.stream("GET", server.url()) as response:
            got: list[str] = []
            with pytest.raises(DecodingError, match="max_line_size") as raised:
                async for line in response.aiter_lines(max_line_size=4096):
                    got.append(line)
            assert got == ["ok"]
            assert raised.value.url == server.url()
        assert_pool_balanced(client.pool)


def _lines_then_stall(body: bytes):  # type: ignore[no-untyped-def]
    """A chunked response whose first chunk is ``body``; then nothing, until the client
    closes (a slow server, not a broken one)."""

    async def script(conn: ServerConnection) -> None:
        if await conn.receive_request() is None:
            return
        await conn.send_raw(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
            % (len(body), body)
        )
        await conn.wait_peer_closed()

    return script


@pytest.mark.parametrize("cut", [False, True])
async def test_a_long_line_after_others_in_one_chunk_fails_at_once(cut: bool) -> None:
    # The over-long line arrives whole in the first chunk, after a short one. It is known
    # to be too long at once: the short line comes out, then DecodingError, without
    # waiting for more of a body that may never come (a slow server's read timeout, or
    # for ever without one). With the long line alone in its chunk that is what happens.
    async def script(conn: ServerConnection) -> None:
        if await conn.receive_request() is None:
            return
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        if cut:
            await conn.send_raw(head + b"6\r\nshort\n\r\n")
            await trio.sleep(0.2)
            await conn.send_raw(b"%x\r\n%s\r\n" % (5000, b"y" * 5000))
        else:
            await conn.send_raw(head + b"%x\r\nshort\n%s\r\n" % (5006, b"y" * 5000))
        await conn.wait_peer_closed()

    # The client's read timeout (5 s) is longer than the test's bound (WAIT).
    async with run_fault_server(script) as server, open_client() as client:
        got: list[str] = []
        streamed: list[Response] = []
        with trio.fail_after(WAIT), pytest.raises(DecodingError, match="max_line_size"):
            async with client.stream("GET", server.url()) as response:
                streamed.append(response)
                async for line in response.aiter_lines(max_line_size=4096):
                    got.append(line)
        assert got == ["short"]
        assert streamed[0].is_closed
        assert_pool_balanced(client.pool)


async def test_a_long_last_line_names_its_request_like_any_other() -> None:
    # The same over-long line, at the end of a body that ends in the same chunk: the
    # DecodingError comes from the decoder's flush, and must carry the request's URL and
    # key as it does when the line is met mid-body (every HTTP error carries them).
    body = b"short\n" + b"y" * 5000 + b"\nend"
    errors: list[DecodingError] = []
    async with (
        run_fault_server(_answer_with([], body)) as server,
        open_client() as client,
    ):
        for _ in range(2):
            with trio.fail_after(WAIT), pytest.raises(DecodingError) as caught:
                async with client.stream("GET", server.url()) as response:
                    async for _ in response.aiter_lines(max_line_size=4096):
                        pass
            errors.append(caught.value)
        # Mid-body (a chunk boundary after the long line) for comparison:
        async with run_fault_server(_lines_then_stall(b"y" * 5000)) as stalled:
            with trio.fail_after(WAIT), pytest.raises(DecodingError) as caught:
                async with client.stream("GET", stalled.url()) as response:
                    async for _ in response.aiter_lines(max_line_size=4096):
                        pass  # pragma: no cover
            assert caught.value.url == stalled.url()
        for error in errors:
            assert error.url == server.url()
            assert error.key is not None
