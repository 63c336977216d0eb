"""Sending one admitted request upstream: attempts, retries, streaming.

Retries happen only before the first byte reaches the client, within
``upstream.retries`` and as the ``decide_retry`` hook allows. A stream that breaks
later ends with an error event. When the client goes away, Sanic cancels the handler;
the ``finally`` closes the upstream response so vLLM frees the sequence.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.errors import error_response, sse_error_event
from gateway.types import RequestInfo, RetrySettings, UpstreamOutcome
from gateway.upstream import classify_error, end_to_end_headers, read_raw

if TYPE_CHECKING:
    from gateway.lifecycle import ModelRuntime
    from gateway.proxy import Gateway

log = logging.getLogger("vllm_gateway.forward")


@dataclass
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
    _info: RequestInfo | None = None

    def info(self) -> RequestInfo:
        """What hooks see of this request; built once, and only if a hook asks."""
        if self._info is None:
            req = self.request
            self._info = RequestInfo(model=self.runtime.name, path=self.path, method=req.method,
                                     headers=req.headers, body=self.payload,
                                     client_ip=req.remote_addr or req.ip, stream=self.stream)
        return self._info


class Forwarder:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        up = gw.settings.upstream
        self.retry_settings = RetrySettings(up.retries, up.backoff_s, up.backoff_multiplier)

    async def send(self, ex: Exchange) -> HTTPResponse | None:
        rt = ex.runtime
        headers = end_to_end_headers(ex.request.headers)
        attempt = 0
        while True:
            attempt += 1
            await rt.ensure_ready(self.gw.fleet)
            url = self.gw.pick_url(ex)
            try:
                return await self._attempt(ex, url, headers, attempt)
            except _RetryableFailure as failure:
                delay = await self._retry_delay(ex, failure.outcome)
                if delay is None:
                    return failure.response
                self.gw.metrics.retries.labels(rt.name, failure.outcome.kind).inc()
                self.gw.tracing.event("gateway.retry", {"attempt": attempt, "kind": failure.outcome.kind,
                                                        "delay_s": delay})
                await asyncio.sleep(delay)

    async def _retry_delay(self, ex: Exchange, outcome: UpstreamOutcome) -> float | None:
        if outcome.attempt > self.retry_settings.retries:
            return None
        decision = self.gw.hooks.first("decide_retry", outcome=outcome, settings=self.retry_settings)
        if decision is None or not decision.retry:
            return None
        if outcome.kind == "connect" and ex.runtime.server is not None:
            if not await ex.runtime.driver.is_running(ex.runtime.cfg, ex.runtime.server):
                await self.gw.fleet.mark_crashed(ex.runtime)  # next attempt restarts it
        return max(0.0, float(decision.delay_s))

    async def _attempt(self, ex: Exchange, url: str, headers: dict[str, str],
                       attempt: int) -> HTTPResponse | None:
        rt = ex.runtime
        pool = rt.pool
        if pool is None:  # stopped between ensure_ready and here: treat as a connect failure
            raise _RetryableFailure(UpstreamOutcome(rt.name, attempt, "connect", error="model stopped"),
                                    self._unavailable(ex, "model server stopped"))
        metrics = self.gw.metrics
        sent = time.perf_counter()
        pool.in_use += 1
        rt.url_in_flight[url] = rt.url_in_flight.get(url, 0) + 1
        upstream = None
        try:
            with self.gw.tracing.span("gateway.upstream_attempt",
                                      {"gen_ai.request.model": rt.name, "attempt": attempt,
                                       "server.address": url}, client=True):
                self.gw.tracing.inject(headers)  # the model server's parent is this attempt
                try:
                    upstream = await pool.request(ex.request.method, url + ex.path,
                                                  content=ex.body, headers=headers,
                                                  params=ex.request.query_string or None)
                except UnicodeEncodeError:  # httpx sends ASCII header values only
                    ex.status = 400
                    return error_response(400, "request header values must be ASCII to be "
                                          "forwarded", "invalid_header", ex.extra_headers)
                except httpx.TransportError as exc:
                    kind = classify_error(exc)
                    metrics.upstream_errors.labels(rt.name, kind).inc()
                    self.gw.tracing.record_error(exc)
                    raise _RetryableFailure(
                        UpstreamOutcome(rt.name, attempt, kind, error=str(exc) or type(exc).__name__),
                        self._unavailable(ex, f"upstream unreachable after {attempt} attempt(s): "
                                              f"{kind}")) from None
                if upstream.status_code >= 500:
                    metrics.upstream_errors.labels(rt.name, "http_5xx").inc()
                if ex.stream and upstream.status_code < 400:
                    await self._stream(ex, upstream)
                    return None
                return await self._buffered(ex, upstream)
        finally:
            if upstream is not None:
                await upstream.aclose()
            pool.in_use -= 1
            rt.url_in_flight[url] = rt.url_in_flight.get(url, 1) - 1
            self.gw.series(metrics.upstream_duration, rt.name).observe(time.perf_counter() - sent)

    async def _buffered(self, ex: Exchange, upstream: httpx.Response) -> HTTPResponse:
        try:
            body = await read_raw(upstream)
        except httpx.TransportError as exc:
            kind = classify_error(exc)
            self.gw.metrics.upstream_errors.labels(ex.runtime.name, kind).inc()
            ex.status = 502
            return error_response(502, f"upstream response broke off: {kind}", "upstream_error",
                                  ex.extra_headers)
        ex.status = upstream.status_code
        if upstream.status_code == 200 and b'"usage"' in body:
            ex.usage = _usage(body)
        headers = end_to_end_headers(upstream.headers)
        headers.update(ex.extra_headers)
        return HTTPResponse(body, status=upstream.status_code, headers=headers)

    async def _stream(self, ex: Exchange, upstream: httpx.Response) -> None:
        headers = end_to_end_headers(upstream.headers)
        headers.update(ex.extra_headers)
        headers["X-Accel-Buffering"] = "no"
        ex.status = upstream.status_code
        response = await ex.request.respond(status=upstream.status_code, headers=headers)
        first = True
        try:
            async for chunk in upstream.aiter_raw():
                if first:
                    self.gw.series(self.gw.metrics.ttft, ex.runtime.name).observe(
                        time.perf_counter() - ex.started)
                    first = False
                if b'"prompt_tokens"' in chunk:
                    ex.usage = _usage_from_sse(chunk) or ex.usage
                await response.send(chunk)
        except httpx.TransportError as exc:
            kind = classify_error(exc)
            self.gw.metrics.upstream_errors.labels(ex.runtime.name, kind).inc()
            await self._end_broken_stream(ex, response, f"upstream stream broke off: {kind}")
            return
        except Exception as exc:  # never leave a client hanging on a half-sent stream
            log.exception("stream for %s failed", ex.runtime.name)
            await self._end_broken_stream(ex, response, f"gateway error: {type(exc).__name__}")
            return
        await response.eof()

    async def _end_broken_stream(self, ex: Exchange, response: Any, message: str) -> None:
        self.gw.metrics.stream_errors.labels(ex.runtime.name).inc()
        ex.status = 502
        await response.send(sse_error_event(message, "upstream_error"))
        await response.eof()

    def _unavailable(self, ex: Exchange, message: str) -> HTTPResponse:
        ex.status = 503
        headers = dict(ex.extra_headers)
        headers["Retry-After"] = "5"
        return error_response(503, f"model {ex.runtime.name!r}: {message}", "upstream_unavailable",
                              headers)


class _RetryableFailure(Exception):
    def __init__(self, outcome: UpstreamOutcome, response: HTTPResponse) -> None:
        self.outcome = outcome
        self.response = response


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
    except ValueError:
        return {}
    return usage if isinstance(usage, dict) else {}


def _usage_from_sse(chunk: bytes) -> dict[str, Any]:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {") and b'"prompt_tokens"' in line:
            found = _usage(line[6:])
            if found:
                return found
    return {}
