"""OpenAI-compatible API: thin handlers over ``Gateway.handle``.

Proxied routes read their own body (``stream=True``): the gateway bounds that read in
time and memory itself (gateway/intake.py) and checks the raw path against the
allow-list, so the route patterns here only decide what reaches ``handle``.
"""
from __future__ import annotations

from sanic import Blueprint, Sanic
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

openai_api = Blueprint("openai_api")


@openai_api.post("/v1/<path:path>", stream=True)
async def proxy_v1(request: Request, path: str) -> HTTPResponse | None:
    return await request.app.ctx.gateway.handle(request)


@openai_api.post("/<name:tokenize|detokenize|score|rerank|pooling|classify>", stream=True)
async def proxy_root(request: Request, name: str) -> HTTPResponse | None:
    return await request.app.ctx.gateway.handle(request)


def add_extra_routes(app: Sanic, paths: list[str]) -> None:
    """Routes for ``upstream.extra_paths`` that the patterns above do not cover."""
    async def proxy_extra(request: Request) -> HTTPResponse | None:
        return await request.app.ctx.gateway.handle(request)

    for i, path in enumerate(p for p in paths if not p.startswith("/v1/")):
        app.add_route(proxy_extra, path, methods=["POST"], name=f"proxy_extra_{i}", stream=True)


@openai_api.get("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    fleet = request.app.ctx.gateway.fleet
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "vllm-gateway",
             "state": rt.state, "backend": rt.cfg.backend}
            for name, rt in fleet.runtimes.items()]
    return json_response({"object": "list", "data": data})
