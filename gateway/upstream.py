"""Per-model upstream connection pools.

Each running model gets its own pool, sized to its max_concurrent, so one busy model
cannot take another's connections (the seed shared one pool and sized its keepalive
set smaller than the pool). We keep httpx's API and use the aiohttp transport:
httpx's own httpcore pool collapses under concurrency on small hosts and can leak a
slot when a request is cancelled under contention (httpcore #1093); see README for
the measurements behind this choice.
"""
from __future__ import annotations

import http.cookiejar
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

from gateway.types import ErrorKind

# Hop-by-hop headers (RFC 9110 7.6.1) and ones the proxy recomputes.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})


class UpstreamPool:
    """One model's HTTP client; ``in_use`` is the gateway's own count of open requests."""

    def __init__(self, size: int, connect_timeout_s: float, timeout_s: float) -> None:
        self.size = size
        self.in_use = 0
        connector = aiohttp.TCPConnector(limit=size, limit_per_host=0, keepalive_timeout=30,
                                         enable_cleanup_closed=False, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        self._connector = connector
        # A proxy's client must be transparent: no cookie jar (one client's Set-Cookie
        # would ride along on another's requests), no default headers (httpx would add
        # Accept-Encoding and User-Agent), no proxy settings from the environment.
        self.client = httpx.AsyncClient(
            transport=AiohttpTransport(client=self._session), trust_env=False,
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=connect_timeout_s),
        )
        self.client.headers.clear()  # the setter would merge httpx's defaults back in
        t = self.client.timeout  # as httpx_aiohttp maps httpx.Timeout
        self._timeout = aiohttp.ClientTimeout(sock_connect=t.connect, sock_read=t.read,
                                              connect=t.pool)

    async def request(self, method: str, url: str, *, content: bytes, headers: dict[str, str],
                      params: str | None = None) -> httpx.Response:
        """``client.send(client.build_request(...), stream=True)``, cheaper when it can be.

        Building an ``httpx.Request`` and walking ``send``'s auth/redirect/cookie layers
        cost more CPU than all the rest of the gateway's work (bench/README.md). Our client
        has none of those features switched on, so a plain request (no query string, no
        userinfo, ASCII headers) goes to the same aiohttp session the transport uses,
        with the headers httpx would send (names lowercased, repeats joined) and the same
        timeouts and exception mapping. The caller gets an ``httpx.Response`` either way;
        on the fast path ``response.request`` and ``response.elapsed`` are not set.
        """
        merged = None if params or "@" in url else self._merge_headers(headers)
        if merged is None:
            req = self.client.build_request(method, url, content=content, headers=headers,
                                            params=params)
            return await self.client.send(req, stream=True)
        with map_aiohttp_exceptions():
            response = await self._session.request(
                method, url, headers=merged, data=content or None, allow_redirects=False,
                auto_decompress=False, compress=False, timeout=self._timeout,
            ).__aenter__()
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(status_code=response.status, headers=response.raw_headers,
                              stream=_Body(response), extensions=extensions)

    def _merge_headers(self, headers: dict[str, str]) -> dict[str, str] | None:
        """What ``client.build_request(headers=headers).headers.items()`` would give
        (aiohttp adds Host and Content-Length); None when a name or value is not ASCII."""
        sent: dict[str, str] = {}
        for k, v in headers.items():
            if not (k.isascii() and v.isascii()):
                return None
            lk = k.lower()
            sent[lk] = f"{sent[lk]}, {v}" if lk in sent else v
        return sent

    @property
    def connections_in_use(self) -> int:
        """Connections aiohttp has handed out (falls back to our own count)."""
        acquired = getattr(self._connector, "_acquired", None)
        return len(acquired) if acquired is not None else self.in_use

    async def aclose(self) -> None:
        await self.client.aclose()
        await self._session.close()


class _Body(AiohttpResponseStream):
    """httpx_aiohttp's response stream, keeping the aiohttp response for ``read_raw``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response)
        self.aiohttp_response = response


async def read_raw(response: httpx.Response) -> bytes:
    """``b"".join(response.aiter_raw())``: the undecoded body; the response is closed after.

    A body from ``UpstreamPool.request``'s fast path is read in one await instead of
    through httpx's chain of async generators; errors are the same httpx exceptions.
    """
    stream = response.stream
    if not isinstance(stream, _Body) or response.is_stream_consumed or response.is_closed:
        return b"".join([chunk async for chunk in response.aiter_raw()])
    response.is_stream_consumed = True
    with map_aiohttp_exceptions():
        body = await stream.aiohttp_response.read()
    await response.aclose()
    return body


def classify_error(exc: BaseException) -> ErrorKind:
    """Map an httpx transport error to the bounded ``kind`` label and retry input."""
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_timeout"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    return "read"


def end_to_end_headers(headers: Any) -> dict[str, str]:
    """Headers to pass on, either way through the proxy: all but hop-by-hop ones."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
