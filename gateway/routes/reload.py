"""``POST /gateway/reload``: re-read the config file, as SIGHUP does (gateway/reload.py)."""
from __future__ import annotations

from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from gateway.logging_setup import tag_request_id
from gateway.reload import reloader
from gateway.routes.guard import admin_refusal

reload_api = Blueprint("reload_api")
reload_api.on_response(tag_request_id)


@reload_api.post("/gateway/reload")
async def reload_config(request: Request) -> HTTPResponse:
    """200 with what changed; 400 ``invalid_config`` with one line per problem (the
    running config is kept) or ``no_config_file``; 503 while shutting down."""
    refused = admin_refusal(request)
    if refused is not None:
        return refused
    outcome = await reloader(request.app).reload("POST /gateway/reload")
    return json_response(outcome.body(), status=outcome.status)
