"""Signals and the drain: one orderly shutdown, whatever arrives and however often.

The first SIGTERM or SIGINT starts the drain (the listener stays open): new and queued
requests get 503 ``shutting_down`` with Retry-After, in-flight ones may finish within
``shutdown_grace_s``, then whatever is still open is ended (streams with an SSE error
event), and only then is the server stopped, so model servers are stopped by the fleet
and the process exits 0. Later signals are logged and change nothing; a signal during
start-up waits for the server to be up, because stopping the loop mid-start is what
used to skip the fleet's shutdown. SIGHUP reloads the config file (gateway/reload.py),
once the server is up; during a drain it is logged and ignored.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING

from sanic import Sanic

if TYPE_CHECKING:
    from gateway.proxy import Gateway

log = logging.getLogger("vllm_gateway.shutdown")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ABORT_WAIT_S = 3.0  # after the grace: time for aborted requests to send their last bytes


class Shutdown:
    def __init__(self, app: Sanic, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.serving = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Take over SIGTERM, SIGINT and SIGHUP on the running loop (idempotent)."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)

    def _hangup(self) -> None:
        if self.task is not None:
            log.warning("SIGHUP received while shutting down; config not reloaded")
            return
        log.info("SIGHUP received: reloading the config")
        task = asyncio.get_running_loop().create_task(self._reload(), name="config-reload")
        self._reloads.add(task)  # a reference, so the task is not collected mid-way
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        from gateway.reload import reloader

        await self.serving.wait()  # a SIGHUP during start-up reloads once serving
        await reloader(self.app).reload("SIGHUP")  # logs and counts its outcome itself

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        if self.task is not None:
            log.warning("%s received while shutting down; the shutdown already under way "
                        "continues", signal.Signals(sig).name)
            return
        log.info("%s received: draining (grace %gs)", signal.Signals(sig).name,
                 self.gw.settings.shutdown_grace_s)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="gateway-drain")

    async def _run(self) -> None:
        await self.serving.wait()
        self.gw.begin_drain()  # /ready answers 503 from here; /health stays 200 (alive)
        deadline = time.monotonic() + self.gw.settings.shutdown_grace_s
        while self.gw.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.gw.active:
            log.warning("shutdown grace over: ending %d request(s) still in flight",
                        len(self.gw.active))
            self.gw.abort_active("shutting_down")
            end = time.monotonic() + ABORT_WAIT_S
            while self.gw.active and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self._ignore_signals()
        self.app.stop(terminate=False)

    @staticmethod
    def _ignore_signals() -> None:
        """From here on the fleet's shutdown must run to the end: Sanic restores the
        default (fatal) action when it removes handlers it thinks it added, so ours are
        removed first and the signals ignored."""
        loop = asyncio.get_running_loop()
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
