"""The request path: parse, admit, queue, make ready, forward, account.

``Gateway`` bundles what the request path needs (settings, hooks, fleet, metrics,
tracing). ``handle`` is the whole pipeline, one short function per phase.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from sanic.request import Request
from sanic.response import HTTPResponse

from gateway.admission import KeyBusy, QueueFull, QueueTimeout, ShuttingDown
from gateway.config import Settings
from gateway.cors import CorsPolicy
from gateway.errors import error_response
from gateway.fleet import Fleet
from gateway.forward import Exchange, Forwarder, RawResponse
from gateway.intake import Intake, RequestReader
from gateway.lifecycle import ModelRuntime, StartFailed
from gateway.logging_setup import REQUEST_ID, AccessLog, request_id
from gateway.metrics import REJECTION_REASONS, GatewayMetrics
from gateway.paths import PathPolicy
from gateway.plugins import HookRunner, PluginError
from gateway.ratelimit import Refusal
from gateway.rename import ModelRenamer
from gateway.tenancy import Tenancy
from gateway.tracing import Tracing
from gateway.types import Rejection, RequestInfo

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
             "/v1/embeddings": "embeddings"}
CLIENT_CLOSED = 499  # nginx's code for "client went away"; only ever a metric label
# The gateway's own refusals a model's ``fallback_on`` can name.
FALLBACK_ON = {"model_unavailable": "unavailable", "queue_full": "queue_full"}
log = logging.getLogger("vllm_gateway.proxy")


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
        self.tenancy = Tenancy(settings.auth, hooks.first("limit_store", settings=settings))
        self.cors = CorsPolicy(settings.cors)
        metrics.init_keys(self.tenancy.names)
        metrics.attach_keys(self.tenancy.status)
        self.active: set[Exchange] = set()  # admitted exchanges, for the shutdown deadline
        self.draining = False
        self._admission_hooks = hooks.has_impls("admit_request")
        self.access_log = AccessLog() if settings.logging.access_log else None
        for rt in fleet.runtimes.values():
            for fallback in rt.cfg.fallbacks:
                metrics.fallbacks.labels(rt.name, fallback)  # born at 0

    async def handle(self, request: Request) -> HTTPResponse | None:
        """One proxied request; its id is in every log line about it and on its answer."""
        rid = request_id(request.headers.get("x-request-id"))
        token = REQUEST_ID.set(rid)  # reset after: a keep-alive connection shares one task
        answer_headers = self.cors.headers(request)  # grows by the rate-limit headers
        try:
            response = await self._handle(request, rid, answer_headers)
        finally:
            REQUEST_ID.reset(token)
        if response is not None:
            response.headers["X-Request-ID"] = rid
            if answer_headers and not isinstance(response, RawResponse):
                response.headers.update(answer_headers)  # forwarded answers have them
        return response

    async def _handle(self, request: Request, rid: str,
                      answer_headers: dict[str, str]) -> HTTPResponse | None:
        started = time.perf_counter()
        endpoint, model_label, status = "other", "", 500
        intake = ex = grant = None
        key_label = ""
        try:
            if self.draining:
                status = 503
                self.metrics.rejections.labels("", "shutting_down").inc()
                return self.shutting_down()
            identity = self.tenancy.identify(request.headers)
            tenant = identity.tenant
            if tenant is None:  # before the body is read: a stranger costs nothing more
                status = 401
                self.metrics.rejections.labels("", "auth").inc()
                self.metrics.key_rejections.labels("", "invalid_api_key").inc()
                return self.tenancy.unauthorized(identity)
            key_label = tenant.name
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
                visible = [n for n in self.fleet.runtimes if tenant.may_use(n)]
                return error_response(404, f"The model `{intake.model}` does not exist. "
                                      f"Available: {', '.join(visible)}", "model_not_found")
            if not tenant.may_use(rt.name):
                status = 403
                self._count_key_rejection(rt.name, key_label, "model_not_allowed")
                return self.tenancy.not_allowed(tenant, intake.model)
            grant = await self.tenancy.acquire(tenant, intake.payload, len(intake.body))
            if isinstance(grant, Refusal):
                status = 429
                self._count_key_rejection(rt.name, key_label, grant.code)
                refused, grant = grant, None
                return self.tenancy.refused(refused, self.queue_headers(rt))
            if grant is not None:
                answer_headers.update(grant.headers)
            ex = Exchange(request, rt, intake.path, intake.payload, intake.body, intake.stream,
                          started, request_id=rid, shown_model=intake.model, tenant=tenant,
                          answer_headers=answer_headers)
            intake.body, intake.payload = b"", {}  # the exchange's now (it may drop them)
            with self.tracing.request_span("gateway.request", request.headers, {
                    "gen_ai.operation.name": _operation(endpoint),
                    "gen_ai.request.model": intake.model, "http.request.method": request.method,
                    "url.path": intake.path, "gen_ai.system": "vllm",
                    "gateway.request_id": rid, "gateway.key": key_label}):
                if rt.cfg.fallbacks:
                    response, status = await self._serve_or_fall_back(ex)
                else:  # the usual case, without the fallback layer's coroutine
                    response, status = await self._serve(ex)
                    response = _stamped(response, rt)
                self.tracing.set_attributes({"http.response.status_code": status})
                return response
        except asyncio.CancelledError:  # the client went away (Sanic cancels the handler)
            # A stream that delivered [DONE] is complete, whenever the client then closes.
            status = ex.status if ex is not None and ex.completed else CLIENT_CLOSED
            raise
        finally:
            self.reader.release(intake)
            if ex is not None:
                model_label = ex.runtime.name  # the model that answered (X-Gateway-Model)
                self.tenancy.settle(grant, ex.usage, sent=ex.reached_upstream,
                                    answered=ex.status < 400)
            elapsed = time.perf_counter() - started
            self.metrics.count_request(model_label, endpoint, str(status), key_label, elapsed)
            if self.access_log is not None:
                _log_access(self.access_log, request, intake, model_label, status, elapsed, ex,
                            key_label)

    async def _serve_or_fall_back(self, ex: Exchange) -> tuple[HTTPResponse | None, int]:
        """Serve the model asked for; if the gateway finds it unavailable (or its queue
        full, when its ``fallback_on`` says so), serve the request on the first of its
        ``fallbacks`` that can, in order. Only the asked-for model's own list is tried,
        each entry once (no chains, no loops); if none can, the client gets the asked-for
        model's refusal. The gateway's refusals are not sent before this decides."""
        first = ex.runtime
        response, status = await self._serve(ex)
        if not first.cfg.fallbacks or not self._falls_back(first, ex):
            return _stamped(response, first), status
        refusal = response, status
        reason = FALLBACK_ON[ex.error_code]
        for name in first.cfg.fallbacks:
            fallback = self.fleet.runtimes.get(name)
            if fallback is None:  # validated at load; a reload may have removed it
                continue
            if ex.tenant is not None and not ex.tenant.may_use(name):
                continue
            log.info("model %s %s: trying fallback %s", first.name, reason, name)
            ex.reroute(fallback)
            response, status = await self._serve(ex)
            if not self._falls_back(first, ex):
                self.metrics.child(self.metrics.fallbacks, first.name, name).inc()
                return _stamped(response, fallback), status
        ex.runtime = first
        return _stamped(refusal[0], first), refusal[1]

    @staticmethod
    def _rewrite_for_runtime(ex: Exchange) -> None:
        """The body as the serving model's server must get it (its model name, the usage
        a token limit needs), and the renamer for its answer. Apart from ``_serve`` so that
        no frame but the exchange's holds the payload while a stream runs (it drops it)."""
        rt, payload = ex.runtime, ex.payload
        upstream_name = rt.served_model_name or rt.name
        changes: dict[str, Any] = {}
        if payload.get("model") != upstream_name:  # an alias, a served name, a fallback
            changes["model"] = upstream_name
        if ex.stream and ex.tenant is not None and ex.tenant.counts_tokens \
                and not _wants_usage(payload):
            # Token limits need the stream's usage: ask for it, and keep it from the client.
            changes["stream_options"] = {**(payload.get("stream_options") or {}),
                                         "include_usage": True}
            ex.strip_usage = True
        if changes or ex.rewritten:  # (a fallback's body is never the last model's)
            ex.body = json.dumps({**payload, **changes}).encode()
            ex.rewritten = True
        if upstream_name != ex.shown_model:
            ex.renamer = ModelRenamer(upstream_name, ex.shown_model)

    @staticmethod
    def _falls_back(first: ModelRuntime, ex: Exchange) -> bool:
        return FALLBACK_ON.get(ex.error_code) in first.cfg.fallback_on

    async def _serve(self, ex: Exchange) -> tuple[HTTPResponse | None, int]:
        rt = ex.runtime
        if self._admission_hooks:
            rejected = await self._admit(ex.info(), rt)
            if rejected is not None:
                return rejected, rejected.status
        self._rewrite_for_runtime(ex)
        ex.task = asyncio.current_task()
        self.active.add(ex)
        tenant = ex.tenant
        try:
            async with rt.admission.slot(tenant, self.tenancy.load(tenant) if tenant else None
                                         ) as waited:
                self.metrics.child(self.metrics.queue_wait, rt.name).observe(waited)
                if tenant is not None:
                    self.metrics.child(self.metrics.key_queue_wait, tenant.name).observe(waited)
                self.tracing.event("gateway.queue_wait", {"wait_s": waited})
                ex.queue_wait_s += waited
                ex.extra_headers = self.queue_headers(rt)
                ex.extra_headers["X-Gateway-Model"] = rt.name
                ex.extra_headers["X-Request-ID"] = ex.request_id
                if ex.answer_headers:
                    ex.extra_headers.update(ex.answer_headers)
                ex.holds_slot = True
                response = await self._forward(ex)
                return response, ex.status
        except QueueFull as exc:
            ex.error_code = "queue_full"
            self._count_key_rejection(None, tenant.name if tenant else "", "queue_full")
            return self._reject(rt, 429, "queue_full", f"model {rt.name!r} queue is full "
                                f"({exc.why}); retry later"), 429
        except KeyBusy:
            assert tenant is not None
            self._count_key_rejection(rt.name, tenant.name, "rate_limit_concurrency")
            headers = self.queue_headers(rt)
            headers["Retry-After"] = "1"
            return error_response(429, f"key {tenant.name!r} already has its "
                                  f"{tenant.max_concurrent} requests in flight (max_concurrent)",
                                  "rate_limit_concurrency", headers), 429
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
            task.uncancel()  # the gateway ended it (shutdown deadline, forced unload): say so
            if ex.abort_reason == "model_unloaded":
                return error_response(503, ex.abort_message, "model_unloaded",
                                      ex.extra_headers), 503
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

    def abort_active(self, reason: str, runtime: ModelRuntime | None = None,
                     message: str = "") -> None:
        """End every request still in flight (only ``runtime``'s slot holders, if given):
        open streams get an SSE error event, the rest a 503 (used when the shutdown grace
        runs out, and by a forced unload)."""
        for ex in list(self.active):
            if runtime is not None and (ex.runtime is not runtime or not ex.holds_slot):
                continue
            ex.abort_reason = reason
            ex.abort_message = message
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
            ex.error_code = "model_unavailable"
            headers = dict(ex.extra_headers)
            headers["Retry-After"] = str(self._retry_after(rt))
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

    def _count_key_rejection(self, model: str | None, key: str, code: str) -> None:
        """A refusal on the key's account; ``model`` also counts it in the model's own
        rejections (as ``rate_limit`` or ``auth``), unless the caller does that itself."""
        self.metrics.key_rejections.labels(key, code).inc()
        if model is not None:
            self.metrics.rejections.labels(model, "auth" if code == "model_not_allowed"
                                           else "rate_limit").inc()

    def _reject(self, rt: ModelRuntime, status: int, reason: str, message: str) -> HTTPResponse:
        self.metrics.rejections.labels(rt.name, reason).inc()
        headers = self.queue_headers(rt)
        headers["Retry-After"] = str(self._retry_after(rt))
        return error_response(status, message, reason, headers)

    @staticmethod
    def _retry_after(rt: ModelRuntime) -> int:
        return rt.retry_after_s()

    @staticmethod
    def queue_headers(rt: ModelRuntime) -> dict[str, str]:
        a = rt.admission
        return {"X-Queue-Depth": str(a.waiting), "X-Max-Concurrent": str(a.max_concurrent),
                "X-Max-Queue-Size": str(a.max_queue)}

    def _count_tokens(self, ex: Exchange) -> None:
        usage = ex.usage
        if not usage:
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt = prompt if type(prompt) is int else 0
        completion = completion if type(completion) is int else 0
        self.metrics.count_tokens(ex.runtime.name, ex.tenant.name if ex.tenant is not None
                                  else "", prompt, completion)
        self.tracing.set_attributes({"gen_ai.usage.input_tokens": prompt,
                                     "gen_ai.usage.output_tokens": completion})


def _stamped(response: HTTPResponse | None, rt: ModelRuntime) -> HTTPResponse | None:
    """The gateway's own answers name the model too (forwarded ones have it already)."""
    if response is not None:
        response.headers["X-Gateway-Model"] = rt.name
    return response


def _log_access(access: AccessLog, request: Request, intake: Intake | HTTPResponse | None,
                model: str, status: int, elapsed: float, ex: Exchange | None, key: str) -> None:
    """One line per proxied request."""
    path = intake.path if isinstance(intake, Intake) else _loggable(request.path)
    access.write(request.method, path, status, model, key, elapsed * 1000,
                 ex.queue_wait_s * 1000 if ex is not None else 0.0, REQUEST_ID.get())


def _loggable(text: str) -> str:
    """A client-sent string made safe for a log line: printable ASCII, bounded."""
    text = text[:200]
    return text if text.isascii() and text.isprintable() else ascii(text)[1:-1]


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _operation(endpoint: str) -> str:
    return {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}.get(
        endpoint, "other")
