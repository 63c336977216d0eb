"""Sending one admitted request upstream: attempts, retries, streaming.

Retries happen only before the first byte reaches the client, within
``upstream.retries`` and as the ``decide_retry`` hook allows; the hook gets the
gateway's own classification of the failure (``sent`` says whether the request may
have reached the server) and, for an HTTP answer, its status. Every upstream failure
ends as a 502/503/504 with an OpenAI error body (or an SSE error event once a stream
has begun), counted by kind, logged in one line. When the client goes away, Sanic
cancels the handler; the ``finally`` releases the upstream response so vLLM frees the
sequence.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sanic.compat import Header
from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.errors import error_response, sse_error_event
from gateway.keys import Tenant
from gateway.rename import ModelRenamer
from gateway.types import ReadOnlyJSON, RequestInfo, RetrySettings, UpstreamOutcome
from gateway.upstream import (
    CREDENTIAL_HEADERS,
    NOTHING_NAMED,
    UpstreamFailure,
    UpstreamResponse,
    forward_request_headers,
    passed_headers,
)

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.fleet import Fleet
    from gateway.lifecycle import ModelRuntime
    from gateway.metrics import GatewayMetrics
    from gateway.plugins import HookRunner
    from gateway.tracing import Tracing

log = logging.getLogger("vllm_gateway.forward")
USAGE_TAIL = 65_536  # bytes of a streamed-through answer kept to find its usage


class RawResponse(HTTPResponse):
    """A model server's answer as the client gets it: the upstream's headers go out as
    aiohttp received them (bytes, filtered by ``passed_headers``), then the gateway's
    own (``headers``), which win. It adds no Content-Type of its own: an upstream answer
    without one must not reach the client as ``content-type: None``.

    Neither is re-sanitized: the upstream's come from aiohttp's parser (which refuses CR,
    LF and NUL in a header), and the gateway's own are its numbers, model names, a
    checked request id and CORS values from config, so the per-header regex Sanic runs
    would find nothing and cost ~5% of a small request."""

    def __init__(self, body: bytes | None, upstream: UpstreamResponse,
                 headers: dict[str, str]) -> None:
        super().__init__(body, status=upstream.status, headers=headers,
                         content_type=upstream.content_type)
        self.upstream_headers = upstream.raw_headers
        self.dropped = upstream.connection_named()

    @property
    def processed_headers(self):  # type: ignore[override]
        """The head's headers, read once, as Sanic formats the head; then they are let go:
        a stream goes on for minutes, and a multidict, once iterated, keeps a copy of
        every name (with the rest, about 1.5 KB per open stream)."""
        own = self.headers
        if self.content_type is not None:
            own.setdefault("content-type", self.content_type)
        # One list, built at once: a generator here was resumed once per header.
        out = passed_headers(self.upstream_headers, self.dropped, own)
        out += [(k.encode("ascii", "replace"),
                 (v if type(v) is str else str(v)).encode(errors="surrogateescape"))
                for k, v in own.items()]
        if not self.body:  # a stream (a whole answer is done with them anyway)
            self.headers = Header()
            self.upstream_headers = ()
            self.dropped = NOTHING_NAMED
        return out


@dataclass(eq=False, slots=True)
class Exchange:
    """One client request on its way through the gateway."""

    request: Request
    runtime: ModelRuntime
    path: str
    payload: dict[str, Any]
    body: bytes
    stream: bool
    started: float
    extra_headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[Any] | None = None
    upstream: UpstreamResponse | None = None
    streaming: bool = False  # the response head has gone to the client
    completed: bool = False  # a stream delivered its [DONE]
    abort_reason: str = ""  # set when the gateway ends this exchange (shutdown deadline)
    abort_message: str = ""  # what the client is told then ("" = the shutdown's message)
    holds_slot: bool = False  # admitted past the queue (a forced unload ends only these)
    request_id: str = ""  # X-Request-ID: the client's, or generated (gateway/logging_setup.py)
    shown_model: str = ""  # the model name the client sees in the answer
    renamer: ModelRenamer | None = None  # set when the upstream's name for it differs
    error_code: str = ""  # the gateway's own refusal, when one decides a fallback
    queue_wait_s: float = 0.0
    reached_upstream: bool = False  # a model server got (or may have got) the request
    rewritten: bool = False  # ``body`` is the payload re-encoded for the model serving it
    strip_usage: bool = False  # the gateway asked for the stream's usage; the client did not
    tenant: Tenant | None = None  # whose request (gateway/keys.py); None only in tests
    answer_headers: dict[str, str] = field(default_factory=dict)  # rate limits, CORS
    _info: RequestInfo | None = None

    def reroute(self, runtime: ModelRuntime) -> None:
        """Serve this request on another model (a fallback): forget what the last try set."""
        self.runtime = runtime
        self.shown_model = runtime.name
        self.status = 0
        self.error_code = ""
        self.usage = {}
        self.extra_headers = {}
        self.renamer = None
        self.holds_slot = False
        self._info = None

    def head_sent(self) -> None:
        """The answer has begun (``respond()`` is called; Sanic sends the head with its
        first piece), so no retry, fallback or error answer can follow: let go, for the
        stream's life, of what only they need: the request's bytes and parse (a chat
        history can be tens of KB per stream) and the gateway's own answer headers (the
        response has its copy)."""
        self.streaming = True
        self.body = b""
        self.payload = {}
        self.extra_headers = {}

    def info(self) -> RequestInfo:
        """What hooks see of this request: read-only copies, built once, only if asked."""
        if self._info is None:
            req = self.request
            headers: dict[str, str] = {}
            for k, v in req.headers.items():
                lk = k.lower()
                if lk in CREDENTIAL_HEADERS:  # a plugin never sees a client's key
                    continue
                headers[lk] = f"{headers[lk]}, {v}" if lk in headers else v
            from types import MappingProxyType
            self._info = RequestInfo(model=self.runtime.name, path=self.path, method=req.method,
                                     headers=MappingProxyType(headers),
                                     body=ReadOnlyJSON(self.payload),
                                     client_ip=req.remote_addr or req.ip, stream=self.stream,
                                     key=self.tenant.name if self.tenant else "",
                                     priority=self.tenant.band_name if self.tenant else "")
        return self._info


class _Retry(Exception):
    def __init__(self, outcome: UpstreamOutcome, failure: UpstreamFailure | None) -> None:
        self.outcome = outcome
        self.failure = failure


class Forwarder:
    """Picks the upstream URL, sends, retries and relays; knows nothing of admission."""

    def __init__(self, settings: Settings, hooks: HookRunner, fleet: Fleet,
                 metrics: GatewayMetrics, tracing: Tracing) -> None:
        self.settings = settings
        self.hooks = hooks
        self.fleet = fleet
        self.metrics = metrics
        self.tracing = tracing
        up = settings.upstream
        self.retry_settings = RetrySettings(up.retries, up.backoff_s, up.backoff_multiplier)
        self.buffer_cap = settings.limits.max_buffered_response_bytes

    def pick_url(self, ex: Exchange) -> str:
        rt = ex.runtime
        if len(rt.urls) == 1:
            return rt.urls[0]
        choice = self.hooks.first("select_backend", request=ex.info(), model=rt.view(),
                                  candidates=rt.urls, in_flight=dict(rt.url_in_flight))
        return choice if choice in rt.urls else rt.urls[0]

    async def send(self, ex: Exchange) -> HTTPResponse | None:
        rt = ex.runtime
        headers = forward_request_headers(ex.request.headers)
        headers["x-request-id"] = ex.request_id
        attempt = 0
        restarted = False
        while True:
            attempt += 1
            if rt.state != "ready" or rt.transition is not None:  # ensure_ready's own test
                await self.fleet.ensure_ready(rt)
            url = self.pick_url(ex)
            try:
                return await self._attempt(ex, url, headers, attempt)
            except _Retry as retry:
                if not retry.outcome.sent and not restarted and await self._server_gone(rt):
                    # The server died (a crash, an OOM kill): restart it within this
                    # request, whatever the retry budget; the request was never sent.
                    restarted = True
                    await self.fleet.mark_crashed(rt)
                    continue
                delay = await self._decide(ex, retry.outcome)
                if delay is None:
                    assert retry.failure is not None  # HTTP answers pass through instead
                    return self._failure_response(ex, retry.failure, attempt)
                self.metrics.retries.labels(rt.name, retry.outcome.kind).inc()
                self.tracing.event("gateway.retry", {"attempt": attempt,
                                                        "kind": retry.outcome.kind,
                                                        "delay_s": delay})
                await asyncio.sleep(delay)

    async def _decide(self, ex: Exchange, outcome: UpstreamOutcome) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if outcome.attempt > self.retry_settings.retries:
            return None
        decision = self.hooks.first("decide_retry", outcome=outcome, settings=self.retry_settings)
        if decision is None or not decision.retry:
            return None
        return max(0.0, float(decision.delay_s))

    async def _server_gone(self, rt: ModelRuntime) -> bool:
        """Whether the model's (managed) server has exited."""
        server = rt.server
        if server is None or not rt.manages_lifecycle:
            return False
        return not await rt.driver.is_running(rt.cfg, server)

    async def _attempt(self, ex: Exchange, url: str, headers: dict[str, str],
                       attempt: int) -> HTTPResponse | None:
        rt = ex.runtime
        pool = rt.pool
        if pool is None:  # stopped between ensure_ready and here: nothing was sent
            failure = UpstreamFailure("connect", "model server stopped")
            raise _Retry(UpstreamOutcome(rt.name, attempt, "connect", error=failure.detail,
                                         sent=False), failure)
        metrics = self.metrics
        sent = time.perf_counter()
        pool.in_use += 1
        rt.url_in_flight[url] = rt.url_in_flight.get(url, 0) + 1
        upstream = None
        try:
            with self.tracing.span("gateway.upstream_attempt",
                                      {"gen_ai.request.model": rt.name, "attempt": attempt,
                                       "server.address": url}, client=True):
                self.tracing.inject(headers)  # the model server's parent is this attempt
                if rt.auth:  # the server's own key (client credentials are never sent)
                    headers = {**headers, **rt.auth}
                try:
                    upstream = await pool.request(ex.request.method, url, ex.path,
                                                  content=ex.body, headers=headers,
                                                  query=ex.request.query_string)
                except UpstreamFailure as failure:
                    ex.reached_upstream = ex.reached_upstream or failure.sent
                    self._count(ex, failure, attempt)
                    raise _Retry(UpstreamOutcome(rt.name, attempt, failure.kind,
                                                 error=failure.detail, sent=failure.sent),
                                 failure) from None
                ex.upstream = upstream
                ex.reached_upstream = True
                status = upstream.status
                if status >= 500 or status == 429:
                    kind = "http_429" if status == 429 else "http_5xx"
                    if status >= 500:
                        metrics.upstream_errors.labels(rt.name, "http_5xx").inc()
                    outcome = UpstreamOutcome(rt.name, attempt, kind, status=status, sent=True)
                    if await self._decide(ex, outcome) is not None:
                        raise _Retry(outcome, None)
                if ex.stream and status < 400 and ex.request.version != "1.0":
                    await self._stream(ex, upstream)
                    return None
                return await self._buffered(ex, upstream, attempt)
        finally:
            ex.upstream = None
            if upstream is not None:
                upstream.release()
            pool.in_use -= 1
            rt.url_in_flight[url] = rt.url_in_flight.get(url, 1) - 1
            self.metrics.child(metrics.upstream_duration, rt.name).observe(time.perf_counter() - sent)

    def _count(self, ex: Exchange, failure: UpstreamFailure, attempt: int) -> None:
        self.metrics.upstream_errors.labels(ex.runtime.name, failure.kind).inc()
        self.tracing.record_error(failure)
        log.warning("model %s: upstream %s on attempt %d: %s", ex.runtime.name, failure.kind,
                    attempt, failure.detail)

    def _failure_response(self, ex: Exchange, failure: UpstreamFailure,
                          attempt: int) -> HTTPResponse:
        headers = dict(ex.extra_headers)
        name = ex.runtime.name
        if not failure.sent:
            ex.status = 503
            headers["Retry-After"] = "5"
            return error_response(503, f"model {name!r}: upstream unreachable after {attempt} "
                                  f"attempt(s): {failure.kind}", "upstream_unavailable", headers)
        if failure.kind == "read_timeout":
            ex.status = 504
            return error_response(504, f"model {name!r}: no answer within "
                                  f"{self.settings.upstream.timeout_s:g}s (upstream.timeout_s)",
                                  "upstream_timeout", headers)
        ex.status = 502
        return error_response(502, f"model {name!r}: bad upstream response: {failure.kind}",
                              "upstream_error", headers)

    async def _buffered(self, ex: Exchange, upstream: UpstreamResponse,
                        attempt: int) -> HTTPResponse | None:
        """Read a whole answer if it is small enough, else stream it through as it comes."""
        length = upstream.content_length
        try:
            if length is not None and length <= self.buffer_cap:
                body = await upstream.read()
            else:
                buf = bytearray()
                async for chunk in upstream.chunks():
                    buf += chunk
                    if len(buf) > self.buffer_cap:
                        return await self._pass_through(ex, upstream, bytes(buf))
                body = bytes(buf)
        except UpstreamFailure as failure:
            self._count(ex, failure, attempt)
            return self._failure_response(ex, failure, attempt)
        ex.status = upstream.status
        if upstream.status == 200 and b'"usage"' in body:
            ex.usage = _usage(body)
        if ex.renamer is not None:
            body = ex.renamer.whole(body)  # Sanic sets Content-Length from the new body
        return self._client_response(ex, upstream, body)

    def _client_response(self, ex: Exchange, upstream: UpstreamResponse,
                         body: bytes | None) -> RawResponse:
        return RawResponse(body, upstream, ex.extra_headers)

    async def _pass_through(self, ex: Exchange, upstream: UpstreamResponse,
                            head: bytes) -> None:
        """A large non-streamed answer: relay it, keeping only a tail for its usage."""
        response = self._client_response(ex, upstream, None)
        renamer = ex.renamer
        if upstream.content_length is not None and renamer is None:
            response.headers["content-length"] = str(upstream.content_length)
        # Renamed, the length may change: the answer goes out chunked instead.
        ex.status = upstream.status
        out = await ex.request.respond(response)
        ex.head_sent()
        tail = head[-USAGE_TAIL:]
        try:
            await out.send(head if renamer is None else renamer.feed(head))
            async for chunk in upstream.chunks():
                tail = (tail + chunk)[-USAGE_TAIL:]
                await out.send(chunk if renamer is None else renamer.feed(chunk))
            if renamer is not None:
                await out.send(renamer.flush())
        except UpstreamFailure as failure:
            self._count(ex, failure, 1)
            ex.status = 502
            ex.request.transport.abort()  # a cut-off body must not look complete
            return None
        if upstream.status == 200 and b'"usage"' in tail:
            ex.usage = _usage(tail)
        await out.eof()
        return None

    async def _stream(self, ex: Exchange, upstream: UpstreamResponse) -> None:
        response = self._client_response(ex, upstream, None)
        response.headers["X-Accel-Buffering"] = "no"
        ex.status = upstream.status
        out = await ex.request.respond(response)
        ex.head_sent()
        upstream.watch_reads(self.settings.upstream.timeout_s)
        # The relay runs as a task of its own: a task resumes through every coroutine
        # frame it awaits in, and the request path is a dozen deep, so relayed in place
        # each event would wake them all (a fifth of the CPU per event, measured in
        # bench/README.md). Cancelling the request cancels the relay and waits for it.
        await asyncio.ensure_future(self._relay(ex, upstream, out))

    async def _relay(self, ex: Exchange, upstream: UpstreamResponse, out: Any) -> None:
        # The last two chunks before this one: where the usage event is, split or not
        # (two locals, not a deque: one of those is a 600-byte block per open stream).
        older = last = b""
        renamer = ex.renamer  # None when the names agree: the loop then does no extra work
        strip_usage = ex.strip_usage
        read, send = upstream.read_any, out.send
        try:
            chunk = await read()
            if chunk:
                self.metrics.child(self.metrics.ttft, ex.runtime.name).observe(
                    time.perf_counter() - ex.started)
            # One event per pass, as it arrives: nothing here may wait but the read
            # and the send (which waits only while the client is slower than vLLM).
            while chunk:
                if renamer is not None:
                    chunk = renamer.feed(chunk)
                if strip_usage and b'"choices":[]' in chunk:
                    chunk, usage = _strip_usage_events(chunk)
                    ex.usage = usage or ex.usage
                if chunk:
                    await send(chunk)
                    if b"data: [DONE]" in chunk:
                        # Counted now: the client may close (and the handler be cancelled)
                        # the moment it has [DONE].
                        ex.usage = _usage_from_sse(older + last + chunk) or ex.usage
                        ex.completed = True
                    older, last = last, chunk
                chunk = await read()
        except UpstreamFailure as failure:
            if ex.abort_reason:
                await self._end_stream(ex, out, ex.abort_message or "the gateway is shutting down",
                                       ex.abort_reason)
                return
            self._count(ex, failure, 1)
            self.metrics.stream_errors.labels(ex.runtime.name).inc()
            await self._end_stream(ex, out, f"upstream stream broke off: {failure.kind}",
                                   "upstream_error")
            return
        if renamer is not None:
            rest = renamer.flush()
            if rest:
                await out.send(rest)
        if not ex.completed:
            ex.usage = _usage_from_sse(older + last) or ex.usage
        await out.eof()

    async def _end_stream(self, ex: Exchange, out: Any, message: str, code: str) -> None:
        ex.status = 502 if code == "upstream_error" else 503
        await out.send(sse_error_event(message, code, ex.status))
        await out.eof()


_DECODER = json.JSONDecoder()


def _usage(body: bytes) -> dict[str, Any]:
    """The ``usage`` object of a completion body, decoded alone: parsing a whole multi-MB
    embeddings response would stall the event loop for every other request."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return {}
    colon = body.find(b":", at + 7)
    try:
        text = body[colon + 1:].decode("utf-8", "replace").lstrip()
        usage, _ = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return {}
    return usage if isinstance(usage, dict) else {}


def _strip_usage_events(chunk: bytes) -> tuple[bytes, dict[str, Any]]:
    """Take whole usage-only events (``"choices":[]``, asked for by the gateway) out of a
    piece of a stream, returning the rest and their usage. A part of an event cut at
    either edge of the piece is never touched."""
    usage: dict[str, Any] = {}
    parts = chunk.split(b"\n\n")
    kept: list[bytes] = []
    last = len(parts) - 1
    for i, part in enumerate(parts):
        # Whole: not the piece's unterminated tail, and it starts an event itself.
        whole = i < last and (i > 0 or part.startswith(b"data: {"))
        if whole and part.startswith(b"data: {") and b'"choices":[]' in part \
                and b'"usage"' in part:
            usage = _usage(part[6:]) or usage
            continue
        kept.append(part)
    return b"\n\n".join(kept), usage


def _usage_from_sse(data: bytes) -> dict[str, Any]:
    """The last usage object in a piece of an event stream (the final one has the totals)."""
    if b'"prompt_tokens"' not in data:
        return {}
    for line in reversed(data.split(b"\n")):
        if line.startswith(b"data: {") and b'"prompt_tokens"' in line:
            found = _usage(line[6:])
            if found:
                return found
    return {}
