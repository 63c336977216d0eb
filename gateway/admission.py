"""Per-model admission: a bounded FIFO queue in front of a concurrency limit.

``ModelAdmission`` is the only writer of its counts, and every change happens in
synchronous code (no ``await`` between reading and writing), each entry paired with
its exit in one ``finally``: no exception or cancellation at an await point can leave
a count behind or take one away twice.

It is work-conserving by construction: every change that can free a slot or remove
a waiter ends in one synchronous ``_dispatch()``, which hands free slots to the
oldest live waiters. So between loop steps a free slot and a live waiter never
coexist, and a request that finds a free slot may enter at once without jumping
the queue.
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


class ShuttingDown(Exception):
    """The model's admission was closed: it takes no new requests."""


class ModelAdmission:
    def __init__(self, name: str, max_concurrent: int, max_queue: int,
                 queue_timeout_s: float = 0.0) -> None:
        self.name = name
        self._max_concurrent = 0
        self._max_queue = 0
        self._queue_timeout_s = 0.0
        self._set_limits(max_concurrent, max_queue, queue_timeout_s)
        # Futures of queued requests, oldest first. A done one (cancelled, or failed by
        # close()) stays until its own task removes it, so that "waiting" and "finished"
        # change together in one synchronous step and drift stays exact.
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_flight = 0
        self._closed = False
        self._stall_since: float | None = None  # monotonic start of a stall, see stalled_seconds
        self.admitted_total = 0
        self.finished_total = 0
        self.rejected_total = 0
        self.anomalies_total = 0
        self.last_used = 0.0  # monotonic; updated on every entry and exit

    # ------------------------------------------------------------------ limits

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def queue_timeout_s(self) -> float:
        return self._queue_timeout_s

    def _set_limits(self, max_concurrent: int, max_queue: int, queue_timeout_s: float) -> None:
        if max_concurrent < 1 or max_queue < 0 or queue_timeout_s < 0:
            raise ValueError(f"{self.name}: need max_concurrent >= 1, max_queue >= 0, "
                             f"queue_timeout_s >= 0 (got {max_concurrent}, {max_queue}, "
                             f"{queue_timeout_s})")
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s

    def resize(self, max_concurrent: int, max_queue: int,
               queue_timeout_s: float | None = None) -> None:
        """Change the limits in place (live config reload), keeping every count.

        Growing ``max_concurrent`` admits waiters at once. Shrinking it preempts no
        holder: ``in_flight`` may stay above the new limit until they finish, and nobody
        enters until it is below. A shrunk ``max_queue`` only bounds new arrivals;
        requests already queued keep their place. A new ``queue_timeout_s`` applies to
        requests that start waiting after this call.
        """
        self._set_limits(max_concurrent, max_queue,
                         self._queue_timeout_s if queue_timeout_s is None else queue_timeout_s)
        self._dispatch()

    # ------------------------------------------------------------------ readings

    @property
    def waiting(self) -> int:
        """Queued requests, including ones cancelled but not yet removed by their task."""
        return len(self._waiters)

    @property
    def live_waiting(self) -> int:
        """Queued requests still waiting for a slot (their future not done)."""
        return sum(1 for f in self._waiters if not f.done())

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def free_slots(self) -> int:
        return max(0, self._max_concurrent - self._in_flight)

    @property
    def busy(self) -> bool:
        return bool(self._waiters) or self._in_flight > 0

    @property
    def closed(self) -> bool:
        return self._closed

    def drift(self) -> int:
        """admitted - finished - waiting - in flight: zero unless accounting is broken."""
        return self.admitted_total - self.finished_total - self.waiting - self._in_flight

    def is_work_conserving(self) -> bool:
        """False if a slot is free while a live waiter waits: a stranded request (a bug)."""
        # in_flight first: when all slots are busy this is O(1), however long the queue.
        return not (self._in_flight < self._max_concurrent and self.live_waiting > 0)

    def stalled_seconds(self, now: float | None = None) -> float:
        """How long live waiters have waited while a slot was free; 0.0 unless a bug."""
        if self._stall_since is None or self.is_work_conserving():
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self._stall_since)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Shut down: end every live wait with ShuttingDown and refuse later requests.

        Holders keep their slot and release it normally. Each ended waiter removes
        itself and counts itself finished when its task resumes.
        """
        self._closed = True
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(ShuttingDown(self.name))
        self._note_stall()

    # ------------------------------------------------------------------ the slot

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one concurrency slot for the body of the ``async with``.

        Yields the seconds spent queued. Raises ShuttingDown after close() and QueueFull
        when the queue is full (both count nothing), QueueTimeout after
        ``queue_timeout_s`` of waiting.
        """
        if self._closed:
            raise ShuttingDown(self.name)
        started = time.monotonic()
        if self._in_flight < self._max_concurrent:
            # Work-conserving: a free slot means no live waiter, so this jumps nobody.
            self._enter()
            self._in_flight += 1
        else:
            if len(self._waiters) >= self._max_queue:
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
        """Queue until _dispatch hands this request a slot (FIFO)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._enter()
        self._waiters.append(fut)
        self._note_stall()
        # The timeout fails the future itself rather than wrapping it in wait_for(shield()):
        # on Python 3.11 that wrapper swallows a cancel landing just after the handoff.
        timer = (loop.call_later(self._queue_timeout_s, self._expire, fut)
                 if self._queue_timeout_s > 0 else None)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a slot (already counted in flight) just as we gave up: pass it on.
                self._release()
            else:
                fut.cancel()  # no-op if done; else no dispatch may hand it a slot now
                self._remove_waiter(fut)
                self._finish()
                self._dispatch()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, fut: asyncio.Future[None]) -> None:
        """Queue timeout: fail the wait; the waiter's own task removes it and counts it."""
        if not fut.done():
            fut.set_exception(QueueTimeout(self.name))

    def _remove_waiter(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            self.anomalies_total += 1  # only this waiter removes its own unserved future

    def _finish(self) -> None:
        self.finished_total += 1
        self.last_used = time.monotonic()

    def _release(self) -> None:
        """Give a held slot back, then let the oldest live waiter have it."""
        self._finish()
        if self._in_flight <= 0:
            self.anomalies_total += 1
        else:
            self._in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """While a slot is free, hand it to the oldest live waiter (skipping done ones)."""
        while self._in_flight < self._max_concurrent:
            fut = next((f for f in self._waiters if not f.done()), None)
            if fut is None:
                break
            self._waiters.remove(fut)
            self._in_flight += 1  # counted in flight now, before its task resumes
            fut.set_result(None)
        self._note_stall()

    def _note_stall(self) -> None:
        """Stamp when a stall starts (or clear it); an independent check on _dispatch."""
        if self.is_work_conserving():
            self._stall_since = None
        elif self._stall_since is None:
            self._stall_since = time.monotonic()
