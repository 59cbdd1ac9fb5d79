"""The public surface: the pinned names exist, and reprs name the public module."""

from __future__ import annotations

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
        "ReadTimeout",
        "WriteTimeout",
        "RemoteProtocolError",
        "LocalProtocolError",
    ],
    trio_connpool.http: [
        "open_client",
        "Client",
        "Response",
        "RequestSender",
        "PoolSender",
        "NoPoolSender",
        "HTTPConnector",
        "HTTP11Connection",
        "HTTP2Connection",
        "Timeouts",
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
