"""The request path: parse, admit, queue, make ready, forward, account.

``Gateway`` bundles what the request path needs (settings, hooks, fleet, metrics,
tracing). ``handle`` is the whole pipeline, one short function per phase.
"""
from __future__ import annotations

import asyncio
import json
import time

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.admission import QueueFull, QueueTimeout, ShuttingDown
from gateway.config import Settings
from gateway.errors import error_response
from gateway.fleet import Fleet
from gateway.forward import Exchange, Forwarder
from gateway.intake import RequestReader
from gateway.lifecycle import ModelRuntime, StartFailed
from gateway.metrics import REJECTION_REASONS, GatewayMetrics
from gateway.paths import PathPolicy
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
        self.forwarder = Forwarder(settings, hooks, fleet, metrics, tracing)
        self.reader = RequestReader(settings.limits, PathPolicy(settings.upstream.extra_paths))
        self.active: set[Exchange] = set()  # admitted exchanges, for the shutdown deadline
        self.draining = False
        self._admission_hooks = hooks.has_impls("admit_request")

    async def handle(self, request: Request) -> HTTPResponse | None:
        started = time.perf_counter()
        endpoint, model_label, status = "other", "", 500
        intake = ex = None
        try:
            if self.draining:
                status = 503
                self.metrics.rejections.labels("", "shutting_down").inc()
                return self.shutting_down()
            intake = await self.reader.read(request)
            if isinstance(intake, HTTPResponse):
                status = intake.status
                self.metrics.rejections.labels("", "too_large" if status == 413
                                               else "bad_request").inc()
                return intake
            endpoint = ENDPOINTS.get(intake.path, "other")
            rt = self.fleet.get(intake.model)
            if rt is None:
                status = 404
                self.metrics.rejections.labels("", "unknown_model").inc()
                return error_response(404, f"The model `{intake.model}` does not exist. "
                                      f"Available: {', '.join(self.fleet.runtimes)}",
                                      "model_not_found")
            model_label = intake.model
            ex = Exchange(request, rt, intake.path, intake.payload, intake.body, intake.stream,
                          started)
            with self.tracing.request_span("gateway.request", request.headers, {
                    "gen_ai.operation.name": _operation(endpoint),
                    "gen_ai.request.model": intake.model, "http.request.method": request.method,
                    "url.path": intake.path, "gen_ai.system": "vllm"}):
                response, status = await self._serve(ex)
                self.tracing.set_attributes({"http.response.status_code": status})
                return response
        except asyncio.CancelledError:  # the client went away (Sanic cancels the handler)
            # A stream that delivered [DONE] is complete, whenever the client then closes.
            status = ex.status if ex is not None and ex.completed else CLIENT_CLOSED
            raise
        finally:
            self.reader.release(intake)
            self.metrics.child(self.metrics.requests, model_label, endpoint, str(status)).inc()
            self.metrics.child(self.metrics.request_duration, model_label, endpoint).observe(
                time.perf_counter() - started)

    async def _serve(self, ex: Exchange) -> tuple[HTTPResponse | None, int]:
        rt, payload = ex.runtime, ex.payload
        if self._admission_hooks:
            rejected = await self._admit(ex.info(), rt)
            if rejected is not None:
                return rejected, rejected.status
        if rt.served_model_name and payload.get("model") != rt.served_model_name:
            ex.body = json.dumps({**payload, "model": rt.served_model_name}).encode()
        ex.task = asyncio.current_task()
        self.active.add(ex)
        try:
            async with rt.admission.slot() as waited:
                self.metrics.child(self.metrics.queue_wait, rt.name).observe(waited)
                self.tracing.event("gateway.queue_wait", {"wait_s": waited})
                ex.extra_headers = self.queue_headers(rt)
                response = await self._forward(ex)
                return response, ex.status
        except QueueFull:
            return self._reject(rt, 429, "queue_full", f"model {rt.name!r} queue is full "
                                f"({rt.admission.max_queue} waiting); retry later"), 429
        except QueueTimeout:
            return self._reject(rt, 429, "queue_timeout", f"model {rt.name!r}: no free slot "
                                f"within {rt.admission.queue_timeout_s:g}s"), 429
        except ShuttingDown:
            self.metrics.rejections.labels(rt.name, "shutting_down").inc()
            return self.shutting_down(), 503
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not ex.abort_reason or ex.streaming or task is None:
                raise
            task.uncancel()  # the gateway ended it at the shutdown deadline: say so
            return self.shutting_down(), 503
        finally:
            self.active.discard(ex)
            self._count_tokens(ex)  # also for a stream whose client left after [DONE]

    # --- shutdown ---------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking requests: new and queued ones get 503; in-flight ones go on."""
        self.draining = True
        for rt in self.fleet.runtimes.values():
            rt.admission.close()
        self.fleet.stop_starting()

    def abort_active(self, reason: str) -> None:
        """End every request still in flight: open streams get an SSE error event, the
        rest a 503 (used when the shutdown grace runs out)."""
        for ex in list(self.active):
            ex.abort_reason = reason
            if ex.streaming and ex.upstream is not None:
                ex.upstream.abort()
            elif not ex.streaming and ex.task is not None:
                ex.task.cancel()

    def shutting_down(self) -> HTTPResponse:
        return error_response(503, "the gateway is shutting down; retry on another instance "
                              "or shortly", "shutting_down", {"Retry-After": "5"})

    async def _forward(self, ex: Exchange) -> HTTPResponse | None:
        rt = ex.runtime
        try:
            if rt.state != "ready":
                with self.tracing.span("gateway.cold_start", {"gen_ai.request.model": rt.name}):
                    await self.fleet.ensure_ready(rt)
            return await self.forwarder.send(ex)
        except StartFailed as exc:
            if self.draining:
                ex.status = 503
                return self.shutting_down()
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

    def _count_tokens(self, ex: Exchange) -> None:
        usage = ex.usage
        if not usage:
            return
        name = ex.runtime.name
        for key, kind in (("prompt_tokens", "input"), ("completion_tokens", "output")):
            value = usage.get(key)
            if isinstance(value, int) and value > 0:
                self.metrics.child(self.metrics.tokens, name, kind).inc(value)
        self.tracing.set_attributes({"gen_ai.usage.input_tokens": usage.get("prompt_tokens") or 0,
                                     "gen_ai.usage.output_tokens": usage.get("completion_tokens") or 0})


def _operation(endpoint: str) -> str:
    return {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}.get(
        endpoint, "other")
