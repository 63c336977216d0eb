"""Built-in ``static`` backend: an OpenAI-compatible server that is already running.

The gateway never starts or stops it; ``url`` (or several ``urls``, spread by the
``select_backend`` hook) is where it lives.
"""
from __future__ import annotations

from typing import Any

from gateway.hookspecs import hookimpl
from gateway.types import RunningServer


class StaticDriver:
    manages_lifecycle = False

    def validate(self, model: Any) -> list[str]:
        if not model.url and not model.urls:
            return ["url: required for backend static (or urls: [...])"]
        if model.command:
            return ["command: not used by backend static (did you mean backend: process?)"]
        return []

    def urls(self, model: Any) -> list[str]:
        return list(model.urls or [model.url])

    async def start(self, model: Any, port: int) -> RunningServer:
        urls = self.urls(model)
        return RunningServer(url=urls[0], ident="static", extra={"urls": urls})

    async def stop(self, model: Any, server: RunningServer) -> None:
        return None

    async def is_running(self, model: Any, server: RunningServer) -> bool:
        return True

    async def adopt(self, model: Any) -> RunningServer | None:
        return None

    async def logs_tail(self, model: Any, server: RunningServer, lines: int = 20) -> str:
        return ""


@hookimpl(trylast=True)
def register_backends(register):
    register("static", StaticDriver())
