"""Per-model admission: a bounded, fair queue in front of a concurrency limit.

``ModelAdmission`` is the only writer of its counts, and of each key's ``KeyLoad``;
every change happens in synchronous code (no ``await`` between reading and writing),
each entry paired with its exit in one ``finally``: no exception or cancellation at an
await point can leave a count behind or take one away twice. A key's counts change in
the same step as the model's, so the two cannot disagree.

It is work-conserving by construction: every change that can free a slot or remove
a waiter ends in one synchronous ``_dispatch()``, which hands free slots to live
waiters. So between loop steps a free slot and a live waiter never coexist, and a
request that finds a free slot may enter at once without jumping the queue.

Who is served next: the highest priority band with a live waiter; within it, keys
take turns by smooth weighted round-robin (a key of weight 2 gets two turns to
another's one), so a key flooding a model cannot starve the others; within a key,
first come first served. Without keys every request is the anonymous key's: FIFO.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from gateway.keys import ANONYMOUS, Tenant


class QueueFull(Exception):
    """The queue (or the key's or band's share of it) is full."""

    def __init__(self, model: str, why: str = "") -> None:
        super().__init__(model)
        self.why = why


class QueueTimeout(Exception):
    """A request waited longer than the queue timeout for a slot."""


class ShuttingDown(Exception):
    """The model's admission was closed: it takes no new requests."""


class KeyBusy(Exception):
    """The key already has its ``max_concurrent`` requests in the gateway."""


@dataclass
class KeyLoad:
    """One key's requests in the gateway, all models together (queued or holding a
    slot, and holding a slot). Written only by ModelAdmission, kept across reloads."""

    active: int = 0
    held: int = 0


class _Waiter:
    __slots__ = ("fut", "key", "band", "weight", "load", "seq")

    def __init__(self, fut: asyncio.Future[None], key: str, band: int, weight: int,
                 load: KeyLoad, seq: int) -> None:
        self.fut, self.key, self.band, self.weight, self.load, self.seq = (
            fut, key, band, weight, load, seq)


_ANONYMOUS = Tenant(ANONYMOUS)  # requests given no tenant (tests, direct callers)


class ModelAdmission:
    def __init__(self, name: str, max_concurrent: int, max_queue: int,
                 queue_timeout_s: float = 0.0) -> None:
        self.name = name
        self._max_concurrent = 0
        self._max_queue = 0
        self._queue_timeout_s = 0.0
        self._set_limits(max_concurrent, max_queue, queue_timeout_s)
        # Queued requests by band, then key, oldest first. A done one (cancelled, or failed
        # by close()) stays until its own task removes it, so that "waiting" and "finished"
        # change together in one synchronous step and drift stays exact.
        self._bands: dict[int, dict[str, deque[_Waiter]]] = {}
        self._credit: dict[tuple[int, str], int] = {}  # smooth weighted round-robin
        self._waiting = 0
        self._seq = 0
        self._queued_by_key: dict[str, int] = {}
        self._held_by_key: dict[str, int] = {}
        self._in_flight = 0
        self._closed = False
        self._stall_since: float | None = None  # monotonic start of a stall, see stalled_seconds
        self._anonymous_load = KeyLoad()
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
        return self._waiting

    def _all_waiters(self):
        for queues in self._bands.values():
            for dq in queues.values():
                yield from dq

    @property
    def live_waiting(self) -> int:
        """Queued requests still waiting for a slot (their future not done)."""
        return sum(1 for w in self._all_waiters() if not w.fut.done())

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def free_slots(self) -> int:
        return max(0, self._max_concurrent - self._in_flight)

    @property
    def busy(self) -> bool:
        return self._waiting > 0 or self._in_flight > 0

    @property
    def closed(self) -> bool:
        return self._closed

    def by_key(self) -> dict[str, tuple[int, int]]:
        """(queued, in flight) per key with any: what each key holds of this model."""
        keys = set(self._queued_by_key) | set(self._held_by_key)
        return {k: (self._queued_by_key.get(k, 0), self._held_by_key.get(k, 0)) for k in keys}

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
        for w in self._all_waiters():
            if not w.fut.done():
                w.fut.set_exception(ShuttingDown(self.name))
        self._note_stall()

    # ------------------------------------------------------------------ the slot

    def slot(self, tenant: Tenant | None = None, load: KeyLoad | None = None) -> Slot:
        """Hold one concurrency slot for the body of the ``async with``.

        ``tenant`` is whose request it is (None: the anonymous key) and ``load`` that
        key's counts across models. Gives the seconds spent queued. Raises
        ShuttingDown after close(), KeyBusy when the key is at its max_concurrent, and
        QueueFull when the queue, the band's or the key's share of it is full (these
        count nothing); QueueTimeout after ``queue_timeout_s`` of waiting.
        """
        return Slot(self, tenant or _ANONYMOUS, load or self._anonymous_load)

    async def _take(self, tenant: Tenant, load: KeyLoad) -> float:
        """A slot for ``tenant``, now or after queuing; the seconds it waited."""
        if self._closed:
            raise ShuttingDown(self.name)
        if tenant.max_concurrent is not None and load.active >= tenant.max_concurrent:
            self.rejected_total += 1
            raise KeyBusy(tenant.name)
        started = time.monotonic()
        if self._in_flight < self._max_concurrent:
            # Work-conserving: a free slot means no live waiter, so this jumps nobody.
            self._enter(load)
            self._hold(tenant.name, load)
            return 0.0
        why = self._queue_refusal(tenant)
        if why:
            self.rejected_total += 1
            raise QueueFull(self.name, why)
        await self._wait_for_handoff(tenant, load)
        return time.monotonic() - started

    def _queue_refusal(self, tenant: Tenant) -> str:
        """Why this key may not queue here now, or ''."""
        if self._waiting >= self._max_queue:
            return f"{self._waiting} waiting, max_queue {self._max_queue}"
        if tenant.queue_share < 1:
            depth = math.floor(self._max_queue * tenant.queue_share)
            if self._waiting >= depth:
                return (f"{self._waiting} waiting; priority {tenant.band_name!r} may queue "
                        f"only while fewer than {depth} wait")
        if tenant.max_queued is not None and \
                self._queued_by_key.get(tenant.name, 0) >= tenant.max_queued:
            return f"key {tenant.name!r} already has its max_queued {tenant.max_queued} waiting"
        return ""

    def _enter(self, load: KeyLoad) -> None:
        self.admitted_total += 1
        load.active += 1
        self.last_used = time.monotonic()

    def _hold(self, key: str, load: KeyLoad) -> None:
        self._in_flight += 1
        load.held += 1
        self._held_by_key[key] = self._held_by_key.get(key, 0) + 1

    async def _wait_for_handoff(self, tenant: Tenant, load: KeyLoad) -> None:
        """Queue until _dispatch hands this request a slot."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._enter(load)
        self._seq += 1
        waiter = _Waiter(fut, tenant.name, tenant.band, tenant.weight, load, self._seq)
        self._bands.setdefault(tenant.band, {}).setdefault(tenant.name, deque()).append(waiter)
        self._waiting += 1
        self._queued_by_key[tenant.name] = self._queued_by_key.get(tenant.name, 0) + 1
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
                self._release(tenant.name, load)
            else:
                fut.cancel()  # no-op if done; else no dispatch may hand it a slot now
                self._remove_waiter(waiter)
                self._finish(load)
                self._dispatch()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, fut: asyncio.Future[None]) -> None:
        """Queue timeout: fail the wait; the waiter's own task removes it and counts it."""
        if not fut.done():
            fut.set_exception(QueueTimeout(self.name))

    def _remove_waiter(self, waiter: _Waiter) -> None:
        queues = self._bands.get(waiter.band, {})
        dq = queues.get(waiter.key)
        try:
            if dq is None:
                raise ValueError
            dq.remove(waiter)
        except ValueError:
            self.anomalies_total += 1  # only this waiter removes its own unserved future
            return
        self._unqueue(waiter, queues, dq)

    def _unqueue(self, waiter: _Waiter, queues: dict[str, deque[_Waiter]],
                 dq: deque[_Waiter]) -> None:
        self._waiting -= 1
        left = self._queued_by_key[waiter.key] - 1
        if left:
            self._queued_by_key[waiter.key] = left
        else:
            del self._queued_by_key[waiter.key]
        if not dq:
            del queues[waiter.key]
            self._credit.pop((waiter.band, waiter.key), None)
            if not queues:
                del self._bands[waiter.band]

    def _finish(self, load: KeyLoad) -> None:
        self.finished_total += 1
        if load.active <= 0:
            self.anomalies_total += 1
        else:
            load.active -= 1
        self.last_used = time.monotonic()

    def _release(self, key: str, load: KeyLoad) -> None:
        """Give a held slot back, then let the next live waiter have it."""
        self._finish(load)
        if self._in_flight <= 0:
            self.anomalies_total += 1
        else:
            self._in_flight -= 1
            load.held -= 1
            left = self._held_by_key.get(key, 0) - 1
            if left > 0:
                self._held_by_key[key] = left
            else:
                self._held_by_key.pop(key, None)
        self._dispatch()

    def _dispatch(self) -> None:
        """While a slot is free, hand it to the next live waiter (skipping done ones)."""
        if not self._waiting:  # nobody queued (the usual release): none to hand, no stall
            self._stall_since = None
            return
        while self._in_flight < self._max_concurrent:
            waiter = self._next_waiter()
            if waiter is None:
                break
            queues = self._bands[waiter.band]
            dq = queues[waiter.key]
            dq.remove(waiter)
            self._unqueue(waiter, queues, dq)
            self._hold(waiter.key, waiter.load)  # counted in flight now, before it resumes
            waiter.fut.set_result(None)
        self._note_stall()

    def _next_waiter(self) -> _Waiter | None:
        """The highest band's next live waiter: keys by smooth weighted round-robin,
        FIFO within a key."""
        for band in sorted(self._bands):
            heads = [w for dq in self._bands[band].values()
                     if (w := next((x for x in dq if not x.fut.done()), None)) is not None]
            if not heads:
                continue
            if len(heads) == 1:
                return heads[0]
            total = 0
            best: _Waiter | None = None
            best_credit = 0
            for w in heads:
                credit = self._credit.get((band, w.key), 0) + w.weight
                self._credit[(band, w.key)] = credit
                total += w.weight
                if best is None or credit > best_credit or (
                        credit == best_credit and w.seq < best.seq):
                    best, best_credit = w, credit
            assert best is not None
            self._credit[(band, best.key)] = best_credit - total
            return best
        return None

    def _note_stall(self) -> None:
        """Stamp when a stall starts (or clear it); an independent check on _dispatch."""
        if self.is_work_conserving():
            self._stall_since = None
        elif self._stall_since is None:
            self._stall_since = time.monotonic()


class Slot:
    """``async with admission.slot(...) as waited``: a slot is taken on entry (or the
    entry raises, holding nothing) and given back on exit, however the body ends. A
    class rather than ``@asynccontextmanager``: every request enters one, and a
    generator-based manager costs two generator steps and two objects more."""

    __slots__ = ("_admission", "_tenant", "_load")

    def __init__(self, admission: ModelAdmission, tenant: Tenant, load: KeyLoad) -> None:
        self._admission = admission
        self._tenant = tenant
        self._load = load

    async def __aenter__(self) -> float:
        return await self._admission._take(self._tenant, self._load)

    async def __aexit__(self, *exc_info: object) -> None:
        self._admission._release(self._tenant.name, self._load)
