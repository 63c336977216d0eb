"""Operator control of models: load, unload, sleep, wake, pin, logs; and the event stream.

Thin handlers: each first asks ``admin_refusal`` (loopback only unless
``admin.allow_remote``), finds the model, and calls the fleet, which owns every
transition (gateway/fleet.py). Model names may hold ``/`` (HF ids), so the action is
the path's last segment. Errors use OpenAI's body (gateway/errors.py).
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from gateway.errors import error_response
from gateway.lifecycle import ModelRuntime, StartFailed
from gateway.logging_setup import tag_request_id
from gateway.routes.guard import admin_refusal

models_api = Blueprint("models_api")
models_api.on_response(tag_request_id)
KEEPALIVE_S = 15.0  # an SSE comment line this often keeps proxies from closing the stream
DEFAULT_LOG_LINES, MAX_LOG_LINES = 100, 5000
Action = Callable[[Request, ModelRuntime], Awaitable[HTTPResponse]]


def _status(rt: ModelRuntime, status: int = 200) -> HTTPResponse:
    return json_response({"model": rt.name, **rt.status()}, status=status)


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.args.get(name)
    return default if value is None else value.lower() not in ("false", "0", "no", "off")


def _start_error(exc: StartFailed) -> HTTPResponse:
    return error_response(503, str(exc).split("\n")[0], "model_unavailable")


async def load(request: Request, rt: ModelRuntime) -> HTTPResponse:
    """Start (or wake) now, ignoring any start backoff; ``?wait=false``: 202 at once."""
    fleet = request.app.ctx.gateway.fleet
    if not _flag(request, "wait", True):
        fleet.start_soon(rt, "admin")
        return _status(rt, 202)
    try:
        await fleet.load(rt)
    except StartFailed as exc:
        return _start_error(exc)
    return _status(rt)


async def unload(request: Request, rt: ModelRuntime) -> HTTPResponse:
    """Drain and stop; ``?force=true`` ends requests in flight with 503 model_unloaded."""
    gw = request.app.ctx.gateway
    if not rt.manages_lifecycle:
        return error_response(400, f"model {rt.name!r} uses the {rt.cfg.backend!r} backend, "
                              "which the gateway does not start or stop", "not_managed")
    on_draining = None
    if _flag(request, "force", False):
        message = (f"model {rt.name!r} was unloaded by an operator while this request ran; "
                   "retry to start it afresh")

        def on_draining() -> None:
            gw.abort_active("model_unloaded", rt, message)
    await gw.fleet.unload(rt, on_draining)
    return _status(rt)


def _not_sleep_mode(rt: ModelRuntime) -> HTTPResponse | None:
    if rt.cfg.sleep_mode:
        return None
    return error_response(400, f"model {rt.name!r} is not configured with sleep_mode: true",
                          "not_sleep_mode")


async def sleep(request: Request, rt: ModelRuntime) -> HTTPResponse:
    refused = _not_sleep_mode(rt)
    if refused is not None:
        return refused
    if not await request.app.ctx.gateway.fleet.sleep(rt):
        return error_response(409, f"model {rt.name!r} is {rt.state}: only a running model "
                              "can be put to sleep", "model_not_running")
    return _status(rt)


async def wake(request: Request, rt: ModelRuntime) -> HTTPResponse:
    refused = _not_sleep_mode(rt)
    return refused if refused is not None else await load(request, rt)


async def pin(request: Request, rt: ModelRuntime) -> HTTPResponse:
    request.app.ctx.gateway.fleet.set_pinned(rt, True)
    return _status(rt)


async def unpin(request: Request, rt: ModelRuntime) -> HTTPResponse:
    request.app.ctx.gateway.fleet.set_pinned(rt, False)
    return _status(rt)


async def logs(request: Request, rt: ModelRuntime) -> HTTPResponse:
    """The server's last ``?lines=N`` lines (default 100, at most 5000), secrets masked."""
    raw = request.args.get("lines", str(DEFAULT_LOG_LINES))
    try:
        lines = int(raw)
    except ValueError:
        lines = 0
    if not 1 <= lines <= MAX_LOG_LINES:
        return error_response(400, f"lines must be an integer from 1 to {MAX_LOG_LINES} "
                              f"(got {raw!r})", "invalid_request")
    return json_response({"model": rt.name, "lines": await rt.log_lines(lines)})


POST_ACTIONS: dict[str, Action] = {"load": load, "unload": unload, "sleep": sleep,
                                   "wake": wake, "pin": pin, "unpin": unpin}
GET_ACTIONS: dict[str, Action] = {"logs": logs}


async def _dispatch(request: Request, rest: str, actions: dict[str, Action]) -> HTTPResponse:
    refused = admin_refusal(request)
    if refused is not None:
        return refused
    name, _, action = rest.rpartition("/")
    if action not in actions or not name:
        return error_response(404, f"no route for {request.method} {request.path} (actions: "
                              f"{', '.join(actions)})", "not_found")
    fleet = request.app.ctx.gateway.fleet
    rt = fleet.get(name)
    if rt is None:
        return error_response(404, f"The model `{name}` does not exist. Available: "
                              f"{', '.join(fleet.runtimes)}", "model_not_found")
    return await actions[action](request, rt)


@models_api.post("/gateway/models/<rest:path>")
async def model_post(request: Request, rest: str) -> HTTPResponse:
    return await _dispatch(request, rest, POST_ACTIONS)


@models_api.get("/gateway/models/<rest:path>")
async def model_get(request: Request, rest: str) -> HTTPResponse:
    return await _dispatch(request, rest, GET_ACTIONS)


@models_api.get("/gateway/events")
async def events(request: Request) -> HTTPResponse | None:
    """Server-sent events: one JSON object per fleet event, a comment line every 15 s.
    The stream ends when the gateway drains; a client that leaves is unsubscribed."""
    refused = admin_refusal(request)
    if refused is not None:
        return refused
    with request.app.ctx.gateway.fleet.events.subscribe() as sub:
        response = await request.respond(content_type="text/event-stream", headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.send(b": subscribed\n\n")
        while True:
            event = await sub.get(KEEPALIVE_S)
            if event is None:
                if sub.closed:
                    break
                await response.send(b": keep-alive\n\n")
                continue
            await response.send(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.eof()
    return None
