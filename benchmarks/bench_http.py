"""HTTP benchmark: our client against a raw h11 floor and the peers, on a local nginx.

Each point (C concurrent tasks, at most M connections) runs these clients, interleaved:

- ``floor``: raw h11 on M persistent trio sockets with no pool: C tasks take a socket from a
  FIFO channel, do one request, put it back. The least work any trio HTTP/1.1 client can do.
- ``ours``: ``trio_connpool.open_client(max_connections_per_key=M)``.
- ``httpx``: ``httpx.AsyncClient`` (httpcore's pool) on trio, ``max_connections=M``.
- ``aiohttp``: ``aiohttp.ClientSession`` on asyncio, ``TCPConnector(limit=M)``.

The HTTP/2 table (over TLS with ALPN, and h2c with prior knowledge) runs C tasks on one
connection: ``ours-h2`` (``open_client(http2=True)``) next to ``httpx-h2``
(``httpx.AsyncClient(http2=True)`` on trio) and our own HTTP/1.1 at M=64 (``ours-h1``).

Every client first runs an untimed warm-up of C requests, so that all are measured with their
connections open, as the floor's are. nginx (Debian's package) is started by this script with
its own config on 127.0.0.1 (one worker, keep-alive unlimited, a fixed 5-byte answer), so the
server is not the bottleneck on a 2-core machine. With two CPUs or more, nginx is pinned to one
CPU and the clients to the others (``--no-pin`` to let the scheduler place both), so that the
client and the server do not take turns on the same core, which made single runs swing. TLS
uses a trustme certificate. Throughput is requests per second over the whole run; latencies
are per request. The HTTP/1.1 table also compares the CPU time this process spends per request
(user and system: less noisy than the wall clock on a shared machine, and what bounds
throughput once the server keeps up).

Run: ``python benchmarks/bench_http.py`` (``--quick`` for a short run, ``--tls`` for TLS only,
``--plain`` for plain only, ``--http2`` for the HTTP/2 table only, ``--no-http2`` without it,
``--repeat N`` to run every cell N times, interleaved in alternating order, and show the
medians; ``--metrics`` for only the cost of ``MetricsInstrument``: ``ours`` next to
``ours-metrics``, the same client recording OpenTelemetry metrics into the SDK, at C=64,
M=16, which needs ``opentelemetry-sdk``).
Needs nginx on PATH (``apt-get install nginx-light``) and the
``bench`` extra (httpx, aiohttp, trustme).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from trio_connpool.http import Timeouts, open_client

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        listen 127.0.0.1:{h2_port} ssl http2;
        listen 127.0.0.1:{h2c_port} http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{ return 200 "hello"; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Nginx:
    """nginx on two loopback ports (plain and TLS), in a temporary directory."""

    def __init__(self, cpu: int | None = None) -> None:
        import trustme

        self.dir = tempfile.mkdtemp(prefix="bench-nginx-")
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1")
        cert.private_key_pem.write_to_path(os.path.join(self.dir, "key.pem"))
        cert.cert_chain_pems[0].write_to_path(os.path.join(self.dir, "cert.pem"))
        self.port, self.tls_port = _free_port(), _free_port()
        self.h2_port, self.h2c_port = _free_port(), _free_port()
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(
                NGINX_CONF.format(
                    dir=self.dir,
                    port=self.port,
                    tls_port=self.tls_port,
                    h2_port=self.h2_port,
                    h2c_port=self.h2c_port,
                )
            )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        pin = None if cpu is None else functools.partial(os.sched_setaffinity, 0, {cpu})
        self.process = subprocess.Popen(
            [nginx, "-c", os.path.join(self.dir, "nginx.conf"), "-p", self.dir], preexec_fn=pin
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.h2c_port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("nginx did not start")

    def ssl_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return context

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Result:
    def __init__(
        self, total: int, elapsed: float, latencies: list[float], cpu: float = math.nan
    ) -> None:
        latencies.sort()
        self.rate = total / elapsed
        self.cpu = cpu / total  # this process's CPU seconds per request (user + system)
        self.p50 = latencies[len(latencies) // 2]
        self.p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]

    @staticmethod
    def median(results: list[Result]) -> Result:
        """The median rate and the median p50 and p99 of repeated runs."""
        middle = len(results) // 2
        merged = min(results, key=lambda r: r.rate)
        merged.rate = sorted(r.rate for r in results)[middle]
        merged.p50 = sorted(r.p50 for r in results)[middle]
        merged.p99 = sorted(r.p99 for r in results)[middle]
        merged.cpu = sorted(r.cpu for r in results)[middle]
        return merged


def run_repeated(repeat: int, runs: dict[str, Callable[[], Result]]) -> dict[str, Result]:
    """Run each client ``repeat`` times, interleaved in alternating order (a, b, c, c, b, a,
    a, ...), so that a machine speeding up or slowing down favours none: the medians."""
    results: dict[str, list[Result]] = {name: [] for name in runs}
    order = list(runs.items())
    for _ in range(repeat):
        for name, run in order:
            results[name].append(run())
        order.reverse()
    return {name: Result.median(found) for name, found in results.items()}


async def _drive_trio(total: int, tasks: int, one: Callable[[], Awaitable[None]]) -> Result:
    """``total`` requests from ``tasks`` tasks, after an untimed warm-up of ``tasks`` requests
    (so every client is measured with its connections open, as the floor's are)."""
    latencies: list[float] = []
    remaining = 0

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - began)

    for count in (tasks, total):
        remaining = count
        latencies.clear()
        start, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Result(total, elapsed, latencies, cpu)


async def run_floor(url: str, ctx: ssl.SSLContext | None, total: int, c: int, m: int) -> Result:
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1].rstrip("/"))
    send, receive = trio.open_memory_channel[tuple[trio.abc.Stream, h11.Connection]](m)
    streams: list[trio.abc.Stream] = []
    for _ in range(m):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if ctx is not None:
            stream = trio.SSLStream(stream, ctx, server_hostname=host)
        streams.append(stream)
        send.send_nowait((stream, h11.Connection(h11.CLIENT)))
    request = h11.Request(method="GET", target="/", headers=[("host", f"{host}:{port}")])

    async def one() -> None:
        stream, conn = await receive.receive()
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.EndOfMessage):
                break
        conn.start_next_cycle()
        send.send_nowait((stream, conn))

    try:
        return await _drive_trio(total, c, one)
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def run_ours(
    url: str,
    ctx: ssl.SSLContext | None,
    total: int,
    c: int,
    m: int,
    timeouts: Timeouts = Timeouts(),  # noqa: B008
) -> Result:
    async with open_client(
        verify=ctx if ctx is not None else True,
        max_connections=m,
        max_connections_per_key=m,
        timeouts=timeouts,
    ) as client:

        async def one() -> None:
            response = await client.request("GET", url)
            assert response.status_code == 200

        return await _drive_trio(total, c, one)


async def run_ours_leak_timeout(
    url: str,
    ctx: ssl.SSLContext | None,
    total: int,
    c: int,
    m: int,
    leak_timeout: float | None,
    timeouts: Timeouts = Timeouts(),  # noqa: B008
) -> Result:
    """``ours`` with leak detection set (None: off, as ``ours``)."""
    async with open_client(
        verify=ctx if ctx is not None else True,
        max_connections=m,
        max_connections_per_key=m,
        leak_timeout=leak_timeout,
        timeouts=timeouts,
    ) as client:

        async def one() -> None:
            response = await client.request("GET", url)
            assert response.status_code == 200

        return await _drive_trio(total, c, one)


def leak_table(nginx: Nginx, total: int, repeat: int) -> None:
    """What leak detection costs: ``ours`` with and without ``leak_timeout`` (60 s, never
    reached: the cost measured is the tracking of every lease), HTTP/1.1 plain, C=64, M=16."""
    url = f"http://127.0.0.1:{nginx.port}/"
    c, m = 64, 16
    print(f"\n== leak detection, HTTP/1.1 plain, C={c} M={m}, {total} requests per run")
    runs: dict[str, Callable[[], Result]] = {
        name: functools.partial(
            trio.run, run_ours_leak_timeout, url, None, total, c, m, leak_timeout
        )
        for name, leak_timeout in (("off", None), ("on", 60.0))
    }
    results = run_repeated(repeat, runs)
    for name in runs:
        r = results[name]
        print(
            f"leak_timeout {name:>3}: {r.rate:>8,.0f} req/s, p99 {1000 * r.p99:5.1f} ms, "
            f"CPU {1e6 * r.cpu:6.1f} us/request"
        )
    off, on = results["off"], results["on"]
    print(
        f"on/off: req/s {on.rate / off.rate:.3f}, CPU per request {on.cpu / off.cpu:.3f}",
        flush=True,
    )


async def run_ours_metrics(
    url: str,
    ctx: ssl.SSLContext | None,
    total: int,
    c: int,
    m: int,
    timeouts: Timeouts = Timeouts(),  # noqa: B008
) -> Result:
    """``ours`` with a ``MetricsInstrument`` recording into the OpenTelemetry SDK (an
    in-memory reader, collected once at the end, as a periodic exporter would every minute)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from trio_connpool.contrib.opentelemetry import MetricsInstrument

    reader = InMemoryMetricReader()
    instrument = MetricsInstrument(MeterProvider(metric_readers=[reader]))
    async with open_client(
        verify=ctx if ctx is not None else True,
        max_connections=m,
        max_connections_per_key=m,
        timeouts=timeouts,
        instruments=[instrument],
    ) as client:

        async def one() -> None:
            response = await client.request("GET", url)
            assert response.status_code == 200

        result = await _drive_trio(total, c, one)
        reader.get_metrics_data()
        return result


def metrics_table(nginx: Nginx, total: int, repeat: int) -> None:
    """The cost of ``MetricsInstrument``: ``ours`` with and without it, at C=64, M=16."""
    print(f"\n== MetricsInstrument, HTTP/1.1, {total} requests per run; req/s (p99 ms)")
    print(f"{'mode':>5} {'C':>4} {'M':>3} {'ours':>16} {'ours-metrics':>16}  cost: req/s (CPU)")
    modes = [
        ("plain", f"http://127.0.0.1:{nginx.port}/", None),
        ("tls", f"https://127.0.0.1:{nginx.tls_port}/", nginx.ssl_context()),
    ]
    c, m = 64, 16
    for name, url, ctx in modes:
        runs: dict[str, Callable[[], Result]] = {
            "ours": functools.partial(trio.run, run_ours, url, ctx, total, c, m),
            "ours-metrics": functools.partial(trio.run, run_ours_metrics, url, ctx, total, c, m),
        }
        results = run_repeated(repeat, runs)
        plain, measured = results["ours"], results["ours-metrics"]
        cells = " ".join(f"{r.rate:>8,.0f} ({1000 * r.p99:>5.1f})" for r in (plain, measured))
        rate_cost = 1 - measured.rate / plain.rate
        cpu_cost = measured.cpu / plain.cpu - 1
        print(
            f"{name:>5} {c:>4} {m:>3} {cells}  {100 * rate_cost:+.1f}% ({100 * cpu_cost:+.1f}%)",
            flush=True,
        )


async def run_httpx(url: str, ctx: ssl.SSLContext | None, total: int, c: int, m: int) -> Result:
    import httpx

    limits = httpx.Limits(max_connections=m, max_keepalive_connections=m)
    verify: Any = ctx if ctx is not None else True
    async with httpx.AsyncClient(limits=limits, verify=verify, timeout=60) as client:

        async def one() -> None:
            response = await client.get(url)
            assert response.status_code == 200

        return await _drive_trio(total, c, one)


async def run_ours_h2(
    url: str,
    ctx: ssl.SSLContext | None,
    total: int,
    c: int,
    timeouts: Timeouts = Timeouts(),  # noqa: B008
) -> Result:
    verify = ctx if ctx is not None else True
    async with open_client(
        verify=verify, http2=True, http1=ctx is not None, timeouts=timeouts
    ) as client:

        async def one() -> None:
            response = await client.request("GET", url)
            assert response.status_code == 200
            assert response.http_version == "HTTP/2"

        result = await _drive_trio(total, c, one)
        assert client.pool is not None
        assert client.pool.statistics().connections == 1
        return result


async def run_httpx_h2(url: str, ctx: ssl.SSLContext | None, total: int, c: int) -> Result:
    import httpx

    verify: Any = ctx if ctx is not None else True
    async with httpx.AsyncClient(
        verify=verify, http2=True, http1=ctx is not None, timeout=60
    ) as client:

        async def one() -> None:
            response = await client.get(url)
            assert response.status_code == 200
            assert response.http_version == "HTTP/2"

        return await _drive_trio(total, c, one)


def http2_table(nginx: Nginx, total: int, peers: list[str], repeat: int) -> None:
    modes: list[tuple[str, str, str, ssl.SSLContext | None]] = [
        (
            "tls",
            f"https://127.0.0.1:{nginx.h2_port}/",
            f"https://127.0.0.1:{nginx.tls_port}/",
            nginx.ssl_context(["h2", "http/1.1"]),
        ),
        ("h2c", f"http://127.0.0.1:{nginx.h2c_port}/", f"http://127.0.0.1:{nginx.port}/", None),
    ]
    for name, url, h1_url, ctx in modes:
        print(f"\n== HTTP/2 {name}, one connection, {total} requests per run; req/s (p99 ms)")
        cols = ["ours-h2", *(["httpx-h2"] if "httpx" in peers else []), "ours-h1"]
        print(f"{'C':>4} " + " ".join(f"{c:>16}" for c in cols) + "  ours-h2/httpx-h2")
        for c in (1, 64, 512):
            runs: dict[str, Callable[[], Result]] = {
                "ours-h2": functools.partial(trio.run, run_ours_h2, url, ctx, total, c)
            }
            if "httpx" in peers:
                # httpx sets ALPN on the context it is given: give it one of its own.
                own = nginx.ssl_context() if ctx is not None else None
                runs["httpx-h2"] = functools.partial(
                    trio.run, run_httpx_h2, url, own, max(200, total // 5), c
                )
            h1_ctx = nginx.ssl_context() if ctx is not None else None
            runs["ours-h1"] = functools.partial(trio.run, run_ours, h1_url, h1_ctx, total, c, 64)
            results = run_repeated(repeat, runs)
            cells = " ".join(
                f"{results[k].rate:>8,.0f} ({1000 * results[k].p99:>5.1f})" for k in cols
            )
            ratio = ""
            if "httpx-h2" in results:
                ratio = f"{results['ours-h2'].rate / results['httpx-h2'].rate:.2f}"
            print(f"{c:>4} {cells}  {ratio}", flush=True)


def run_aiohttp(url: str, ctx: ssl.SSLContext | None, total: int, c: int, m: int) -> Result:
    import aiohttp

    async def main() -> Result:
        connector = aiohttp.TCPConnector(limit=m, ssl=ctx if ctx is not None else True)
        async with aiohttp.ClientSession(connector=connector) as session:
            latencies: list[float] = []
            remaining = 0

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    began = time.perf_counter()
                    async with session.get(url) as response:
                        await response.read()
                        assert response.status == 200
                    latencies.append(time.perf_counter() - began)

            for count in (c, total):  # an untimed warm-up, as in _drive_trio
                remaining = count
                latencies.clear()
                start, cpu = time.perf_counter(), time.process_time()
                await asyncio.gather(*(worker() for _ in range(c)))
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            return Result(total, elapsed, latencies, cpu)

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tls", action="store_true", help="TLS only")
    parser.add_argument("--plain", action="store_true", help="plain only")
    parser.add_argument("--peers", default="httpx,aiohttp", help="comma-separated peers to run")
    parser.add_argument("--http2", action="store_true", help="the HTTP/2 table only")
    parser.add_argument("--no-http2", action="store_true", help="skip the HTTP/2 table")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per cell, interleaved; medians are shown"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the OS place nginx and the clients"
    )
    parser.add_argument(
        "--leak",
        action="store_true",
        help="only the cost of leak detection: ours with and without leak_timeout, C=64 M=16",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="only the cost of MetricsInstrument (needs opentelemetry-sdk)",
    )
    args = parser.parse_args()
    total = 2_000 if args.quick else 6_000
    peers = [p for p in args.peers.split(",") if p]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu = cpus[-1] if len(cpus) >= 2 and not args.no_pin else None
    nginx = Nginx(server_cpu)
    if server_cpu is not None:
        os.sched_setaffinity(0, set(cpus) - {server_cpu})
        print(f"nginx on CPU {server_cpu}, the clients on CPUs {sorted(set(cpus) - {server_cpu})}")
    try:
        if args.leak or args.metrics:
            if args.leak:
                leak_table(nginx, total, args.repeat)
            if args.metrics:
                metrics_table(nginx, total, args.repeat)
            return
        modes: list[tuple[str, str, ssl.SSLContext | None]] = []
        if not args.tls:
            modes.append(("plain", f"http://127.0.0.1:{nginx.port}/", None))
        if not args.plain:
            modes.append(("tls", f"https://127.0.0.1:{nginx.tls_port}/", nginx.ssl_context()))
        if args.http2:
            modes = []
        for name, url, ctx in modes:
            print(f"\n== HTTP/1.1 {name}, {total} requests per run; req/s (p99 ms)")
            cols = ["floor", "ours", *peers]
            print(
                f"{'C':>4} {'M':>3} "
                + " ".join(f"{c:>16}" for c in cols)
                + "  ours/floor: req/s (p99, CPU per request)"
            )
            for c in (1, 64, 512):
                for m in (1, 16, 64):
                    if m > c and c > 1:
                        continue
                    runs: dict[str, Callable[[], Result]] = {
                        "floor": functools.partial(trio.run, run_floor, url, ctx, total, c, m),
                        "ours": functools.partial(trio.run, run_ours, url, ctx, total, c, m),
                    }
                    if "httpx" in peers:
                        n = max(200, total // 5)
                        runs["httpx"] = functools.partial(trio.run, run_httpx, url, ctx, n, c, m)
                    if "aiohttp" in peers:
                        runs["aiohttp"] = functools.partial(run_aiohttp, url, ctx, total, c, m)
                    results = run_repeated(args.repeat, runs)
                    cells = " ".join(
                        f"{results[k].rate:>8,.0f} ({1000 * results[k].p99:>5.1f})" for k in cols
                    )
                    ratio = results["ours"].rate / results["floor"].rate
                    p99 = results["ours"].p99 / results["floor"].p99
                    cpu = results["ours"].cpu / results["floor"].cpu
                    print(
                        f"{c:>4} {m:>3} {cells}  {ratio:.2f} (p99 x{p99:.2f}, CPU x{cpu:.2f})",
                        flush=True,
                    )
        if not args.no_http2:
            http2_table(nginx, total, peers, args.repeat)
    finally:
        nginx.stop()


if __name__ == "__main__":
    main()
