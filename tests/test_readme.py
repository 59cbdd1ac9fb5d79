"""The README's examples run: every ```python block, each in a fresh interpreter.

The examples point at public names (``https://example.com/``, a database host, a Redis-like
port) and the tests run with no network, so each block is run with those rewritten to local
servers: hypercorn over TLS (a trustme CA the default trust store takes from
``SSL_CERT_FILE``), a plain TCP port, and a line server that answers ``PING`` with ``PONG``.
A block that cannot run here is marked in the README by an HTML comment on the line before
it, ``<!-- readme-test: skip the reason -->``, and listed in `SKIPPED` below; every other
block runs. The number of blocks is pinned, so a block added to the README without being
run (or skipped, with its reason) fails here until this file counts it.
"""

from __future__ import annotations

import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
from _servers import CountingApp, Receive, Scope, Send, TLSFiles, serve_hypercorn

import trio_connpool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = Path(trio_connpool.__file__).resolve().parent.parent

# The ```python blocks in the README, and which of them are skipped (by the first line of
# the block, with the reason the README's marker gives). Update both when the README changes.
BLOCKS = 16
SKIPPED: dict[int, str] = {
    433: "needs a private CA and a client certificate",
    470: "needs a Unix socket (a Docker daemon)",
    514: "needs a proxy at proxy.example:3128",
    550: "needs a proxy at proxy.example:3128",
    715: "needs opentelemetry-exporter-prometheus and serves a fixed port",
}
# Bound on one block's run (they take well under a second each here).
BLOCK_TIMEOUT = 60

_FENCE = re.compile(r"^(?P<indent> *)```python\s*$")
_SKIP = re.compile(r"^\s*<!--\s*readme-test:\s*skip\s+(?P<reason>.+?)\s*-->\s*$")
# What the examples may point at and the local stand-in for each (filled in per run).
_PUBLIC_URL = re.compile(r"https?://(?!127\.0\.0\.1[:/])[^\s\"')]+")


@attrs.frozen
class Block:
    line: int  # where its code starts in README.md (1-based)
    code: str
    skip: str | None  # the marker's reason, or None


def readme_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text``, dedented, with its skip marker if any."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent = fence["indent"]
        start = index + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"README.md:{index + 1}: a python block is never closed"
        body = [line.removeprefix(indent) for line in lines[start:end]]
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = _SKIP.match(previous)
        blocks.append(Block(start + 1, "\n".join(body) + "\n", marker and marker["reason"]))
        index = end + 1
    return blocks


def test_the_block_parser() -> None:
    text = (
        "x\n```python\nprint(1)\n```\n\n<!-- readme-test: skip needs a GPU -->\n"
        "- item:\n  ```python\n  if True:\n      print(2)\n  ```\n```sh\nls\n```\n"
    )
    assert readme_blocks(text) == [
        Block(3, "print(1)\n", None),
        Block(9, "if True:\n    print(2)\n", None),
    ]
    marked = "<!-- readme-test: skip needs a GPU -->\n```python\npass\n```\n"
    assert readme_blocks(marked) == [Block(3, "pass\n", "needs a GPU")]


def test_every_block_is_counted_and_each_main_is_run() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == BLOCKS, (
        f"README.md has {len(blocks)} python blocks, this test knows {BLOCKS}: run the new "
        "one here (or mark it <!-- readme-test: skip REASON --> and list it in SKIPPED)"
    )
    assert {block.line: block.skip for block in blocks if block.skip} == SKIPPED
    for block in blocks:
        compile(block.code, f"README.md:{block.line}", "exec")
        if "async def main(" in block.code:
            assert "trio.run(main)" in block.code, f"README.md:{block.line} never runs main()"


# ---- the local stand-ins ----------------------------------------------------------------


async def _serve_lines(stream: trio.SocketStream) -> None:
    """PING -> PONG, one answer per line, until the client closes."""
    buffer = b""
    async with stream:
        for _ in range(10_000):  # bounded
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                await stream.send_all(b"PONG\n" if line == b"PING" else b"ERR\n")


class ReadmeApp(CountingApp):
    """CountingApp plus ``/redirect/{n}``: n redirects (302) in a row, then ``/``."""

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/redirect/"):
            hops = int(path.removeprefix("/redirect/"))
            location = b"/" if hops <= 1 else f"/redirect/{hops - 1}".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [(b"location", location)],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await super()._route(scope, receive, send)


@attrs.frozen
class Local:
    https: str  # https://127.0.0.1:PORT, trusted through SSL_CERT_FILE
    tcp_port: int
    line_port: int
    env: dict[str, str]

    def rewrite(self, code: str) -> str:
        code = code.replace("https://example.com", self.https)
        code = code.replace('("db.internal", 5432)', f'("127.0.0.1", {self.tcp_port})')
        code = code.replace('("127.0.0.1", 6379)', f'("127.0.0.1", {self.line_port})')
        left = _PUBLIC_URL.findall(code)
        assert not left, f"the test has no local stand-in for {left}"
        return code


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    files = TLSFiles.create(tmp_path)
    ca = tmp_path / "ca.pem"
    files.ca.cert_pem.write_to_path(str(ca))
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "SSL_CERT_FILE": str(ca)}
    env.pop("SSL_CERT_DIR", None)
    async with (
        serve_hypercorn(ReadmeApp(), files) as https,
        serve_hypercorn(CountingApp()) as plain,
        trio.open_nursery() as nursery,
    ):
        listeners = await nursery.start(partial(trio.serve_tcp, _serve_lines, 0, host="127.0.0.1"))
        line_port = listeners[0].socket.getsockname()[1]
        tcp_port = int(plain.rpartition(":")[2])
        yield Local(https, tcp_port, line_port, env)
        nursery.cancel_scope.cancel()


async def _run(code: str, env: dict[str, str]) -> tuple[int, str]:
    with trio.fail_after(BLOCK_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-c", code],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    return done.returncode, output


async def test_the_default_trust_store_takes_ssl_cert_file(local: Local) -> None:
    # What lets the HTTPS examples run against the local server: our default context.
    code = (
        "import trio\nfrom trio_connpool import open_client\n"
        "async def main():\n    async with open_client() as client:\n"
        f"        print((await client.get({local.https + '/'!r})).status_code)\n"
        "trio.run(main)\n"
    )
    status, output = await _run(code, local.env)
    assert (status, output.strip()) == (0, "200")
    untrusting = {k: v for k, v in local.env.items() if k != "SSL_CERT_FILE"}
    status, output = await _run(code, untrusting)
    assert status == 1
    assert "certificate verify failed" in output


def _block_ids() -> list[str]:
    found = [f"README.md:{block.line}" for block in readme_blocks(README.read_text("utf-8"))]
    # (Fewer blocks than BLOCKS fails the count test; the ids must still be enough.)
    return (found + [f"block-{index}" for index in range(BLOCKS)])[:BLOCKS]


@pytest.mark.parametrize("index", range(BLOCKS), ids=_block_ids())
async def test_the_block_runs(local: Local, index: int) -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert index < len(blocks), "README.md has fewer python blocks than BLOCKS"
    block = blocks[index]
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    status, output = await _run(local.rewrite(block.code), local.env)
    assert status == 0, f"README.md:{block.line} failed:\n{output}"
