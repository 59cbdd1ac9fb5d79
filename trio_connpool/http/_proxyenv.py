"""The proxy settings of the environment: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and
``NO_PROXY`` (each also in lower case, which wins, as curl reads them).

A minimal reading: ``NO_PROXY`` is a comma-separated list of host names (matching the name
and its subdomains, a leading dot allowed), ``host:port`` entries, IP addresses, or ``*``
(no proxy at all). Empty variables count as unset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import final

__all__ = ["ProxyEnv"]


@final
class ProxyEnv:
    """The proxies an environment asks for, read once.

    Args:
        proxies: Scheme (``"http"``, ``"https"``, ``"all"``) to proxy URL.
        no_proxy: The ``NO_PROXY`` entries, lowercased and stripped.
    """

    __slots__ = ("_no_proxy", "_proxies")

    def __init__(self, proxies: Mapping[str, str], no_proxy: tuple[str, ...] = ()) -> None:
        self._proxies = dict(proxies)
        self._no_proxy = no_proxy

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyEnv:
        """Read the proxy variables of ``environ`` (``os.environ``, say)."""

        def get(name: str) -> str:
            return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()

        proxies = {
            scheme: value
            for scheme in ("http", "https", "all")
            if (value := get(f"{scheme}_proxy"))
        }
        entries = tuple(
            entry.strip().lower() for entry in get("no_proxy").split(",") if entry.strip()
        )
        return cls(proxies, entries)

    def proxy_for(self, scheme: str, host: str, port: int) -> str | None:
        """The proxy URL for a request to ``scheme://host:port``, or None (direct)."""
        url = self._proxies.get(scheme) or self._proxies.get("all")
        if not url or self._bypassed(host.lower(), port):
            return None
        return url

    def _bypassed(self, host: str, port: int) -> bool:
        for entry in self._no_proxy:
            if entry == "*":
                return True
            name, _, entry_port = (
                entry.rpartition(":")
                if entry.count(":") == 1
                else (
                    entry,
                    "",
                    "",
                )
            )
            if entry_port and entry_port != str(port):
                continue
            name = name.strip("[]").lstrip(".")
            if host == name or host.endswith("." + name):
                return True
        return False
