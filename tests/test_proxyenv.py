"""Tests of ProxyEnv: which proxy the environment gives a request. No event loop is needed.

The tables follow the rules at the top of `trio_connpool/http/_proxyenv.py`, in their order.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import assume, given, strategies as st

from trio_connpool.http import URL
from trio_connpool.http._proxyenv import MAX_NO_PROXY_ENTRIES, ProxyEnv

P = "http://proxy.test:3128"
Q = "http://other.test:8080"
S = "socks5h://socks.test:1080"

# ---- proxy variables ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "http", "https"),
    [
        pytest.param({}, None, None, id="nothing-set"),
        pytest.param({"http_proxy": P}, P, None, id="http-only"),
        pytest.param({"https_proxy": P}, None, P, id="https-only"),
        pytest.param({"HTTPS_PROXY": P}, None, P, id="https-upper"),
        pytest.param({"HTTP_PROXY": P}, P, None, id="http-upper-outside-cgi"),
        pytest.param({"all_proxy": P}, P, P, id="all-for-both"),
        pytest.param({"ALL_PROXY": P}, P, P, id="all-upper"),
        pytest.param({"all_proxy": P, "https_proxy": Q}, P, Q, id="specific-beats-all"),
        pytest.param({"ALL_PROXY": P, "HTTP_PROXY": Q}, Q, P, id="specific-upper-beats-all"),
        pytest.param({"http_proxy": P, "HTTP_PROXY": Q}, P, None, id="lower-beats-upper"),
        pytest.param({"HTTPS_PROXY": Q, "https_proxy": P}, None, P, id="lower-beats-upper-s"),
        pytest.param({"all_proxy": P, "ALL_PROXY": Q}, P, P, id="lower-all-beats-upper"),
        pytest.param({"Http_Proxy": P}, None, None, id="mixed-case-name-not-read"),
        # Empty means unset: the next candidate is used.
        pytest.param({"http_proxy": "", "HTTP_PROXY": Q}, Q, None, id="empty-lower-falls-back"),
        pytest.param({"https_proxy": "  ", "all_proxy": P}, P, P, id="blank-falls-to-all"),
        pytest.param({"http_proxy": "", "all_proxy": ""}, None, None, id="all-empty"),
        # httpoxy: under CGI the uppercase HTTP_PROXY may come from a request header.
        pytest.param({"REQUEST_METHOD": "GET", "HTTP_PROXY": Q}, None, None, id="cgi-ignores"),
        pytest.param({"REQUEST_METHOD": "", "HTTP_PROXY": Q}, None, None, id="cgi-empty-method"),
        pytest.param(
            {"REQUEST_METHOD": "GET", "HTTP_PROXY": Q, "ALL_PROXY": P}, P, P, id="cgi-all"
        ),
        pytest.param(
            {"REQUEST_METHOD": "GET", "http_proxy": P, "HTTP_PROXY": Q}, P, None, id="cgi-lower"
        ),
        pytest.param(
            {"REQUEST_METHOD": "GET", "HTTPS_PROXY": Q}, None, Q, id="cgi-keeps-https-upper"
        ),
    ],
)
def test_proxy_variables(environ: dict[str, str], http: str | None, https: str | None) -> None:
    env = ProxyEnv.from_environ(environ)
    assert env.proxy_for("http", "example.com", 80) == http
    assert env.proxy_for("https", "example.com", 443) == https


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128"),
        ("proxy.corp", "http://proxy.corp:80"),
        ("localhost:3128", "http://localhost:3128"),
        ("10.0.0.1:3128", "http://10.0.0.1:3128"),
        ("[::1]:3128", "http://[::1]:3128"),
        ("HTTP://Proxy.CORP:3128/", "http://proxy.corp:3128"),
        ("https://proxy.corp", "https://proxy.corp:443"),
        ("socks5://proxy.corp", "socks5://proxy.corp:1080"),
        ("SOCKS5H://proxy.corp:9050", "socks5h://proxy.corp:9050"),
        ("http://proxy:", "http://proxy:80"),
        ("  http://proxy.corp:3128  ", "http://proxy.corp:3128"),
        ("http://User:p%40ss@proxy.corp:3128", "http://User:p%40ss@proxy.corp:3128"),
        ("user:pw@proxy.corp", "http://user:pw@proxy.corp:80"),
        ("http://[::1]", "http://[::1]:80"),
        ("http://[FE80::1]:3128", "http://[fe80::1]:3128"),
        ("http://bücher.example:3128", "http://xn--bcher-kva.example:3128"),
        ("http://proxy_1.corp", "http://proxy_1.corp:80"),
    ],
)
def test_proxy_values_normalised(value: str, normalised: str) -> None:
    env = ProxyEnv.from_environ({"all_proxy": value})
    assert env.all_proxy == normalised
    assert env.proxy_for("https", "example.com", 443) == normalised


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks4://proxy:1080", "socks4 proxies are not supported"),
        ("socks4a://proxy:1080", "socks4a proxies are not supported"),
        ("ftp://proxy:21", "unsupported proxy scheme 'ftp'"),
        ("http://", "proxy URL has no host"),
        ("http://:3128", "proxy URL has no host"),
        ("http://proxy:99999", "invalid proxy URL"),
        ("http://proxy:port", "invalid proxy URL"),
        ("http://proxy:0", "proxy port must be 1..65535"),
        ("http://proxy/path", "has no path, query or fragment"),
        ("http://proxy/?x", "has no path, query or fragment"),
        ("http://proxy#f", "has no path, query or fragment"),
        ("http://pro xy", "whitespace or control characters"),
        ("http://pro\txy", "whitespace or control characters"),
        ("http://pro<xy>", "invalid character in proxy host"),
        ("http://a..b", "invalid character in proxy host"),
        # urlsplit refuses these itself since Python 3.11.4; our own check covers older ones.
        ("http://[proxy]", "invalid"),
        ("http://[10.0.0.1]", "invalid"),
        ("http://" + "\u00e9" * 64, "cannot be IDNA-encoded"),
        ("http://proxy\r\n", None),  # stripped: trailing whitespace is allowed
    ],
)
def test_invalid_proxy_values(value: str, message: str | None) -> None:
    if message is None:
        assert ProxyEnv.from_environ({"HTTPS_PROXY": value}).https_proxy == "http://proxy:80"
        return
    with pytest.raises(ValueError, match=r"^HTTPS_PROXY: ") as info:
        ProxyEnv.from_environ({"HTTPS_PROXY": value})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "socks4://alice:s3cret@proxy:1080",
        "ftp://alice:s3cret@proxy",
        "http://alice:s3cret@proxy:99999",
        "http://alice:s3cret@proxy/path",
        "alice:s3cret@proxy:port",
        "http://alice:s3cret@pro xy",
        "http://alice:s3/cret@proxy:port",  # an unencoded / ends the authority early
        "http://alice:s3?cret@proxy:port",
        "http://alice:s3#cret@proxy/x",
    ],
)
def test_errors_hide_credentials(value: str) -> None:
    with pytest.raises(ValueError, match=r"^http_proxy: ") as info:
        ProxyEnv.from_environ({"http_proxy": value})
    assert "cret" not in str(info.value)
    assert "alice" not in str(info.value)
    assert "***@" in str(info.value)


def test_error_names_the_variable_read() -> None:
    # The lowercase one is read and is bad; the good uppercase one is not consulted.
    with pytest.raises(ValueError, match=r"^all_proxy: "):
        ProxyEnv.from_environ({"all_proxy": "ftp://x", "ALL_PROXY": P})
    with pytest.raises(ValueError, match=r"^ALL_PROXY: "):
        ProxyEnv.from_environ({"all_proxy": "", "ALL_PROXY": "ftp://x"})
    with pytest.raises(ValueError, match=r"^https_proxy: "):
        ProxyEnv(https_proxy="ftp://x")


def test_repr_hides_credentials_and_is_readable() -> None:
    env = ProxyEnv.from_environ(
        {
            "http_proxy": "http://alice:s3cret@proxy.test:3128",
            "ALL_PROXY": "socks5://bob@socks.test",
            "no_proxy": "localhost,.corp, 10.0.0.0/8",
        }
    )
    assert repr(env) == (
        "ProxyEnv(http_proxy='http://***@proxy.test:3128', https_proxy=None, "
        "all_proxy='socks5://***@socks.test:1080', no_proxy='localhost, .corp, 10.0.0.0/8')"
    )
    # The credentials are still there for the connection to the proxy.
    assert env.proxy_for("http", "example.com", 80) == "http://alice:s3cret@proxy.test:3128"
    assert env.https_proxy is None
    assert env.proxy_for("https", "example.com", 443) == "socks5://bob@socks.test:1080"


def test_repr_shortens_long_no_proxy() -> None:
    env = ProxyEnv(no_proxy=",".join(f"h{i}.test" for i in range(8)))
    assert repr(env) == (
        "ProxyEnv(http_proxy=None, https_proxy=None, all_proxy=None, "
        "no_proxy='h0.test, h1.test, h2.test, h3.test, h4.test, ... (3 more)')"
    )


def test_empty_environment_and_constructor() -> None:
    env = ProxyEnv()
    assert (env.http_proxy, env.https_proxy, env.all_proxy) == (None, None, None)
    assert env.no_proxy == ()
    assert not env.bypass_all
    assert env.proxy_for("http", "example.com", 80) is None
    explicit = ProxyEnv(http_proxy="proxy.test:3128", no_proxy="example.com")
    assert explicit.proxy_for("http", "a.example.com", 80) is None
    assert explicit.proxy_for("http", "example.org", 80) == P


def test_unknown_request_scheme_is_refused() -> None:
    env = ProxyEnv(all_proxy=P)
    with pytest.raises(ValueError, match="scheme must be 'http' or 'https', not 'ftp'"):
        env.proxy_for("ftp", "example.com", 21)


# ---- NO_PROXY ------------------------------------------------------------------------------

# (NO_PROXY, host, port, bypassed)
NO_PROXY_CASES: list[tuple[str, str, int, bool]] = [
    # `*` as any entry bypasses everything.
    ("*", "example.com", 80, True),
    ("*", "::1", 80, True),
    ("example.org, *", "example.com", 80, True),
    ("*.", "example.com", 80, False),  # not `*`: an invalid entry
    # Host names: the name and everything under it, with or without a leading dot.
    ("example.com", "example.com", 80, True),
    ("example.com", "a.example.com", 80, True),
    ("example.com", "a.b.example.com", 80, True),
    (".example.com", "example.com", 80, True),
    (".example.com", "a.example.com", 80, True),
    ("*.example.com", "a.example.com", 80, True),
    ("*.example.com", "example.com", 80, True),
    ("example.com", "badexample.com", 80, False),
    (".example.com", "badexample.com", 80, False),
    ("example.com", "example.com.org", 80, False),
    ("example.com", "example.co", 80, False),
    ("a.example.com", "example.com", 80, False),
    ("example.com", "com", 80, False),
    # Case and trailing dots on either side.
    ("Example.COM", "a.example.com", 80, True),
    ("example.com", "A.EXAMPLE.COM", 80, True),
    ("example.com.", "a.example.com", 80, True),
    ("example.com", "a.example.com.", 80, True),
    (".example.com.", "example.com.", 80, True),
    # Separators: commas, spaces, tabs, newlines, runs of them.
    ("a.test,  ,b.test", "b.test", 80, True),
    ("a.test b.test\tc.test\nd.test", "d.test", 80, True),
    (",,,", "a.test", 80, False),
    ("localhost", "localhost", 8080, True),
    ("bücher.example", "xn--bcher-kva.example", 80, True),
    # IP addresses match exactly; only IP entries match IP hosts.
    ("10.0.0.1", "10.0.0.1", 80, True),
    ("10.0.0.1", "10.0.0.2", 80, False),
    ("0.1", "10.0.0.1", 80, False),
    ("0.0.1", "10.0.0.1", 80, False),
    ("::1", "::1", 80, True),
    ("::1", "0:0::1", 80, True),  # compared as addresses, not text
    ("[::1]", "::1", 80, True),
    ("::1", "[::1]", 80, True),  # a host given in brackets
    ("[::1]", "[::1]", 80, True),
    ("2001:db8::1", "2001:DB8::1", 80, True),
    ("::1", "::2", 80, False),
    ("127.0.0.1", "localhost", 80, False),  # nothing is resolved
    # CIDR ranges.
    ("10.0.0.0/8", "10.255.1.2", 80, True),
    ("10.0.0.0/8", "11.0.0.1", 80, False),
    ("192.168.0.0/16", "192.168.77.1", 80, True),
    ("192.168.1.7/16", "192.168.200.1", 80, True),  # host bits ignored, as curl
    ("0.0.0.0/0", "8.8.8.8", 80, True),
    ("0.0.0.0/0", "::1", 80, False),  # an IPv4 range never holds an IPv6 address
    ("10.0.0.0/8", "a.10.0.0.0", 80, False),
    ("::1/128", "::1", 80, True),
    ("::1/128", "::2", 80, False),
    ("fe80::/10", "fe80::1", 80, True),
    ("fe80::/10", "[febf:ffff::1]", 80, True),
    ("fe80::/10", "fec0::1", 80, False),
    ("::/0", "10.0.0.1", 80, False),
    ("10.0.0.0/8,fe80::/10,192.168.0.0/24", "192.168.0.9", 80, True),
    # host:port entries match only that port.
    ("example.com:8080", "example.com", 8080, True),
    ("example.com:8080", "a.example.com", 8080, True),
    ("example.com:8080", "example.com", 80, False),
    (".example.com:443", "a.example.com", 443, True),
    ("10.0.0.1:8080", "10.0.0.1", 8080, True),
    ("10.0.0.1:8080", "10.0.0.1", 80, False),
    ("[::1]:8080", "::1", 8080, True),
    ("[::1]:8080", "[::1]", 8080, True),
    ("[::1]:8080", "::1", 80, False),
    ("example.com:8080,example.com:9090", "example.com", 9090, True),
    ("example.com:8080,example.org", "example.org", 1, True),
    # Invalid entries are ignored, and the others still apply.
    ("10.0.0.0/33,example.com", "example.com", 80, True),
    ("10.0.0.0/33", "10.0.0.1", 80, False),
    ("example.com:http", "example.com", 80, False),
    ("example.com:0", "example.com", 80, False),
    ("example.com:65536", "example.com", 80, False),
    ("example.com:", "example.com", 80, False),
    ("10.0.0.0/8:80", "10.0.0.1", 80, False),
    ("[::1", "::1", 80, False),
    ("[::1]x", "::1", 80, False),
    ("[10.0.0.1]", "10.0.0.1", 80, False),
    ("[example.com]", "example.com", 80, False),
    ("a..b", "a..b", 80, False),
    ("exa/mple", "exa", 80, False),
    (".", "example.com", 80, False),
]


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), NO_PROXY_CASES)
def test_no_proxy(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    env = ProxyEnv.from_environ({"all_proxy": P, "no_proxy": no_proxy})
    assert env.bypasses(host, port) is bypassed
    expected = None if bypassed else P
    assert env.proxy_for("http", host, port) == expected
    assert env.proxy_for("https", host, port) == expected


@pytest.mark.parametrize(
    ("text", "bypassed"),
    [
        ("http://[::1]:8080/x", True),
        ("http://[::1]/", False),
        ("https://[FE80::1]/", True),
        ("http://A.Example.COM./", True),
        ("http://10.1.2.3/", True),
        ("http://badexample.com/", False),
    ],
)
def test_no_proxy_with_hosts_from_urls(text: str, bypassed: bool) -> None:
    """The URL layer stores IPv6 hosts without brackets; they must match bracketed entries."""
    env = ProxyEnv.from_environ(
        {"all_proxy": P, "NO_PROXY": "[::1]:8080, fe80::/10, example.com, 10.0.0.0/8"}
    )
    url = URL(text)
    assert (env.proxy_for(url.scheme, url.host, url.port) is None) is bypassed
    origin = url.origin
    assert (env.proxy_for(origin.scheme, origin.host, origin.port) is None) is bypassed


@pytest.mark.parametrize(
    ("environ", "host", "bypassed"),
    [
        ({"no_proxy": "a.test"}, "a.test", True),
        ({"NO_PROXY": "a.test"}, "a.test", True),
        ({"no_proxy": "a.test", "NO_PROXY": "b.test"}, "b.test", False),  # lower wins
        ({"no_proxy": "a.test", "NO_PROXY": "b.test"}, "a.test", True),
        ({"no_proxy": "", "NO_PROXY": "b.test"}, "b.test", True),  # empty means unset
        ({"no_proxy": " ", "NO_PROXY": ""}, "b.test", False),
        ({"No_Proxy": "b.test"}, "b.test", False),
    ],
)
def test_no_proxy_variable_names(environ: dict[str, str], host: str, bypassed: bool) -> None:
    env = ProxyEnv.from_environ({"https_proxy": P, **environ})
    assert (env.proxy_for("https", host, 443) is None) is bypassed


def test_no_proxy_applies_to_every_proxy_variable() -> None:
    env = ProxyEnv.from_environ(
        {"http_proxy": P, "HTTPS_PROXY": Q, "all_proxy": S, "no_proxy": "internal.test"}
    )
    assert env.proxy_for("http", "x.internal.test", 80) is None
    assert env.proxy_for("https", "x.internal.test", 443) is None
    assert env.proxy_for("http", "public.test", 80) == P
    assert env.proxy_for("https", "public.test", 443) == Q


def test_no_proxy_attributes() -> None:
    env = ProxyEnv(no_proxy="a.test, 10.0.0.0/33 ,[::1]:80,bad..name")
    assert env.no_proxy == ("a.test", "[::1]:80")
    assert env.no_proxy_ignored == ("10.0.0.0/33", "bad..name")
    assert not env.bypass_all
    assert ProxyEnv(no_proxy="a.test,*").bypass_all


def test_no_proxy_bound() -> None:
    names = [f"h{i}.test" for i in range(MAX_NO_PROXY_ENTRIES + 5)]
    env = ProxyEnv(all_proxy=P, no_proxy=",".join(names))
    assert len(env.no_proxy) == MAX_NO_PROXY_ENTRIES
    assert env.no_proxy_ignored == (f"... entries after the first {MAX_NO_PROXY_ENTRIES}",)
    assert env.proxy_for("http", f"h{MAX_NO_PROXY_ENTRIES - 1}.test", 80) is None
    assert env.proxy_for("http", f"h{MAX_NO_PROXY_ENTRIES}.test", 80) == P


# ---- properties ----------------------------------------------------------------------------


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_label = st.from_regex(r"[a-z0-9][a-z0-9\-]{0,10}", fullmatch=True)
_name = st.lists(_label, min_size=1, max_size=4).map(".".join)


@given(
    entry=_name,
    sub=st.lists(_label, max_size=3).map(".".join),
    dot=st.booleans(),
    upper=st.booleans(),
    port=st.integers(1, 65535),
)
def test_a_host_matches_its_own_suffix_entry(
    entry: str, sub: str, dot: bool, upper: bool, port: int
) -> None:
    host = f"{sub}.{entry}" if sub else entry
    assume(not _is_address(host))  # ``1.2.3.4`` is an address, matched only by IP entries
    env = ProxyEnv(no_proxy=("." if dot else "") + entry)
    assert env.bypasses(host.upper() if upper else host, port)


@given(entry=_name, prefix=_label, dot=st.booleans())
def test_no_match_without_a_dot_boundary(entry: str, prefix: str, dot: bool) -> None:
    # `prefix + entry` ends with the entry's characters but is another name.
    env = ProxyEnv(no_proxy=("." if dot else "") + entry)
    assert not env.bypasses(prefix + entry, 80)
    assert not env.bypasses(f"www.{prefix}{entry}", 80)


@given(address=st.ip_addresses(), prefixlen=st.integers(0, 128))
def test_cidr_matches_what_ipaddress_says(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefixlen: int
) -> None:
    prefixlen = min(prefixlen, address.max_prefixlen)
    network = ipaddress.ip_network(f"{address}/{prefixlen}", strict=False)
    env = ProxyEnv(no_proxy=str(network))
    assert env.bypasses(str(address), 80)
    # The first address past the network is outside it (when there is one).
    after = int(network.broadcast_address) + 1
    if after < 2**address.max_prefixlen:
        outside = type(address)(after)
        assert not env.bypasses(str(outside), 80)


# ---- cost ----------------------------------------------------------------------------------


def _worst_case(n: int) -> str:
    # Every kind of entry, none matching the hosts looked up below: names (with and without
    # ports), exact addresses, and CIDR ranges of every prefix length.
    entries: list[str] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            entries.append(f".n{i}.example.com")
        elif kind == 1:
            entries.append(f"n{i}.example.com:{1 + i % 65535}")
        elif kind == 2:
            entries.append(f"10.{i % 256}.{i // 256 % 256}.{i % 7}")
        elif kind == 3:
            entries.append(f"11.{i % 256}.0.0/{8 + i % 25}")
        else:
            entries.append(f"fd{i % 256:02x}::/{16 + i % 113}")
    return ",".join(entries)


def _lookup_time(n: int) -> float:
    env = ProxyEnv(all_proxy=P, no_proxy=_worst_case(n))
    assert len(env.no_proxy) == n
    hosts = [
        ("a.b.c.d.e.f.example.org", 443),
        ("12.1.2.3", 80),
        ("2001:db8::1", 80),
        ("[2001:db8::2]", 8080),
    ]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            for host, port in hosts:
                assert env.proxy_for("https", host, port) == P
        best = min(best, time.perf_counter() - start)
    return best


def test_lookup_cost_does_not_grow_with_no_proxy() -> None:
    """A lookup hashes the host's suffixes and one value per prefix length: with 10,000
    entries it must cost about what it costs with 10 (the bound is generous for loaded
    machines; a scan of the list would be some hundreds of times slower)."""
    small = _lookup_time(10)
    large = _lookup_time(MAX_NO_PROXY_ENTRIES)
    assert large < small * 10 + 0.005, (small, large)
    # Absolute sanity: 800 lookups against 10,000 entries well under a second.
    assert large < 0.5


def test_parse_is_linear() -> None:
    start = time.perf_counter()
    ProxyEnv(no_proxy=_worst_case(1_000))
    small = time.perf_counter() - start
    start = time.perf_counter()
    ProxyEnv(no_proxy=_worst_case(MAX_NO_PROXY_ENTRIES))
    large = time.perf_counter() - start
    assert large < small * 10 * 5 + 0.05, (small, large)
    # A huge value is cut at the bound without splitting the rest.
    start = time.perf_counter()
    env = ProxyEnv(no_proxy="a.test," * 1_000_000)
    assert len(env.no_proxy) == MAX_NO_PROXY_ENTRIES
    assert time.perf_counter() - start < 1.0
