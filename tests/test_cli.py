"""The command line: ``get``, ``load`` and ``demo``, run as users run them.

Most tests run ``python -m trio_connpool`` as a subprocess (``trio.run_process``) against a
real server (hypercorn, or the scripted fault server) in the test's own trio run, on
127.0.0.1 with a port from 0. They check what users see: stdout, stderr (one line per error,
never a traceback, no progress bar when piped) and the exit status (0 ok, 1 a request failed,
2 usage error). A few run the command functions in-process, for what a subprocess cannot
show cheaply (a symlink planted in the output directory, the progress bar's switch).

Every test is bounded with ``fail_after``.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
from _servers import (
    CountingApp,
    ServerConnection,
    TLSFiles,
    run_fault_server,
    serve_hypercorn,
)

from trio_connpool import ConnectError, PoolError
from trio_connpool._cli import main
from trio_connpool._commands import (
    Progress,
    UsageError,
    assign_filenames,
    describe,
    get_command,
    load_command,
    parse_url,
    percentile,
    prepare_directory,
    safe_filename,
)
from trio_connpool.http import URL

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable
    from pathlib import Path

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

# Bound on one test: a few interpreter start-ups plus loopback requests.
LIMIT = 30.0
GET_LINE = re.compile(r"^(\d{3}) (\d+) bytes (\d+\.\d) ms (\S+)(?: -> (.+))?$")
LATENCY = re.compile(
    r"^latency ms: p50 (\d+\.\d\d)  p90 (\d+\.\d\d)  p99 (\d+\.\d\d)  max (\d+\.\d\d)$", re.M
)
NO_TQDM = (
    "import sys; sys.modules['tqdm'] = None; "
    "from trio_connpool._cli import main; sys.exit(main(sys.argv[1:]))"
)


async def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m trio_connpool ARGS``, capturing stdout and stderr (pipes)."""
    return await trio.run_process(
        [sys.executable, "-m", "trio_connpool", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=cwd,
    )


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


def files(directory: Path) -> dict[str, bytes]:
    """The entries of ``directory``: file name -> content (b"" for a directory)."""
    return {p.name: b"" if p.is_dir() else p.read_bytes() for p in directory.iterdir()}


def assert_one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """stderr holds exactly one line, and no traceback; return it."""
    err = lines(result.stderr)
    assert len(err) == 1, result.stderr
    assert b"Traceback" not in result.stderr
    assert err[0].startswith("trio-connpool"), err
    return err[0]


@asynccontextmanager
async def hypercorn() -> AsyncGenerator[tuple[str, CountingApp], None]:
    app = CountingApp()
    async with serve_hypercorn(app) as base:
        yield base, app


def refused_port() -> socket.socket:
    """A bound TCP socket that does not listen: connecting to its port is refused.

    Kept open for the test, so no other process can take the port meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


# ---- get ---------------------------------------------------------------------------------


async def test_get_several_urls() -> None:
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, app):
            urls = [f"{base}/", f"{base}/bytes/1000", f"{base}/status/204", f"{base}/bytes/0"]
            result = await cli("get", "-c", "2", *urls)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    seen: dict[str, tuple[int, int]] = {}
    for line in lines(result.stdout):
        match = GET_LINE.match(line)
        assert match is not None, line
        assert match[5] is None
        seen[match[4]] = (int(match[1]), int(match[2]))
    assert seen == {
        f"{base}/": (200, len(b"hello, world")),
        f"{base}/bytes/1000": (200, 1000),
        f"{base}/status/204": (204, 0),
        f"{base}/bytes/0": (200, 0),
    }
    assert app.requests == 4
    assert 1 <= app.connections <= 2  # -c 2: one pool, at most two connections


async def test_get_an_error_status_exits_1() -> None:
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            result = await cli("get", f"{base}/", f"{base}/status/404")
    assert result.returncode == 1
    assert result.stderr == b""
    statuses = sorted(line.split()[0] for line in lines(result.stdout))
    assert statuses == ["200", "404"]


async def test_get_output_dir_writes_the_right_files(tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"  # created as needed
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            port = base.rsplit(":", 1)[1]
            urls = [f"{base}/bytes/10", f"{base}/", f"{base}/bytes/10", f"{base}/bytes/70000"]
            result = await cli("get", "-o", str(out), *urls, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    prefix = f"127.0.0.1_{port}"
    expected = {
        f"{prefix}_bytes_10": b"x" * 10,
        f"{prefix}": b"hello, world",
        f"{prefix}_bytes_10-2": b"x" * 10,
        f"{prefix}_bytes_70000": b"x" * 70000,
    }
    assert files(out) == expected
    assert list(files(tmp_path)) == ["out"]  # nothing written elsewhere
    written = {}
    for line in lines(result.stdout):
        match = GET_LINE.match(line)
        assert match is not None, line
        assert match[5] is not None
        written[match[5]] = int(match[2])
    assert written == {str(out / name): len(body) for name, body in expected.items()}


async def test_get_https_verifies_unless_insecure(tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path)  # a certificate no system trust store knows
    with trio.fail_after(LIMIT):
        async with serve_hypercorn(CountingApp(), tls) as base:
            verified = await cli("get", f"{base}/")
            insecure = await cli("get", "--insecure", f"{base}/")
    assert verified.returncode == 1
    line = assert_one_line_error(verified)
    assert line.startswith(f"trio-connpool: GET {base}/ failed: ConnectError: ")
    assert ": certificate verify failed: " in line  # OpenSSL's words follow
    assert insecure.returncode == 0, insecure.stderr
    assert insecure.stdout == b"hello, world"  # one URL: the body, as curl


async def test_get_refused_port_is_one_line_and_exit_1() -> None:
    with refused_port() as sock, trio.fail_after(LIMIT):
        port = sock.getsockname()[1]
        result = await cli("get", f"http://127.0.0.1:{port}/")
    assert result.returncode == 1
    assert result.stdout == b""
    line = assert_one_line_error(result)
    assert line.startswith(f"trio-connpool: GET http://127.0.0.1:{port}/ failed: ConnectError: ")
    assert "Connection refused" in line


async def test_get_timeout_is_one_line_and_exit_1() -> None:
    async def stall(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.wait_peer_closed()  # never answers

    with trio.fail_after(LIMIT):
        async with run_fault_server(stall) as server:
            result = await cli("get", "--timeout", "0.2", server.url("/slow"))
    assert result.returncode == 1
    line = assert_one_line_error(result)
    assert "failed: ReadTimeout: " in line


@pytest.mark.parametrize(
    "args",
    [
        ["get", "ftp://127.0.0.1/"],
        ["get", "http://"],
        ["get", "http://127.0.0.1:99999/"],
        ["get", "http://127.0.0.1/ spaces"],
        ["get", "-c", "0", "http://127.0.0.1/"],
        ["load", "not a url"],
        ["load", "http://127.0.0.1/", "-n", "0"],
        ["load", "http://127.0.0.1/", "-c", "many"],
        ["load", "http://127.0.0.1/", "--timeout", "-1"],
    ],
)
async def test_usage_errors_exit_2(args: list[str]) -> None:
    with trio.fail_after(LIMIT):
        result = await cli(*args)
    assert result.returncode == 2
    assert result.stdout == b""
    line = assert_one_line_error(result)
    assert ": error: " in line


async def test_output_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with trio.fail_after(LIMIT):
        result = await cli(
            "get", "-o", str(tmp_path / "file"), "http://127.0.0.1:9/", "http://127.0.0.1:9/b"
        )
    assert result.returncode == 2
    assert "is not a directory" in assert_one_line_error(result)


# ---- load --------------------------------------------------------------------------------


async def test_load_prints_percentiles_and_statistics() -> None:
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, app):
            result = await cli("load", f"{base}/", "-n", "50", "-c", "5")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # piped: no progress bar
    text = result.stdout.decode()
    assert f"load: 50 requests to {base}/ from 5 concurrent tasks" in text
    done = r"^done: 50 ok, 0 failed in \d+\.\d+ s \([\d,.]+ requests/s, 600 bytes received\)$"
    assert re.search(done, text, re.M), text
    assert "status: 200 x50" in text
    assert "protocol: HTTP/1.1 x50" in text
    match = LATENCY.search(text)
    assert match is not None, text
    p50, p90, p99, top = (float(value) for value in match.groups())
    assert 0 < p50 <= p90 <= p99 <= top
    pool = re.search(
        r"^pool: connections=(\d) idle=(\d) in_use=0 connecting=0 waiting=0 leases=0 "
        r"max_connections=5$",
        text,
        re.M,
    )
    assert pool is not None, text
    assert pool[1] == pool[2]
    assert 1 <= int(pool[1]) <= 5
    assert re.search(rf"^  {re.escape(base)} \(HTTP/1\.1\): idle={pool[1]} in_use=0", text, re.M)
    assert app.requests == 50
    assert app.connections <= 5


async def test_load_refused_port_is_one_line_and_exit_1() -> None:
    with refused_port() as sock, trio.fail_after(LIMIT):
        port = sock.getsockname()[1]
        result = await cli("load", f"http://127.0.0.1:{port}/", "-n", "5", "-c", "2")
    assert result.returncode == 1
    line = assert_one_line_error(result)
    assert line.startswith("trio-connpool: 5 of 5 requests failed; first: ConnectError: ")
    text = result.stdout.decode()
    assert "done: 0 ok, 5 failed" in text
    assert "errors: ConnectError x5" in text
    assert "latency ms: n/a" in text


# ---- progress ----------------------------------------------------------------------------


async def test_piped_output_has_no_progress_bar() -> None:
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            load = await cli("load", f"{base}/", "-n", "300", "-c", "4")
            get = await cli("get", *(f"{base}/bytes/{n}" for n in range(20)))
    for result in (load, get):
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        assert b"\r" not in result.stdout
        assert b"\x1b" not in result.stdout


async def _run_on_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run ``argv`` with stderr on a pseudo-terminal; return its status and what it drew."""
    import fcntl  # POSIX only
    import pty
    import struct
    import termios

    master, replica = pty.openpty()
    # A real terminal has a size; a fresh pty is 0x0, which tqdm draws as nothing.
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    drawn = bytearray()

    async def read_terminal() -> None:
        async with trio.lowlevel.FdStream(master) as terminal:
            for _ in range(100_000):  # bounded: each turn reads data or ends
                try:
                    data = await terminal.receive_some()
                except trio.BrokenResourceError:  # EIO: the last writer closed the pty
                    return
                if not data:
                    return
                drawn.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_terminal)
        try:
            result = await trio.run_process(
                argv, stdout=subprocess.DEVNULL, stderr=replica, check=False
            )
        finally:
            os.close(replica)
    return result.returncode, bytes(drawn)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
async def test_progress_bar_on_a_terminal_only_with_tqdm() -> None:
    pytest.importorskip("tqdm")
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            args = ["load", f"{base}/", "-n", "200", "-c", "4"]
            status, drawn = await _run_on_terminal([sys.executable, "-m", "trio_connpool", *args])
            assert status == 0, drawn
            assert b"0/200" in drawn  # tqdm drew its bar
            assert b"Traceback" not in drawn
            # Without tqdm: a plain line, redrawn in place, and no error.
            status, drawn = await _run_on_terminal([sys.executable, "-c", NO_TQDM, *args])
            assert status == 0, drawn
            assert drawn.startswith(b"\r\x1b[Kload: 0/200 req, ")
            assert drawn.endswith(b"\r\x1b[K")  # erased before the summary
            assert b"Traceback" not in drawn
            # --no-progress: none even with tqdm.
            status, drawn = await _run_on_terminal(
                [sys.executable, "-m", "trio_connpool", *args, "--no-progress"]
            )
            assert status == 0, drawn
            assert drawn == b""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_switches() -> None:
    terminal = _Terminal()
    out = io.StringIO()
    # Not a terminal, or disabled: nothing is drawn, lines go straight through.
    for stream, enabled in ((io.StringIO(), True), (terminal, False)):
        bar = Progress(3, description="x", stream=stream, enabled=enabled)
        assert not bar.shown
        bar.advance()
        bar.print("line", out)
        bar.close()
    assert out.getvalue() == "line\nline\n"
    assert terminal.getvalue() == ""


async def test_progress_without_tqdm_is_a_plain_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    terminal, out = _Terminal(), io.StringIO()
    bar = Progress(3, description="x", stream=terminal, enabled=True)
    assert bar.shown
    bar.advance()
    bar.advance(failed=True)
    bar.refresh()
    bar.print("above", out)
    bar.close()
    bar.close()  # idempotent
    drawn = terminal.getvalue()
    assert drawn.startswith("\r\x1b[Kx: 0/3 req, 0.0 s, ")
    assert "\r\x1b[Kx: 2/3 req, 1 failed, " in drawn
    assert drawn.endswith("\r\x1b[K")  # erased at the end
    assert out.getvalue() == "above\n"


# ---- demo --------------------------------------------------------------------------------


async def test_demo_still_works() -> None:
    with trio.fail_after(LIMIT):
        result = await cli("demo", "--quiet", "-n", "100", "-c", "10")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert "server saw" in result.stdout.decode()


# ---- in-process: the command functions and helpers ---------------------------------------


async def test_get_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    stdout, stderr = io.StringIO(), io.StringIO()
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            url = parse_url(f"{base}/")
            (out / safe_filename(url)).symlink_to(outside)
            status = await get_command([(f"{base}/", url)], output_dir=out, out=stdout, err=stderr)
    assert status == 1
    assert outside.read_bytes() == b"precious"
    assert stdout.getvalue() == ""
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith(f"trio-connpool: GET {base}/ failed: OSError: ")


async def test_get_draws_lines_above_the_bar_and_saves_files(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    stdout, terminal = io.StringIO(), _Terminal()
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            texts = [f"{base}/bytes/{n}" for n in (1, 2, 3)]
            status = await get_command(
                [(text, parse_url(text)) for text in texts],
                concurrency=2,
                output_dir=tmp_path,
                out=stdout,
                err=terminal,
            )
    assert status == 0
    assert len(stdout.getvalue().splitlines()) == 3
    assert "0/3" in terminal.getvalue()  # the bar was drawn on the "terminal"
    assert sorted(len(body) for body in files(tmp_path).values()) == [1, 2, 3]


async def test_get_removes_a_partial_file(tmp_path: Path) -> None:
    async def truncate(conn: ServerConnection) -> None:
        await conn.receive_request()
        await conn.send_head(content_length=100)
        await conn.send_raw(b"x" * 10)  # then close: 90 bytes short

    stdout, stderr = io.StringIO(), io.StringIO()
    with trio.fail_after(LIMIT):
        async with run_fault_server(truncate) as server:
            text = server.url("/short")
            status = await get_command(
                [(text, parse_url(text))], output_dir=tmp_path, out=stdout, err=stderr
            )
    assert status == 1
    assert files(tmp_path) == {}
    assert stdout.getvalue() == ""
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith(f"trio-connpool: GET {text} failed: RemoteProtocolError: ")


async def test_load_draws_a_bar_on_a_terminal() -> None:
    pytest.importorskip("tqdm")
    stdout, terminal = io.StringIO(), _Terminal()
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            text = f"{base}/"
            status = await load_command(
                text, parse_url(text), requests=20, concurrency=3, out=stdout, err=terminal
            )
    assert status == 0
    assert "0/20" in terminal.getvalue()
    assert "\r" not in stdout.getvalue()


async def test_closed_stdout_pipe_exits_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: writes fail with EPIPE (`... | head -0`)
    try:
        with trio.fail_after(LIMIT):
            async with hypercorn() as (base, _):
                result = await trio.run_process(
                    [sys.executable, "-m", "trio_connpool", "get", f"{base}/", f"{base}/"],
                    stdout=write_end,
                    capture_stderr=True,
                    check=False,
                )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == b""


def test_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_args: object) -> int:
        raise BaseExceptionGroup(
            "", [KeyboardInterrupt(), BaseExceptionGroup("", [KeyboardInterrupt()])]
        )

    monkeypatch.setattr("trio_connpool._cli._run", interrupted)
    assert main(["get", "http://127.0.0.1:9/"]) == 130
    assert capsys.readouterr().err == "trio-connpool: interrupted\n"

    def failed(*_args: object) -> int:
        raise BaseExceptionGroup("", [KeyboardInterrupt(), RuntimeError("a bug")])

    monkeypatch.setattr("trio_connpool._cli._run", failed)
    with pytest.raises(BaseExceptionGroup):  # a bug keeps its traceback
        main(["get", "http://127.0.0.1:9/"])


async def test_load_counts_error_statuses_as_failures() -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    with trio.fail_after(LIMIT):
        async with hypercorn() as (base, _):
            text = f"{base}/status/503"
            status = await load_command(
                text, parse_url(text), requests=7, concurrency=20, out=stdout, err=stderr
            )
    assert status == 1
    report = stdout.getvalue()
    assert "from 7 concurrent tasks" in report  # never more tasks than requests
    assert "done: 0 ok, 7 failed" in report
    assert "status: 503 x7" in report
    assert stderr.getvalue() == ""  # every request got an answer: nothing to explain


class _Refusal:
    """Stands in for ``open_client(...)`` refusing its options, as it does on entry."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def __aenter__(self) -> None:
        raise ValueError(self.message)

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - never entered
        raise AssertionError("unreachable")


def _refusing(message: str) -> Callable[..., _Refusal]:
    def open_client(**_options: object) -> _Refusal:
        return _Refusal(message)

    return open_client


async def test_unavailable_option_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "trio_connpool._commands.open_client", _refusing("http2=True is not supported yet")
    )
    url = parse_url("http://127.0.0.1:9/")
    with pytest.raises(UsageError, match=r"^--http2: http2=True is not supported yet$"):
        await get_command([("http://127.0.0.1:9/", url)], http2=True, out=io.StringIO())
    with pytest.raises(UsageError, match=r"^--http2: "):
        await load_command("u", url, http2=True, out=io.StringIO())


def test_main_reports_an_unavailable_option_as_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("trio_connpool._commands.open_client", _refusing("not today"))
    assert main(["get", "--http2", "http://127.0.0.1:9/"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "trio-connpool get: error: --http2: not today\n"
    assert captured.out == ""


def test_main_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["load", "http://127.0.0.1/", "-n", "-3"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "trio-connpool load: error: argument -n/--requests: must be at least 1, got -3 "
        "(see 'trio-connpool load --help')\n"
    )


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://127.0.0.1:8000/bytes/10?x=1", "127.0.0.1_8000_bytes_10_x_1"),
        ("http://example.com/", "example.com"),
        ("https://example.com:443/a/b.txt", "example.com_a_b.txt"),
        ("http://example.com/../../etc/passwd", "example.com_.._.._etc_passwd"),
        ("http://example.com/%2e%2e/%2F", "example.com_2e_2e_2F"),
        ("http://[::1]:8080/x", "1_8080_x"),
        ("http://nul/", "url-nul"),
        ("http://con.example/", "url-con.example"),
    ],
)
def test_safe_filename(url: str, name: str) -> None:
    assert safe_filename(URL(url)) == name


def test_safe_filename_never_escapes_and_stays_short() -> None:
    long_a = URL("http://example.com/" + "a" * 500)
    long_b = URL("http://example.com/" + "a" * 499 + "b")
    names = {safe_filename(long_a), safe_filename(long_b)}
    assert len(names) == 2  # cut names still differ (hash of the whole URL)
    for name in [*names, safe_filename(URL("http://example.com/.../.hidden"))]:
        assert len(name) <= 120
        assert "/" not in name
        assert "\\" not in name
        assert not name.startswith((".", "-"))


def test_assign_filenames_makes_names_distinct() -> None:
    urls = [
        URL("http://h/a.txt"),
        URL("http://h/a.txt"),
        URL("http://h/A.txt"),  # differs only in case: a clash on macOS and Windows
        URL("http://h/a_txt"),
    ]
    assert assign_filenames(urls) == ["h_a.txt", "h_a-2.txt", "h_A-3.txt", "h_a_txt"]
    hosts = [URL("http://example.com/"), URL("http://example.com"), URL("http://h:81/x.1")]
    assert assign_filenames([*hosts, hosts[2]]) == [
        "example.com",
        "example.com-2",
        "h_81_x.1",
        "h_81_x-2.1",
    ]


def test_percentile_is_nearest_rank() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert [percentile(values, f) for f in (0.0, 0.25, 0.5, 0.9, 0.99, 1.0)] == [
        1.0,
        1.0,
        2.0,
        4.0,
        4.0,
        4.0,
    ]
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_describe_is_one_line_with_the_os_reason() -> None:
    refused = ConnectionRefusedError(111, "Error connecting: Connection refused")
    try:
        try:
            raise OSError("all attempts failed") from BaseExceptionGroup("all", [refused])
        except OSError as exc:
            raise ConnectError("cannot connect\nto here", key="k") from exc
    except ConnectError as exc:
        text = describe(exc)
    assert text == "ConnectError: cannot connect to here: " + os.strerror(111)
    assert describe(PoolError()) == "PoolError"
    assert describe(ValueError("plain")) == "ValueError: plain"


def test_prepare_directory(tmp_path: Path) -> None:
    made = prepare_directory(str(tmp_path / "a" / "b"))
    assert made.is_dir()
    assert prepare_directory(str(made)) == made  # already there: fine
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(UsageError, match="is not a directory"):
        prepare_directory(str(tmp_path / "f"))
    with pytest.raises(UsageError, match="cannot create"):
        prepare_directory(str(tmp_path / "f" / "below"))
