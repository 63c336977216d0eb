"""Operator endpoints: liveness, status, Prometheus metrics and service discovery."""
from __future__ import annotations

from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from gateway.logging_setup import tag_request_id
from gateway.plugins import list_plugins
from gateway.routes.guard import is_admin, read_refusal

admin = Blueprint("admin")
admin.on_response(tag_request_id)


@admin.get("/health")
async def health(request: Request) -> HTTPResponse:
    """Liveness: 200 from start-up until the server stops, draining included (a load
    balancer reads /ready for that); 503 while starting or once stopping."""
    if not request.app.ctx.serving:
        return json_response({"status": "starting"}, status=503)
    return json_response({"status": "draining" if request.app.ctx.gateway.draining else "ok"})


@admin.get("/ready")
async def ready(request: Request) -> HTTPResponse:
    """Readiness: 200 while taking requests; 503 while starting or draining."""
    if not request.app.ctx.serving or request.app.ctx.gateway.draining:
        return json_response({"status": "draining" if request.app.ctx.gateway.draining
                              else "starting"}, status=503)
    return json_response({"status": "ready"})


@admin.get("/gateway/status")
async def status(request: Request) -> HTTPResponse:
    """Models, totals and keys. Without an admin key (once keys exist) upstream URLs and
    the internals of errors are left out: they are for operators."""
    gw = request.app.ctx.gateway
    identity = gw.tenancy.identify(request.headers)
    refused = read_refusal(request, "status", identity)
    if refused is not None:
        return refused
    fleet = gw.fleet
    models = {name: rt.status() for name, rt in fleet.runtimes.items()}
    operator = is_admin(request, identity)
    if not operator:
        for m in models.values():
            m["urls"] = []
            if m.get("last_error"):
                m["last_error"] = "failed (details for operators: an admin key)"
    totals = {
        "models": len(models),
        "running": sum(1 for m in models.values() if m["state"] == "ready"),
        "queue_depth": sum(m["queue_depth"] for m in models.values()),
        "in_flight": sum(m["in_flight"] for m in models.values()),
        "vram_total_mib": fleet.gpu.total_mib(),
        "vram_reserved_mib": sum(m["vram_mib"] for m in models.values()),
        "event_subscribers": fleet.events.subscribers,
    }
    body = {"models": models, "totals": totals}
    if operator:
        body["keys"] = gw.tenancy.status()
    return json_response(body)


@admin.get("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    refused = read_refusal(request, "metrics")
    if refused is not None:
        return refused
    registry = request.app.ctx.gateway.metrics.registry
    return HTTPResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


@admin.get("/gateway/sd")
async def service_discovery(request: Request) -> HTTPResponse:
    """Prometheus HTTP SD: every running model server's /metrics, labelled. It names
    upstream addresses, so once keys exist it answers admin keys only."""
    if request.app.ctx.gateway.tenancy.enabled and not is_admin(request):
        return request.app.ctx.gateway.tenancy.unauthorized(
            request.app.ctx.gateway.tenancy.identify(request.headers))
    fleet = request.app.ctx.gateway.fleet
    groups = []
    for name, rt in fleet.runtimes.items():
        if rt.state != "ready":
            continue
        targets = [urlsplit(u).netloc for u in rt.urls]
        groups.append({"targets": targets,
                       "labels": {"model": name, "backend": rt.cfg.backend,
                                  "__metrics_path__": "/metrics"}})
    return json_response(groups)


@admin.get("/gateway/plugins")
async def plugins(request: Request) -> HTTPResponse:
    refused = read_refusal(request, "status")
    if refused is not None:
        return refused
    pm = request.app.ctx.gateway.hooks.pm
    return json_response([{"name": p.name, "origin": p.origin, "hooks": list(p.hooks)}
                          for p in list_plugins(pm)])
