"""Per-model admission: a bounded FIFO queue in front of a concurrency limit.

``ModelAdmission`` is the only writer of its counts. Every change happens in
synchronous code (no ``await`` between reading and writing), and every entry is
paired with its exit in one ``finally``. So an exception or a cancellation at any
await point - including Sanic's RequestCancelled, a CancelledError that
``except Exception`` misses - cannot leave a count behind or take one away twice.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class QueueFull(Exception):
    """The model's queue already holds max_queue waiting requests."""


class QueueTimeout(Exception):
    """A request waited longer than the queue timeout for a slot."""


class ModelAdmission:
    def __init__(self, name: str, max_concurrent: int, max_queue: int,
                 queue_timeout_s: float = 0.0) -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_flight = 0
        self.admitted_total = 0
        self.finished_total = 0
        self.rejected_total = 0
        self.anomalies_total = 0
        self.last_used = 0.0  # monotonic; updated on every entry and exit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def busy(self) -> bool:
        return bool(self._waiters) or self._in_flight > 0

    def drift(self) -> int:
        """admitted - finished - waiting - in flight: zero unless accounting is broken."""
        return self.admitted_total - self.finished_total - self.waiting - self._in_flight

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one concurrency slot for the body of the ``async with``.

        Yields the seconds spent queued. Raises QueueFull (nothing counted) when the
        queue is full, QueueTimeout after ``queue_timeout_s`` of waiting.
        """
        started = time.monotonic()
        if self._in_flight < self.max_concurrent and not self._waiters:
            self._enter()
            self._in_flight += 1
        else:
            if len(self._waiters) >= self.max_queue:
                self.rejected_total += 1
                raise QueueFull(self.name)
            await self._wait_for_handoff()
        try:
            yield time.monotonic() - started
        finally:
            self._release()

    def _enter(self) -> None:
        self.admitted_total += 1
        self.last_used = time.monotonic()

    async def _wait_for_handoff(self) -> None:
        """Queue until a finishing request hands its slot over (FIFO)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enter()
        self._waiters.append(fut)
        try:
            if self.queue_timeout_s > 0:
                await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
            else:
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we gave up: pass it on.
                self._release()
            else:
                fut.cancel()
                self._remove_waiter(fut)
                self._finish()
            if isinstance(exc, asyncio.TimeoutError):
                raise QueueTimeout(self.name) from None
            raise

    def _remove_waiter(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            self.anomalies_total += 1  # only this waiter removes its own cancelled future

    def _finish(self) -> None:
        self.finished_total += 1
        self.last_used = time.monotonic()

    def _release(self) -> None:
        """Give the slot to the oldest live waiter, or free it."""
        self._finish()
        for fut in self._waiters:
            # A cancelled waiter stays queued until its own task removes it, so that
            # "waiting" and "finished" change together in one synchronous step.
            if not fut.done():
                self._waiters.remove(fut)
                fut.set_result(None)  # the slot moves to the waiter: in_flight unchanged
                return
        if self._in_flight <= 0:
            self.anomalies_total += 1
            return
        self._in_flight -= 1
