"""Config reload, part of the fleet: models added, removed and reconfigured in place
(gateway/reload.py decides what changed and calls these).

A mixin of ``Fleet`` (gateway/fleet.py), split out by concern: the swap of settings
and runtimes happens here in one synchronous step; removed models retire (their
requests finish, then their servers stop).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.config import ModelConfig, Settings
from gateway.lifecycle import ModelRuntime
from gateway.upstream import UpstreamPool

if TYPE_CHECKING:
    from gateway.events import EventBus
    from gateway.types import BackendDriver
    from gateway.vram import GpuBudget

log = logging.getLogger("vllm_gateway.fleet")
RETIRE_POLL_S = 0.05  # a removed model checks this often whether its requests are done


class Reconfiguration:
    settings: Settings
    events: EventBus
    gpu: GpuBudget
    runtimes: dict[str, ModelRuntime]
    aliases: dict[str, ModelRuntime]
    drivers: dict[str, BackendDriver]
    _retiring: dict[str, tuple[ModelRuntime, asyncio.Task[None]]]
    _background: set[asyncio.Task[None]]

    async def prepare_runtime(self, cfg: ModelConfig, settings: Settings) -> ModelRuntime:
        """A runtime for a model a config reload adds, built before it joins ``runtimes``
        (``reconfigure``): a backend without a lifecycle (``static``) is made ready as at
        start-up; any other may adopt a server an earlier gateway left running."""
        rt = ModelRuntime(cfg, settings, self.drivers[cfg.backend], self._state_changed)
        if not rt.manages_lifecycle:
            rt.mark_ready(await rt.driver.start(cfg, 0), 0.0, "static")
        else:
            await self._adopt(rt)
        return rt

    @staticmethod
    async def discard_runtime(rt: ModelRuntime) -> None:
        """A prepared runtime whose reload is not applied after all: close its pool (an
        adopted server stays as the earlier gateway left it)."""
        if rt.pool is not None:
            await rt.pool.aclose()

    def retiring(self, name: str) -> ModelRuntime | None:
        """The runtime of a removed model still finishing its requests, if any."""
        entry = self._retiring.get(name)
        return entry[0] if entry else None

    def reconfigure(self, settings: Settings, added: dict[str, ModelRuntime]) -> None:
        """Install reloaded settings in one synchronous step, so no request sees half a
        config. Models kept get the new settings and config (``_reconfigure``); ``added``
        runtimes (from ``prepare_runtime``) join; a removed model still retiring comes back
        as it is. Removed models leave ``runtimes`` at once, so new requests for them get
        404, and retire: the requests they hold finish, then their servers stop."""
        chosen = {cfg.name: (self.runtimes.get(cfg.name) or added.get(cfg.name)
                             or self.retiring(cfg.name)) for cfg in settings.models}
        missing = [name for name, rt in chosen.items() if rt is None]
        if missing:
            raise ValueError(f"no runtime prepared for model(s) {missing}")
        for cfg in settings.models:  # nothing below can fail
            rt = chosen[cfg.name]
            if rt is self.retiring(cfg.name):
                self._unretire(cfg.name)
            if rt is not added.get(cfg.name):
                self._reconfigure(rt, cfg, settings)
        removed = [rt for name, rt in self.runtimes.items() if name not in chosen]
        self.settings = settings
        self.gpu.settings = settings
        self.runtimes = dict(chosen)  # type: ignore[arg-type]  # none is None (checked)
        self.aliases = {a: rt for rt in self.runtimes.values() for a in rt.cfg.aliases}
        for rt in removed:
            self._retire(rt)

    def _reconfigure(self, rt: ModelRuntime, cfg: ModelConfig, settings: Settings) -> None:
        """A kept model's new config. Limits apply now: admission is resized in place (a
        larger ``max_concurrent`` admits waiters at once; a smaller one preempts nobody),
        and the next start sizes the connection pool to it. What the server runs
        (command, image, args, env, served_model_name, ...) applies at its next start, as
        starts read ``rt.cfg``: a running server keeps running as it was started."""
        old, before = rt.cfg, rt.settings.upstream
        rt.settings = settings
        rt.cfg = cfg
        if cfg.pinned != old.pinned:  # the file changed it; otherwise an operator's pin stands
            rt.pinned = cfg.pinned
            self.events.publish("pin" if cfg.pinned else "unpin", rt.name, "config", rt.state)
        if not rt.manages_lifecycle or (rt.state in ("stopped", "failed")
                                        and rt.transition is None):
            rt.served_model_name = cfg.served_model_name  # no server runs the old name
        rt.admission.resize(settings.max_concurrent(cfg), settings.max_queue(cfg),
                            settings.limits.queue_timeout_s)
        self._resize_pool(rt, settings, (before.connect_timeout_s, before.timeout_s))

    def _resize_pool(self, rt: ModelRuntime, settings: Settings,
                     timeouts_before: tuple[float, float]) -> None:
        """A running model whose limit or upstream timeouts changed gets a new pool now
        (one sized to the old limit would make the extra requests wait for a connection):
        new attempts use it, attempts under way finish on the old one, which is closed
        once they are done. A model not running gets its pool at its next start."""
        old, up = rt.pool, settings.upstream
        if old is None or (old.size, timeouts_before) == (
                rt.admission.max_concurrent, (up.connect_timeout_s, up.timeout_s)):
            return
        rt.pool = UpstreamPool(rt.admission.max_concurrent, up.connect_timeout_s, up.timeout_s)

        async def close_when_idle() -> None:
            try:
                while old.in_use > 0:
                    await asyncio.sleep(RETIRE_POLL_S)
            finally:
                await old.aclose()

        task = asyncio.create_task(close_when_idle(), name=f"pool-close:{rt.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _retire(self, rt: ModelRuntime) -> None:
        task = asyncio.create_task(self._drain_removed(rt), name=f"retire:{rt.name}")
        self._retiring[rt.name] = (rt, task)
        log.info("model %s removed from the config: %d queued and %d in flight finish first",
                 rt.name, rt.admission.waiting, rt.admission.in_flight)

    def _unretire(self, name: str) -> None:
        rt, task = self._retiring.pop(name)
        task.cancel()
        log.info("model %s is back in the config before it was stopped: it stays", rt.name)

    async def _drain_removed(self, rt: ModelRuntime) -> None:
        """A removed model's end: once no request holds or awaits it, its server stops
        (reason ``removed``), again if a request that found it just before the removal
        started it meanwhile. Then its admission closes (a straggler gets 503) and the
        runtime is dropped."""
        try:
            while True:
                while rt.admission.busy or rt.transition is not None:
                    await asyncio.sleep(RETIRE_POLL_S)
                if rt.state in ("stopped", "failed"):
                    break
                await self.stop_model(rt, "removed")
            rt.admission.close()
            log.info("model %s removed: its requests finished and its server stopped", rt.name)
        finally:
            if self.retiring(rt.name) is rt:
                del self._retiring[rt.name]

    async def _end_retiring(self) -> list[ModelRuntime]:
        """Shutdown: removed models still finishing their requests stop with the rest."""
        entries = list(self._retiring.values())
        for _, task in entries:
            task.cancel()
        await asyncio.gather(*(task for _, task in entries), return_exceptions=True)
        return [rt for rt, _ in entries]
