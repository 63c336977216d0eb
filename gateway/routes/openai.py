"""OpenAI-compatible API: thin handlers over ``Gateway.handle``."""
from __future__ import annotations

from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

openai_api = Blueprint("openai_api")

# vLLM serves these at the root as well as under /v1 (tokenize, score, rerank, ...).
ROOT_PASSTHROUGH = ("tokenize", "detokenize", "score", "rerank", "pooling", "classify")


@openai_api.post("/v1/<path:path>")
async def proxy_v1(request: Request, path: str) -> HTTPResponse | None:
    return await request.app.ctx.gateway.handle(request, "/v1/" + path)


@openai_api.post("/<name:tokenize|detokenize|score|rerank|pooling|classify>")
async def proxy_root(request: Request, name: str) -> HTTPResponse | None:
    return await request.app.ctx.gateway.handle(request, "/" + name)


@openai_api.get("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    fleet = request.app.ctx.gateway.fleet
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "vllm-gateway",
             "state": rt.state, "backend": rt.cfg.backend}
            for name, rt in fleet.runtimes.items()]
    return json_response({"object": "list", "data": data})
