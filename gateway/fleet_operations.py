"""Operators' requests, part of the fleet: load, unload, sleep, pin
(gateway/routes/models.py calls them).

A mixin of ``Fleet`` (gateway/fleet.py), split out by concern: each request runs as
one of the fleet's transitions, so it composes with starts, stops and evictions.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.lifecycle import ModelRuntime

if TYPE_CHECKING:
    from gateway.events import EventBus


class OperatorRequests:
    events: EventBus

    async def load(self, rt: ModelRuntime) -> None:
        """Start (or wake) the model now, whatever its start backoff says."""
        await self.ensure_ready(rt, "admin", ignore_backoff=True)

    async def unload(self, rt: ModelRuntime,
                     on_draining: Callable[[], None] | None = None) -> None:
        """Stop the model as one transition that first drains it: requests in flight
        finish (``on_draining`` runs once new ones wait, e.g. to cancel those instead),
        requests arriving meanwhile wait, then start it afresh. Returns once stopped."""
        await self._settle(rt)
        if rt.state not in ("ready", "sleeping") or not rt.manages_lifecycle:
            return

        async def transition() -> None:
            try:
                await self._drained(rt)
                await self._stop_now(rt, "unload")
            finally:
                rt.transition = None

        rt.transition = asyncio.create_task(transition(), name=f"unload:{rt.name}")
        if on_draining is not None:
            on_draining()
        await asyncio.shield(rt.transition)

    async def sleep(self, rt: ModelRuntime) -> bool:
        """An operator's sleep for a ``sleep_mode`` model: False when it is not running."""
        await self._settle(rt)
        if rt.state == "ready":
            await self.sleep_model(rt, "admin")
        return rt.state == "sleeping"

    def set_pinned(self, rt: ModelRuntime, pinned: bool) -> None:
        """Override ``pinned`` at run time; eviction reads only this flag."""
        rt.pinned = pinned
        self.events.publish("pin" if pinned else "unpin", rt.name, "admin", rt.state)

    async def _settle(self, rt: ModelRuntime) -> None:
        """Wait out whatever transition the model is in, whatever its outcome."""
        while rt.transition is not None:
            await asyncio.gather(asyncio.shield(rt.transition), return_exceptions=True)

    async def _drained(self, rt: ModelRuntime) -> None:
        """Wait until no request is at the model's server (queued ones wait on the
        transition that called this, holding no upstream connection)."""
        while rt.pool is not None and rt.pool.in_use > 0:
            await asyncio.sleep(0.05)
