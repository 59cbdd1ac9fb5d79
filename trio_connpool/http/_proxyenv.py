"""Which proxy a request uses, read from the environment the way curl reads it.

This module is pure: it performs no I/O, needs no event loop and never reads `os.environ` by
itself. `ProxyEnv.from_environ` is handed a mapping (usually `os.environ`), parses it once, and
`ProxyEnv.proxy_for` then answers per request from precomputed tables.

The rules
=========

Proxy variables
---------------

1. ``http_proxy`` / ``HTTP_PROXY`` is the proxy for ``http://`` URLs, ``https_proxy`` /
   ``HTTPS_PROXY`` the one for ``https://`` URLs. ``all_proxy`` / ``ALL_PROXY`` is used for
   either scheme whose specific variable is unset. Only the all-lowercase and all-uppercase
   spellings are read (as curl), not ``Http_Proxy``.
2. Where both spellings are set, the lowercase one wins (as curl, urllib and httpx).
3. An empty value (or one of only whitespace) means unset: the next candidate is consulted, so
   ``http_proxy=""`` with ``HTTP_PROXY`` set uses ``HTTP_PROXY`` (as curl; urllib instead lets
   an empty lowercase value cancel the uppercase one).
4. The uppercase ``HTTP_PROXY`` is ignored when ``REQUEST_METHOD`` is present in the mapping:
   under CGI, a client's ``Proxy:`` request header arrives as ``HTTP_PROXY`` ("httpoxy",
   CVE-2016-5385). This is what urllib, httpx and Go do. curl goes further and never reads
   ``HTTP_PROXY`` at all; we read it outside CGI because containers and CI systems commonly set
   only the uppercase spellings, and httpx honours them. The lowercase ``http_proxy`` cannot
   come from a request header and is always read.
5. A value without ``://`` means ``http://`` (``proxy.corp:3128`` is
   ``http://proxy.corp:3128``). The schemes accepted are ``http``, ``https``, ``socks5`` and
   ``socks5h`` (any case). ``socks4`` and ``socks4a`` are refused with a ValueError rather than
   passed through: httpx refuses them too, and an error naming the variable now is clearer
   than a failed connect later.
6. A value is normalised to ``scheme://[userinfo@]host:port``: the scheme lowercased, the port
   made explicit (the scheme's default, 80, 443 or 1080 for SOCKS, where none is written; curl
   assumes 1080 for every scheme, httpx the scheme's default, which we follow), the host
   lowercased and IDNA-encoded, a trailing ``/`` dropped. Credentials are kept,
   percent-encoded as written, for the connection to the proxy.
7. A value that cannot be a proxy URL (an unknown scheme, no host, a host that is neither a
   DNS name nor an IP address, a bad port, a path, query or fragment, whitespace or control
   characters inside) raises ValueError naming the variable.
   Messages never show the value's credentials.

NO_PROXY
--------

8. ``no_proxy`` / ``NO_PROXY`` (lowercase wins; empty means unset) lists hosts that are reached
   directly. Entries are separated by commas and/or whitespace. A bypassed host gets no proxy
   whichever proxy variable would apply.
9. An entry ``*`` bypasses the proxy for every host (curl honours ``*`` only as the whole value;
   we honour it as any entry, as httpx and Go do).
10. A host name entry matches that host and every name under it, case-insensitively, with or
    without a leading dot: ``example.com`` and ``.example.com`` both match ``example.com`` and
    ``a.example.com``, never ``badexample.com`` nor ``example.com.org``. This is curl's rule;
    urllib agrees, Go and httpx let a leading dot exclude the bare name. ``*.example.com`` is
    read as ``.example.com``. Trailing dots are ignored on both sides. A non-ASCII name is
    IDNA-encoded, as URLs' hosts are.
11. An IP address entry matches that address exactly; a CIDR entry (``10.0.0.0/8``,
    ``::1/128``, ``fe80::/10``) matches every address in the network (host bits set in the
    entry are ignored, as curl). IPv6 addresses may be written bare (``::1``, as curl's
    documentation asks) or in brackets (``[::1]``). IP entries match only hosts given as IP
    addresses: no name is resolved. The host may be given with or without brackets
    (`trio_connpool.http.URL` stores IPv6 hosts without them).
12. An entry ``host:port``, ``ip:port`` or ``[ipv6]:port`` matches only that port (as Go and
    Node.js; curl does not read ports in NO_PROXY). Entries without a port match every port.
13. Entries that are none of the above (``10.0.0.0/33``, ``a..b``, ``host:http``, a CIDR with
    a port or in brackets) are ignored, not errors: one mistyped entry in a shared environment
    must not break every request. They are listed in `ProxyEnv.no_proxy_ignored`.
14. Only the first 10,000 entries are read (`MAX_NO_PROXY_ENTRIES`); the rest are not parsed,
    and `ProxyEnv.no_proxy_ignored` ends with a note saying so. A lookup never scans the list:
    a name is checked by hashing it and each of its parent domains (cost proportional to the
    host's length), an address by one hash per distinct CIDR prefix length (at most 33 for
    IPv4 and 129 for IPv6). Parsing is linear in the entries read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final, final
from urllib.parse import SplitResult, urlsplit

__all__ = ["MAX_NO_PROXY_ENTRIES", "ProxyEnv"]

MAX_NO_PROXY_ENTRIES: Final = 10_000
"""How many NO_PROXY entries are read; later ones are ignored."""

_PROXY_SCHEMES: Final = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
_REFUSED_SCHEMES: Final = frozenset({"socks4", "socks4a"})
# One entry of NO_PROXY: a run of anything but commas and whitespace. Lazy iteration through
# finditer keeps parsing linear and lets us stop at the bound without splitting the rest.
_ENTRY_RE: Final = re.compile(r"[^,\s]+")
# A host name once lowercased and IDNA-encoded: dot-separated non-empty labels. The same
# characters as the URL layer accepts in a registered name, minus the percent and punctuation
# that never occur in a DNS name. No nested quantifier can backtrack: labels are split by dots.
_NAME_RE: Final = re.compile(r"[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*")
_BAD_CHARS_RE: Final = re.compile(r"[\x00-\x20\x7f]")

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _redact(value: str) -> str:
    """`value` with everything between the scheme and the last ``@`` hidden, for messages.

    The last ``@`` anywhere, not only in the authority: an unencoded ``/``, ``?`` or ``#`` in a
    password ends the authority early for a URL parser, and the rest must stay hidden too.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    at = rest.rfind("@")
    if at != -1:
        rest = "***@" + rest[at + 1 :]
    return f"{scheme}{sep}{rest}"


def _parse_proxy(value: str, variable: str) -> str:
    """Return the normalised proxy URL for `value`, read from `variable` (named in errors)."""
    text = value.strip()
    if _BAD_CHARS_RE.search(text):
        raise ValueError(
            f"{variable}: a proxy URL cannot contain whitespace or control characters: "
            f"{_redact(text)!r}"
        )
    if "://" not in text:
        text = "http://" + text
    try:
        parts: SplitResult = urlsplit(text)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise ValueError(f"{variable}: invalid proxy URL {_redact(text)!r}") from None
    scheme = parts.scheme.lower()
    if scheme in _REFUSED_SCHEMES:
        raise ValueError(
            f"{variable}: {scheme} proxies are not supported (use socks5 or socks5h): "
            f"{_redact(text)!r}"
        )
    if scheme not in _PROXY_SCHEMES:
        raise ValueError(
            f"{variable}: unsupported proxy scheme {scheme!r} (expected http, https, socks5 or "
            f"socks5h): {_redact(text)!r}"
        )
    if not parts.hostname:
        raise ValueError(f"{variable}: proxy URL has no host: {_redact(text)!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(
            f"{variable}: a proxy URL has no path, query or fragment: {_redact(text)!r}"
        )
    if port == 0:
        raise ValueError(f"{variable}: proxy port must be 1..65535: {_redact(text)!r}")
    host = parts.hostname  # lowercased, brackets removed
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if hostport.startswith("["):
        if _parse_ip(host) is None or ":" not in host:
            raise ValueError(f"{variable}: invalid IPv6 proxy address: {_redact(text)!r}")
        host = f"[{host}]"
    else:
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(
                    f"{variable}: proxy host cannot be IDNA-encoded: {_redact(text)!r}"
                ) from None
        if not _NAME_RE.fullmatch(host):
            raise ValueError(f"{variable}: invalid character in proxy host: {_redact(text)!r}")
    if port is None:
        port = _PROXY_SCHEMES[scheme]
    return f"{scheme}://{userinfo}{at}{host}:{port}"


def _parse_port(text: str) -> int | None:
    """The port `text` names (ASCII digits, 1..65535), or None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def _parse_ip(text: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normalise_name(text: str) -> str | None:
    """A host name entry, lowercased, without leading ``*.``/``.`` or trailing dots, or None."""
    if text.startswith("*."):
        text = text[1:]
    name = text.removeprefix(".").rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if _NAME_RE.fullmatch(name) else None


@final
class _Rules:
    """NO_PROXY compiled into hash tables; see the module docstring, rules 8 to 14."""

    __slots__ = ("bypass_all", "entries", "ignored", "ip_nets", "ips_by_port", "names",
                 "names_by_port")  # fmt: skip

    def __init__(self, value: str) -> None:
        self.bypass_all = False
        entries: list[str] = []
        ignored: list[str] = []
        names: set[str] = set()
        names_by_port: dict[int, set[str]] = {}
        ips_by_port: dict[int, set[_IPAddress]] = {}
        # (version, shift) -> network numbers shifted right by `shift`: one set lookup per
        # distinct prefix length decides membership.
        nets: dict[tuple[int, int], set[int]] = {}
        for count, match in enumerate(_ENTRY_RE.finditer(value), start=1):
            if count > MAX_NO_PROXY_ENTRIES:
                ignored.append(f"... entries after the first {MAX_NO_PROXY_ENTRIES}")
                break
            entry = match.group()
            if self._add(entry, names, names_by_port, ips_by_port, nets):
                entries.append(entry)
            else:
                ignored.append(entry)
        self.entries = tuple(entries)
        self.ignored = tuple(ignored)
        self.names = frozenset(names)
        self.names_by_port = {port: frozenset(s) for port, s in names_by_port.items()}
        self.ips_by_port = {port: frozenset(s) for port, s in ips_by_port.items()}
        # Indexed by ``address.version == 6``: (shift, shifted network numbers) pairs.
        self.ip_nets = tuple(
            tuple((shift, frozenset(s)) for (v, shift), s in sorted(nets.items()) if v == version)
            for version in (4, 6)
        )

    def _add(
        self,
        entry: str,
        names: set[str],
        names_by_port: dict[int, set[str]],
        ips_by_port: dict[int, set[_IPAddress]],
        nets: dict[tuple[int, int], set[int]],
    ) -> bool:
        """Record one entry; False if it is invalid."""
        if entry == "*":
            self.bypass_all = True
            return True
        port: int | None = None
        host = entry
        if entry.startswith("["):
            close = entry.find("]")
            if close == -1:
                return False
            host, rest = entry[1:close], entry[close + 1 :]
            if rest:
                if not rest.startswith(":"):
                    return False
                port = _parse_port(rest[1:])
                if port is None:
                    return False
            address = _parse_ip(host)
            if address is None or address.version != 6:
                return False
        elif entry.count(":") == 1:  # host:port or ipv4:port; bare IPv6 has more colons
            host, _, port_text = entry.partition(":")
            port = _parse_port(port_text)
            if port is None:
                return False
        if "/" in host:
            if port is not None:
                return False
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError:
                return False
            shift = network.max_prefixlen - network.prefixlen
            nets.setdefault((network.version, shift), set()).add(
                int(network.network_address) >> shift
            )
            return True
        address = _parse_ip(host)
        if address is not None:
            if port is None:
                nets.setdefault((address.version, 0), set()).add(int(address))
            else:
                ips_by_port.setdefault(port, set()).add(address)
            return True
        name = _normalise_name(host)
        if name is None:
            return False
        if port is None:
            names.add(name)
        else:
            names_by_port.setdefault(port, set()).add(name)
        return True

    def bypasses(self, host: str, port: int) -> bool:
        if self.bypass_all:
            return True
        if host.startswith("["):
            host = host[1:].removesuffix("]")
        # An address matches only IP entries: ``10.0.0.1`` must not match a name entry
        # ``0.1``. Most host names end in a letter (no top-level domain is numeric), so the
        # costly parse is tried only where it can succeed.
        if ":" in host or host[-1:].isdigit():
            address = _parse_ip(host)
            if address is not None:
                return self._bypasses_ip(address, port)
        name = host.rstrip(".").lower()
        names = self.names
        ported = self.names_by_port.get(port)
        # `name`, then each parent domain: a.b.c, b.c, c. Only dot boundaries are tried, so
        # ``example.com`` never matches ``badexample.com``.
        start = 0
        while True:
            suffix = name[start:] if start else name
            if suffix in names or (ported is not None and suffix in ported):
                return True
            dot = name.find(".", start)
            if dot == -1:
                return False
            start = dot + 1

    def _bypasses_ip(self, address: _IPAddress, port: int) -> bool:
        ported = self.ips_by_port.get(port)
        if ported is not None and address in ported:
            return True
        number = int(address)
        for shift, numbers in self.ip_nets[address.version == 6]:
            if number >> shift in numbers:
                return True
        return False


_NO_RULES: Final = _Rules("")


@final
class ProxyEnv:
    """The proxies the environment asks for, and the hosts that bypass them.

    Build one with `from_environ` (usually from `os.environ`, once, when a client is made) and
    ask `proxy_for` per request. The rules are the module's: curl's reading of ``http_proxy``,
    ``https_proxy``, ``all_proxy`` and ``no_proxy``, with the differences stated there. The
    object is immutable and does no I/O; it does not read the environment by itself, so a
    changed environment needs a new object.

    ``ProxyEnv()`` with no arguments is the empty environment: no proxy for anything. The
    keyword arguments take values as the variables would hold them, under the same rules, so a
    configuration can be given explicitly.

    Attributes:
        http_proxy: The normalised proxy URL for ``http://`` requests, ``all_proxy``
            included, or None.
        https_proxy: The same for ``https://`` requests.
        all_proxy: The normalised ``all_proxy`` value as read, or None.
        no_proxy: The NO_PROXY entries in effect, as written.
        no_proxy_ignored: The NO_PROXY entries ignored as invalid (and a last item saying so if
            entries beyond `MAX_NO_PROXY_ENTRIES` were dropped).
        bypass_all: True if NO_PROXY holds ``*``.

    Raises:
        ValueError: A proxy value is not a proxy URL we can use; the message names the variable
            and hides credentials.
    """

    __slots__ = ("_http", "_https", "_rules", "all_proxy", "http_proxy", "https_proxy")

    http_proxy: str | None
    https_proxy: str | None
    all_proxy: str | None

    def __init__(
        self,
        *,
        http_proxy: str | None = None,
        https_proxy: str | None = None,
        all_proxy: str | None = None,
        no_proxy: str | None = None,
    ) -> None:
        self._setup(
            (http_proxy, "http_proxy"),
            (https_proxy, "https_proxy"),
            (all_proxy, "all_proxy"),
            no_proxy,
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyEnv:
        """Read the proxy variables from `environ` (a mapping such as `os.environ`).

        Args:
            environ: Variable names to values. Only ``http_proxy``, ``https_proxy``,
                ``all_proxy``, ``no_proxy``, their uppercase spellings and
                ``REQUEST_METHOD`` are looked at.

        Raises:
            ValueError: A proxy variable holds something that is not a usable proxy URL; the
                message names the variable and hides credentials.
        """
        cgi = "REQUEST_METHOD" in environ

        def pick(lower: str) -> tuple[str | None, str]:
            upper = lower.upper()
            value = environ.get(lower)
            if value is not None and value.strip():
                return value, lower
            if lower == "http_proxy" and cgi:
                return None, lower
            value = environ.get(upper)
            if value is not None and value.strip():
                return value, upper
            return None, lower

        self = cls.__new__(cls)
        self._setup(
            pick("http_proxy"), pick("https_proxy"), pick("all_proxy"), pick("no_proxy")[0]
        )
        return self

    def _setup(
        self,
        http: tuple[str | None, str],
        https: tuple[str | None, str],
        all_: tuple[str | None, str],
        no_proxy: str | None,
    ) -> None:
        def parse(value: str | None, variable: str) -> str | None:
            if value is None or not value.strip():
                return None
            return _parse_proxy(value, variable)

        self.http_proxy = parse(*http)
        self.https_proxy = parse(*https)
        self.all_proxy = parse(*all_)
        self._http = self.http_proxy or self.all_proxy
        self._https = self.https_proxy or self.all_proxy
        self._rules = _Rules(no_proxy) if no_proxy and no_proxy.strip() else _NO_RULES

    @property
    def no_proxy(self) -> tuple[str, ...]:
        """The NO_PROXY entries in effect, as written."""
        return self._rules.entries

    @property
    def no_proxy_ignored(self) -> tuple[str, ...]:
        """The NO_PROXY entries ignored as invalid, or beyond `MAX_NO_PROXY_ENTRIES`."""
        return self._rules.ignored

    @property
    def bypass_all(self) -> bool:
        """True if NO_PROXY holds ``*``: no request uses a proxy."""
        return self._rules.bypass_all

    def proxy_for(self, scheme: str, host: str, port: int) -> str | None:
        """The proxy URL a request to ``scheme://host:port`` goes through, or None for direct.

        Args:
            scheme: ``"http"`` or ``"https"``, lowercase (as `trio_connpool.http.URL.scheme`).
            host: The host, as `trio_connpool.http.URL.host` holds it; IPv6 addresses may also
                be given in brackets, names in any case and with a trailing dot.
            port: The port the request goes to, for NO_PROXY entries that name one.

        Returns:
            The normalised proxy URL (``scheme://[userinfo@]host:port``), or None if no proxy
            variable applies or NO_PROXY exempts the host.

        Raises:
            ValueError: `scheme` is neither ``"http"`` nor ``"https"``.
        """
        if scheme == "http":
            proxy = self._http
        elif scheme == "https":
            proxy = self._https
        else:
            raise ValueError(f"proxy_for: scheme must be 'http' or 'https', not {scheme!r}")
        if proxy is None or self._rules.bypasses(host, port):
            return None
        return proxy

    def bypasses(self, host: str, port: int) -> bool:
        """True if NO_PROXY says a request to `host`:`port` goes direct (rules 8 to 14)."""
        return self._rules.bypasses(host, port)

    def __repr__(self) -> str:
        def show(url: str | None) -> str:
            return "None" if url is None else repr(_redact(url))

        entries = self._rules.entries
        shown = ", ".join(entries[:5])
        if len(entries) > 5:
            shown += f", ... ({len(entries) - 5} more)"
        return (
            f"ProxyEnv(http_proxy={show(self.http_proxy)}, "
            f"https_proxy={show(self.https_proxy)}, all_proxy={show(self.all_proxy)}, "
            f"no_proxy={shown!r})"
        )
