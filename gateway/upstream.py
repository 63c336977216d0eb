"""Per-model upstream connection pools.

Each running model gets its own pool, sized to its max_concurrent, so one busy model
cannot take another's connections (the seed shared one pool and sized its keepalive
set smaller than the pool). We keep httpx's API and use the aiohttp transport:
httpx's own httpcore pool collapses under concurrency on small hosts and can leak a
slot when a request is cancelled under contention (httpcore #1093); see README for
the measurements behind this choice.
"""
from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

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
                                              skip_auto_headers=("User-Agent",))
        self._connector = connector
        self.client = httpx.AsyncClient(
            transport=AiohttpTransport(client=self._session),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=connect_timeout_s),
        )

    @property
    def connections_in_use(self) -> int:
        """Connections aiohttp has handed out (falls back to our own count)."""
        acquired = getattr(self._connector, "_acquired", None)
        return len(acquired) if acquired is not None else self.in_use

    async def aclose(self) -> None:
        await self.client.aclose()
        await self._session.close()


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


def forward_headers(headers: dict[str, str] | object) -> dict[str, str]:
    """Request headers to send upstream: everything but hop-by-hop ones."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}  # type: ignore[attr-defined]


def response_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
