"""Following redirects, against hypercorn on 127.0.0.1: the method and body rules of RFC 9110
as httpx applies them, relative Locations, the redirect bound, a missing Location, headers
dropped across origins (two servers on two ports), and the pool balanced after each."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import attrs
import pytest
import trio
from _servers import CountingApp, Receive, Scope, Send, assert_pool_balanced, serve_hypercorn

from trio_connpool import RemoteProtocolError, StreamConsumed, TooManyRedirects
from trio_connpool.http import Request, Response, open_client
from trio_connpool.http._client import _redirect_request  # pyright: ignore[reportPrivateUsage]


class RedirectApp(CountingApp):
    """``/r/{status}?to=URL`` (a number) answers that status with ``Location: URL`` (and a
    small body); ``/loop`` redirects to itself; ``/bare/{status}`` has no Location; anything
    else answers 200 with JSON describing the request (method, path, query, headers, body).
    """

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        for _ in range(10_000):  # bounded
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        path: str = scope["path"]
        query = parse_qs(scope["query_string"].decode())
        if path.startswith("/r/") and path[3:].isdigit():
            location = query["to"][0].encode()
            await _answer(send, int(path.removeprefix("/r/")), b"moved", location)
        elif path == "/loop":
            await _answer(send, 302, b"again", b"/loop")
        elif path.startswith("/bare/"):
            await _answer(send, int(path.removeprefix("/bare/")), b"nowhere", None)
        else:
            described = {
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "headers": {n.decode(): v.decode() for n, v in scope["headers"]},
                "body": b"".join(chunks).decode(),
            }
            await _answer(send, 200, json.dumps(described).encode(), None)


async def _answer(send: Send, status: int, body: bytes, location: bytes | None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if location is not None:
        headers.append((b"location", location))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@attrs.frozen
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: str


def _seen(response: Response) -> Seen:
    assert response.status_code == 200, response
    return Seen(**json.loads(response.content))


def _to(target: str) -> str:
    return "?to=" + target.replace("&", "%26").replace("?", "%3F")


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with serve_hypercorn(RedirectApp()) as url:
        yield url


@pytest.mark.parametrize(
    ("status", "method", "expected"),
    [
        (303, "POST", "GET"),
        (303, "PUT", "GET"),
        (303, "HEAD", "HEAD"),
        (302, "POST", "GET"),
        (302, "PUT", "GET"),  # as httpx (and browsers): not only POST
        (301, "POST", "GET"),
        (301, "PUT", "PUT"),
        (307, "POST", "POST"),
        (308, "PUT", "PUT"),
        (307, "DELETE", "DELETE"),
    ],
)
async def test_method_and_body_rules(base: str, status: int, method: str, expected: str) -> None:
    async with open_client(follow_redirects=True) as client:
        response = await client.request(
            method,
            f"{base}/r/{status}{_to('/inspect')}",
            content=b"the body",
            headers={"Content-Type": "text/plain"},
        )
        assert [r.status_code for r in response.history] == [status]
        assert response.history[0].request.method == method
        assert response.request.method == expected
        if expected == "HEAD":
            assert response.status_code == 200
            assert response.content == b""
            return
        seen = _seen(response)
        assert seen.method == expected
        if expected == method:
            assert seen.body == "the body"
            assert seen.headers["content-length"] == "8"
        else:
            assert seen.body == ""
            assert "content-length" not in seen.headers
            assert "transfer-encoding" not in seen.headers
        # The intermediate response was read (it was small) and its connection reused.
        assert response.history[0].content == b"moved"
        assert response.history[0].is_closed
        assert_pool_balanced(client.pool, idle=1)


async def test_relative_locations_are_resolved_against_the_request_url(base: str) -> None:
    async with open_client(follow_redirects=True) as client:
        for location, path, query in (
            ("/inspect?x=1", "/inspect", "x=1"),
            ("other", "/r/other", ""),
            ("../up", "/up", ""),
            (f"{base}/absolute", "/absolute", ""),
            ("//" + base.removeprefix("http://") + "/netpath", "/netpath", ""),
        ):
            seen = _seen(await client.get(f"{base}/r/302{_to(location)}"))
            assert (seen.path, seen.query) == (path, query), location
        assert_pool_balanced(client.pool, idle=1)


async def test_history_lists_every_hop_in_order(base: str) -> None:
    async with open_client() as client:
        inner = "/r/302" + _to("/r/307?to=/end")
        url = f"{base}/r/301{_to(inner)}"
        response = await client.get(url, follow_redirects=True)
        assert [r.status_code for r in response.history] == [301, 302, 307]
        assert [len(r.history) for r in response.history] == [0, 1, 2]  # as httpx
        assert _seen(response).path == "/end"
        assert str(response.url) == base + "/end"
        assert_pool_balanced(client.pool, idle=1)


async def test_redirects_are_not_followed_by_default(base: str) -> None:
    async with open_client() as client:
        response = await client.get(f"{base}/r/302{_to('/inspect')}")
        assert response.status_code == 302
        assert response.headers["location"] == "/inspect"
        assert response.content == b"moved"
        assert response.history == []
    async with open_client(follow_redirects=True) as client:
        response = await client.get(f"{base}/r/302{_to('/inspect')}", follow_redirects=False)
        assert response.status_code == 302
        assert_pool_balanced(client.pool, idle=1)


async def test_a_redirect_without_location_is_returned(base: str) -> None:
    async with open_client(follow_redirects=True) as client:
        for status in (301, 302, 303, 307, 308):
            response = await client.get(f"{base}/bare/{status}")
            assert response.status_code == status
            assert response.content == b"nowhere"
            assert response.history == []
        assert_pool_balanced(client.pool, idle=1)


async def test_the_redirect_bound(base: str) -> None:
    async with open_client(follow_redirects=True, max_redirects=3) as client:
        with pytest.raises(TooManyRedirects) as caught:
            await client.get(base + "/loop")
        message = str(caught.value)
        assert "more than 3 redirects" in message
        assert base + "/loop" in message
        assert caught.value.url == base + "/loop"
        assert_pool_balanced(client.pool, idle=1)
    # The default bound is 20 hops: 21 requests, then the error.
    app = RedirectApp()
    async with serve_hypercorn(app) as other, open_client(follow_redirects=True) as client:
        with pytest.raises(TooManyRedirects, match="more than 20 redirects"):
            await client.get(other + "/loop")
        assert app.requests == 21
        assert_pool_balanced(client.pool, idle=1)
    async with open_client(max_redirects=0) as client:
        with pytest.raises(TooManyRedirects):
            await client.get(base + "/loop", follow_redirects=True)


async def test_a_streamed_body_is_not_resent(base: str) -> None:
    app = RedirectApp()

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    async with serve_hypercorn(app) as url, open_client(follow_redirects=True) as client:
        with pytest.raises(StreamConsumed, match="streamed") as caught:
            await client.post(f"{url}/r/307{_to('/inspect')}", content=body())
        assert isinstance(caught.value, RuntimeError)
        assert app.requests == 1  # the redirect was not sent
        # A redirect that drops the body is followed.
        response = await client.post(f"{url}/r/303{_to('/inspect')}", content=body())
        assert _seen(response).method == "GET"
        assert_pool_balanced(client.pool, idle=1)


async def test_an_invalid_location_is_the_servers_error(base: str) -> None:
    async with open_client(follow_redirects=True) as client:
        for location in ("ftp://127.0.0.1/x", "http://[::1/"):
            with pytest.raises(RemoteProtocolError, match="Location"):
                await client.get(f"{base}/r/302{_to(location)}")
        assert_pool_balanced(client.pool, idle=1)


async def test_credentials_are_dropped_when_the_origin_changes() -> None:
    secret = {"Authorization": "Bearer secret", "Cookie": "session=1", "X-Other": "kept"}
    async with (
        serve_hypercorn(RedirectApp()) as first,
        serve_hypercorn(RedirectApp()) as second,
        open_client(follow_redirects=True) as client,
    ):
        assert first != second  # two ports
        # Same origin: Authorization stays; Cookie is dropped on every redirect (httpx).
        seen = _seen(await client.get(f"{first}/r/302{_to('/inspect')}", headers=secret))
        assert seen.headers["authorization"] == "Bearer secret"
        assert "cookie" not in seen.headers
        assert seen.headers["x-other"] == "kept"
        # Another port: another origin. Authorization and Cookie go; Host is the new one.
        seen = _seen(await client.get(f"{first}/r/307{_to(second + '/inspect')}", headers=secret))
        assert "authorization" not in seen.headers
        assert "cookie" not in seen.headers
        assert seen.headers["x-other"] == "kept"
        assert seen.headers["host"] == second.removeprefix("http://")
        # A Host given for the first origin is not sent to the second.
        seen = _seen(
            await client.get(
                f"{first}/r/302{_to(second + '/inspect')}",
                headers={"Host": first.removeprefix("http://")},
            )
        )
        assert seen.headers["host"] == second.removeprefix("http://")
        # Client-wide default headers are dropped the same way.
        client.headers["Authorization"] = "Basic default"
        seen = _seen(await client.get(f"{first}/r/308{_to(second + '/inspect')}"))
        assert "authorization" not in seen.headers
        assert_pool_balanced(client.pool, idle=2)


async def test_proxy_credentials_set_by_hand_do_not_follow_a_redirect_elsewhere() -> None:
    """A ``Proxy-Authorization`` header given by hand is for the proxy of the first URL: a
    redirect to another origin (which may go direct, or through another proxy) must not carry
    it to a server that was never meant to see the proxy's credentials. ``Proxy(auth=...)``
    is the way to give credentials that follow the proxy."""
    secret = {"Proxy-Authorization": "Basic cHJveHk6c2VjcmV0"}
    async with (
        serve_hypercorn(RedirectApp()) as first,
        serve_hypercorn(RedirectApp()) as second,
        open_client(follow_redirects=True) as client,
    ):
        seen = _seen(await client.get(f"{first}/r/302{_to(second + '/inspect')}", headers=secret))
        assert "proxy-authorization" not in seen.headers
        # The same origin keeps it, as it keeps Authorization.
        seen = _seen(await client.get(f"{first}/r/302{_to('/inspect')}", headers=secret))
        assert seen.headers["proxy-authorization"] == secret["Proxy-Authorization"]
        assert_pool_balanced(client.pool, idle=2)


async def test_stream_follows_redirects(base: str) -> None:
    async with open_client() as client:
        async with client.stream(
            "POST", f"{base}/r/303{_to('/inspect')}", json={"a": 1}, follow_redirects=True
        ) as response:
            assert [r.status_code for r in response.history] == [303]
            assert not response.is_closed
            chunks = [chunk async for chunk in response.aiter_bytes()]
        seen = json.loads(b"".join(chunks))
        assert (seen["method"], seen["body"]) == ("GET", "")
        assert "content-type" in seen["headers"]  # as httpx: only the framing is dropped
        assert_pool_balanced(client.pool, idle=1)


async def test_a_large_redirect_body_is_not_read(base: str) -> None:
    """A redirect whose body is over 64 KiB is closed unread: its connection closes."""

    class BigRedirect(RedirectApp):
        async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/big":
                await _answer(send, 302, b"x" * (1024 * 1024), b"/inspect")
            else:
                await super()._route(scope, receive, send)

    app = BigRedirect()
    async with serve_hypercorn(app) as url, open_client(follow_redirects=True) as client:
        with trio.fail_after(5):
            response = await client.get(url + "/big")
        assert _seen(response).path == "/inspect"
        first = response.history[0]
        assert first.is_closed
        with pytest.raises(RuntimeError):
            first.content  # noqa: B018
        assert app.connections == 2  # the first connection was not reused
        assert_pool_balanced(client.pool, idle=1)


@pytest.mark.parametrize(
    ("start", "location", "authorization_kept"),
    [
        ("http://example.com/a", "https://example.com/b", True),  # the upgrade httpx allows
        ("http://example.com/a", "https://example.com:8443/b", False),
        ("http://example.com:8080/a", "https://example.com/b", False),
        ("https://example.com/a", "http://example.com/b", False),  # a downgrade
        ("http://example.com/a", "http://example.org/b", False),
        ("http://example.com/a", "/b", True),
    ],
)
def test_authorization_across_origins(start: str, location: str, authorization_kept: bool) -> None:
    request = Request("GET", start, headers={"Authorization": "Bearer x", "Cookie": "c=1"})
    redirect = Response(302, request=request, headers={"Location": location})
    following = _redirect_request(request, redirect)
    assert ("authorization" in following.headers) is authorization_kept
    assert "cookie" not in following.headers
