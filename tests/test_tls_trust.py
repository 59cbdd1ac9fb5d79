"""TLS trust: a CA bundle path (file or hashed directory) with HTTP/2, client certificates
(mTLS against nginx with ``ssl_verify_client on``), SSL_CERT_FILE / SSL_CERT_DIR with and
without ``trust_env``, and the warning for a caller's context that negotiates no ALPN.

Real servers on 127.0.0.1: hypercorn over TLS (h2 and http/1.1 offered) and nginx.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import trio
import trustme
from _servers import CountingApp, TLSFiles, serve_hypercorn, serve_nginx
from cryptography.hazmat.primitives import serialization

from trio_connpool import ConnectError
from trio_connpool.http import Response, create_ssl_context, open_client


@pytest.fixture
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


def _ca_file(tls: TLSFiles, directory: Path) -> Path:
    path = directory / "ca.pem"
    tls.ca.cert_pem.write_to_path(str(path))
    return path


def _ca_dir(tls: TLSFiles, directory: Path) -> Path:
    """A directory of hashed CA certificates, as ``openssl rehash`` makes it."""
    hashed = directory / "certs"
    hashed.mkdir()
    tls.ca.cert_pem.write_to_path(str(hashed / "test-ca.pem"))
    openssl = shutil.which("openssl")
    if openssl is None:  # pragma: no cover
        pytest.skip("openssl (for `openssl rehash`) is not installed")
    subprocess.run([openssl, "rehash", str(hashed)], check=True)
    assert any(name.endswith(".0") for name in os.listdir(hashed))
    return hashed


# ---- verify= a CA bundle path -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_a_ca_path_verifies_and_negotiates_http2(
    tls: TLSFiles, tmp_path: Path, kind: str
) -> None:
    ca = _ca_file(tls, tmp_path) if kind == "file" else _ca_dir(tls, tmp_path)
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        for verify in (str(ca), ca):  # a str and an os.PathLike
            async with open_client(verify=verify, http2=True) as client:
                response = await client.get(base + "/")
                assert response.status_code == 200
                assert response.http_version == "HTTP/2"
        # The path replaces the system's store: another CA's certificate is refused.
        other = _ca_file(TLSFiles.create(_mkdir(tmp_path / "other")), tmp_path / "other")
        async with open_client(verify=other) as client:
            with pytest.raises(ConnectError, match="certificate verify failed"):
                await client.get(base + "/")


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


async def test_bad_paths_fail_when_the_client_opens(tls: TLSFiles, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(FileNotFoundError, match="no such CA bundle"):
        async with open_client(verify=tmp_path / "missing.pem"):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(ValueError, match="no CA certificate found"):
        async with open_client(verify=str(empty)):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(FileNotFoundError, match="cert: no such file"):
        async with open_client(cert=str(tmp_path / "client.pem")):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(ValueError, match="cannot load the client certificate"):
        async with open_client(cert=(str(empty), str(tls.keyfile))):
            raise AssertionError("unreachable")  # pragma: no cover
    with pytest.raises(TypeError, match="cert must be"):
        async with open_client(cert=("a", "b", "c", "d")):  # type: ignore[arg-type]
            raise AssertionError("unreachable")  # pragma: no cover
    # A caller's context is never modified, so cert= cannot go into it.
    with pytest.raises(TypeError, match="never modified"):
        async with open_client(verify=tls.client_context(), cert=str(tls.certfile)):
            raise AssertionError("unreachable")  # pragma: no cover


def test_contexts_made_from_paths_offer_alpn(tls: TLSFiles, tmp_path: Path) -> None:
    ca = _ca_file(tls, tmp_path)
    context = create_ssl_context(ca, http2=True)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1
    given = tls.client_context()
    assert create_ssl_context(given) is given


# ---- client certificates against nginx (ssl_verify_client on) -----------------------------

_MTLS = """
    server {
        listen 127.0.0.1:PORT ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        ssl_client_certificate {dir}/ca.pem;
        ssl_verify_client on;
        location / { return 200 "hello $ssl_client_verify"; }
    }
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ClientFiles:
    """A client certificate from the server's CA, in the three forms cert= takes."""

    def __init__(self, ca: trustme.CA, directory: Path) -> None:
        leaf = ca.issue_cert("client.example")
        self.combined = directory / "client.pem"
        self.certfile = directory / "client-cert.pem"
        self.keyfile = directory / "client-key.pem"
        self.encrypted = directory / "client-key-encrypted.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.certfile))
        leaf.private_key_pem.write_to_path(str(self.keyfile))
        self.combined.write_bytes(leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes())
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
        self.encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"s3cret"),
            )
        )


async def test_mtls_with_nginx(tls: TLSFiles, tmp_path: Path) -> None:
    shutil.copy(tls.certfile, tmp_path / "cert.pem")
    shutil.copy(tls.keyfile, tmp_path / "key.pem")
    ca = _ca_file(tls, tmp_path)
    files = ClientFiles(tls.ca, _mkdir(tmp_path / "client"))
    port = _free_port()
    url = f"https://localhost:{port}/"
    async with serve_nginx(tmp_path, _MTLS.replace("PORT", str(port)), ports=[port]):
        # Without a client certificate nginx answers 400 and says why.
        async with open_client(verify=ca, http2=True) as client:
            refused = await client.get(url)
        assert refused.status_code == 400
        assert "No required SSL certificate was sent" in refused.text
        for cert in (
            str(files.combined),
            files.combined,
            (str(files.certfile), str(files.keyfile)),
            (files.certfile, files.encrypted, "s3cret"),
        ):
            async with open_client(verify=ca, cert=cert, http2=True) as client:
                response = await client.get(url)
            assert response.status_code == 200, cert
            assert response.http_version == "HTTP/2"
            assert response.text == "hello SUCCESS", cert
        # With verify=False too (the certificate goes into every context made here).
        async with open_client(verify=False, cert=files.combined) as client:
            assert (await client.get(url)).status_code == 200
        # The CLI, with curl's names.
        for flags in (
            ["--cert", str(files.combined)],
            ["--cert", str(files.certfile), "--key", str(files.keyfile)],
        ):
            result = await trio.run_process(
                [sys.executable, "-m", "trio_connpool", "get", "--cacert", str(ca), *flags, url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"hello SUCCESS"


async def test_cli_reports_bad_tls_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    for flags, message in (
        (["--cacert", str(tmp_path / "missing.pem")], b"--cacert: no such file"),
        (["--cert", str(tmp_path / "missing.pem")], b"--cert: no such file"),
        (["--cacert", str(empty)], b"--cacert: no CA certificate found"),
        (["--key", str(empty)], b"--key: only with --cert"),
    ):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_connpool", "get", *flags, "https://localhost:1/"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr, result.stderr


# ---- the ALPN warning for a caller's context -------------------------------------------


async def test_a_given_context_without_alpn_warns_once_per_origin(tls: TLSFiles) -> None:
    app = CountingApp()
    async with serve_hypercorn(app, tls) as base:
        port = base.rsplit(":", 1)[1]
        context = tls.client_context()  # no set_alpn_protocols: the server cannot choose h2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with open_client(verify=context, http2=True) as client:
                for host in ("127.0.0.1", "localhost"):
                    for _ in range(3):
                        responses = await _burst(client, f"https://{host}:{port}/", 4)
                        assert {r.http_version for r in responses} == {"HTTP/1.1"}
        assert app.connections > 2  # several connects per origin, one warning each
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert len(messages) == 2, messages
        for host, message in zip(("127.0.0.1", "localhost"), messages, strict=True):
            assert f"https://{host}:{port}" in message
            assert 'set_alpn_protocols(["h2", "http/1.1"])' in message
        # HTTP/2 only: no fallback, the refusal says the same.
        async with open_client(verify=context, http2=True, http1=False) as client:
            with pytest.raises(ConnectError, match=r"set_alpn_protocols\(\["):
                await client.get(base + "/")
        # The context itself was not touched; with ALPN set on it, HTTP/2 and no warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with open_client(
                verify=tls.client_context(["h2", "http/1.1"]), http2=True
            ) as client:
                assert (await client.get(base + "/")).http_version == "HTTP/2"
        assert [str(w.message) for w in caught] == []


async def test_our_contexts_never_warn(tls: TLSFiles, tmp_path: Path) -> None:
    app = CountingApp()
    ca = _ca_file(tls, tmp_path)
    # A server that takes no part in ALPN: our context offered h2, and HTTP/1.1 it is.
    async with serve_hypercorn(app, tls, alpn=[]) as base:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for verify in (ca, False):
                async with open_client(verify=verify, http2=True) as client:
                    response = await client.get(base + "/")
                    assert response.http_version == "HTTP/1.1"
        assert [str(w.message) for w in caught] == []


async def _burst(client: object, url: str, count: int) -> list[Response]:
    results: list[Response] = []

    async def one() -> None:
        results.append(await client.get(url))  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


# ---- SSL_CERT_FILE and SSL_CERT_DIR ---------------------------------------------------------

_ENV_SCRIPT = """
import json, os, sys
import trio
from trio_connpool import ConnectError
from trio_connpool.http import open_client

async def get(url, **options):
    async with open_client(**options) as client:
        try:
            return (await client.get(url)).text
        except ConnectError as exc:
            failed = "certificate verify failed"
            return failed if failed in str(exc) else str(exc)

async def main():
    url, other = sys.argv[1], sys.argv[2]
    results = [await get(url), await get(url, trust_env=False)]
    # Read when a client opens: one opened before the variables go keeps trusting them...
    async with open_client() as client:
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            os.environ.pop(name, None)
        results.append((await client.get(other)).text)
    # ...and one opened after does not.
    results.append(await get(url))
    print(json.dumps(results))

trio.run(main)
"""


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
async def test_ssl_cert_variables_and_trust_env(
    tls: TLSFiles, tmp_path: Path, variable: str
) -> None:
    ca = _ca_file(tls, tmp_path) if variable == "SSL_CERT_FILE" else _ca_dir(tls, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env[variable] = str(ca)
    async with serve_hypercorn(CountingApp(), tls) as base:
        port = base.rsplit(":", 1)[1]
        result = await trio.run_process(
            [
                sys.executable,
                "-c",
                _ENV_SCRIPT,
                f"https://localhost:{port}/",
                f"https://127.0.0.1:{port}/",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        "hello, world",  # trust_env=True: the variable's CA is trusted
        "certificate verify failed",  # trust_env=False: the system's store only
        "hello, world",  # a client opened while the variable was set
        "certificate verify failed",  # a client opened after it was unset
    ]
