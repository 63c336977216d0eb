"""The request path: parse, admit, queue, make ready, forward, account.

``Gateway`` bundles what the request path needs (settings, hooks, fleet, metrics,
tracing). ``handle`` is the whole pipeline, one short function per phase.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.admission import QueueFull, QueueTimeout
from gateway.config import Settings
from gateway.errors import error_response
from gateway.fleet import Fleet
from gateway.forward import Exchange, Forwarder
from gateway.lifecycle import ModelRuntime, StartFailed
from gateway.metrics import REJECTION_REASONS, GatewayMetrics
from gateway.plugins import HookRunner, PluginError
from gateway.tracing import Tracing
from gateway.types import Rejection, RequestInfo

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
             "/v1/embeddings": "embeddings"}
CLIENT_CLOSED = 499  # nginx's code for "client went away"; only ever a metric label


class Gateway:
    def __init__(self, settings: Settings, hooks: HookRunner, fleet: Fleet,
                 metrics: GatewayMetrics, tracing: Tracing) -> None:
        self.settings = settings
        self.hooks = hooks
        self.fleet = fleet
        self.metrics = metrics
        self.tracing = tracing
        self.forwarder = Forwarder(self)
        self._admission_hooks = hooks.has_impls("admit_request")
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def series(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set: ``labels()`` checks its
        arguments and takes a lock on every call. Label values are bounded (metrics.py)."""
        child = self._series.get((metric, labels))
        if child is None:
            child = self._series[(metric, labels)] = metric.labels(*labels)
        return child

    async def handle(self, request: Request, path: str) -> HTTPResponse | None:
        started = time.perf_counter()
        endpoint = ENDPOINTS.get(path, "other")
        model_label, status = "", 500
        try:
            parsed = _parse(request)
            if isinstance(parsed, HTTPResponse):
                status = parsed.status
                self.metrics.rejections.labels("", "bad_request").inc()
                return parsed
            payload, model = parsed
            rt = self.fleet.get(model)
            if rt is None:
                status = 404
                self.metrics.rejections.labels("", "unknown_model").inc()
                return error_response(404, f"The model `{model}` does not exist. "
                                      f"Available: {', '.join(self.fleet.runtimes)}",
                                      "model_not_found")
            model_label = model
            with self.tracing.request_span("gateway.request", request.headers, {
                    "gen_ai.operation.name": _operation(endpoint), "gen_ai.request.model": model,
                    "http.request.method": request.method, "url.path": path,
                    "gen_ai.system": "vllm"}):
                response, status = await self._serve(request, path, rt, payload)
                self.tracing.set_attributes({"http.response.status_code": status})
                return response
        except asyncio.CancelledError:  # the client went away (Sanic cancels the handler)
            status = CLIENT_CLOSED
            raise
        finally:
            self.series(self.metrics.requests, model_label, endpoint, str(status)).inc()
            self.series(self.metrics.request_duration, model_label, endpoint).observe(
                time.perf_counter() - started)

    async def _serve(self, request: Request, path: str, rt: ModelRuntime,
                     payload: dict[str, Any]) -> tuple[HTTPResponse | None, int]:
        ex = Exchange(request, rt, path, payload, request.body, payload.get("stream") is True,
                      time.perf_counter())
        if self._admission_hooks:
            rejected = await self._admit(ex.info(), rt)
            if rejected is not None:
                return rejected, rejected.status
        if rt.served_model_name and payload.get("model") != rt.served_model_name:
            ex.body = json.dumps({**payload, "model": rt.served_model_name}).encode()
        try:
            async with rt.admission.slot() as waited:
                self.series(self.metrics.queue_wait, rt.name).observe(waited)
                self.tracing.event("gateway.queue_wait", {"wait_s": waited})
                ex.extra_headers = self.queue_headers(rt)
                response = await self._forward(ex)
                self._count_tokens(ex)
                return response, ex.status
        except QueueFull:
            return self._reject(rt, 429, "queue_full", f"model {rt.name!r} queue is full "
                                f"({rt.admission.max_queue} waiting); retry later"), 429
        except QueueTimeout:
            return self._reject(rt, 429, "queue_timeout", f"model {rt.name!r}: no free slot "
                                f"within {rt.admission.queue_timeout_s:g}s"), 429

    async def _forward(self, ex: Exchange) -> HTTPResponse | None:
        rt = ex.runtime
        try:
            if rt.state != "ready":
                with self.tracing.span("gateway.cold_start", {"gen_ai.request.model": rt.name}):
                    await rt.ensure_ready(self.fleet)
            return await self.forwarder.send(ex)
        except StartFailed as exc:
            ex.status = 503
            headers = dict(ex.extra_headers)
            headers["Retry-After"] = "10"
            return error_response(503, str(exc).split("\n")[0], "model_unavailable", headers)
        except PluginError as exc:
            ex.status = 500
            return error_response(500, str(exc), "plugin_error", ex.extra_headers)

    async def _admit(self, info: RequestInfo, rt: ModelRuntime) -> HTTPResponse | None:
        if not self._admission_hooks:
            return None
        try:
            with self.tracing.span("gateway.admission"):
                answers = await self.hooks.each("admit_request", request=info, model=rt.view())
        except PluginError as exc:
            return error_response(500, str(exc), "plugin_error")
        rejection = next((a for a in answers if isinstance(a, Rejection)), None)
        if rejection is None:
            return None
        headers = self.queue_headers(rt)
        if rejection.retry_after_s is not None:
            headers["Retry-After"] = str(rejection.retry_after_s)
        reason = rejection.reason if rejection.reason in REJECTION_REASONS else "admission"
        self.metrics.rejections.labels(rt.name, reason).inc()
        return error_response(rejection.status, rejection.message, rejection.code, headers)

    def _reject(self, rt: ModelRuntime, status: int, reason: str, message: str) -> HTTPResponse:
        self.metrics.rejections.labels(rt.name, reason).inc()
        headers = self.queue_headers(rt)
        headers["Retry-After"] = str(self._retry_after(rt))
        return error_response(status, message, reason, headers)

    @staticmethod
    def _retry_after(rt: ModelRuntime) -> int:
        return 1 if rt.state == "ready" else 10

    @staticmethod
    def queue_headers(rt: ModelRuntime) -> dict[str, str]:
        a = rt.admission
        return {"X-Queue-Depth": str(a.waiting), "X-Max-Concurrent": str(a.max_concurrent),
                "X-Max-Queue-Size": str(a.max_queue)}

    def pick_url(self, ex: Exchange) -> str:
        rt = ex.runtime
        if len(rt.urls) == 1:
            return rt.urls[0]
        choice = self.hooks.first("select_backend", request=ex.info(), model=rt.view(),
                                  candidates=rt.urls, in_flight=dict(rt.url_in_flight))
        return choice if choice in rt.urls else rt.urls[0]

    def _count_tokens(self, ex: Exchange) -> None:
        usage = ex.usage
        if not usage:
            return
        name = ex.runtime.name
        for key, kind in (("prompt_tokens", "input"), ("completion_tokens", "output")):
            value = usage.get(key)
            if isinstance(value, int) and value > 0:
                self.series(self.metrics.tokens, name, kind).inc(value)
        self.tracing.set_attributes({"gen_ai.usage.input_tokens": usage.get("prompt_tokens") or 0,
                                     "gen_ai.usage.output_tokens": usage.get("completion_tokens") or 0})


def _operation(endpoint: str) -> str:
    return {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}.get(
        endpoint, "other")


def _parse(request: Request) -> tuple[dict[str, Any], str] | HTTPResponse:
    try:
        payload = json.loads(request.body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, f"request body is not valid JSON: {exc}", "invalid_json")
    if not isinstance(payload, dict):
        return error_response(400, "request body must be a JSON object", "invalid_request")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return error_response(400, "`model` is required and must be a string", "missing_model")
    return payload, model
