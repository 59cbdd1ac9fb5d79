"""``get`` with one URL behaves like curl: the body on stdout, curl's request options.

Each test runs ``python -m trio_connpool get`` as a subprocess (``trio.run_process``) against
hypercorn on 127.0.0.1 (in the test's own trio run) and checks what a user sees: the bytes
on stdout, the lines on stderr and the exit status. The server's ``/echo-request`` route
answers with the method, headers and body it received, as JSON.

Every test is bounded with ``fail_after``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from _servers import CountingApp, Receive, Scope, Send, serve_hypercorn

from trio_connpool._commands import (
    UsageError,
    fetch_command,
    get_command,
    parse_url,
    request_spec,
    url_file_name,
)
from trio_connpool.http import URL, open_client

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable
    from pathlib import Path

LIMIT = 20.0
BINARY = bytes(range(256)) * 3 + b"\r\n\x00end"


class EchoApp(CountingApp):
    """CountingApp plus ``/echo-request`` (the request as JSON), ``/binary`` (BINARY),
    ``/redirect`` (302 to ``/echo-request``), ``/files/NAME`` (``file NAME``)."""

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path == "/echo-request":
            body = b""
            for _ in range(10_000):  # bounded: the tests send small bodies
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            answer = {
                "method": scope["method"],
                "headers": [[n.decode(), v.decode()] for n, v in scope["headers"]],
                "body": body.decode("latin-1"),
            }
            await _send(send, 200, json.dumps(answer).encode(), b"application/json")
        elif path == "/binary":
            await _send(send, 200, BINARY, b"application/octet-stream")
        elif path == "/redirect":
            await _send(send, 302, b"moved", b"text/plain", [(b"location", b"/echo-request")])
        elif path.startswith("/files/"):
            await _send(send, 200, b"file " + path.removeprefix("/files/").encode(), b"text/plain")
        else:
            await super()._route(scope, receive, send)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def server() -> AsyncGenerator[str, None]:
    async with serve_hypercorn(EchoApp()) as base:
        yield base


async def get(
    *args: str, cwd: Path | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m trio_connpool get ARGS``, capturing stdout and stderr (pipes)."""
    return await trio.run_process(
        [sys.executable, "-m", "trio_connpool", "get", *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=cwd,
    )


async def concurrently(
    *jobs: Callable[[], Awaitable[subprocess.CompletedProcess[bytes]]],
) -> list[subprocess.CompletedProcess[bytes]]:
    """Run the commands at once (each is a separate process); their results in order."""
    results: list[subprocess.CompletedProcess[bytes] | None] = [None] * len(jobs)

    async def run(index: int) -> None:
        results[index] = await jobs[index]()

    async with trio.open_nursery() as nursery:
        for index in range(len(jobs)):
            nursery.start_soon(run, index)
    return [result for result in results if result is not None]


def echoed(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    answer["headers"] = {name: value for name, value in answer["headers"]}
    return answer


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def one_line(stderr: bytes) -> str:
    (line,) = stderr.decode().splitlines()
    assert "Traceback" not in line
    return line


# ---- where the body goes -----------------------------------------------------------------


async def test_one_url_writes_the_body_to_stdout_byte_for_byte(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with server() as base:
            plain, dash = await concurrently(
                partial(get, f"{base}/binary", cwd=tmp_path),
                partial(get, "-o", "-", f"{base}/binary", cwd=tmp_path),
            )
    for result in (plain, dash):
        assert result.returncode == 0, result.stderr
        assert result.stdout == BINARY
        assert result.stderr == b""
    assert entries(tmp_path) == []  # -o - made no file or directory named "-"


async def test_output_file_and_directory_keep_the_right_names(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    with trio.fail_after(LIMIT):
        async with server() as base:
            to_file, to_new_dir, to_old_dir = await concurrently(
                partial(get, "-o", "saved.bin", f"{base}/binary", cwd=tmp_path),
                partial(get, "-o", "new/", f"{base}/files/report.txt", cwd=tmp_path),
                partial(get, "-o", "existing", f"{base}/", cwd=tmp_path),
            )
            overwrite = await get("-o", "saved.bin", f"{base}/files/x", cwd=tmp_path)
    for result in (to_file, to_new_dir, to_old_dir, overwrite):
        assert result.returncode == 0, result.stderr
        assert result.stdout == b""
        assert result.stderr == b""
    assert (tmp_path / "saved.bin").read_bytes() == b"file x"  # a named file is replaced
    assert (tmp_path / "new" / "report.txt").read_bytes() == b"file report.txt"
    assert (existing / "index.html").read_bytes() == b"hello, world"
    assert entries(tmp_path) == ["existing", "new", "saved.bin"]


async def test_output_into_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        result = await get("-o", str(tmp_path / "no" / "file"), "http://127.0.0.1:9/")
    assert result.returncode == 2
    assert "does not exist" in one_line(result.stderr)


async def test_an_empty_output_name_is_a_usage_error() -> None:
    # Path("") is ".": the body went to a file named after the URL in the current directory.
    with trio.fail_after(LIMIT):
        result = await get("-o", "", "http://127.0.0.1:9/report.txt")
    assert result.returncode == 2
    assert "-o" in one_line(result.stderr)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://h/", "index.html"),
        ("http://h/a/b/report.txt?x=1", "report.txt"),
        ("http://h/a/", "index.html"),
        ("http://h/.hidden", "hidden"),
        ("http://h/..", "index.html"),
        ("http://h/con.txt", "url-con.txt"),
        ("http://h/a%2Fb", "a_2Fb"),
    ],
)
def test_url_file_name(url: str, name: str) -> None:
    assert url_file_name(URL(url)) == name


# ---- what is sent ------------------------------------------------------------------------


async def test_header_method_and_form_data_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "form.txt").write_bytes(b"a=1\r\n&b=2\n")
    with trio.fail_after(LIMIT):
        async with server() as base:
            url = f"{base}/echo-request"
            results = await concurrently(
                partial(
                    get,
                    "-H",
                    "X-One: 1",
                    "-H",
                    "X-Two:  two ",
                    "-X",
                    "PUT",
                    "-d",
                    "@form.txt",
                    "-d",
                    "y=2",
                    url,
                    cwd=tmp_path,
                ),
                partial(get, "-d", "@-", url, stdin=b"from=stdin\n"),
                partial(
                    get,
                    "--data-binary",
                    "@form.txt",
                    "-H",
                    "content-type: text/plain",
                    url,
                    cwd=tmp_path,
                ),
                partial(get, "--json", '{"a": 1}', url),
                partial(get, "--json", "{}", "-d", "x", url),
            )
    put, stdin, binary, inline = map(echoed, results[:4])
    assert put["method"] == "PUT"
    assert put["headers"]["x-one"] == "1"
    assert put["headers"]["x-two"] == "two"
    assert put["body"] == "a=1&b=2&y=2"  # -d @FILE drops newlines, as curl does; & joins
    assert put["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert (stdin["method"], stdin["body"]) == ("POST", "from=stdin")
    assert binary["body"] == "a=1\r\n&b=2\n"  # --data-binary sends the file as it is
    assert binary["headers"]["content-type"] == "text/plain"  # -H wins over the implied type
    assert inline["method"] == "POST"
    assert json.loads(inline["body"]) == {"a": 1}
    assert inline["headers"]["content-type"] == "application/json"
    assert inline["headers"]["accept"] == "application/json"
    mixed = results[4]
    assert mixed.returncode == 2
    assert "--json cannot be combined" in one_line(mixed.stderr)


async def test_request_spec_is_what_the_server_receives(tmp_path: Path) -> None:
    (tmp_path / "body.json").write_bytes(b'{"from": "file"}\n')
    specs = [
        request_spec(),
        request_spec(data=["x=1"]),
        request_spec(method="PATCH", data=["z"]),
        request_spec(json=[f"@{tmp_path / 'body.json'}"]),
        request_spec(data=["{}"], headers=["Content-Type:"]),
    ]
    received: list[dict[str, Any]] = []
    with trio.fail_after(LIMIT):
        async with server() as base:
            url = parse_url(f"{base}/echo-request")
            for spec in specs:
                out = io.BytesIO()
                assert await fetch_command("u", url, spec=spec, out=out, err=io.StringIO()) == 0
                answer = json.loads(out.getvalue())
                answer["headers"] = dict(answer["headers"])
                received.append(answer)
    plain, form, patch, from_file, untyped = received
    assert plain["method"] == "GET"
    assert plain["body"] == ""
    assert "content-type" not in plain["headers"]
    assert (form["method"], form["body"]) == ("POST", "x=1")
    assert (patch["method"], patch["body"]) == ("PATCH", "z")
    assert from_file["body"] == '{"from": "file"}\n'  # --json @FILE is sent as it is
    assert from_file["headers"]["content-type"] == "application/json"
    assert "content-type" not in untyped["headers"]  # -H 'Content-Type:' dropped it


def test_request_spec_can_drop_an_implied_header() -> None:
    spec = request_spec(json=["{}"], headers=["Accept:", "X-A: b"])
    assert spec.method == "POST"
    assert spec.headers == [("Content-Type", "application/json"), ("X-A", "b")]
    with pytest.raises(UsageError, match="expected 'Name: value'"):
        request_spec(headers=["no colon"])
    with pytest.raises(UsageError, match="cannot read"):
        request_spec(data=["@/nonexistent/file"])


async def test_location_follows_redirects() -> None:
    # Needs Client.request()/stream(follow_redirects=True, max_redirects=N).
    with trio.fail_after(LIMIT):
        async with server() as base:
            unfollowed, followed, verbose, limited = await concurrently(
                partial(get, f"{base}/redirect"),
                partial(get, "-L", f"{base}/redirect"),
                partial(get, "-L", "-v", f"{base}/redirect"),
                partial(get, "-L", "--max-redirs", "0", f"{base}/redirect"),
            )
    assert unfollowed.returncode == 0
    assert unfollowed.stdout == b"moved"
    assert echoed(followed)["method"] == "GET"
    assert echoed(verbose)["method"] == "GET"
    # Two requests, the second on the connection the first one opened.
    assert "over a new connection (1 opened; " in verbose.stderr.decode()
    assert "; 2 request(s)" in verbose.stderr.decode()
    assert limited.returncode == 1
    assert limited.stdout == b""
    assert f"trio-connpool: GET {base}/redirect failed: " in one_line(limited.stderr)


# ---- what is shown -----------------------------------------------------------------------


async def test_include_puts_the_head_before_the_body() -> None:
    with trio.fail_after(LIMIT):
        async with server() as base:
            result = await get("-i", f"{base}/binary")
    assert result.returncode == 0, result.stderr
    head, blank, body = result.stdout.partition(b"\r\n\r\n")
    assert blank
    assert body == BINARY
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200")
    assert "content-type: application/octet-stream" in lines[1:]
    assert result.stderr == b""


async def test_include_and_verbose_show_every_head_of_a_followed_redirect() -> None:
    # As curl -L -i: each response's head, the redirect's first, then the body of the last
    # (a followed redirect's body is not written). -v shows each head on stderr.
    with trio.fail_after(LIMIT):
        async with server() as base:
            included, verbose = await concurrently(
                partial(get, "-L", "-i", f"{base}/redirect"),
                partial(get, "-L", "-v", f"{base}/redirect"),
            )
    assert included.returncode == 0, included.stderr
    first, blank, rest = included.stdout.partition(b"\r\n\r\n")
    assert blank
    assert first.startswith(b"HTTP/1.1 302")
    assert b"\r\nlocation: /echo-request" in first
    second, blank, body = rest.partition(b"\r\n\r\n")
    assert blank
    assert second.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["method"] == "GET"  # the body of the last response only
    received = [
        line for line in verbose.stderr.decode().splitlines() if line.startswith("< HTTP/1.1")
    ]
    assert [line.split()[2] for line in received] == ["302", "200"], verbose.stderr


async def test_verbose_tells_protocol_connection_and_times_on_stderr() -> None:
    with trio.fail_after(LIMIT):
        async with server() as base:
            result = await get("-v", "-H", "X-A: b", f"{base}/binary")
    assert result.returncode == 0, result.stderr
    assert result.stdout == BINARY  # -v does not touch stdout
    err = result.stderr.decode().splitlines()
    assert err[0] == f"* GET {base}/binary"
    assert "> X-A: b" in err
    assert any(line.startswith("< HTTP/1.1 200") for line in err)
    assert any(
        line.startswith("* HTTP/1.1 over a new connection (1 opened; connect ") for line in err
    )
    times = [line for line in err if line.startswith("* time: first byte")]
    assert len(times) == 1
    assert times[0].endswith(f"; {len(BINARY)} bytes of body")


async def test_verbose_with_several_urls_counts_reused_connections() -> None:
    with trio.fail_after(LIMIT):
        async with server() as base:
            result = await get("-v", "-c", "1", f"{base}/", f"{base}/files/a", f"{base}/")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr.decode() == "* 3 URLs, 3 requests over 1 new connections\n"


async def test_fail_exits_22_without_a_body() -> None:
    with trio.fail_after(LIMIT):
        async with server() as base:
            plain, failed, fine = await concurrently(
                partial(get, f"{base}/nothing-here"),
                partial(get, "-f", f"{base}/nothing-here"),
                partial(get, "-f", f"{base}/"),
            )
    assert plain.returncode == 0  # curl: an HTTP error status is still a transfer
    assert plain.stdout == b"not found"
    assert failed.returncode == 22
    assert failed.stdout == b""
    assert one_line(failed.stderr).endswith("the server answered 404 (--fail)")
    assert (fine.returncode, fine.stdout) == (0, b"hello, world")


# ---- time limits -------------------------------------------------------------------------


async def test_max_time_bounds_the_whole_command(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with server() as base:
            began = trio.current_time()
            result = await get("-m", "0.5", "-o", "out", f"{base}/slow/8000", cwd=tmp_path)
            took = trio.current_time() - began
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line == (
        f"trio-connpool: GET {base}/slow/8000 failed: operation timed out after 0.5 s (--max-time)"
    )
    assert took < 6  # the 8 s answer was not awaited
    assert entries(tmp_path) == []


async def test_timeout_also_bounds_the_pool_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def spy(**options: Any) -> Any:
        seen.append(options["timeouts"])
        return open_client(**options)

    monkeypatch.setattr("trio_connpool._commands.open_client", spy)
    url = parse_url("http://127.0.0.1:9/")
    out, err = io.BytesIO(), io.StringIO()
    with trio.fail_after(LIMIT):
        status = await fetch_command("u", url, timeout=42.0, out=out, err=err)
    assert status == 1  # port 9 refuses
    assert out.getvalue() == b""
    assert err.getvalue().startswith("trio-connpool: GET u failed: ConnectError: ")
    with trio.fail_after(LIMIT):
        status = await get_command(
            [("u", url), ("v", url)], timeout=43.0, out=io.StringIO(), err=io.StringIO()
        )
    assert status == 1
    one, several = seen
    assert (one.connect, one.read, one.write, one.pool) == (42.0,) * 4
    assert (several.connect, several.read, several.write, several.pool) == (43.0,) * 4


async def test_several_urls_refuse_stdout_and_include() -> None:
    with trio.fail_after(LIMIT):
        dash, include = await concurrently(
            partial(get, "-o", "-", "http://127.0.0.1:9/a", "http://127.0.0.1:9/b"),
            partial(get, "-i", "http://127.0.0.1:9/a", "http://127.0.0.1:9/b"),
        )
    assert dash.returncode == 2
    assert "several URLs cannot share stdout" in one_line(dash.stderr)
    assert include.returncode == 2
    assert "-i/--include: only with one URL" in one_line(include.stderr)
