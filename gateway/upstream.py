"""Per-model upstream connection pools, and what can go wrong talking to a model server.

Each running model gets its own aiohttp pool, sized to its max_concurrent, so one busy
model cannot take another's connections. The gateway classifies every failure itself,
from aiohttp's own exceptions: whether a retry is safe depends on whether the request
provably never reached the server (refused, DNS, connect or pool timeout), and
httpx-style mappings blur exactly that line (a connection closed after the request was
written is not a connect error). Every failure, including garbage instead of HTTP and
oversized headers, becomes one ``UpstreamFailure`` with a bounded ``kind``.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
from yarl import URL

from gateway.types import ErrorKind

# Hop-by-hop headers (RFC 9110 7.6.1), ones the proxy recomputes, and Expect (the
# gateway has the whole body already; a server without 100-continue would wait for it).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
    "proxy-connection",
})
NOTHING_NAMED: frozenset[str] = frozenset()  # what a Connection header usually adds to those
# Kinds where the request provably did not reach the server: safe to send again.
NOT_SENT: frozenset[str] = frozenset({"connect", "dns", "connect_timeout", "pool_timeout"})
# vLLM closes idle keep-alive connections after 5 s; reusing one it is closing would turn
# a healthy request into an ambiguous "disconnected". Stay well below it.
KEEPALIVE_S = 3.0


class UpstreamFailure(Exception):
    """One failed exchange with a model server: ``kind`` is bounded, ``detail`` is for logs."""

    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def sent(self) -> bool:
        """False only when the request provably never reached the server."""
        return self.kind not in NOT_SENT


def classify(exc: BaseException, pool_was_full: bool = False) -> UpstreamFailure:
    """Map an aiohttp (or timeout) exception to an ``UpstreamFailure``."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, getattr(aiohttp, "ClientConnectorDNSError", ())):
        return UpstreamFailure("dns", detail)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure("connect", detail)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure("pool_timeout" if pool_was_full else "connect_timeout", detail)
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return UpstreamFailure("read_timeout", detail)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure("truncated", detail)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        ConnectionError)):
        return UpstreamFailure("disconnected", detail)
    return UpstreamFailure("protocol", detail)  # garbage, oversize headers, bad framing


class UpstreamResponse:
    """A model server's answer, headers read, body not yet: read it whole or in chunks."""

    __slots__ = ("_resp", "status", "_loop", "_timeout_s", "_last", "_watch", "_timed_out")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self._watch: asyncio.TimerHandle | None = None
        self._timed_out = False

    def watch_reads(self, timeout_s: float) -> None:
        """For a stream: keep the read timeout (no byte for ``timeout_s``) with one lazy
        timer instead of aiohttp's, which is cancelled and re-made on every chunk (a
        tenth of the relay's time per event). Each read only notes the time; the timer,
        when it fires, re-arms itself for the last read's deadline or ends the stream."""
        connection = self._resp.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None or timeout_s <= 0:
            return
        protocol.read_timeout = None  # its pending timer goes at the next chunk
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._last = self._loop.time()
        self._watch = self._loop.call_at(self._last + timeout_s, self._check_reads)

    def _check_reads(self) -> None:
        due = self._last + self._timeout_s
        if self._loop.time() < due:
            self._watch = self._loop.call_at(due, self._check_reads)
            return
        self._watch = None
        self._timed_out = True
        self._resp.close()  # the pending read fails; read_any says why

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Every header as received, in bytes, repeats kept (two Set-Cookie stay two)."""
        return self._resp.raw_headers

    @property
    def content_type(self) -> str | None:
        return self._resp.headers.get("Content-Type")

    @property
    def content_length(self) -> int | None:
        return self._resp.content_length

    def connection_named(self) -> frozenset[str]:
        """Headers the answer's own Connection header makes hop-by-hop (RFC 9110 7.6.1)."""
        return _connection_named(self._resp.headers.getall("Connection", ()))

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise classify(exc) from None

    async def read_any(self) -> bytes:
        """The body bytes that have arrived (b"" at the end); failures surface as
        ``UpstreamFailure``. The stream relay's loop calls it once per chunk: a plain
        coroutine costs less there than stepping an async generator."""
        try:
            chunk = await self._resp.content.readany()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self._timed_out:
                raise UpstreamFailure("read_timeout", f"no data for {self._timeout_s:g}s "
                                      "while streaming") from None
            raise classify(exc) from None
        if self._watch is not None:
            if chunk:
                self._last = self._loop.time()
            else:
                self._unwatch()
        elif self._timed_out:  # closed by the watch and read as a clean end: it was not
            raise UpstreamFailure("read_timeout", f"no data for {self._timeout_s:g}s "
                                  "while streaming")
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; failures surface as ``UpstreamFailure``."""
        content = self._resp.content
        while True:
            try:
                chunk = await content.readany()
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise classify(exc) from None
            if not chunk:
                return
            yield chunk

    def abort(self) -> None:
        """Close the connection at once (unblocks a pending read)."""
        self._unwatch()
        self._resp.close()

    def release(self) -> None:
        """Done with it: a fully read connection returns to the pool, others are closed."""
        self._unwatch()
        resp = self._resp
        if resp.content.is_eof():
            resp.release()
        else:
            resp.close()


class UpstreamPool:
    """One model's HTTP client; ``in_use`` is the gateway's own count of open requests.

    Transparent by construction: no cookie jar (one client's Set-Cookie must not ride on
    another's request), no invented headers, no proxy settings from the environment.
    """

    def __init__(self, size: int, connect_timeout_s: float, timeout_s: float) -> None:
        self.size = size
        self.in_use = 0
        self._connector = aiohttp.TCPConnector(limit=size, limit_per_host=0,
                                               keepalive_timeout=KEEPALIVE_S,
                                               enable_cleanup_closed=False, ttl_dns_cache=None)
        # connect covers waiting for a pooled connection as well as the TCP connect.
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s,
                                        sock_connect=connect_timeout_s, sock_read=timeout_s)
        self._session = aiohttp.ClientSession(
            connector=self._connector, auto_decompress=False, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout,
            max_line_size=16384, max_field_size=16384,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        self._urls: dict[str, URL] = {}  # base + allow-listed path: a handful per model

    async def request(self, method: str, base: str, path: str, *, content: bytes,
                      headers: dict[str, str], query: str = "") -> UpstreamResponse:
        """Send one request to ``base + path`` exactly as given (no re-normalisation)."""
        text = base + path
        if query:
            url = URL(f"{text}?{query}", encoded=True)
        else:
            url = self._urls.get(text) or self._url(text)
        pool_was_full = self.connections_in_use >= self.size
        try:
            resp = await self._session.request(
                method, url, headers=headers, data=content or None, allow_redirects=False)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise classify(exc, pool_was_full) from None
        return UpstreamResponse(resp)

    def _url(self, text: str) -> URL:
        if len(self._urls) >= 64:  # bounded whatever the callers pass
            self._urls.clear()
        url = self._urls[text] = URL(text, encoded=True)
        return url

    @property
    def connections_in_use(self) -> int:
        """Connections aiohttp has handed out (falls back to our own count)."""
        acquired = getattr(self._connector, "_acquired", None)
        return len(acquired) if acquired is not None else self.in_use

    async def aclose(self) -> None:
        await self._session.close()


# A client's credentials for the gateway; never forwarded to a model server.
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})
NOT_FORWARDED = HOP_BY_HOP | CREDENTIAL_HEADERS


def forward_request_headers(headers: Any) -> dict[str, str]:
    """Client headers to send upstream: end-to-end ones only (RFC 9110 7.6.1), including
    dropping every header the client's Connection header names, and never the client's
    credentials (the model's own key is sent instead). Repeats are joined."""
    connection = headers.getall("connection", ()) if hasattr(headers, "getall") \
        else [headers.get("connection", "")]
    named = _connection_named(connection)
    out: dict[str, str] = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk in NOT_FORWARDED or lk in named:
            continue
        out[lk] = f"{out[lk]}, {v}" if lk in out else v
    return out


# Never passed from an answer: hop-by-hop, or set by the gateway (Sanic adds the length).
NOT_PASSED = HOP_BY_HOP | {"content-type"}


def passed_headers(raw: Iterable[tuple[bytes, bytes]], dropped: frozenset[str],
                   own: Any) -> list[tuple[bytes, bytes]]:
    """An answer's headers for the client, as received: hop-by-hop ones (and those its
    Connection header names, ``dropped``) are left out, and so is any the gateway sets
    itself (``own``, a case-insensitive mapping): the gateway's win."""
    out = []
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in NOT_PASSED and key not in dropped and key not in own:
            out.append((name, value))
    return out


def _connection_named(values: Iterable[str]) -> frozenset[str]:
    """The headers Connection values name, beyond the hop-by-hop ones (which go anyway):
    usually none ("keep-alive"), and then one shared empty set, not one per request."""
    if not values:
        return NOTHING_NAMED
    named = frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
    return named if named - HOP_BY_HOP else NOTHING_NAMED


def bad_header_value(headers: Any) -> str | None:
    """The name of the first header whose value cannot be forwarded (control characters,
    non-ASCII), or None. Checked before admission, so a bad header costs no slot."""
    joined = "".join(headers.values())
    if joined.isascii() and joined.isprintable():  # the usual case: all of them at once
        return None
    for k, v in headers.items():
        if v.isascii() and v.isprintable():
            continue
        if not v.isascii() or any(c != "\t" and not c.isprintable() for c in v):
            return k
    return None
