"""Hostile HTTP/1.1 responses: inputs crafted to be slow or to split responses.

Two layers. The core (`H1Client`) gets worst-case inputs up to its head limit, built to
make a backtracking parser or a buffer rebuilt per read take quadratic or exponential time;
each must be parsed in time linear in its size. The budget below is generous (the inputs
parse in a few milliseconds; before they were made linear they took seconds to minutes), so
the test fails only on a change of complexity, not on a slow machine. Then the real client
over a real socket gets the same heads and the response-splitting cases, and must give a
typed error at once and never hand out a connection that carried them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
from _servers import ServerConnection, assert_pool_balanced, run_fault_server

from trio_connpool import RemoteProtocolError
from trio_connpool.http import open_client
from trio_connpool.http._h1 import MAX_INFORMATIONAL, H1Client, HalfState, RemoteViolation

LIMIT = 64 * 1024
# Seconds allowed per worst-case input of up to LIMIT bytes. Linear parsing takes a few
# milliseconds; the quadratic and exponential paths these inputs were built for took seconds.
BUDGET = 0.5

STATUS = b"HTTP/1.1 200 OK\r\n"


def blank_values(n: int, end: bytes) -> bytes:
    """n lines of a name and a value of only blanks, then ``end`` (the exponential case)."""
    return STATUS + b"Content-Length: 0\r\n" + b"A:    \r\n" * n + end


def worst_heads() -> Iterator[tuple[str, bytes]]:
    fill = LIMIT - 200
    n = fill // 8
    yield "blank-values-then-bad-line", blank_values(n, b"bad line\r\n\r\n")
    yield "blank-values-then-fold", blank_values(n, b" folded\r\n\r\n")
    yield "blank-values-then-bare-lf", blank_values(n, b"B: x\nC: y\r\n\r\n")
    yield "blank-values-then-nul", blank_values(n, b"B: \x00\r\n\r\n")
    yield "blanks-in-a-value-then-nul", STATUS + b"A: a" + b" " * fill + b"\x00\r\n\r\n"
    yield "blanks-only-then-nul", STATUS + b"A:" + b" " * fill + b"\x00\r\n\r\n"
    yield "blanks-then-bare-cr", STATUS + b"A:" + b" \t" * (fill // 2) + b"\r\r\n\r\n"
    yield "many-runs-then-bad", STATUS + b"A: " + b"a " * (fill // 2) + b"\x0b\r\n\r\n"
    yield "many-runs-each-line", STATUS + (b"A: " + b"a " * 30 + b"\r\n") * (fill // 66) + b"\0"
    yield "folds", STATUS + b"A: a\r\n" + b" b\r\n" * (fill // 4) + b"\r\n"
    yield "bare-lf-lines", STATUS + b"A: b\n" * (fill // 5) + b"\n"
    yield "blank-reason", b"HTTP/1.1 200 " + b" " * fill + b"\x00\r\n\r\n"


def worst_bodies() -> Iterator[tuple[str, bytes]]:
    fill = LIMIT - 200
    yield "blanks-in-a-chunk-extension", b"1;" + b" " * fill + b"\n\r\n"
    yield "blanks-after-a-chunk-size", b"1" + b" " * fill + b"x\r\n"
    yield "blanks-in-a-trailer", b"0\r\nT:" + b" " * fill + b"\x00\r\n\r\n"
    yield "blank-trailer-values", b"0\r\n" + b"T:    \r\n" * (fill // 8) + b"bad\r\n\r\n"
    yield "tiny-chunks", b"1\r\na\r\n" * (fill // 6) + b"0\r\n\r\n"


def client_for(method: bytes = b"GET") -> H1Client:
    client = H1Client(max_head_size=LIMIT)
    client.send_request(method, b"/", [(b"Host", b"example.com")])
    client.end_request()
    return client


def drain(client: H1Client) -> bytes:
    body = b""
    for _ in range(LIMIT * 2):
        chunk = client.receive_body()
        if not chunk:
            return body
        body += chunk
    raise AssertionError("the body did not end")


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    with contextlib.suppress(RemoteViolation):
        step()
    return time.perf_counter() - start


def in_budget(make_step: Callable[[], Callable[[], object]], budget: float = BUDGET) -> bool:
    """Whether one of three runs of a fresh ``make_step()`` finishes within ``budget``: a run
    that the machine's other work slowed down gets two more chances, an input that is slow
    by its complexity gets none."""
    return any(timed(make_step()) < budget for _ in range(3))


@pytest.mark.parametrize(("name", "head"), list(worst_heads()), ids=[n for n, _ in worst_heads()])
def test_worst_case_heads_parse_in_linear_time(name: str, head: bytes) -> None:
    assert len(head) <= LIMIT + 16

    def make_step() -> Callable[[], object]:
        client = client_for()
        client.receive_data(head)
        return lambda: client.receive_head() and drain(client)

    assert in_budget(make_step), name


@pytest.mark.parametrize(
    ("name", "body"), list(worst_bodies()), ids=[n for n, _ in worst_bodies()]
)
def test_worst_case_chunked_bodies_parse_in_linear_time(name: str, body: bytes) -> None:

    def make_step() -> Callable[[], object]:
        client = client_for()
        client.receive_data(STATUS + b"Transfer-Encoding: chunked\r\n\r\n")
        assert client.receive_head() is not None
        client.receive_data(body)
        return lambda: drain(client)

    assert in_budget(make_step), name


def feed_in_pieces(client: H1Client, data: bytes, size: int, step: Callable[[], object]) -> None:
    for start in range(0, len(data), size):
        client.receive_data(data[start : start + size])
        if step() is not None:
            return


@pytest.mark.parametrize("size", [1, 6])
def test_a_head_fed_a_few_bytes_per_read_is_linear(size: int) -> None:
    head = STATUS + b"X-Fill: abcdefgh\r\n" * ((LIMIT - 100) // 18) + b"\r\n"
    clients: list[H1Client] = []

    def make_step() -> Callable[[], object]:
        client = client_for()
        clients.append(client)
        return lambda: feed_in_pieces(client, head, size, client.receive_head)

    # 64k calls of one byte cost time of their own, whatever the parser does with them.
    assert in_budget(make_step, BUDGET * (4 if size == 1 else 1))
    assert clients[-1].their_state is HalfState.BODY  # the body is next: the whole head was read


@pytest.mark.parametrize(
    "body",
    [b"1" * (LIMIT - 100) + b"\r\n", b"0\r\n" + b"T: x\r\n" * ((LIMIT - 100) // 6) + b"\r\n"],
    ids=["chunk-line", "trailers"],
)
def test_chunk_lines_and_trailers_fed_a_few_bytes_per_read_are_linear(body: bytes) -> None:

    def make_step() -> Callable[[], object]:
        client = client_for()
        client.receive_data(STATUS + b"Transfer-Encoding: chunked\r\n\r\n")
        assert client.receive_head() is not None
        return lambda: feed_in_pieces(client, body, 6, client.receive_body)

    assert in_budget(make_step)


def test_a_body_fed_a_few_bytes_per_read_is_linear() -> None:
    got: list[bytes] = []

    def make_step() -> Callable[[], object]:
        client = client_for()
        client.receive_data(STATUS + b"Content-Length: %d\r\n\r\n" % LIMIT)
        assert client.receive_head() is not None
        got.clear()

        def step() -> None:
            for _ in range(8):
                chunk = client.receive_body()
                if not chunk:
                    return
                got.append(chunk)

        return lambda: feed_in_pieces(client, b"x" * LIMIT, 6, step)

    assert in_budget(make_step)
    assert b"".join(got) == b"x" * LIMIT


# ---- the rules these inputs also test ------------------------------------------------------


@pytest.mark.parametrize("code", [b"000", b"099", b"050"])
def test_status_codes_below_100_are_violations(code: bytes) -> None:
    client = client_for()
    client.receive_data(
        b"HTTP/1.1 " + code + b" X\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    with pytest.raises(RemoteViolation, match="status code"):
        client.receive_head()
    assert not client.reusable


def test_informational_responses_are_bounded() -> None:
    client = client_for()
    informational = b"HTTP/1.1 102 Processing\r\n\r\n"
    client.receive_data(informational * MAX_INFORMATIONAL)
    assert client.receive_head() is None
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    head = client.receive_head()
    assert head is not None and head.status_code == 200

    client = client_for()
    client.receive_data(informational * (MAX_INFORMATIONAL + 1))
    with pytest.raises(RemoteViolation, match="informational"):
        client.receive_head()


def test_the_informational_bound_is_per_exchange() -> None:
    client = client_for()
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    for _ in range(3):
        client.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INFORMATIONAL + final)
        assert client.receive_head() is not None
        assert client.receive_body() == b""
        client.start_next_cycle()
        client.send_request(b"GET", b"/", [(b"Host", b"example.com")])
        client.end_request()


@pytest.mark.parametrize(
    "response",
    [
        STATUS + b"Content-Length: 3\r\r\n\r\nabc",
        STATUS + b"X: a\rb\r\nContent-Length: 0\r\n\r\n",
        STATUS + b"X: a\r\nContent-Length: 0\r\r\n\r\n",
        STATUS + b"X: a\r\n \rb\r\nContent-Length: 0\r\n\r\n",
        STATUS + b"X: a\nY: b\r\r\n\r\n",
        STATUS + b"Transfer-Encoding: chunked\r\n\r\n0\r\nT: 1\r\r\n\r\n",
        STATUS + b"Transfer-Encoding: chunked\r\n\r\n0\r\nT: 1\rX: 2\r\n\r\n",
        STATUS + b"Transfer-Encoding: chunked\r\n\r\n1;a\rb\r\nx\r\n0\r\n\r\n",
        STATUS + b"Transfer-Encoding: chunked\r\n\r\n1\r \r\nx\r\n0\r\n\r\n",
    ],
    ids=[f"case{n}" for n in range(9)],
)
def test_a_bare_cr_is_a_violation(response: bytes) -> None:
    client = client_for()
    client.receive_data(response)
    with pytest.raises(RemoteViolation):
        if client.receive_head() is not None:
            drain(client)
    assert not client.reusable


def test_content_length_and_chunked_are_read_as_chunked_and_never_reused() -> None:
    client = client_for()
    client.receive_data(
        STATUS + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    )
    assert client.receive_head() is not None
    assert drain(client) == b"ab"
    assert client.response_done
    assert not client.reusable


def test_bytes_after_a_complete_response_make_it_not_reusable() -> None:
    client = client_for()
    client.receive_data(STATUS + b"Content-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")
    assert client.receive_head() is not None
    assert drain(client) == b"ok"
    assert client.response_done
    assert not client.reusable
    assert client.trailing_data == b"HTTP/1.1 200 OK\r\n\r\n"


def test_buffered_tiny_chunks_are_returned_together() -> None:
    client = client_for()
    client.receive_data(STATUS + b"Transfer-Encoding: chunked\r\n\r\n")
    assert client.receive_head() is not None
    client.receive_data(b"1\r\nx\r\n" * 1000 + b"1\r\ny")
    assert client.receive_body() == b"x" * 1000 + b"y"  # one call, not one per chunk
    assert client.receive_body() is None
    client.receive_data(b"\r\n0\r\n\r\n")
    assert client.receive_body() == b""
    assert client.reusable


def test_the_peer_closing_makes_a_complete_response_not_reusable() -> None:
    client = client_for()
    client.receive_data(STATUS + b"Content-Length: 2\r\n\r\nok")
    client.receive_data(b"")
    assert client.receive_head() is not None
    assert drain(client) == b"ok"
    assert client.response_done
    assert not client.reusable


# ---- the real client over a real socket ------------------------------------------------------


def answer_with(data: bytes) -> Callable[[ServerConnection], Awaitable[None]]:
    async def script(conn: ServerConnection) -> None:
        if await conn.receive_request() is not None:
            await conn.send_raw(data)
            await conn.wait_peer_closed()

    return script


@pytest.mark.parametrize(
    "head",
    [
        blank_values(11, b"bad line\r\n\r\n"),
        blank_values(11, b" folded\r\n\r\n"),
        blank_values(11, b"B: x\nC: y\r\n\r\n"),
        STATUS + b"A:" + b" " * 60_000 + b"\x00\r\n\r\n",
    ],
    ids=["bad-line", "fold", "bare-lf", "blanks"],
)
async def test_a_crafted_head_cannot_freeze_the_client(head: bytes) -> None:
    """Before the parser was made linear, the first three froze the event loop for seconds
    (about five times longer for every extra line) and the last for several more."""
    async with run_fault_server(answer_with(head)) as server, open_client() as client:
        start = time.perf_counter()
        with trio.fail_after(5):
            try:
                response = await client.get(server.url())
            except RemoteProtocolError:
                pass
            else:  # the fold and bare-LF heads are valid after all
                assert response.status_code == 200
        assert time.perf_counter() - start < 1
        assert_pool_balanced(client.pool)


async def test_a_status_below_100_does_not_split_the_response() -> None:
    inner = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
    head = b"HTTP/1.1 099 X\r\nContent-Length: %d\r\n\r\n" % len(inner) + inner
    async with run_fault_server(answer_with(head)) as server, open_client() as client:
        with trio.fail_after(5), pytest.raises(RemoteProtocolError, match="status code"):
            await client.get(server.url())
        assert_pool_balanced(client.pool, idle=0)


async def test_an_endless_stream_of_informational_responses_ends() -> None:
    async def script(conn: ServerConnection) -> None:
        if await conn.receive_request() is not None:
            for _ in range(10_000):  # bounded; the client gives up long before
                await conn.send_raw(b"HTTP/1.1 102 Processing\r\n\r\n")

    async with run_fault_server(script) as server, open_client() as client:
        with trio.fail_after(5), pytest.raises(RemoteProtocolError, match="informational"):
            await client.get(server.url())
        assert_pool_balanced(client.pool, idle=0)


@pytest.mark.parametrize(
    "response",
    [
        STATUS + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        STATUS
        + b"Content-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected",
    ],
    ids=["content-length-and-chunked", "bytes-after-the-response"],
)
async def test_a_suspect_response_ends_its_connection(response: bytes) -> None:
    async def script(conn: ServerConnection) -> None:
        for _ in range(10):
            if await conn.receive_request() is None:
                return
            await conn.send_raw(response)

    async with run_fault_server(script) as server, open_client() as client:
        for _ in range(3):
            with trio.fail_after(5):
                got = await client.get(server.url())
            assert (got.status_code, got.content) == (200, b"ok")
        await server.wait_for(lambda: server.accepted == 3)
        assert_pool_balanced(client.pool, idle=0)
