"""vLLM's sleep mode for the simulator (``--enable-sleep-mode``).

vLLM serves these development endpoints when started with ``--enable-sleep-mode`` and
VLLM_SERVER_DEV_MODE=1: POST /sleep?level=N offloads the weights and frees the GPU
memory, POST /wake_up brings them back, GET /is_sleeping tells which. While asleep,
generation requests are refused with 503.
"""
from __future__ import annotations

import asyncio

from sanic import Sanic
from sanic.request import Request
from sanic.response import HTTPResponse, json

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
TRANSITION_S = 0.05  # offloading/reloading weights, much faster than a cold start


class SleepState:
    def __init__(self) -> None:
        self.sleeping = False
        self.level = 0
        self.sleeps_total = 0
        self.wakes_total = 0


def add_sleep_routes(app: Sanic) -> SleepState:
    state = SleepState()

    @app.on_request
    async def _refuse_while_asleep(request: Request) -> HTTPResponse | None:
        if state.sleeping and request.path in GENERATION_PATHS:
            err = {"message": "The model is sleeping; POST /wake_up first.",
                   "type": "ServiceUnavailableError", "param": None, "code": 503}
            return json({"error": err}, status=503)
        return None

    @app.post("/sleep")
    async def sleep(request: Request) -> HTTPResponse:
        level = request.args.get("level", "1")
        if level not in ("1", "2"):
            return json({"error": {"message": f"invalid sleep level {level!r}"}}, status=400)
        await asyncio.sleep(TRANSITION_S)
        state.sleeping, state.level = True, int(level)
        state.sleeps_total += 1
        return HTTPResponse(status=200)

    @app.post("/wake_up")
    async def wake_up(_request: Request) -> HTTPResponse:
        await asyncio.sleep(TRANSITION_S)
        if state.sleeping:
            state.wakes_total += 1
        state.sleeping, state.level = False, 0
        return HTTPResponse(status=200)

    @app.get("/is_sleeping")
    async def is_sleeping(_request: Request) -> HTTPResponse:
        return json({"is_sleeping": state.sleeping})

    return state
