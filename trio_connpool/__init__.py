"""trio_connpool: a trio-native connection pool, with an HTTP/1.1 and HTTP/2 client on top.

The pool core is generic: :func:`open_pool` takes any async ``connector(key)`` and lends the
connections it makes to any number of trio tasks, one sub-pool per key, with per-key and
global limits, FIFO waiters, LIFO or FIFO reuse, timeouts and expiry, and nothing leaked on
cancellation. See the README for concepts and recipes.
"""

from __future__ import annotations

from ._exceptions import (
    ConnectError as ConnectError,
)
from ._exceptions import (
    ConnectTimeout as ConnectTimeout,
)
from ._exceptions import (
    InvalidHeader as InvalidHeader,
)
from ._exceptions import (
    InvalidURL as InvalidURL,
)
from ._exceptions import (
    LocalProtocolError as LocalProtocolError,
)
from ._exceptions import (
    PoolClosed as PoolClosed,
)
from ._exceptions import (
    PoolError as PoolError,
)
from ._exceptions import (
    PoolTimeout as PoolTimeout,
)
from ._exceptions import (
    ReadTimeout as ReadTimeout,
)
from ._exceptions import (
    RemoteProtocolError as RemoteProtocolError,
)
from ._exceptions import (
    TooManyWaiters as TooManyWaiters,
)
from ._exceptions import (
    TransportError as TransportError,
)
from ._exceptions import (
    WriteTimeout as WriteTimeout,
)
from ._pool import (
    Connection as Connection,
)
from ._pool import (
    Instrument as Instrument,
)
from ._pool import (
    Pool as Pool,
)
from ._pool import (
    create_pool as create_pool,
)
from ._pool import (
    open_pool as open_pool,
)
from ._state import (
    KeyStatistics as KeyStatistics,
)
from ._state import (
    Lease as Lease,
)
from ._state import (
    PoolStatistics as PoolStatistics,
)
from ._state import (
    ReleasePolicy as ReleasePolicy,
)
from ._state import (
    Reservation as Reservation,
)
from ._version import __version__ as __version__


def _fixup_module_metadata() -> None:
    # Make reprs and tracebacks say trio_connpool.Pool, not trio_connpool._pool.Pool.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_connpool._"):
            obj.__module__ = __name__


__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Connection",
    "Instrument",
    "InvalidHeader",
    "InvalidURL",
    "KeyStatistics",
    "Lease",
    "LocalProtocolError",
    "Pool",
    "PoolClosed",
    "PoolError",
    "PoolStatistics",
    "PoolTimeout",
    "ReadTimeout",
    "ReleasePolicy",
    "RemoteProtocolError",
    "Reservation",
    "TooManyWaiters",
    "TransportError",
    "WriteTimeout",
    "__version__",
    "create_pool",
    "open_pool",
]

_fixup_module_metadata()
