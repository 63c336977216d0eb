"""The app factory: ``create_app(settings) -> Sanic``.

Everything with a lifetime (plugin manager, fleet, pools, sweeper, tracer) is built
here or in the server listeners and hangs off ``app.ctx``; nothing is global, so
tests can build as many gateways as they like.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

from sanic import Sanic
from sanic.exceptions import MethodNotAllowed, NotFound, PayloadTooLarge, RequestTimeout, SanicException
from sanic.server.protocols.http_protocol import HttpProtocol

from gateway.config import Settings
from gateway.drivers import check_models, collect_drivers, configure_drivers
from gateway.errors import error_response
from gateway.fleet import Fleet
from gateway.logging_setup import request_id, tag_request_id
from gateway.metrics import GatewayMetrics
from gateway.plugins import HookRunner, build_plugin_manager, import_plugin_modules
from gateway.proxy import Gateway
from gateway.routes.admin import admin
from gateway.routes.models import models_api
from gateway.routes.openai import add_extra_routes, openai_api
from gateway.routes.reload import reload_api
from gateway.routes.ui import ui
from gateway.shutdown import Shutdown
from gateway.tracing import Tracing

log = logging.getLogger("vllm_gateway")
_app_ids = itertools.count()
# Sanic's RESPONSE_TIMEOUT counts from arrival to the first byte; a queued request or
# one waiting for a cold start must not be killed by it, so the gateway's own
# timeouts (queue, start, load, upstream) are the only ones that apply.
NO_SANIC_TIMEOUT_S = 10 * 86_400
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                        b"retry-after: 1\r\nx-request-id: %b\r\nconnection: close\r\n"
                        b"content-length: %d\r\n\r\n%b")


class GatewayProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with a cap on open connections: one past
    ``limits.max_connections`` gets a 503 and is closed, before any byte is read."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        cap = getattr(self.app.ctx, "max_connections", None)
        if cap is not None and len(self.connections) > cap:
            body = error_response(503, f"too many open connections (limits.max_connections = "
                                  f"{cap}); retry shortly", "too_many_connections").body
            rid = request_id(None).encode()  # no request read yet: a fresh id
            transport.write(TOO_MANY_CONNECTIONS % (rid, len(body), body))
            transport.close()
            self.app.ctx.gateway.metrics.rejections.labels("", "too_many_connections").inc()


def build_gateway(settings: Settings, extra_plugins: Iterable[tuple[str, object]] = (),
                  span_exporter: Any = None, source: str = "config") -> Gateway:
    """Plugins, drivers, fleet and metrics, validated; raises ConfigError or PluginError."""
    modules = import_plugin_modules(settings.plugins.modules, source)
    pm = build_plugin_manager(settings.plugins.disabled, settings.plugins.load_entrypoints,
                              list(modules) + list(extra_plugins))
    drivers = collect_drivers(pm)
    configure_drivers(settings, drivers)
    check_models(settings, drivers, source)
    metrics = GatewayMetrics()

    def observe(hook: str, plugin: str, seconds: float, error: BaseException | None) -> None:
        metrics.plugin_duration.labels(hook, plugin).observe(seconds)
        if error is not None:
            metrics.plugin_errors.labels(hook, plugin).inc()

    hooks = HookRunner(pm, observe)
    for hook, plugin in hooks.implementations():
        metrics.plugin_errors.labels(hook, plugin)  # born at 0: the first error is visible
    fleet = Fleet(settings, hooks, drivers, metrics)
    metrics.attach_state(fleet.gauges, fleet.gpu.total_mib, fleet.gpu.used_mib)
    for name in fleet.runtimes:
        metrics.init_model(name)
    tracing = Tracing(settings.tracing.otlp_endpoint, settings.tracing.service_name, span_exporter)
    return Gateway(settings, hooks, fleet, metrics, tracing)


def create_app(settings: Settings, extra_plugins: Iterable[tuple[str, object]] = (),
               span_exporter: Any = None, source: str = "config") -> Sanic:
    gw = build_gateway(settings, extra_plugins, span_exporter, source)
    app = Sanic(f"vllm_gateway_{next(_app_ids)}")
    app.config.RESPONSE_TIMEOUT = NO_SANIC_TIMEOUT_S
    # REQUEST_TIMEOUT bounds the wait for request headers; bodies have their own
    # deadline (limits.body_timeout_s, gateway/intake.py).
    app.config.REQUEST_TIMEOUT = settings.limits.header_timeout_s
    app.config.REQUEST_MAX_SIZE = settings.limits.max_request_bytes
    app.config.KEEP_ALIVE_TIMEOUT = 75
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 5  # after our own drain: connections left idle
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.gateway = gw
    app.ctx.serving = False
    app.ctx.max_connections = settings.limits.max_connections
    app.ctx.shutdown = Shutdown(app, gw)
    app.ctx.handle_signals = False  # `serve` sets it; in-process tests drive shutdown directly
    app.blueprint(openai_api)
    app.blueprint(admin)
    app.blueprint(reload_api)
    app.blueprint(models_api)
    app.blueprint(ui)
    add_extra_routes(app, settings.upstream.extra_paths)
    _add_error_handlers(app, gw)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        if app.ctx.handle_signals:
            app.ctx.shutdown.install()  # first: a signal during start-up is not lost
        await gw.fleet.startup()
        await gw.hooks.each("startup", gateway=gw)

    @app.after_server_start
    async def _serving(app: Sanic) -> None:
        if app.ctx.handle_signals:
            # Again: Sanic sets SIGTERM/SIGINT to SIG_IGN just before this listener runs.
            app.ctx.shutdown.install()
        app.ctx.serving = True
        app.ctx.shutdown.serving.set()

    @app.before_server_stop
    async def _draining(app: Sanic) -> None:
        app.ctx.serving = False

    @app.after_server_stop
    async def _stop(app: Sanic) -> None:
        await gw.hooks.each("shutdown", gateway=gw, isolate=True)
        await gw.fleet.shutdown()
        gw.tracing.shutdown()

    return app


def _add_error_handlers(app: Sanic, gw: Gateway) -> None:
    def handles(*exceptions):
        """``app.exception``, and the answer carries X-Request-ID."""
        def register(fn):
            async def tagged(request, exc):
                response = await fn(request, exc)
                await tag_request_id(request, response)
                return response
            app.exception(*exceptions)(tagged)
            return fn
        return register

    @handles(PayloadTooLarge)
    async def _too_large(request, exc):
        gw.metrics.rejections.labels("", "too_large").inc()
        if "header" in str(exc).lower():
            return error_response(431, "request headers exceed "
                                  f"{app.config.REQUEST_MAX_HEADER_SIZE} bytes",
                                  "request_headers_too_large")
        return error_response(413, f"request body exceeds {gw.settings.limits.max_request_bytes} "
                              "bytes (limits.max_request_bytes)", "request_too_large")

    @handles(RequestTimeout)
    async def _timeout(request, exc):
        return error_response(408, "request headers not received within "
                              f"{gw.settings.limits.header_timeout_s:g}s (limits.header_timeout_s)",
                              "request_timeout")

    @handles(NotFound)
    async def _not_found(request, exc):
        return error_response(404, f"no route for {request.method} {request.path}", "not_found")

    @handles(MethodNotAllowed)
    async def _method(request, exc):
        return error_response(405, f"method {request.method} not allowed on {request.path}",
                              "method_not_allowed")

    @handles(SanicException)
    async def _sanic(request, exc):
        status = getattr(exc, "status_code", 500) or 500
        return error_response(status, str(exc) or "request failed", "bad_request"
                              if status < 500 else "internal_error")

    @handles(Exception)
    async def _unexpected(request, exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal gateway error: {type(exc).__name__}",
                              "internal_error")
