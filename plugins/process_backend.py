"""Built-in ``process`` backend: runs a model server as a child process.

``command`` is any server that speaks OpenAI's API and answers GET /health: the
simulator, ``vllm serve``, llama.cpp's server. ``{port}`` and ``{name}`` are filled
in. The child gets its own process group so stopping it also stops its children.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from gateway.hookspecs import hookimpl
from gateway.types import RunningServer

STOP_GRACE_S = 10.0


def resolve_executable(cmd0: str) -> str:
    """Find ``cmd0`` on PATH, else beside this interpreter (a venv's bin/ not on PATH)."""
    found = shutil.which(cmd0)
    if found:
        return found
    sibling = Path(sys.executable).parent / cmd0
    return str(sibling) if sibling.exists() else cmd0


class ProcessDriver:
    manages_lifecycle = True

    def __init__(self) -> None:
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def validate(self, model: Any) -> list[str]:
        if not model.command:
            return ["command: required for backend process (a list: [program, arg, ...])"]
        if not any("{port}" in part for part in model.command):
            return ["command: must contain {port} so the gateway can choose the server's port"]
        if model.sleep_mode and "--enable-sleep-mode" not in model.command:
            return ["sleep_mode: the command must pass --enable-sleep-mode"]
        return []

    async def start(self, model: Any, port: int) -> RunningServer:
        argv = [part.replace("{port}", str(port)).replace("{name}", model.name)
                for part in model.command]
        argv[0] = resolve_executable(argv[0])
        log = tempfile.NamedTemporaryFile(prefix=f"vllm-gateway-{_safe(model.name)}-",
                                          suffix=".log", delete=False)
        env = {**os.environ, **model.env}
        if model.sleep_mode:  # vLLM serves /sleep and /wake_up only in dev mode
            env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True)
        except OSError as exc:
            log.close()
            raise RuntimeError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        finally:
            log.close()
        self._procs[str(proc.pid)] = proc
        return RunningServer(url=f"http://127.0.0.1:{port}", ident=str(proc.pid),
                             extra={"log": log.name})

    async def stop(self, model: Any, server: RunningServer) -> None:
        proc = self._procs.pop(server.ident, None)
        if proc is None:
            return
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        else:
            _signal_group(proc.pid, signal.SIGKILL)  # stray grandchildren
        try:
            os.unlink(server.extra.get("log", ""))
        except OSError:
            pass

    async def is_running(self, model: Any, server: RunningServer) -> bool:
        proc = self._procs.get(server.ident)
        return proc is not None and proc.returncode is None

    async def adopt(self, model: Any) -> RunningServer | None:
        return None  # children die with the gateway; nothing to adopt

    async def logs_tail(self, model: Any, server: RunningServer, lines: int = 20) -> str:
        try:
            with open(server.extra.get("log", ""), errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines))
        except OSError:
            return ""


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@hookimpl(trylast=True)
def register_backends(register):
    register("process", ProcessDriver())
