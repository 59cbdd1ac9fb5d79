"""Opening transports: TCP with happy eyeballs, then TLS with ALPN.

`open_stream` is the one place where sockets come into being, so it owns two promises: a
connect is bounded by the connect timeout as a whole (DNS, TCP and the TLS handshake
together), and a half-open stream is closed on every failure or cancellation, never left to
the garbage collector. Every failure comes out as `ConnectError` (or `ConnectTimeout`),
raised ``from`` the original error so a certificate problem stays visible in the chain, and
its message ends with the root cause in words (``Connection refused``, ``certificate verify
failed: ...``), found in that chain when the message is shown.

TLS verifies certificates and host names by default (`create_ssl_context`), and a caller's
`ssl.SSLContext` is used as given, never modified: contexts are shared objects, and changing
one under its owner would be a security bug waiting to happen.

A connection may also go over a Unix domain socket (``uds``) instead of TCP: the URL still
gives the Host header, the scheme (TLS over the socket for ``https``) and the TLS server name.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from typing import TYPE_CHECKING, Union, cast

import trio

from .._exceptions import ConnectError, ConnectTimeout

if TYPE_CHECKING:
    from ._models import Origin

__all__ = ["CertTypes", "VerifyTypes", "create_ssl_context", "open_stream", "start_tls"]

VerifyTypes = Union[bool, str, "os.PathLike[str]", ssl.SSLContext]
"""What ``verify=`` accepts: True (the system's trust store), False (no verification), the
path of a CA bundle (a PEM file, or a directory of hashed certificates as ``openssl rehash``
makes), or an `ssl.SSLContext` used as given."""

_Path = Union[str, "os.PathLike[str]"]
CertTypes = Union[_Path, tuple[_Path, _Path], tuple[_Path, _Path, str]]  # noqa: UP007
"""What ``cert=`` accepts (a client certificate, httpx's forms): the path of one PEM file
holding the certificate and its key, ``(certfile, keyfile)``, or ``(certfile, keyfile,
password)``."""


def _path(name: str, value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(cast("os.PathLike[str]", value))
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a path (str or os.PathLike), not {value!r}")
    return value


def _load_cert(context: ssl.SSLContext, cert: object) -> None:
    """Load the client certificate ``cert`` (see `CertTypes`) into ``context``."""
    if isinstance(cert, tuple):
        parts: tuple[object, ...] = cert  # pyright: ignore[reportUnknownVariableType]
        if len(parts) not in (2, 3):
            raise TypeError(
                "cert must be a path, (certfile, keyfile) or (certfile, keyfile, password), "
                f"not a tuple of {len(parts)}"
            )
        certfile = _path("cert's certfile", parts[0])
        keyfile: str | None = _path("cert's keyfile", parts[1])
        password = parts[2] if len(parts) == 3 else None
        if password is not None and not isinstance(password, (str, bytes)):
            raise TypeError(f"cert's password must be a str or bytes, not {password!r}")
    else:
        certfile, keyfile, password = _path("cert", cert), None, None
    for path in (certfile, keyfile):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"cert: no such file: {path!r}")
    try:
        context.load_cert_chain(certfile, keyfile, password)
    except ssl.SSLError as exc:
        raise ValueError(
            f"cert: cannot load the client certificate from {certfile!r}"
            f"{'' if keyfile is None else f' and its key from {keyfile!r}'}: {exc}"
        ) from exc


def _system_context(trust_env: bool) -> ssl.SSLContext:
    """A verifying context that trusts the system's store: OpenSSL's default locations,
    which honour SSL_CERT_FILE and SSL_CERT_DIR, or with ``trust_env=False`` the locations
    compiled into OpenSSL, whatever the environment says."""
    if trust_env:
        return ssl.create_default_context()
    paths = ssl.get_default_verify_paths()
    cafile = paths.openssl_cafile if os.path.isfile(paths.openssl_cafile) else None
    capath = paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None
    if cafile is None and capath is None:  # (Windows: its store, as load_default_certs)
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=cafile, capath=capath)


def create_ssl_context(
    verify: VerifyTypes = True,
    *,
    cert: CertTypes | None = None,
    http1: bool = True,
    http2: bool = False,
    trust_env: bool = True,
) -> ssl.SSLContext:
    """Return the `ssl.SSLContext` to open HTTPS connections with.

    Files are read here, once: a bad path fails now, not at the first request.

    Args:
        verify: ``True`` (the default) verifies the server's certificate against the system's
            trust store and checks the host name. ``False`` turns both off (for tests and
            trusted networks only). A path (str or `os.PathLike`) verifies against that CA
            bundle instead of the system's: a PEM file, or a directory of hashed
            certificates (``openssl rehash``). An `ssl.SSLContext` is returned as is, never
            modified: its ALPN protocols are then whatever you set on it (none unless you
            called ``set_alpn_protocols``, which means HTTP/1.1).
        cert: A client certificate (see `CertTypes`), for contexts made here; not with an
            `ssl.SSLContext`, which is never modified (load it there yourself).
        http1: Offer ``http/1.1`` in ALPN (ignored for a given context).
        http2: Offer ``h2`` in ALPN, before ``http/1.1`` (ignored for a given context).
        trust_env: With ``verify=True``, honour the ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``
            environment variables (OpenSSL's own; read now). False: the trust store compiled
            into OpenSSL, whatever they say.

    Returns:
        The context.

    Raises:
        TypeError: If ``verify`` or ``cert`` is of the wrong type, or ``cert`` comes with an
            `ssl.SSLContext`.
        FileNotFoundError: If a path names no file (or directory, for ``verify``).
        ValueError: If neither protocol is offered, or a file holds no usable certificate
            or key.
    """
    if not (http1 or http2):
        raise ValueError("offer at least one of http1 and http2")
    if isinstance(verify, ssl.SSLContext):
        if cert is not None:
            raise TypeError(
                "cert= cannot be used with an ssl.SSLContext: a given context is never "
                "modified; load the certificate into it (context.load_cert_chain(...))"
            )
        return verify
    if isinstance(verify, bool):
        context = _system_context(trust_env)
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    else:
        if not isinstance(verify, (str, os.PathLike)):
            raise TypeError(
                f"verify must be a bool, a CA bundle path or an ssl.SSLContext, not {verify!r}"
            )
        path = _path("verify", verify)
        if os.path.isdir(path):
            context = ssl.create_default_context(capath=path)
        elif os.path.isfile(path):
            try:
                context = ssl.create_default_context(cafile=path)
            except ssl.SSLError as exc:
                raise ValueError(f"verify: no CA certificate found in {path!r}: {exc}") from exc
        else:
            raise FileNotFoundError(f"verify: no such CA bundle (file or directory): {path!r}")
    if cert is not None:
        _load_cert(context, cert)
    context.set_alpn_protocols(["h2"] * http2 + ["http/1.1"] * http1)
    return context


def start_tls(
    stream: trio.abc.Stream, origin: Origin, ssl_context: ssl.SSLContext | None
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap ``stream`` in TLS for ``origin`` (its host name checked; ``ssl_context`` None: the
    library's default context). The caller awaits the handshake, and closes the stream if it
    fails."""
    return trio.SSLStream(
        stream,
        ssl_context if ssl_context is not None else create_ssl_context(),
        server_hostname=origin.host,
        https_compatible=True,
    )


async def open_stream(
    origin: Origin,
    *,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float | None,
    uds: str | None = None,
) -> tuple[trio.abc.Stream, str | None]:
    """Open a connection to ``origin``: TCP (or a Unix socket), plus TLS for ``https``.

    TCP uses `trio.open_tcp_stream` (happy eyeballs over every address the name resolves
    to) with ``TCP_NODELAY`` set. For ``https`` the TLS handshake is done here, with SNI and
    host name checking against ``origin.host``.

    Args:
        origin: Where to connect.
        ssl_context: The TLS context for ``https``; ``None`` means `create_ssl_context()`
            (verified, HTTP/1.1 only). Ignored for ``http``.
        connect_timeout: Bound on the whole connect (DNS, TCP, TLS), or ``None``.
        uds: Connect to this Unix domain socket instead of ``origin``'s host and port.

    Returns:
        The open stream, and the protocol ALPN selected (``"h2"``, ``"http/1.1"``), or
        ``None`` for plain TCP or when the server did not take part in ALPN.

    Raises:
        ConnectTimeout: If the connect did not finish within ``connect_timeout``.
        ConnectError: If it failed (DNS, refused, unreachable, TLS or certificate error);
            the original error is the ``__cause__``.
    """
    stream: trio.abc.Stream | None = None
    timeout = math.inf if connect_timeout is None else connect_timeout
    try:
        with trio.fail_after(timeout):
            if uds is None:
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            else:
                tcp = await trio.open_unix_socket(uds)
            stream = tcp
            if not origin.is_secure:
                return tcp, None
            stream = tls = start_tls(tcp, origin, ssl_context)
            await tls.do_handshake()
            return tls, tls.selected_alpn_protocol()
    except BaseException as exc:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectTimeout(
                f"connecting to {origin} took longer than {connect_timeout} s", key=origin
            ) from exc
        if isinstance(exc, (OSError, trio.BrokenResourceError, ssl.SSLError)):
            # No "{exc}" here: the words come from the chain when the error is shown (trio's
            # "all attempts to connect ... failed" holds them one exception group further).
            via = "" if uds is None else f" over the Unix socket {uds}"
            raise ConnectError(f"cannot connect to {origin}{via}", key=origin) from exc
        raise
