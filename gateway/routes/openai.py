"""OpenAI-compatible API: thin handlers over ``Gateway.handle``.

Proxied routes read their own body (``stream=True``): the gateway bounds that read in
time and memory itself (gateway/intake.py) and checks the raw path against the
allow-list, so the route patterns here only decide what reaches ``handle``.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from sanic import Blueprint, Sanic
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from gateway.errors import error_response
from gateway.keys import Tenant
from gateway.lifecycle import ModelRuntime
from gateway.logging_setup import request_id
from gateway.routes.guard import read_refusal

openai_api = Blueprint("openai_api")


@openai_api.post("/v1/<path:path>", stream=True)
async def proxy_v1(request: Request, path: str) -> HTTPResponse | None:
    return await request.app.ctx.gateway.handle(request)


@openai_api.post("/<name:tokenize|detokenize|score|rerank|pooling|classify>", stream=True)
async def proxy_root(request: Request, name: str) -> HTTPResponse | None:
    return await request.app.ctx.gateway.handle(request)


@openai_api.options("/v1/<path:path>")
async def preflight_v1(request: Request, path: str) -> HTTPResponse:
    return request.app.ctx.gateway.cors.preflight(request)


@openai_api.options("/<name:tokenize|detokenize|score|rerank|pooling|classify>")
async def preflight_root(request: Request, name: str) -> HTTPResponse:
    return request.app.ctx.gateway.cors.preflight(request)


def add_extra_routes(app: Sanic, paths: list[str]) -> None:
    """Routes for ``upstream.extra_paths`` that the patterns above do not cover."""
    async def proxy_extra(request: Request) -> HTTPResponse | None:
        return await request.app.ctx.gateway.handle(request)

    for i, path in enumerate(p for p in paths if not p.startswith("/v1/")):
        app.add_route(proxy_extra, path, methods=["POST"], name=f"proxy_extra_{i}", stream=True)


def model_object(model_id: str, rt: ModelRuntime) -> dict[str, Any]:
    """OpenAI's model object plus the gateway's ``state`` and ``backend``; an alias is
    an entry of its own (clients look models up by id) with ``alias_of`` naming the model."""
    obj = {"id": model_id, "object": "model", "created": 0, "owned_by": "vllm-gateway",
           "state": rt.state, "backend": rt.cfg.backend}
    if model_id != rt.name:
        obj["alias_of"] = rt.name
    return obj


def _caller(request: Request) -> tuple[Tenant | None, HTTPResponse | None]:
    """The key calling a read route, or the 401 to send (``auth.protect: [models]``
    makes even an anonymous-allowed gateway require a key here)."""
    tenancy = request.app.ctx.gateway.tenancy
    identity = tenancy.identify(request.headers)
    refused = read_refusal(request, "models", identity)
    if refused is None and identity.tenant is None:
        refused = tenancy.unauthorized(identity)
    return (None, refused) if refused is not None else (identity.tenant, None)


@openai_api.get("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    """The models this key may use (each alias an entry of its own)."""
    tenant, refused = _caller(request)
    if refused is not None:
        return _with_id(request, refused)
    fleet = request.app.ctx.gateway.fleet
    data = [model_object(model_id, rt) for rt in fleet.runtimes.values()
            if tenant.may_use(rt.name) for model_id in (rt.name, *rt.cfg.aliases)]
    return _with_id(request, json_response({"object": "list", "data": data}))


@openai_api.get("/v1/models/<model_id:path>")
async def retrieve_model(request: Request, model_id: str) -> HTTPResponse:
    """``GET /v1/models/{id}``; ids may hold ``/``, sent as is or as ``%2F`` (the openai
    client's spelling). Model names never contain ``%``, so decoding is unambiguous."""
    tenant, refused = _caller(request)
    if refused is not None:
        return _with_id(request, refused)
    model_id = unquote(model_id)
    rt = request.app.ctx.gateway.fleet.get(model_id)
    if rt is None or not tenant.may_use(rt.name):  # a model it may not use: not there
        return _with_id(request, error_response(
            404, f"The model `{model_id[:200]}` does not exist.", "model_not_found"))
    return _with_id(request, json_response(model_object(model_id, rt)))


def _with_id(request: Request, response: HTTPResponse) -> HTTPResponse:
    response.headers["X-Request-ID"] = request_id(request.headers.get("x-request-id"))
    response.headers.update(request.app.ctx.gateway.cors.headers(request))
    return response
