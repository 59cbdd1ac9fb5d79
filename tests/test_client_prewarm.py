"""Client.prewarm against a real local server: the connections it opens serve the requests."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import trio
from _servers import CountingApp, serve_hypercorn

from trio_connpool import ConnectError, Instrument
from trio_connpool.http import NoPoolSender, open_client


class Connects(Instrument):
    def __init__(self) -> None:
        self.started = 0

    def connect_started(self, key: Hashable) -> None:
        self.started += 1


async def test_prewarmed_connections_serve_the_first_requests() -> None:
    app = CountingApp()
    connects = Connects()
    async with serve_hypercorn(app) as base, open_client(instruments=[connects]) as client:
        assert await client.prewarm(base + "/any/path?q=1", 3) == 3
        assert connects.started == 3
        assert client.pool is not None
        assert client.pool.statistics().idle == 3
        statuses: list[int] = []

        async def get() -> None:
            response = await client.get(base + "/slow/50")
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(get)
        assert statuses == [200, 200, 200]
        assert app.max_active == 3  # concurrent
        assert connects.started == 3  # the requests opened no connection
        assert app.connections == 3  # the server saw the three prewarmed ones, no more
        assert await client.prewarm(base, 3) == 0


async def test_prewarm_over_http2_opens_one_connection() -> None:
    app = CountingApp()
    async with (
        serve_hypercorn(app) as base,
        open_client(http1=False, http2=True) as client,
    ):
        assert await client.prewarm(base, 5) == 1
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(client.get, base + "/slow/20")
        assert app.connections == 1
        assert client.pool is not None
        assert client.pool.statistics().connections == 1


async def test_prewarm_errors() -> None:
    async with open_client(pool=NoPoolSender()) as client:
        with pytest.raises(TypeError, match="needs a client with a connection pool"):
            await client.prewarm("http://127.0.0.1:1/", 1)
    async with open_client() as client:
        with pytest.raises(TypeError):
            await client.prewarm(b"http://x/", 1)  # type: ignore[arg-type]
        # Nothing listens on port 1: the connect error comes out, typed, with its key.
        with pytest.raises(ConnectError) as info:
            await client.prewarm("http://127.0.0.1:1/", 2)
        assert info.value.key is not None
        assert client.pool is not None
        assert client.pool.statistics().connections == 0
