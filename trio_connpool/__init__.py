"""trio_connpool: a trio-native connection pool, with an HTTP/1.1 and HTTP/2 client on top.

The pool core is generic: :func:`open_pool` takes any async ``connector(key)`` and lends the
connections it makes to any number of trio tasks, one sub-pool per key, with per-key and
global limits, FIFO waiters, LIFO or FIFO reuse, timeouts and expiry, and nothing leaked on
cancellation. See the README for concepts and recipes.

The HTTP layer (:mod:`trio_connpool.http`, and with it h2, hpack and hyperframe) is imported
the first time ``open_client``, ``HTTPConnector``, ``Timeouts`` or ``http`` is looked up
here, so a program that uses only the generic pool never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._exceptions import (
    ConnectError as ConnectError,
    ConnectTimeout as ConnectTimeout,
    DecodingError as DecodingError,
    HTTPStatusError as HTTPStatusError,
    InvalidHeader as InvalidHeader,
    InvalidURL as InvalidURL,
    LocalProtocolError as LocalProtocolError,
    PoolClosed as PoolClosed,
    PoolError as PoolError,
    PoolTimeout as PoolTimeout,
    ProxyError as ProxyError,
    ReadTimeout as ReadTimeout,
    RemoteProtocolError as RemoteProtocolError,
    ServerDisconnected as ServerDisconnected,
    StreamConsumed as StreamConsumed,
    TooManyRedirects as TooManyRedirects,
    TooManyWaiters as TooManyWaiters,
    TransportError as TransportError,
    TrioRequiredError as TrioRequiredError,
    WriteTimeout as WriteTimeout,
)
from ._logging import LoggingInstrument as LoggingInstrument
from ._options import LeakReport as LeakReport
from ._pool import (
    Connection as Connection,
    Instrument as Instrument,
    Pool as Pool,
    PoolOptions as PoolOptions,
    create_pool as create_pool,
    open_pool as open_pool,
)
from ._state import (
    KeyStatistics as KeyStatistics,
    Lease as Lease,
    PoolStatistics as PoolStatistics,
    ReleasePolicy as ReleasePolicy,
    Reservation as Reservation,
)
from ._version import __version__ as __version__

if TYPE_CHECKING:
    # The client, at the top for convenience; imported on first use (see __getattr__).
    from . import http as http
    from .http import (
        HTTPConnector as HTTPConnector,
        Timeouts as Timeouts,
        open_client as open_client,
    )

# The names __getattr__ imports on first use, and the module each comes from.
_LAZY = {
    "open_client": ".http",
    "http": ".http",
    "HTTPConnector": ".http",
    "Timeouts": ".http",
}


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error there

    def __getattr__(name: str) -> object:
        # Called only for names not (yet) in this module's globals.
        module_name = _LAZY.get(name)
        if module_name is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        module = importlib.import_module(module_name, __name__)
        value: object = module if name == "http" else getattr(module, name)
        globals()[name] = value  # later lookups do not come here again
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY})


def _fixup_module_metadata() -> None:
    # Make reprs and tracebacks say trio_connpool.Pool, not trio_connpool._pool.Pool. The
    # lazily imported names keep their own module (trio_connpool.http).
    for name in __all__:
        if name in _LAZY:
            continue
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_connpool._"):
            obj.__module__ = __name__


__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Connection",
    "HTTPConnector",
    "DecodingError",
    "HTTPStatusError",
    "Instrument",
    "LeakReport",
    "LoggingInstrument",
    "InvalidHeader",
    "InvalidURL",
    "KeyStatistics",
    "Lease",
    "LocalProtocolError",
    "Pool",
    "PoolClosed",
    "PoolError",
    "PoolOptions",
    "PoolStatistics",
    "PoolTimeout",
    "ProxyError",
    "ReadTimeout",
    "ReleasePolicy",
    "RemoteProtocolError",
    "Reservation",
    "ServerDisconnected",
    "Timeouts",
    "StreamConsumed",
    "TooManyRedirects",
    "TooManyWaiters",
    "TransportError",
    "TrioRequiredError",
    "WriteTimeout",
    "__version__",
    "create_pool",
    "open_client",
    "open_pool",
]

_fixup_module_metadata()
