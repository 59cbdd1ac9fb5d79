"""A ready-made :class:`~trio_connpool.Instrument` that reports pool events to :mod:`logging`.

Hooks run synchronously inside the pool's bookkeeping, on its hot path, so this one does as
little as it can: each hook first asks ``logger.isEnabledFor(level)`` and returns at once when
the record would be dropped, and messages use logging's lazy ``%``-formatting, so the reprs of
keys and connections are only computed for records that are actually emitted.

Every record carries two extra attributes for structured handlers and filters:
``pool_event`` (the hook's name, e.g. ``"lease_acquired"``) and ``pool_key`` (the key, or
``None`` for ``hook_failed``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._pool import Instrument

if TYPE_CHECKING:
    from collections.abc import Hashable

__all__ = ["LoggingInstrument"]

_DEFAULT_LOGGER = "trio_connpool"


class LoggingInstrument(Instrument):
    """Log every pool event through the standard :mod:`logging` module.

    ::

        logging.basicConfig(level=logging.DEBUG)
        async with open_pool(connect, instruments=[LoggingInstrument()]) as pool:
            ...

    Connects, waits, leases, releases and closes are logged at ``level``. A failing hook (or
    a connection's failing background task or ``aclose``) is logged at ``WARNING`` (or at
    ``level`` if that is higher), with the exception's traceback.

    Args:
        logger: The logger to use, or the name of one; default ``"trio_connpool"``.
        level: The level of the ordinary events; default ``logging.DEBUG``.

    Raises:
        TypeError: ``logger`` is neither a `logging.Logger`, a str nor None, or ``level``
            is not an int.
    """

    def __init__(
        self, logger: logging.Logger | str | None = None, level: int = logging.DEBUG
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or _DEFAULT_LOGGER)
        elif not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, a name or None, not {logger!r}")
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"level must be a logging level (an int), not {level!r}")
        self.logger = logger
        self.level = level
        self.warning_level: int = max(level, logging.WARNING)

    def __repr__(self) -> str:
        return (
            f"<LoggingInstrument logger={self.logger.name!r} "
            f"level={logging.getLevelName(self.level)}>"
        )

    def connect_started(self, key: Hashable) -> None:
        """Log ``connect started: key=...``."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "connect started: key=%r",
                key,
                extra={"pool_event": "connect_started", "pool_key": key},
            )

    def connect_succeeded(self, key: Hashable, connection: object) -> None:
        """Log ``connect succeeded: key=... connection=...``."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "connect succeeded: key=%r connection=%r",
                key,
                connection,
                extra={"pool_event": "connect_succeeded", "pool_key": key},
            )

    def connect_failed(self, key: Hashable, error: BaseException | None) -> None:
        """Log ``connect failed: key=... error=...`` (``connect cancelled`` for None)."""
        if self.logger.isEnabledFor(self.level):
            extra = {"pool_event": "connect_failed", "pool_key": key}
            if error is None:
                self.logger.log(self.level, "connect cancelled: key=%r", key, extra=extra)
            else:
                self.logger.log(
                    self.level, "connect failed: key=%r error=%r", key, error, extra=extra
                )

    def waiting(self, key: Hashable) -> None:
        """Log ``waiting for a connection: key=...``."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "waiting for a connection: key=%r",
                key,
                extra={"pool_event": "waiting", "pool_key": key},
            )

    def lease_acquired(self, key: Hashable, connection: object) -> None:
        """Log ``lease acquired: key=... connection=...``."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "lease acquired: key=%r connection=%r",
                key,
                connection,
                extra={"pool_event": "lease_acquired", "pool_key": key},
            )

    def lease_released(self, key: Hashable, connection: object) -> None:
        """Log ``lease released: key=... connection=...``."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "lease released: key=%r connection=%r",
                key,
                connection,
                extra={"pool_event": "lease_released", "pool_key": key},
            )

    def connection_closed(self, key: Hashable, connection: object) -> None:
        """Log ``connection closed: key=... connection=...``."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "connection closed: key=%r connection=%r",
                key,
                connection,
                extra={"pool_event": "connection_closed", "pool_key": key},
            )

    def hook_failed(self, hook: str, error: Exception) -> None:
        """Log ``hook ... failed: ...`` at WARNING, with the traceback."""
        if self.logger.isEnabledFor(self.warning_level):
            self.logger.log(
                self.warning_level,
                "hook %s failed: %r",
                hook,
                error,
                exc_info=error,
                extra={"pool_event": "hook_failed", "pool_key": None},
            )
