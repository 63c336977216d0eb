"""vLLM's sleep mode for the simulator (``--enable-sleep-mode``).

vLLM serves these development endpoints when started with ``--enable-sleep-mode`` and
VLLM_SERVER_DEV_MODE=1: ``POST /sleep?level=N`` (N 0-2, default 1; answers
``{"status": "sleeping", "level": N}``) offloads the weights and frees the GPU memory,
``POST /wake_up`` (answers ``{"status": "awake", "tags": null}``) brings them back,
``GET /is_sleeping`` answers ``{"is_sleeping": bool}``. A bad level is vLLM's 400.

While asleep ``/health`` and ``/v1/models`` stay 200, and a generation request (chat,
completions, embeddings) is **held** until ``/wake_up``, counted as waiting, and then
served, as vLLM's paused scheduler does; nothing is refused. A stream's response headers
still go out at once. ``vllm:engine_sleep_state`` (labels ``engine="0"``, ``sleep_state``
awake / weights_offloaded / discard_all) follows the state. Requests already generating when
``/sleep`` comes finish normally here (vLLM's default ``mode=abort`` would abort them; the
``mode`` parameter is ignored), and level 2 loses nothing (vLLM would need its weights
reloaded after waking).
"""
from __future__ import annotations

import asyncio
from typing import Protocol

from sanic import Sanic
from sanic.request import Request
from sanic.response import HTTPResponse

from vllm_simulator import text as st


class SimState(Protocol):
    """What sleep mode needs of the simulator's state (vllm_simulator.server.SimState)."""

    awake: asyncio.Event

    def set_sleep_state(self, level: int | None) -> None: ...

TRANSITION_S = 0.05  # offloading/reloading weights, much faster than a cold start


class SleepState:
    def __init__(self, sim: SimState) -> None:
        self.sim = sim
        self.level = 0
        self.sleeps_total = 0
        self.wakes_total = 0

    @property
    def sleeping(self) -> bool:
        return not self.sim.awake.is_set()

    def fall_asleep(self, level: int) -> None:
        self.sim.awake.clear()
        self.level = level
        self.sleeps_total += 1
        self.sim.set_sleep_state(level)

    def wake(self) -> None:
        if self.sleeping:
            self.wakes_total += 1
        self.level = 0
        self.sim.set_sleep_state(None)
        self.sim.awake.set()  # the held requests go on


def _json(obj, status: int = 200) -> HTTPResponse:
    return HTTPResponse(st.dumps(obj), status=status, content_type="application/json")


def add_sleep_routes(app: Sanic) -> SleepState:
    state = SleepState(app.ctx.sim)

    @app.post("/sleep")
    async def sleep(request: Request) -> HTTPResponse:
        level = request.args.get("level", "1")
        if level not in ("0", "1", "2"):
            err = st.error_body(f"Input should be 0, 1 or 2, got {level!r}.", 400,
                                "query.level", st.SCHEMA_ERROR)
            return HTTPResponse(err, status=400, content_type="application/json")
        await asyncio.sleep(TRANSITION_S)
        state.fall_asleep(int(level))
        return _json({"status": "sleeping", "level": int(level)})

    @app.post("/wake_up")
    async def wake_up(_request: Request) -> HTTPResponse:
        await asyncio.sleep(TRANSITION_S)
        state.wake()
        return _json({"status": "awake", "tags": None})

    @app.get("/is_sleeping")
    async def is_sleeping(_request: Request) -> HTTPResponse:
        return _json({"is_sleeping": state.sleeping})

    return state
