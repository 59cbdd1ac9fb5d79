"""CPU instructions per request, counted by valgrind: a figure the machine's noise cannot move.

``bench_http.py`` measures requests per second, which on a shared virtual machine swings by
tens of percent between identical runs. This script counts the user-space instructions a
client executes per request instead, with valgrind's callgrind, against the same local nginx:
each client runs twice, with N and 4N requests, and the difference is divided by 3N, so start-
up, imports, connects and the warm-up drop out. Under valgrind the client is so slow that nginx
always has the answer ready, so this is the cost of the client's own work (its syscalls'
kernel time is not counted).

Points: HTTP/1.1 ``ours`` against the raw h11 ``floor`` (see ``bench_http.py``) at the given C
(tasks) and M (connections), and with ``--http2``, HTTP/2 on one connection, ``ours-h2``
against ``httpx-h2``.

Run: ``python benchmarks/bench_instructions.py`` (``--points plain:512:64,tls:64:16`` to
choose HTTP/1.1 points, ``--http2`` for the HTTP/2 points, ``--metrics`` for the cost of
``MetricsInstrument``: ``ours`` next to ``ours-metrics`` at plain:64:16 or ``--points``,
which needs ``opentelemetry-sdk``; ``--leak`` for the cost of leak detection the same way,
``ours-leak`` with a ``leak_timeout`` never reached; ``-n`` for N). Needs valgrind
(``apt-get install valgrind``), nginx and the ``bench`` extra. About a minute per client and
point.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import ssl
import subprocess
import sys

import trio

from trio_connpool.http import Timeouts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_http

_COLLECTED = re.compile(rb"Collected : (\d+)")
# valgrind runs a client some 50x slower: our default 5 s timeouts (the wait for a connection
# too) would fire on the way.
_SLOW = Timeouts(connect=600, read=600, write=600, pool=600)


def _child(client: str, url: str, ca: str | None, total: int, c: int, m: int) -> None:
    ctx = None
    if ca is not None:
        ctx = ssl.create_default_context(cafile=ca)
        if client == "ours-h2":
            ctx.set_alpn_protocols(["h2", "http/1.1"])
    if client == "floor":
        trio.run(bench_http.run_floor, url, ctx, total, c, m)
    elif client == "ours":
        trio.run(functools.partial(bench_http.run_ours, timeouts=_SLOW), url, ctx, total, c, m)
    elif client == "ours-metrics":
        run = functools.partial(bench_http.run_ours_metrics, timeouts=_SLOW)
        trio.run(run, url, ctx, total, c, m)
    elif client == "ours-leak":
        run = functools.partial(
            bench_http.run_ours_leak_timeout, leak_timeout=3600.0, timeouts=_SLOW
        )
        trio.run(run, url, ctx, total, c, m)
    elif client == "ours-h2":
        trio.run(functools.partial(bench_http.run_ours_h2, timeouts=_SLOW), url, ctx, total, c)
    elif client == "httpx-h2":
        trio.run(bench_http.run_httpx_h2, url, ctx, total, c)
    else:
        raise SystemExit(f"unknown client {client!r}")


def _instructions(client: str, url: str, ca: str | None, total: int, c: int, m: int) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        client,
        url,
        ca or "-",
        str(total),
        str(c),
        str(m),
    ]
    done = subprocess.run(command, capture_output=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        sys.stderr.write(done.stderr.decode(errors="replace")[-3000:])
        raise SystemExit(f"{client} failed under valgrind (exit {done.returncode})")
    return int(found.group(1))


def _per_request(client: str, url: str, ca: str | None, n: int, c: int, m: int) -> float:
    small = _instructions(client, url, ca, n, c, m)
    large = _instructions(client, url, ca, 4 * n, c, m)
    return (large - small) / (3 * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", default=None)
    parser.add_argument("--http2", action="store_true", help="the HTTP/2 points instead")
    parser.add_argument("-n", type=int, default=1000, help="N: runs of N and 4N requests")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="the cost of MetricsInstrument instead: ours and ours-metrics at --points "
        "(default plain:64:16)",
    )
    parser.add_argument(
        "--leak",
        action="store_true",
        help="the cost of leak detection instead: ours and ours-leak at --points "
        "(default plain:64:16)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.points_given = args.points is not None
    if args.points is None:
        args.points = "plain:1:1,plain:64:16,plain:512:64,tls:512:16"
    if args.child:
        client, url, ca, total, c, m = args.child
        _child(client, url, None if ca == "-" else ca, int(total), int(c), int(m))
        return
    nginx = bench_http.Nginx()
    try:
        ca = os.path.join(nginx.dir, "ca.pem")
        nginx.ca.cert_pem.write_to_path(ca)
        if args.metrics or args.leak:
            points = args.points if args.points_given else "plain:64:16"
            other = "ours-metrics" if args.metrics else "ours-leak"
            what = "MetricsInstrument" if args.metrics else "leak detection"
            print(f"HTTP/1.1; instructions per request, without and with {what}")
            print(f"{'mode':>5} {'C':>4} {'M':>3} {'ours':>10} {other:>12}  cost")
            for point in points.split(","):
                mode, c, m = point.split(":")
                if mode == "tls":
                    url, point_ca = f"https://127.0.0.1:{nginx.tls_port}/", ca
                else:
                    url, point_ca = f"http://127.0.0.1:{nginx.port}/", None
                ours = _per_request("ours", url, point_ca, args.n, int(c), int(m))
                measured = _per_request(other, url, point_ca, args.n, int(c), int(m))
                print(
                    f"{mode:>5} {c:>4} {m:>3} {ours:>10,.0f} {measured:>12,.0f}  "
                    f"{100 * (measured / ours - 1):+.1f}%"
                )
            return
        if args.http2:
            print("HTTP/2, one connection; instructions per request")
            print(f"{'mode':>5} {'C':>4} {'ours-h2':>12} {'httpx-h2':>12}  httpx-h2/ours-h2")
            for mode, port in (("tls", nginx.h2_port), ("h2c", nginx.h2c_port)):
                scheme = "https" if mode == "tls" else "http"
                url = f"{scheme}://127.0.0.1:{port}/"
                mode_ca = ca if mode == "tls" else None
                for c in (64, 512):
                    ours = _per_request("ours-h2", url, mode_ca, args.n, c, 1)
                    peer = _per_request("httpx-h2", url, mode_ca, args.n, c, 1)
                    print(f"{mode:>5} {c:>4} {ours:>12,.0f} {peer:>12,.0f}  {peer / ours:.2f}")
            return
        print("HTTP/1.1; instructions per request")
        print(f"{'mode':>5} {'C':>4} {'M':>3} {'floor':>10} {'ours':>10}  ours/floor")
        for point in args.points.split(","):
            mode, c, m = point.split(":")
            if mode == "tls":
                url, point_ca = f"https://127.0.0.1:{nginx.tls_port}/", ca
            else:
                url, point_ca = f"http://127.0.0.1:{nginx.port}/", None
            floor = _per_request("floor", url, point_ca, args.n, int(c), int(m))
            ours = _per_request("ours", url, point_ca, args.n, int(c), int(m))
            print(f"{mode:>5} {c:>4} {m:>3} {floor:>10,.0f} {ours:>10,.0f}  {ours / floor:.2f}")
    finally:
        nginx.stop()


if __name__ == "__main__":
    main()
