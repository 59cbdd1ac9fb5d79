"""MetricsInstrument with the real OpenTelemetry SDK (an in-memory reader), after known
workloads against hypercorn: names, units, attributes and values. Also the HTTP client's
request hooks, which it relies on, with a plain instrument.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import pytest
import trio
from _fakes import FakeConnector, Step
from _servers import CountingApp, TLSFiles, serve_hypercorn

from trio_connpool import ConnectError, Instrument, open_pool
from trio_connpool.http import URL, HTTPKey, Request, Response, open_client

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)

from trio_connpool.contrib.opentelemetry import (
    CONNECTION_DURATION_BUCKETS,
    REQUEST_DURATION_BUCKETS,
    MetricsInstrument,
)

Attributes = frozenset[tuple[str, Any]]


class Metrics:
    """One collection's metrics: each by name, its points by attribute set."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        data = reader.get_metrics_data()
        assert data is not None
        self.metrics: dict[str, Metric] = {
            metric.name: metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }

    def unit(self, name: str) -> str | None:
        return self.metrics[name].unit

    def points(self, name: str) -> dict[Attributes, Any]:
        metric = self.metrics.get(name)
        if metric is None:
            return {}
        return {
            frozenset((point.attributes or {}).items()): point for point in metric.data.data_points
        }

    def values(self, name: str) -> dict[Attributes, int | float]:
        result: dict[Attributes, int | float] = {}
        for attributes, point in self.points(name).items():
            assert isinstance(point, NumberDataPoint)
            result[attributes] = point.value
        return result

    def histogram(self, name: str, **attributes: Any) -> HistogramDataPoint:
        point = self.points(name)[frozenset(attributes.items())]
        assert isinstance(point, HistogramDataPoint)
        return point


def origin_of(base: str) -> dict[str, Any]:
    url = URL(base)
    return {"server.address": url.host, "server.port": url.port, "url.scheme": url.scheme}


def _a(mapping: Mapping[str, Any]) -> Attributes:
    return frozenset(mapping.items())


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def instrument(reader: InMemoryMetricReader) -> MetricsInstrument:
    return MetricsInstrument(MeterProvider(metric_readers=[reader]))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls-otel"))


async def test_http11_workload(
    reader: InMemoryMetricReader, instrument: MetricsInstrument
) -> None:
    app = CountingApp()
    async with serve_hypercorn(app) as base:
        origin = origin_of(base)
        async with open_client(instruments=[instrument], max_connections=2) as client:
            # A refused port first (its connect fails; nothing of it is left to evict).
            with pytest.raises(ConnectError):
                await client.get("http://127.0.0.1:1/")
            # Six at once on two connections: four of them wait for a connection.
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(client.get, base + "/slow/50")
            assert (await client.get(base + "/status/503")).status_code == 503
            assert (await client.request("PURGE", base + "/")).status_code == 200

            open_metrics = Metrics(reader)
            assert app.connections == 2
        closed_metrics = Metrics(reader)

    m = open_metrics
    units = {
        "http.client.request.duration": "s",
        "http.client.active_requests": "{request}",
        "http.client.open_connections": "{connection}",
        "trio_connpool.connections": "{connection}",
        "trio_connpool.waiting": "{task}",
        "trio_connpool.waits": "{wait}",
        "trio_connpool.wait.time": "s",
        "trio_connpool.connects": "{connect}",
        "trio_connpool.connect_failures": "{connect}",
        "trio_connpool.leases": "{lease}",
    }
    for name, unit in units.items():
        assert m.unit(name) == unit, name

    # http.client.request.duration: one series per outcome, with the conventions' buckets.
    durations = m.points("http.client.request.duration")
    ok = m.histogram(
        "http.client.request.duration",
        **origin,
        **{
            "http.request.method": "GET",
            "http.response.status_code": 200,
            "network.protocol.version": "1.1",
        },
    )
    assert ok.count == 6
    assert 6 * 0.05 <= ok.sum < 6 * 5.0
    assert tuple(ok.explicit_bounds) == REQUEST_DURATION_BUCKETS
    unavailable = m.histogram(
        "http.client.request.duration",
        **origin,
        **{
            "http.request.method": "GET",
            "http.response.status_code": 503,
            "network.protocol.version": "1.1",
            "error.type": "503",
        },
    )
    assert unavailable.count == 1
    other = m.histogram(
        "http.client.request.duration",
        **origin,
        **{
            "http.request.method": "_OTHER",
            "http.response.status_code": 200,
            "network.protocol.version": "1.1",
        },
    )
    assert other.count == 1
    refused = m.histogram(
        "http.client.request.duration",
        **{
            "server.address": "127.0.0.1",
            "server.port": 1,
            "url.scheme": "http",
            "http.request.method": "GET",
            "error.type": "ConnectError",
        },
    )
    assert refused.count == 1
    assert 0 <= refused.sum < 5.0
    assert len(durations) == 4

    # Nothing in flight now; two idle connections.
    active = m.values("http.client.active_requests")
    assert active[_a({**origin, "http.request.method": "GET"})] == 0
    assert active[_a({**origin, "http.request.method": "_OTHER"})] == 0
    assert set(active.values()) == {0}
    open_connections = m.values("http.client.open_connections")
    assert open_connections == {
        _a({**origin, "http.connection.state": "idle"}): 2,
        _a({**origin, "http.connection.state": "active"}): 0,
    }

    # The pool's own metrics, pool.key the origin.
    key = str(URL(base).origin)
    assert m.values("trio_connpool.connections") == {
        _a({"pool.key": key, "state": "idle"}): 2,
        _a({"pool.key": key, "state": "in_use"}): 0,
        _a({"pool.key": key, "state": "connecting"}): 0,
    }
    assert m.values("trio_connpool.waiting") == {_a({"pool.key": key}): 0}
    assert m.values("trio_connpool.connects") == {frozenset(): 2}
    assert m.values("trio_connpool.connect_failures") == {frozenset(): 1}
    assert m.values("trio_connpool.leases") == {frozenset(): 8}
    # The refused GET waited for its connect; the six concurrent GETs all waited (two for
    # the connects, four for a connection to come back); the two later requests found one
    # idle. The histogram of each wait is off by default.
    assert m.values("trio_connpool.waits") == {frozenset(): 7}
    (wait_time,) = m.values("trio_connpool.wait.time").values()
    assert 4 * 0.05 <= wait_time < 7 * 5.0
    assert not m.points("trio_connpool.wait.duration")

    # Once the client closed: both connections ended, open counts fell to 0, and the
    # counters kept their totals.
    m = closed_metrics
    lifetimes = m.histogram(
        "http.client.connection.duration", **origin, **{"network.protocol.version": "1.1"}
    )
    assert m.unit("http.client.connection.duration") == "s"
    assert lifetimes.count == 2
    assert 0.05 <= lifetimes.sum < 2 * 10.0
    assert tuple(lifetimes.explicit_bounds) == CONNECTION_DURATION_BUCKETS
    assert set(m.values("http.client.open_connections").values()) == {0}
    assert set(m.values("trio_connpool.connections").values()) == {0}
    assert m.values("trio_connpool.connects") == {frozenset(): 2}
    assert m.values("trio_connpool.leases") == {frozenset(): 8}


async def test_http2_requests_say_protocol_version_2(
    reader: InMemoryMetricReader, instrument: MetricsInstrument, tls: TLSFiles
) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        origin = origin_of(base)
        context = tls.client_context(["h2", "http/1.1"])
        async with open_client(verify=context, http2=True, instruments=[instrument]) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(client.get, base + "/slow/20")
            assert app.connections == 1
            m = Metrics(reader)
            assert (
                m.values("http.client.open_connections")[
                    _a({**origin, "http.connection.state": "idle"})
                ]
                == 1
            )
        closed = Metrics(reader)
    assert origin["url.scheme"] == "https"
    point = m.histogram(
        "http.client.request.duration",
        **origin,
        **{
            "http.request.method": "GET",
            "http.response.status_code": 200,
            "network.protocol.version": "2",
        },
    )
    assert point.count == 5
    assert 5 * 0.02 <= point.sum < 5 * 5.0
    lifetime = closed.histogram(
        "http.client.connection.duration", **origin, **{"network.protocol.version": "2"}
    )
    assert lifetime.count == 1
    # One connection served five leases at once.
    assert closed.values("trio_connpool.leases") == {frozenset(): 5}
    assert closed.values("trio_connpool.connects") == {frozenset(): 1}


async def test_generic_pool_keys_get_no_pool_key_unless_named(
    autojump_clock: trio.testing.MockClock, reader: InMemoryMetricReader
) -> None:
    provider = MeterProvider(metric_readers=[reader])
    anonymous = MetricsInstrument(provider, wait_histogram=True)
    connector = FakeConnector(Step(delay=1.0))
    async with open_pool(connector, instruments=[anonymous]) as pool:
        lease = await pool.acquire(("tenant", 7))
        m = Metrics(reader)
        assert m.values("trio_connpool.connections") == {
            _a({"state": "idle"}): 0,
            _a({"state": "in_use"}): 1,
            _a({"state": "connecting"}): 0,
        }
        wait = m.histogram("trio_connpool.wait.duration")
        assert wait.count == 1
        assert wait.sum == pytest.approx(1.0)
        assert tuple(wait.explicit_bounds) == REQUEST_DURATION_BUCKETS
        assert m.values("trio_connpool.waits") == {frozenset(): 1}
        assert m.values("trio_connpool.wait.time") == {frozenset(): pytest.approx(1.0)}
        pool.release(lease)
        # No HTTP key: none of the HTTP client's metrics has a point.
        assert not m.points("http.client.open_connections")
        assert not m.points("http.client.request.duration")

    other = InMemoryMetricReader()
    named = MetricsInstrument(MeterProvider(metric_readers=[other]), pool_key=lambda key: "db")
    async with open_pool(FakeConnector(), instruments=[named]) as pool:
        pool.release(await pool.acquire(("tenant", 7)))
        assert (
            Metrics(other).values("trio_connpool.connections")[
                _a({"pool.key": "db", "state": "idle"})
            ]
            == 1
        )
    with pytest.raises(TypeError, match="pool_key"):
        MetricsInstrument(provider, pool_key="db")  # type: ignore[arg-type]


async def test_one_instrument_adds_up_two_pools(
    reader: InMemoryMetricReader, instrument: MetricsInstrument
) -> None:
    async with open_pool(FakeConnector(), instruments=[instrument]) as first:
        async with open_pool(FakeConnector(), instruments=[instrument]) as second:
            first.release(await first.acquire("a"))
            second.release(await second.acquire("a"))
            assert Metrics(reader).values("trio_connpool.connections")[_a({"state": "idle"})] == 2
        # The closed pool's counts still count: a counter never goes back.
        closed = Metrics(reader)
        assert closed.values("trio_connpool.connects") == {frozenset(): 2}
        assert closed.values("trio_connpool.waits") == {frozenset(): 2}


# ---- the request hooks, without OpenTelemetry ---------------------------------------------


class RequestRecorder(Instrument):
    def __init__(self) -> None:
        self.started: list[tuple[Hashable, object]] = []
        self.finished: list[tuple[Hashable, object, object, BaseException | None, float]] = []
        self.failures: list[str] = []

    def request_started(self, key: Hashable, request: object) -> None:
        self.started.append((key, request))

    def request_finished(
        self,
        key: Hashable,
        request: object,
        response: object | None,
        error: BaseException | None,
        seconds: float,
    ) -> None:
        self.finished.append((key, request, response, error, seconds))

    def hook_failed(self, hook: str, error: Exception) -> None:
        self.failures.append(hook)


async def test_request_hooks_see_each_request_and_its_end() -> None:
    recorder = RequestRecorder()
    app = CountingApp()
    async with serve_hypercorn(app) as base, open_client(instruments=[recorder]) as client:
        response = await client.get(base + "/slow/30")
        with pytest.raises(ConnectError):
            await client.get("http://127.0.0.1:1/")
    assert len(recorder.started) == 2
    (key, request, got, error, seconds) = recorder.finished[0]
    assert isinstance(key, HTTPKey) and isinstance(request, Request)
    assert recorder.started[0] == (key, request)
    assert got is response and error is None
    assert isinstance(got, Response)
    assert 0.03 <= seconds < 5.0
    (_, _, got, error, seconds) = recorder.finished[1]
    assert got is None and isinstance(error, ConnectError)
    assert not recorder.failures


async def test_request_hooks_cost_nothing_unless_overridden() -> None:
    async with open_client(instruments=[Instrument()]) as client:
        sender = client.sender
        assert "send_request" not in vars(sender)  # the class's own method: no wrapper
    async with open_client(instruments=[RequestRecorder()]) as client:
        sender = client.sender
        assert "send_request" in vars(sender)


async def test_a_request_hook_set_on_the_instance_alone_is_called() -> None:
    """Only request_finished, set in ``__init__``: the client wraps requests for it, and
    calls no request_started (none is overridden)."""
    ended: list[tuple[object, BaseException | None]] = []

    class EndsOnly(Instrument):
        def __init__(self) -> None:
            self.request_finished = lambda key, request, response, error, seconds: (  # type: ignore[method-assign]
                ended.append((response, error))
            )

    instrument = EndsOnly()
    async with (
        serve_hypercorn(CountingApp()) as base,
        open_client(instruments=[instrument]) as client,
    ):
        response = await client.get(base + "/")
    assert ended == [(response, None)]


async def test_a_raising_request_hook_is_reported_and_ignored() -> None:
    class Broken(RequestRecorder):
        def request_started(self, key: Hashable, request: object) -> None:
            raise RuntimeError("boom")

    broken = Broken()
    async with serve_hypercorn(CountingApp()) as base, open_client(instruments=[broken]) as client:
        assert (await client.get(base + "/")).status_code == 200
    assert broken.failures == ["request_started"]
    assert len(broken.finished) == 1


def test_active_request_counts_forget_idle_series_past_their_bound(
    reader: InMemoryMetricReader, instrument: MetricsInstrument
) -> None:
    """Methods are the caller's: a client that sends many distinct ones (or meets many
    origins) does not grow the instrument without bound. Series that read 0 are forgotten
    past 4,096; those with requests in flight are kept and still counted."""
    key = HTTPKey(URL("http://example.com/").origin)
    held = Request("GET", "http://example.com/")
    instrument.request_started(key, held)
    for n in range(10_000):
        request = Request(f"M{n}", "http://example.com/")
        instrument.request_started(key, request)
        instrument.request_finished(key, request, None, ConnectError("refused"), 0.001)
    assert len(instrument._active_requests) <= 4096  # pyright: ignore[reportPrivateUsage]
    origin = origin_of("http://example.com/")
    active = Metrics(reader).values("http.client.active_requests")
    assert active[_a({**origin, "http.request.method": "GET"})] == 1
    assert active[_a({**origin, "http.request.method": "_OTHER"})] == 0
    instrument.request_finished(key, held, None, ConnectError("refused"), 0.001)
    active = Metrics(reader).values("http.client.active_requests")
    assert active[_a({**origin, "http.request.method": "GET"})] == 0


async def test_a_subclass_waited_hook_is_kept_with_the_wait_histogram(
    autojump_clock: trio.testing.MockClock, reader: InMemoryMetricReader
) -> None:
    """A subclass that overrides ``waited`` (and calls up) is still called when the wait
    histogram is on: the instrument's own recording must not shadow the subclass's hook."""
    seen: list[float] = []

    class Logged(MetricsInstrument):
        def waited(self, key: Hashable, seconds: float) -> None:
            seen.append(seconds)
            super().waited(key, seconds)

    instrument = Logged(MeterProvider(metric_readers=[reader]), wait_histogram=True)
    async with open_pool(FakeConnector(Step(delay=1.0)), instruments=[instrument]) as pool:
        pool.release(await pool.acquire("a"))
    assert seen == [pytest.approx(1.0)]
    assert Metrics(reader).histogram("trio_connpool.wait.duration").count == 1


def test_a_forgotten_active_request_series_reads_0_rather_than_going_stale(
    reader: InMemoryMetricReader, instrument: MetricsInstrument
) -> None:
    """An active-requests series last exported with requests in flight, then forgotten past
    the bound once it read 0, reports 0 (as the pool's series do when a key goes): without
    that point its last value stays 1 for a backend."""
    key = HTTPKey(URL("http://example.com/").origin)
    request = Request("GET", "http://example.com/")
    instrument.request_started(key, request)
    origin = origin_of("http://example.com/")
    series = _a({**origin, "http.request.method": "GET"})
    assert Metrics(reader).values("http.client.active_requests")[series] == 1
    instrument.request_finished(key, request, None, ConnectError("refused"), 0.001)
    for n in range(5000):  # other origins: their series fill the bound
        other = HTTPKey(URL(f"http://h{n}.example/").origin)
        started = Request("GET", f"http://h{n}.example/")
        instrument.request_started(other, started)
        instrument.request_finished(other, started, None, ConnectError("refused"), 0.001)
    assert Metrics(reader).values("http.client.active_requests").get(series) == 0
