"""What the pool and the client check their options with.

This module is the bottom layer of the package: no trio, no I/O, nothing of the package
imported.
"""

from __future__ import annotations

import math

__all__ = ["check_duration"]


def check_duration(name: str, value: object, *, allow_none: bool = True) -> None:
    """Refuse ``value`` unless it is a number of seconds, 0 or more (or None if allowed).

    The one check of every duration the package takes (timeouts, lifetimes, intervals), so
    each says the same. NaN is refused (it compares false with every deadline, so a NaN
    timeout would never fire and would hold up the heap of the others), and so is a bool.
    Infinity is accepted: it means no limit, like None.

    Raises:
        TypeError: ``value`` is not an int or a float (or None, if allowed).
        ValueError: ``value`` is negative or NaN.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if allow_none else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, not {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be 0 or more seconds, not {value!r}")
