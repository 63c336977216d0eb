"""The fleet's event bus: state changes, starts, stops, evictions and failures, as they
happen, for ``GET /gateway/events`` (and anything else in the process that listens).

``publish`` is synchronous and never blocks: the fleet calls it in the middle of its
transitions. Each subscriber has a bounded queue; one that does not keep up loses its
oldest events (counted in ``dropped``), never holds up the fleet or another subscriber.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

QUEUE_SIZE = 256  # events kept per subscriber before the oldest are dropped


class Subscription:
    """One listener's queue; use as a context manager so it is always removed."""

    def __init__(self, bus: EventBus, size: int) -> None:
        self._bus = bus
        self._queue: deque[dict[str, Any]] = deque(maxlen=size)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _put(self, event: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest itself
        self._queue.append(event)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event; None on timeout, or once the bus is closed and drained."""
        if not self._queue and not self.closed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._bus._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._queue_size)
        if self.closed:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    def publish(self, type: str, model: str, reason: str = "", state: str = "") -> None:
        """Hand one event to every subscriber; sync, O(subscribers), never blocks."""
        event = {"type": type, "model": model, "reason": reason, "state": state,
                 "time": time.time()}
        for sub in list(self._subscribers):
            sub._put(event)

    def close(self) -> None:
        """The gateway is draining: end every subscription (streams end), take no more."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.close()
