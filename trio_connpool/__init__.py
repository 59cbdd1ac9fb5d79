"""trio_connpool: a trio-native connection pool, with an HTTP/1.1 and HTTP/2 client on top.

The pool core is generic: :func:`open_pool` takes any async ``connector(key)`` and lends the
connections it makes to any number of trio tasks, one sub-pool per key, with per-key and
global limits, FIFO waiters, LIFO or FIFO reuse, timeouts and expiry, and nothing leaked on
cancellation. See the README for concepts and recipes.
"""

from __future__ import annotations

from ._exceptions import (
    ConnectError as ConnectError,
    ConnectTimeout as ConnectTimeout,
    InvalidHeader as InvalidHeader,
    InvalidURL as InvalidURL,
    LocalProtocolError as LocalProtocolError,
    PoolClosed as PoolClosed,
    PoolError as PoolError,
    PoolTimeout as PoolTimeout,
    ReadTimeout as ReadTimeout,
    RemoteProtocolError as RemoteProtocolError,
    ServerDisconnected as ServerDisconnected,
    TooManyWaiters as TooManyWaiters,
    TransportError as TransportError,
    WriteTimeout as WriteTimeout,
)
from ._logging import LoggingInstrument as LoggingInstrument
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
from .http import open_client as open_client  # the client, at the top for convenience


def _fixup_module_metadata() -> None:
    # Make reprs and tracebacks say trio_connpool.Pool, not trio_connpool._pool.Pool.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_connpool._") and name != "open_client":
            obj.__module__ = __name__


__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Connection",
    "Instrument",
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
    "ReadTimeout",
    "ReleasePolicy",
    "RemoteProtocolError",
    "Reservation",
    "ServerDisconnected",
    "TooManyWaiters",
    "TransportError",
    "WriteTimeout",
    "__version__",
    "create_pool",
    "open_client",
    "open_pool",
]

_fixup_module_metadata()
