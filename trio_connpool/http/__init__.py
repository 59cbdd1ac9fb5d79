"""The HTTP layer of trio_connpool: URL and message models, HTTP/1.1 and HTTP/2 connections,
connects, and the client.

The names here are what the client and the pool build on; the modules themselves are private.
"""

from __future__ import annotations

from .._exceptions import (
    ProxyError as ProxyError,
    StreamConsumed as StreamConsumed,
    TooManyRedirects as TooManyRedirects,
)
from ._client import (
    CLIENT_POOL_OPTIONS as CLIENT_POOL_OPTIONS,
    USE_CLIENT_DEFAULT as USE_CLIENT_DEFAULT,
    Client as Client,
    HTTPConnection as HTTPConnection,
    HTTPConnector as HTTPConnector,
    HTTPKey as HTTPKey,
    NoPoolSender as NoPoolSender,
    PoolSender as PoolSender,
    RequestSender as RequestSender,
    TimeoutTypes as TimeoutTypes,
    UseClientDefault as UseClientDefault,
    open_client as open_client,
)
from ._connect import (
    CertTypes as CertTypes,
    VerifyTypes as VerifyTypes,
    create_ssl_context as create_ssl_context,
    open_stream as open_stream,
)
from ._http2 import HTTP2Connection as HTTP2Connection
from ._http11 import HTTP11Connection as HTTP11Connection
from ._models import (
    URL as URL,
    Headers as Headers,
    HeaderTypes as HeaderTypes,
    Origin as Origin,
    PrimitiveData as PrimitiveData,
    QueryParamTypes as QueryParamTypes,
    Request as Request,
    RequestContent as RequestContent,
    RequestData as RequestData,
    Response as Response,
    ResponseStream as ResponseStream,
    Timeouts as Timeouts,
)
from ._proxy import Proxy as Proxy

__all__ = [
    "CLIENT_POOL_OPTIONS",
    "Client",
    "HTTPConnection",
    "HTTPConnector",
    "HTTPKey",
    "NoPoolSender",
    "PoolSender",
    "Proxy",
    "ProxyError",
    "RequestSender",
    "StreamConsumed",
    "TimeoutTypes",
    "TooManyRedirects",
    "USE_CLIENT_DEFAULT",
    "UseClientDefault",
    "open_client",
    "HTTP11Connection",
    "HTTP2Connection",
    "HeaderTypes",
    "Headers",
    "Origin",
    "PrimitiveData",
    "QueryParamTypes",
    "Request",
    "RequestContent",
    "RequestData",
    "Response",
    "ResponseStream",
    "Timeouts",
    "URL",
    "create_ssl_context",
    "open_stream",
    "CertTypes",
    "VerifyTypes",
]
