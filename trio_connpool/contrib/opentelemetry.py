"""OpenTelemetry metrics for a pool and for the HTTP client: an :class:`Instrument`.

::

    from trio_connpool.contrib.opentelemetry import MetricsInstrument

    async with open_client(instruments=[MetricsInstrument()]) as client:
        ...

Needs ``opentelemetry-api`` (the ``otel`` extra); the application installs an SDK (or not:
without one every metric is a no-op) and chooses where the metrics go.

The pool's metrics, for any pool (``open_pool`` or the client's), are named
``trio_connpool.*``:

- ``trio_connpool.connections`` (``{connection}``, an asynchronous UpDownCounter): open
  connections and connects in flight, by ``state``: ``idle``, ``in_use``, ``connecting``.
- ``trio_connpool.waiting`` (``{task}``, an asynchronous UpDownCounter): tasks waiting for a
  connection.
- ``trio_connpool.waits`` (``{wait}``, an asynchronous counter) and
  ``trio_connpool.wait.time`` (``s``, an asynchronous counter): waits for a connection that
  ended, whatever their end (served, failed, timed out, cancelled), and the seconds they took
  in all; the mean wait over an interval is the one's rate over the other's. A task that
  finds a connection available does not wait and is not counted.
- ``trio_connpool.wait.duration`` (``s``, a histogram), only with ``wait_histogram=True``:
  how long each of those waits took. Off by default: a histogram value costs an SDK call of
  some 60,000 instructions (more than a tenth of a request's own cost), and a busy pool has
  about one wait per request.
- ``trio_connpool.connects`` and ``trio_connpool.connect_failures`` (``{connect}``,
  asynchronous counters): connects that succeeded, and that failed or were cancelled.
- ``trio_connpool.leases`` (``{lease}``, an asynchronous counter): leases handed out.

``trio_connpool.connections``, ``trio_connpool.waiting`` and ``trio_connpool.wait.duration``
carry a ``pool.key`` attribute, where a key has a bounded name: an HTTP
key's origin (``"https://example.com:443"``; the TLS context and ``extra`` of the key are
left out), or what ``pool_key(key)`` returns if given (None: no attribute for that key).
Other keys get none: a key can be anything, and an attribute of unbounded cardinality
would make a time series per value. The counters are the pool's totals
(:class:`~trio_connpool.PoolStatistics`), without ``pool.key``.

The HTTP client's metrics follow OpenTelemetry's semantic conventions for HTTP clients:

- ``http.client.request.duration`` (``s``, a histogram with the conventions' buckets):
  from the start of the request to the arrival of its response head, or its failure (the
  body is the caller's to read, as long as it likes, and is not included). Each redirect
  hop is a request of its own; the client's own retries of a request (on a stale keep-alive
  connection, or refused by HTTP/2) are part of it. Attributes:
  ``http.request.method`` (``_OTHER`` for a method outside RFC 9110 and PATCH),
  ``server.address``, ``server.port``, ``url.scheme``, ``http.response.status_code`` (if a
  response arrived), ``network.protocol.version`` (``"1.1"`` or ``"2"``, if a response
  arrived) and ``error.type``: the exception's class name (``ConnectError``,
  ``ReadTimeout``, ``Cancelled``...) if the request failed, else the status code as a
  string for a status of 400 or more.
- ``http.client.active_requests`` (``{request}``): requests started and not yet ended,
  by ``http.request.method``, ``server.address``, ``server.port``, ``url.scheme``.
- ``http.client.open_connections`` (``{connection}``): open connections by
  ``http.connection.state`` (``active``: leased; ``idle``), ``server.address``,
  ``server.port``, ``url.scheme`` (not by protocol version: the pool counts connections
  per key, not per protocol).
- ``http.client.connection.duration`` (``s``, a histogram with the conventions' buckets):
  how long each connection stayed open, from its connect's success to its close, with
  ``server.address``, ``server.port``, ``url.scheme`` and ``network.protocol.version``.

The two counts of the conventions' UpDownCounters are asynchronous UpDownCounters here (the
same data: a non-monotonic sum), read from the instrument's own counts and the pools'
statistics when the metrics are collected, so a request pays no SDK call for them. A
request pays one, for ``http.client.request.duration``: with the SDK, that call is most of
what the instrument costs.

One instrument may serve several pools: their figures are added up.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Final

import trio
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .._options import Instrument
from .._pool import Pool
from .._version import __version__
from ..http._client import HTTPKey
from ..http._models import Request, Response

__all__ = ["MetricsInstrument"]

# The semantic conventions' bucket advice, in seconds.
REQUEST_DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
CONNECTION_DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

# RFC 9110's methods and PATCH: any other is "_OTHER" (the conventions' rule, which bounds
# the attribute's values).
_KNOWN_METHODS: Final = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
_PROTOCOL_VERSIONS: Final = {"HTTP/1.1": "1.1", "HTTP/2": "2", "HTTP/1.0": "1.0"}
# Caches of attribute sets are emptied when they reach this size (their keys are bounded
# by the origins, methods and statuses met, but a long-lived process meets many).
_CACHE_LIMIT: Final = 4096

_Attributes = dict[str, str | int]

# The pool's counters: (name, PoolStatistics field, unit, its zero, description).
_COUNTERS: Final = (
    ("trio_connpool.waits", "waits", "{wait}", 0, "Waits for a connection that ended."),
    (
        "trio_connpool.wait.time",
        "wait_time",
        "s",
        0.0,
        "Time the waits for a connection took, added up.",
    ),
    ("trio_connpool.connects", "connects", "{connect}", 0, "Connects that succeeded."),
    (
        "trio_connpool.connect_failures",
        "connect_failures",
        "{connect}",
        0,
        "Connects that failed or were cancelled.",
    ),
    ("trio_connpool.leases", "leases_served", "{lease}", 0, "Leases handed out."),
)


def _origin_attributes(key: HTTPKey) -> _Attributes:
    origin = key.origin
    return {"server.address": origin.host, "server.port": origin.port, "url.scheme": origin.scheme}


class _Active:
    """Requests in flight for one key and method."""

    __slots__ = ("count", "key", "method")

    def __init__(self, key: HTTPKey, method: str) -> None:
        self.key = key
        self.method = method
        self.count = 0


def _as_pool(pool: object) -> Pool[Any, Any] | None:
    # The hooks type the pool as an object (the options module knows no pools).
    return pool if isinstance(pool, Pool) else None  # pyright: ignore[reportUnknownVariableType]


class MetricsInstrument(Instrument):
    """Records a pool's metrics and the HTTP client's in OpenTelemetry (see the module).

    Args:
        meter_provider: Where the metrics go; None: OpenTelemetry's global one
            (``opentelemetry.metrics.get_meter_provider()``, which may be set later).
        pool_key: ``pool_key(key) -> str | None``: the ``pool.key`` attribute of a key of
            the pool's metrics (None: no attribute for that key). It must have few values.
            Default: an HTTP key's origin, nothing for other keys.
        wait_histogram: Record ``trio_connpool.wait.duration``, a histogram of each wait
            for a connection (the module says what it costs). The counts and the total
            time of the waits are recorded either way.

    Give it to ``open_pool(instruments=[...])`` or ``open_client(instruments=[...])``; one
    instrument may serve several pools and clients.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        pool_key: Callable[[Hashable], str | None] | None = None,
        wait_histogram: bool = False,
    ) -> None:
        if pool_key is not None and not callable(pool_key):
            raise TypeError(f"pool_key must be a callable or None, not {pool_key!r}")
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("trio_connpool", __version__)
        self._pool_key = pool_key
        self._pools: list[Pool[Any, Any]] = []
        # Cumulative counts of the pools that closed, by statistics field, so the counters
        # never go back.
        self._closed: dict[str, float] = {field: zero for _, field, _, zero, _ in _COUNTERS}
        self._key_attributes: dict[Hashable, _Attributes] = {}
        # Keyed by the HTTP key's id() (a key's hash is a Python call); the entry keeps the
        # key alive, so its id cannot be reused while the entry lasts.
        self._request_attributes: dict[tuple[object, ...], tuple[HTTPKey, _Attributes]] = {}
        self._active_requests: dict[tuple[int, str], _Active] = {}
        self._connected_at: dict[int, tuple[float, HTTPKey]] = {}
        self._seen: dict[str, set[tuple[tuple[str, str | int], ...]]] = {}

        meter.create_observable_up_down_counter(
            "trio_connpool.connections",
            [self._observe_connections],
            unit="{connection}",
            description="Open connections by state (idle, in_use) and connects in flight "
            "(connecting).",
        )
        meter.create_observable_up_down_counter(
            "trio_connpool.waiting",
            [self._observe_waiting],
            unit="{task}",
            description="Tasks waiting for a connection.",
        )
        for name, field, unit, _, description in _COUNTERS:
            meter.create_observable_counter(
                name, [self._cumulative(field)], unit=unit, description=description
            )
        self._wait_duration: metrics.Histogram | None = None
        if wait_histogram:
            self._wait_duration = meter.create_histogram(
                "trio_connpool.wait.duration",
                unit="s",
                description="Time each wait for a connection took.",
                explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS,
            )
        self._request_duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            "http.client.active_requests",
            [self._observe_active_requests],
            unit="{request}",
            description="Number of active HTTP requests.",
        )
        meter.create_observable_up_down_counter(
            "http.client.open_connections",
            [self._observe_open_connections],
            unit="{connection}",
            description="Number of outbound HTTP connections that are currently active or "
            "idle on the client.",
        )
        self._connection_duration = meter.create_histogram(
            "http.client.connection.duration",
            unit="s",
            description="The duration of the successfully established outbound HTTP connections.",
            explicit_bucket_boundaries_advisory=CONNECTION_DURATION_BUCKETS,
        )

    def __repr__(self) -> str:
        return f"<MetricsInstrument pools={len(self._pools)}>"

    # ------------------------------------------------------------------ pool hooks

    def pool_opened(self, pool: object) -> None:
        opened = _as_pool(pool)
        if opened is not None:
            self._pools.append(opened)

    def pool_closed(self, pool: object) -> None:
        closed = _as_pool(pool)
        if closed is not None and closed in self._pools:
            self._pools.remove(closed)
            stats = closed.statistics()
            for field in self._closed:
                self._closed[field] += getattr(stats, field)

    def waited(self, key: Hashable, seconds: float) -> None:
        if self._wait_duration is not None:
            self._wait_duration.record(seconds, self._attributes_of(key))

    def connect_succeeded(self, key: Hashable, connection: object) -> None:
        if isinstance(key, HTTPKey):
            self._connected_at[id(connection)] = (trio.current_time(), key)

    def connection_closed(self, key: Hashable, connection: object) -> None:
        opened = self._connected_at.pop(id(connection), None)
        if opened is None:
            return
        since, http_key = opened
        attributes = _origin_attributes(http_key)
        version = _PROTOCOL_VERSIONS.get(getattr(connection, "http_version", ""))
        if version is not None:
            attributes["network.protocol.version"] = version
        self._connection_duration.record(trio.current_time() - since, attributes)

    # ------------------------------------------------------------------ request hooks

    def request_started(self, key: Hashable, request: object) -> None:
        assert isinstance(key, HTTPKey) and isinstance(request, Request)
        method = request.method
        counted = (id(key), method)
        active = self._active_requests.get(counted)
        if active is None:
            active = self._new_active(counted, key, method)
        active.count += 1

    def _new_active(self, counted: tuple[int, str], key: HTTPKey, method: str) -> _Active:
        requests = self._active_requests
        if len(requests) >= _CACHE_LIMIT:
            # Forget the series that read 0 (a client that met many origins or methods).
            for stale in [entry for entry, active in requests.items() if not active.count]:
                del requests[stale]
        active = requests[counted] = _Active(key, method)
        return active

    def request_finished(
        self,
        key: Hashable,
        request: object,
        response: object | None,
        error: BaseException | None,
        seconds: float,
    ) -> None:
        assert isinstance(key, HTTPKey) and isinstance(request, Request)
        method = request.method
        active = self._active_requests.get((id(key), method))
        if active is not None:
            # Kept at 0 rather than forgotten, so the series reads 0 and does not go stale.
            active.count -= 1
        cached: tuple[object, ...]
        if response is not None:
            assert isinstance(response, Response)
            cached = (id(key), method, response.status_code, response.http_version)
        else:
            cached = (id(key), method, type(error).__qualname__)
        entry = self._request_attributes.get(cached)
        if entry is None or entry[0] is not key:
            entry = (key, self._request_attributes_for(key, method, response, error))
            if len(self._request_attributes) >= _CACHE_LIMIT:
                self._request_attributes.clear()
            self._request_attributes[cached] = entry
        self._request_duration.record(seconds, entry[1])

    def _request_attributes_for(
        self, key: HTTPKey, method: str, response: object | None, error: BaseException | None
    ) -> _Attributes:
        attributes = _origin_attributes(key)
        attributes["http.request.method"] = method if method in _KNOWN_METHODS else "_OTHER"
        if isinstance(response, Response):
            status = response.status_code
            attributes["http.response.status_code"] = status
            version = _PROTOCOL_VERSIONS.get(response.http_version)
            if version is not None:
                attributes["network.protocol.version"] = version
            if status >= 400:
                attributes["error.type"] = str(status)
        else:
            attributes["error.type"] = type(error).__qualname__
        return attributes

    # ------------------------------------------------------------------ collection

    def _attributes_of(self, key: Hashable) -> _Attributes:
        attributes = self._key_attributes.get(key)
        if attributes is None:
            if self._pool_key is not None:
                name = self._pool_key(key)
            elif isinstance(key, HTTPKey):
                name = str(key.origin)
            else:
                name = None
            attributes = {}
            if name is not None:
                attributes["pool.key"] = str(name)
            if len(self._key_attributes) >= _CACHE_LIMIT:
                self._key_attributes.clear()
            self._key_attributes[key] = attributes
        return attributes

    def _per_key(self, fields: Sequence[tuple[str, str]], name: str) -> Iterable[Observation]:
        """Observations of KeyStatistics ``fields`` (field, ``name`` attribute value), added
        up over the keys (and pools) with the same attributes."""
        sums: dict[tuple[tuple[str, str | int], ...], int] = {}
        for pool in self._pools:
            for key, stats in pool.statistics().keys.items():
                base = self._attributes_of(key)
                for field, value in fields:
                    attributes = {**base, name: value} if name else base
                    frozen = tuple(sorted(attributes.items()))
                    sums[frozen] = sums.get(frozen, 0) + getattr(stats, field)
        return self._observations(name or "waiting", sums)

    def _observations(
        self, metric: str, sums: dict[tuple[tuple[str, str | int], ...], int]
    ) -> list[Observation]:
        """``sums`` as observations, with 0 for every series reported before and gone now
        (a key the pool forgot), so its count falls back to 0 rather than going stale."""
        seen = self._seen.setdefault(metric, set())
        if len(seen) >= _CACHE_LIMIT:
            seen.clear()
        for frozen in seen:
            sums.setdefault(frozen, 0)
        seen.update(sums)
        return [Observation(total, dict(frozen)) for frozen, total in sums.items()]

    def _observe_connections(self, _: CallbackOptions) -> Iterable[Observation]:
        fields = (("idle", "idle"), ("in_use", "in_use"), ("connecting", "connecting"))
        return self._per_key(fields, "state")

    def _observe_waiting(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._per_key((("waiting", ""),), "")

    def _total(self, field: str) -> float:
        total: float = sum(getattr(pool.statistics(), field) for pool in self._pools)
        return total

    def _cumulative(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """The callback of the counter of statistics ``field``: the pools' totals, the
        closed ones' included."""

        def observe(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self._closed[field] + self._total(field))]

        return observe

    def _observe_active_requests(self, _: CallbackOptions) -> Iterable[Observation]:
        sums: dict[tuple[tuple[str, str | int], ...], int] = {}
        for active in list(self._active_requests.values()):
            attributes = _origin_attributes(active.key)
            method = active.method
            attributes["http.request.method"] = method if method in _KNOWN_METHODS else "_OTHER"
            frozen = tuple(sorted(attributes.items()))
            sums[frozen] = sums.get(frozen, 0) + active.count
        # A series whose entry was forgotten (past the bound, at 0) reads 0, not its last.
        return self._observations("active_requests", sums)

    def _observe_open_connections(self, _: CallbackOptions) -> Iterable[Observation]:
        sums: dict[tuple[tuple[str, str | int], ...], int] = {}
        for pool in self._pools:
            for key, stats in pool.statistics().keys.items():
                if not isinstance(key, HTTPKey):
                    continue
                base = _origin_attributes(key)
                for state, count in (("active", stats.in_use), ("idle", stats.idle)):
                    frozen = tuple(sorted({**base, "http.connection.state": state}.items()))
                    sums[frozen] = sums.get(frozen, 0) + count
        return self._observations("open_connections", sums)
