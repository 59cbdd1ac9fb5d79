"""Real proxies for the tests: squid (HTTP forwarding, CONNECT, TLS to the proxy, Basic auth)
and microsocks (SOCKS5 with a user and password), each run on 127.0.0.1 from its own files and
stopped by its PID; and scripted trio proxies for the faults (a status answer, a close, a
stall).

A missing binary skips the test with the reason, unless ``TRIO_CONNPOOL_REQUIRE_PROXIES=1``
is set (CI installs them), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, Generator
from pathlib import Path

import attrs
import pytest
import trio
from _servers import TLSFiles

SQUID = "/usr/sbin/squid"
MICROSOCKS = "/usr/bin/microsocks"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
USER = "alice"
PASSWORD = "s3cret:pw"  # a colon in a password must survive the URL and Basic encoding
_STARTUP_WAIT = 20.0


def require(*paths: str) -> None:
    """Skip (or fail, when the proxies are required) unless every binary exists."""
    missing = [path for path in paths if not os.access(path, os.X_OK)]
    if not missing:
        return
    reason = f"proxy tests need {', '.join(missing)} (apt-get install squid-openssl microsocks)"
    if os.environ.get("TRIO_CONNPOOL_REQUIRE_PROXIES") == "1":
        pytest.fail(reason + "; TRIO_CONNPOOL_REQUIRE_PROXIES=1 says they must run")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path | None) -> None:
    deadline = time.monotonic() + _STARTUP_WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"proxy exited with {process.returncode}: {text}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {_STARTUP_WAIT} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _htpasswd_line(user: str, password: str) -> str:
    hashed = subprocess.run(
        ["openssl", "passwd", "-apr1", password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{user}:{hashed}\n"


@attrs.define
class Squid:
    """A running squid: ``plain`` (no auth), ``auth`` (Basic auth required) and ``tls``
    (TLS to the proxy, no auth) ports; ``tls_files`` is the proxy's certificate."""

    directory: Path
    plain: int
    auth: int
    tls: int
    tls_files: TLSFiles

    def url(self, which: str = "plain", *, userinfo: str = "") -> str:
        scheme = "https" if which == "tls" else "http"
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}127.0.0.1:{getattr(self, which)}"

    def access_log(self) -> str:
        path = self.directory / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def run_squid() -> Generator[Squid]:
    """Run squid in the foreground (-N) from a config of its own in a fresh directory."""
    require(SQUID, NCSA_AUTH)
    # Not under pytest's tmp_path: squid's helpers and logs run as the "proxy" user, who
    # cannot enter pytest's private directories.
    directory = Path(tempfile.mkdtemp(prefix="trio-connpool-squid-"))
    try:
        directory.chmod(0o777)
        tls_files = TLSFiles.create(directory)
        for path in (tls_files.certfile, tls_files.keyfile):
            path.chmod(0o644)
        passwords = directory / "htpasswd"
        passwords.write_text(_htpasswd_line(USER, PASSWORD))
        passwords.chmod(0o644)
        plain, auth, tls = free_port(), free_port(), free_port()
        user = "cache_effective_user proxy" if os.geteuid() == 0 else ""
        config = directory / "squid.conf"
        config.write_text(
            f"""
http_port 127.0.0.1:{plain} name=plain
http_port 127.0.0.1:{auth} name=auth
https_port 127.0.0.1:{tls} name=tls tls-cert={tls_files.certfile} tls-key={tls_files.keyfile}
pid_filename {directory}/squid.pid
{user}
cache deny all
cache_mem 8 MB
cache_store_log none
access_log stdio:{directory}/access.log
cache_log {directory}/cache.log
coredump_dir {directory}
shutdown_lifetime 0 seconds
auth_param basic program {NCSA_AUTH} {passwords}
auth_param basic children 2
auth_param basic realm trio-connpool tests
acl localhost src 127.0.0.1/32
acl SSL_ports port 1-65535
acl Safe_ports port 1-65535
acl CONNECT method CONNECT
acl authport myportname auth
acl authed proxy_auth REQUIRED
acl forbidden dstdomain forbidden.invalid
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access deny forbidden
http_access deny authport !authed
http_access allow localhost
http_access deny all
"""
        )
        log = directory / "cache.log"
        process = subprocess.Popen(
            [SQUID, "-N", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for port in (plain, auth, tls):
                _wait_listening(port, process, log)
            yield Squid(directory, plain, auth, tls, tls_files)
        finally:
            _stop(process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@attrs.define
class Socks:
    port: int

    def url(self, scheme: str = "socks5", *, userinfo: str = f"{USER}:{PASSWORD}") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}127.0.0.1:{self.port}"


@contextlib.contextmanager
def run_microsocks() -> Generator[Socks]:
    """Run microsocks on 127.0.0.1 with USER and PASSWORD required."""
    require(MICROSOCKS)
    port = free_port()
    process = subprocess.Popen(
        [MICROSOCKS, "-i", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, process, None)
        yield Socks(port)
    finally:
        _stop(process)


# ---- scripted proxies for the faults --------------------------------------------------------


@attrs.define
class ScriptedProxy:
    """A proxy that reads one request head per connection and then runs a fault."""

    port: int = 0
    heads: list[bytes] = attrs.Factory(list[bytes])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.asynccontextmanager
async def scripted_proxy(fault: str) -> AsyncGenerator[ScriptedProxy]:
    """``fault``: ``"407"``, ``"403"``, ``"502"`` (answer CONNECT with that status),
    ``"close"`` (close after reading the request), ``"stall"`` (never answer), ``"junk"``
    (a head that is not HTTP)."""
    proxy = ScriptedProxy()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            head = await _read_head(stream)
            proxy.heads.append(head)
            if fault == "close":
                return
            if fault == "stall":
                await trio.sleep_forever()
            if fault == "junk":
                await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")
                return
            reasons = {"407": "Proxy Authentication Required", "403": "Forbidden"}
            reason = reasons.get(fault, "Bad Gateway")
            extra = b'Proxy-Authenticate: Basic realm="x"\r\n' if fault == "407" else b""
            body = b"denied"
            await stream.send_all(
                f"HTTP/1.1 {fault} {reason}\r\n".encode()
                + extra
                + b"Content-Length: 6\r\n\r\n"
                + body
            )
            with trio.move_on_after(5):
                await stream.receive_some(1)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()
