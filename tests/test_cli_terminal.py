"""``load`` in a real terminal: a pseudo-terminal holds the command's stdout and stderr.

What a person sees: the progress line keeps moving while a request is slow (it is redrawn on
a timer, not only when a request completes), with tqdm and without; and Ctrl-C (SIGINT to the
command's process group) prints the summary of what was done so far and exits 130.

The command runs as a subprocess in its own session, so the signal reaches only it; every
wait is bounded, and the process is killed by its own PID if a test fails half-way.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
from typing import TYPE_CHECKING

import pytest
import trio
from _servers import CountingApp, serve_hypercorn

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")

LIMIT = 20.0
NO_TQDM = (
    "import sys; sys.modules['tqdm'] = None; "
    "from trio_connpool._cli import main; sys.exit(main(sys.argv[1:]))"
)


class Terminal:
    """A command running with stdout and stderr on a fresh 80x24 pseudo-terminal."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.screen = bytearray()  # every byte the command wrote, in order
        self.returncode: int | None = None
        self.process: trio.Process | None = None
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import fcntl  # POSIX only
        import pty
        import struct
        import termios

        master, replica = pty.openpty()
        fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, master)
            try:
                self.process = await trio.lowlevel.open_process(
                    self.argv, stdout=replica, stderr=replica, start_new_session=True
                )
            finally:
                os.close(replica)  # ours; the child keeps its copies
            task_status.started()
            try:
                self.returncode = await self.process.wait()
            finally:
                if self.process.returncode is None:  # the test failed half-way
                    self.process.kill()
                    with trio.CancelScope(shield=True):
                        await self.process.wait()

    async def _read(self, master: int) -> None:
        async with trio.lowlevel.FdStream(master) as terminal:
            for _ in range(100_000):  # bounded: each turn reads data or ends
                try:
                    data = await terminal.receive_some()
                except trio.BrokenResourceError:  # EIO: the command's side is closed
                    data = b""
                self.screen.extend(data)
                self._changed.set()
                self._changed = trio.Event()
                if not data:
                    return

    async def wait_for(self, seen: Callable[[bytes], bool]) -> None:
        """Wait until the screen satisfies ``seen`` (the caller bounds the wait)."""
        while not seen(bytes(self.screen)):
            await self._changed.wait()


async def test_progress_moves_while_a_request_is_slow() -> None:
    # One request answered after 1.5 s: the line must be redrawn during the wait (elapsed
    # time and rate change), several times, before the summary arrives.
    with trio.fail_after(LIMIT):
        async with serve_hypercorn(CountingApp()) as base:
            args = ["load", f"{base}/slow/1500", "-n", "1", "-c", "1"]
            with_tqdm = Terminal([sys.executable, "-m", "trio_connpool", *args])
            plain = Terminal([sys.executable, "-c", NO_TQDM, *args])
            async with trio.open_nursery() as nursery:
                await nursery.start(with_tqdm.run)
                await nursery.start(plain.run)
    # tqdm draws "load:   0%|...| 0/1 [00:01<?, ?req/s]"; the plain line "load: 0/1 req, ...".
    tqdm_marker = b"0/1 [" if importlib.util.find_spec("tqdm") is not None else b"0/1 req"
    for terminal, marker in ((with_tqdm, tqdm_marker), (plain, b"0/1 req")):
        screen = bytes(terminal.screen)
        assert terminal.returncode == 0, screen
        assert b"done: 1 ok, 0 failed" in screen
        before = screen[: screen.index(b"done: ")]
        assert before.count(marker) >= 4, screen  # every 0.2 s: about 7 in 1.5 s
        assert b"Traceback" not in screen
    if tqdm_marker == b"0/1 [":
        assert b"0/1 [00:01<" in bytes(with_tqdm.screen)  # tqdm's elapsed time moved on


async def test_ctrl_c_prints_the_partial_summary_and_exits_130() -> None:
    with trio.fail_after(LIMIT):
        async with serve_hypercorn(CountingApp()) as base:
            args = ["load", f"{base}/", "-n", "1000000", "-c", "2"]
            terminal = Terminal([sys.executable, "-c", NO_TQDM, *args])
            async with trio.open_nursery() as nursery:
                await nursery.start(terminal.run)
                # Some requests done (the plain line shows them), then Ctrl-C.
                await terminal.wait_for(
                    lambda screen: re.search(rb"[1-9]\d*/1000000 req", screen) is not None
                )
                assert terminal.process is not None
                os.killpg(terminal.process.pid, signal.SIGINT)
    assert terminal.returncode == 130
    screen = bytes(terminal.screen).decode()
    match = re.search(
        r"interrupted: (\d+) of 1000000 requests done, (\d+) ok, 0 failed in (\d+\.\d+) s "
        r"\(([\d,.]+) requests/s, ([\d,]+) bytes received\)",
        screen,
    )
    assert match is not None, screen
    assert int(match[1]) == int(match[2]) > 0
    assert int(match[5].replace(",", "")) == 12 * int(match[1])  # b"hello, world" each
    assert "status: 200 x" in screen
    assert "latency ms: p50 " in screen
    assert screen.rstrip().endswith("trio-connpool: interrupted")
    assert "Traceback" not in screen
