"""The public surface: the pinned names exist, reprs name the public module, and importing the
package for the generic pool loads no HTTP protocol library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import trio_connpool
import trio_connpool.http

PINNED = {
    trio_connpool: [
        "open_pool",
        "create_pool",
        "open_client",
        "Pool",
        "PoolOptions",
        "Connection",
        "Instrument",
        "ReleasePolicy",
        "Reservation",
        "PoolStatistics",
        "KeyStatistics",
        "PoolError",
        "PoolTimeout",
        "PoolClosed",
        "TooManyWaiters",
        "ConnectError",
        "ConnectTimeout",
        "ProxyError",
        "ReadTimeout",
        "WriteTimeout",
        "RemoteProtocolError",
        "LocalProtocolError",
        "TrioRequiredError",
        "Timeouts",
        "HTTPConnector",
        "TooManyRedirects",
        "StreamConsumed",
    ],
    trio_connpool.http: [
        "open_client",
        "Client",
        "Response",
        "RequestSender",
        "PoolSender",
        "Proxy",
        "ProxyError",
        "NoPoolSender",
        "HTTPConnector",
        "HTTP11Connection",
        "HTTP2Connection",
        "Timeouts",
        "TooManyRedirects",
        "StreamConsumed",
        "USE_CLIENT_DEFAULT",
        "TimeoutTypes",
        "QueryParamTypes",
    ],
}


@pytest.mark.parametrize("module", list(PINNED), ids=lambda m: getattr(m, "__name__", "?"))
def test_pinned_names_are_exported(module: object) -> None:
    names: list[str] = getattr(module, "__all__")  # noqa: B009
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(module, name), name
    assert set(PINNED[module]) <= set(names)  # type: ignore[index]


def test_top_level_names_say_trio_connpool() -> None:
    assert trio_connpool.Pool.__module__ == "trio_connpool"
    assert trio_connpool.PoolError.__module__ == "trio_connpool"
    assert repr(trio_connpool.Pool).startswith("<class 'trio_connpool.Pool'")
    assert trio_connpool.open_client is trio_connpool.http.open_client


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports this very trio_connpool; its stdout."""
    root = str(Path(trio_connpool.__file__).resolve().parent.parent)
    path = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


_PROTOCOL_LIBRARIES = "{'h2', 'hpack', 'h11', 'hyperframe'}"


def test_import_loads_no_protocol_library() -> None:
    loaded = _python(
        "import trio_connpool, sys; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {_PROTOCOL_LIBRARIES}))"
    )
    assert loaded == "[]"


def test_http_names_resolve_on_first_use() -> None:
    code = """
import sys
import trio_connpool
assert "trio_connpool.http" not in sys.modules
assert "open_client" in dir(trio_connpool)
from trio_connpool import open_client
assert "h2" in sys.modules and "hpack" in sys.modules
import trio_connpool.http
assert open_client is trio_connpool.open_client is trio_connpool.http.open_client
assert open_client.__module__ == "trio_connpool.http._client"
try:
    trio_connpool.open_clinet
except AttributeError as exc:
    print(exc)
"""
    assert _python(code) == "module 'trio_connpool' has no attribute 'open_clinet'"
    # The names of the HTTP layer a recipe needs load it on first use too.
    code = """
import sys
import trio_connpool
assert "trio_connpool.http" not in sys.modules
from trio_connpool import Timeouts, HTTPConnector
import trio_connpool.http
assert Timeouts is trio_connpool.http.Timeouts
assert HTTPConnector is trio_connpool.http.HTTPConnector
print("ok")
"""
    assert _python(code) == "ok"
    # The subpackage is reachable as an attribute too, as it was when imported eagerly.
    client = _python("import trio_connpool; print(trio_connpool.http.Client.__name__)")
    assert client == "Client"


def test_the_command_line_and_its_demo_need_no_h11() -> None:
    # h11 is a test and benchmark reference only: the demo's server speaks HTTP/1.1 itself.
    loaded = _python(
        "import sys, trio_connpool._cli, trio_connpool._demo, trio_connpool.http; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'h11'))"
    )
    assert loaded == "[]"
