"""Placement, part of the fleet: making room for a model before it starts.

A mixin of ``Fleet`` (gateway/fleet.py), split out by concern; it works on the
fleet's own state (runtimes, the placement lock, the GPU budget) and calls back
into the fleet's stop and sleep transitions. The placement lock is held only while
room is made and the starting model's footprint reserved, never through a launch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gateway.lifecycle import ModelRuntime, StartFailed
from gateway.types import Eviction, EvictionRequest
from gateway.vram import shortfall

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.events import EventBus
    from gateway.metrics import GatewayMetrics
    from gateway.plugins import HookRunner
    from gateway.vram import GpuBudget

log = logging.getLogger("vllm_gateway.fleet")


class Placement:
    settings: Settings
    hooks: HookRunner
    metrics: GatewayMetrics
    events: EventBus
    gpu: GpuBudget
    runtimes: dict[str, ModelRuntime]
    _placement: asyncio.Lock

    async def _reserve(self, rt: ModelRuntime, cause: str) -> None:
        """Make room and mark the model ``starting`` (which reserves its footprint), all
        under the placement lock; wait for room (bounded) with the lock released."""
        deadline = time.monotonic() + self.settings.gpu.load_timeout_s
        while True:
            async with self._placement:
                rt.vram_mib = self.gpu.footprint(rt.cfg)
                total = self.gpu.total_mib()
                if total and rt.vram_mib > total:
                    raise StartFailed(f"model {rt.name!r} needs {rt.vram_mib} MiB but the GPU "
                                      f"budget is {total} MiB (gpu.total_vram_mib / vram_mib)")
                req = self._eviction_request(rt)
                reason = shortfall(req)
                if reason is None:
                    rt.mark_starting(cause)  # from here its footprint counts as held
                    return
                victims = self._valid_victims(self.hooks.first("select_evictions", request=req)
                                              or ())
                if victims:
                    await self._evict(victims, reason)
                    continue
            if time.monotonic() >= deadline:
                raise StartFailed(f"model {rt.name!r}: no room after "
                                  f"{self.settings.gpu.load_timeout_s:g}s ({reason}); loaded "
                                  "models are busy or pinned")
            await asyncio.sleep(0.2)

    def _eviction_request(self, rt: ModelRuntime) -> EvictionRequest:
        loaded = self.loaded(exclude=rt)
        return EvictionRequest(
            target=rt.view(), loaded=tuple(m.view() for m in loaded),
            total_vram_mib=self.gpu.total_mib() or 0,
            reserved_vram_mib=sum(m.reserved_mib() for m in loaded),
            max_models_running=self.settings.max_models_running,
            min_residency_s=self.settings.gpu.min_residency_s, now=time.monotonic(),
            sleep_residual_mib=self.settings.gpu.sleep_residual_mib)

    def _valid_victims(self, answer: Iterable[str | Eviction]) -> list[tuple[ModelRuntime, str]]:
        """The core's guard on any policy: only idle, unpinned, loaded models are evicted,
        and only an awake ``sleep_mode`` model is put to sleep."""
        out = []
        for item in answer:
            name, action = (item, "stop") if isinstance(item, str) else (item.model, item.action)
            rt = self.runtimes.get(name)
            if rt is None or rt.pinned or not self.may_stop(rt):
                continue
            if action == "sleep" and not (rt.cfg.sleep_mode and rt.state == "ready"):
                continue
            out.append((rt, "sleep" if action == "sleep" else "stop"))
        return out

    async def _evict(self, victims: list[tuple[ModelRuntime, str]], reason: str) -> None:
        used_before = self.gpu.used_mib()
        freed = 0
        for victim, action in victims:
            if not self.may_stop(victim):  # busy again while an earlier victim stopped
                continue
            before = victim.reserved_mib()
            self.metrics.evictions.labels(victim.name, reason).inc()
            self.events.publish("eviction", victim.name, reason, victim.state)
            if action == "sleep":
                await self.sleep_model(victim)
            else:
                await self.stop_model(victim, "eviction")
            freed += before - victim.reserved_mib()
        await self._wait_released(used_before, freed)

    async def _wait_released(self, used_before: int | None, freed_mib: int) -> None:
        """Drivers lag: wait until NVML shows the victims' memory gone (bounded)."""
        if used_before is None or freed_mib <= 0:
            return
        deadline = time.monotonic() + self.settings.gpu.release_timeout_s
        target = used_before - int(freed_mib * 0.9)
        while time.monotonic() < deadline:
            used = self.gpu.used_mib()
            if used is None or used <= target:
                return
            await asyncio.sleep(0.25)
        log.warning("GPU memory not released after %.0fs (used %s MiB, expected <= %s)",
                    self.settings.gpu.release_timeout_s, self.gpu.used_mib(), target)
