"""ModelAdmission cannot drift or strand a request: every await point, every step.

The seed gateway double-decremented its queue counter when an exception landed
between a decrement and its flag; a later version left a slot free while a request
waited forever (a cancelled waiter at the head of the queue swallowed the handoff).
Here every interleaving we can reach is driven step by step, and after every step
admitted == finished + waiting + in flight, and no live waiter waits while a slot
is free (work-conserving).
"""
from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.admission import ModelAdmission, QueueFull, QueueTimeout, ShuttingDown


def check(adm: ModelAdmission, in_flight_cap: int | None = None,
          waiting_cap: int | None = None) -> None:
    """Both invariants. The caps allow what a shrinking resize() leaves behind."""
    assert adm.admitted_total == adm.finished_total + adm.waiting + adm.in_flight
    assert adm.drift() == 0
    assert 0 <= adm.in_flight <= (adm.max_concurrent if in_flight_cap is None else in_flight_cap)
    assert 0 <= adm.live_waiting <= adm.waiting
    assert adm.waiting <= (adm.max_queue if waiting_cap is None else waiting_cap)
    assert adm.anomalies_total == 0
    # Work-conserving: a free slot and a live waiter never coexist between steps.
    if adm.in_flight < adm.max_concurrent:
        assert adm.live_waiting == 0, (
            f"stranded: {adm.live_waiting} waiting with {adm.free_slots} slot(s) free")
    assert adm.is_work_conserving()
    assert adm.stalled_seconds() == 0.0
    assert adm.free_slots == max(0, adm.max_concurrent - adm.in_flight)
    if adm.closed:
        assert adm.live_waiting == 0


class Watch:
    """check() after every step; in flight and waiting may exceed a shrunk limit only
    by what was already there (a shrinking resize() preempts nobody)."""

    def __init__(self, adm: ModelAdmission) -> None:
        self.adm = adm
        self.in_flight = adm.in_flight
        self.waiting = adm.waiting

    def __call__(self) -> None:
        adm = self.adm
        check(adm, max(self.in_flight, adm.max_concurrent), max(self.waiting, adm.max_queue))
        self.in_flight, self.waiting = adm.in_flight, adm.waiting


class Boom(Exception):
    pass


async def client(adm: ModelAdmission, hold_steps: int, fail: bool, log: list) -> None:
    """One request: take a slot, hold it for some loop iterations, maybe raise."""
    log.append("arrived")
    try:
        async with adm.slot():
            log.append("in")
            for _ in range(hold_steps):
                await asyncio.sleep(0)
            if fail:
                raise Boom()
    except (QueueFull, Boom):
        pass


async def drive(adm: ModelAdmission, tasks: list[asyncio.Task], cancel_at: dict[int, int],
                max_steps: int = 200) -> None:
    """Advance the loop one iteration at a time, cancelling task i at step cancel_at[i]."""
    for n in range(max_steps):
        for i, at in cancel_at.items():
            if at == n:
                tasks[i].cancel()
        await asyncio.sleep(0)
        check(adm)
        if all(t.done() for t in tasks):
            break
    await asyncio.gather(*tasks, return_exceptions=True)
    check(adm)
    assert adm.waiting == 0 and adm.in_flight == 0


async def test_cancel_at_every_step_leaves_no_count():
    """Exhaustive: every (victim, step) pair, plus pairs of victims, with queueing."""
    holds = [3, 1, 4, 2, 5]
    steps = range(0, 14)
    scenarios = [{v: s} for v in range(len(holds)) for s in steps]
    scenarios += [{a: s, b: s2} for a, b in itertools.combinations(range(len(holds)), 2)
                  for s, s2 in ((1, 1), (2, 5), (6, 3))]
    for cancel_at in scenarios:
        adm = ModelAdmission("m", max_concurrent=2, max_queue=3)
        log: list = []
        tasks = [asyncio.create_task(client(adm, h, False, log)) for h in holds]
        await drive(adm, tasks, cancel_at)
        # at most 2 running + 3 queued: every request that arrived was admitted
        assert adm.admitted_total == log.count("arrived") and adm.rejected_total == 0


async def test_exception_inside_slot_at_every_step_releases_once():
    for failing in range(4):
        for hold in range(4):
            adm = ModelAdmission("m", max_concurrent=1, max_queue=4)
            tasks = [asyncio.create_task(client(adm, hold if i == failing else 1, i == failing, []))
                     for i in range(4)]
            await drive(adm, tasks, {})
            assert adm.finished_total == 4


async def test_queue_full_touches_no_counter():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=1)
    hold = asyncio.Event()

    async def holder():
        async with adm.slot():
            await hold.wait()

    t1 = asyncio.create_task(holder())
    t2 = asyncio.create_task(holder())
    await asyncio.sleep(0)
    before = (adm.admitted_total, adm.finished_total, adm.waiting, adm.in_flight)
    with pytest.raises(QueueFull):
        async with adm.slot():
            pass  # pragma: no cover - never entered
    assert (adm.admitted_total, adm.finished_total, adm.waiting, adm.in_flight) == before
    assert adm.rejected_total == 1
    hold.set()
    await asyncio.gather(t1, t2)
    check(adm)


async def test_waiters_are_served_first_come_first_served():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=10)
    order: list[int] = []
    gate = asyncio.Event()

    async def req(i: int):
        async with adm.slot():
            order.append(i)
            if i == 0:
                await gate.wait()

    tasks = [asyncio.create_task(req(0))]
    await asyncio.sleep(0)
    for i in range(1, 6):
        tasks.append(asyncio.create_task(req(i)))
        await asyncio.sleep(0)
    assert adm.waiting == 5
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4, 5]
    check(adm)


async def test_queue_timeout_gives_up_and_counts_it_finished():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5, queue_timeout_s=0.05)
    gate = asyncio.Event()

    async def holder():
        async with adm.slot():
            await gate.wait()

    t = asyncio.create_task(holder())
    await asyncio.sleep(0)
    with pytest.raises(QueueTimeout):
        async with adm.slot():
            pass  # pragma: no cover
    check(adm)
    assert adm.waiting == 0 and adm.finished_total == 1
    gate.set()
    await t
    check(adm)


async def test_cancel_after_handoff_passes_slot_on():
    """The nastiest window: a waiter is handed the slot and cancelled before it runs."""
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5)
    gate = asyncio.Event()
    ran: list[str] = []

    async def req(name: str, wait_gate: bool):
        async with adm.slot():
            ran.append(name)
            if wait_gate:
                await gate.wait()

    first = asyncio.create_task(req("first", True))
    await asyncio.sleep(0)
    second = asyncio.create_task(req("second", False))
    third = asyncio.create_task(req("third", False))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.sleep(0)  # first finishes: its slot is handed to second
    second.cancel()         # ...which is cancelled before it ever runs
    await asyncio.gather(first, second, third, return_exceptions=True)
    assert ran == ["first", "third"]
    check(adm)
    assert adm.in_flight == 0 and adm.waiting == 0


ops = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 12), st.booleans(),
                         st.one_of(st.none(), st.integers(0, 20))), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=ops, max_concurrent=st.integers(1, 3), max_queue=st.integers(0, 4))
def test_random_arrivals_failures_and_cancellations_never_drift(plan, max_concurrent, max_queue):
    async def scenario():
        adm = ModelAdmission("m", max_concurrent=max_concurrent, max_queue=max_queue)
        tasks: list[asyncio.Task] = []
        cancel_at: dict[int, int] = {}
        log: list[str] = []
        for i, (arrive_delay, hold, fail, cancel_step) in enumerate(plan):
            for _ in range(arrive_delay):
                await asyncio.sleep(0)
                check(adm)
            tasks.append(asyncio.create_task(client(adm, hold, fail, log)))
            if cancel_step is not None:
                cancel_at[i] = cancel_step
        await drive(adm, tasks, cancel_at)
        assert adm.admitted_total + adm.rejected_total == log.count("arrived")

    asyncio.run(scenario())


# --------------------------------------------------------------------------- work-conserving

async def req(adm: ModelAdmission, name: str, ran: list[str],
              gate: asyncio.Event | None = None) -> None:
    """One request: take a slot, note that it ran, hold it until ``gate`` (if any) opens."""
    async with adm.slot():
        ran.append(name)
        if gate is not None:
            await gate.wait()


async def step(adm: ModelAdmission, n: int = 1) -> None:
    for _ in range(n):
        await asyncio.sleep(0)
        check(adm)


async def finish_all(adm: ModelAdmission, tasks: list[asyncio.Task], max_steps: int = 100) -> None:
    """Step until every task is done, checking both invariants; fail on a hung one."""
    watch = Watch(adm)
    for _ in range(max_steps):
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0)
        watch()
    hung = [t for t in tasks if not t.done()]
    assert not hung, (f"{len(hung)} request(s) hung: in_flight={adm.in_flight} "
                      f"waiting={adm.waiting} live_waiting={adm.live_waiting}")
    await asyncio.gather(*tasks, return_exceptions=True)
    check(adm)
    assert adm.waiting == 0 and adm.in_flight == 0


@pytest.mark.parametrize("finisher", ["caller", "task"])
async def test_cancelled_waiter_does_not_strand_a_new_arrival(finisher):
    """The B/A/C bug, in this order as admission sees it, within one loop pass:
    queued B is cancelled (its future is cancelled at once; its task cleans up later
    in the pass), in-flight A finishes, new C arrives. The old code: A's release
    skipped B's dead future and freed the slot; C queued because B's future was still
    in the queue; B's cleanup removed itself and handed the free slot to nobody. A slot
    free, C waiting forever, drift still 0."""
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5)
    ran: list[str] = []
    gate = asyncio.Event()
    if finisher == "caller":
        held = adm.slot()           # A is this test itself: its exit is synchronous
        await held.__aenter__()
        a = None
    else:
        a = asyncio.create_task(req(adm, "A", ran, gate))
        await step(adm)
    b = asyncio.create_task(req(adm, "B", ran))
    await step(adm)
    assert (adm.in_flight, adm.waiting, adm.live_waiting) == (1, 1, 1)

    if finisher == "caller":
        c = asyncio.create_task(req(adm, "C", ran))  # C's slot() runs in the next pass
        b.cancel()                                   # B: future cancelled now
        await held.__aexit__(None, None, None)       # A finishes now
    else:
        gate.set()                                   # A's finish runs first in the pass,
        c = asyncio.create_task(req(adm, "C", ran))  # then C's arrival,
        b.cancel()                                   # then B's cleanup (future cancelled now)
    await asyncio.sleep(0)  # the one pass: A released, C arrived, B cleaned up
    assert "C" in ran or adm.in_flight == 1, (
        f"C stranded: in_flight={adm.in_flight} waiting={adm.waiting} drift={adm.drift()}")
    check(adm)
    await finish_all(adm, [t for t in (a, b, c) if t is not None])
    assert ran == (["A", "C"] if a else ["C"])
    assert b.cancelled()


@pytest.mark.parametrize("live_tail", [False, True])
async def test_several_cancelled_waiters_at_the_head(live_tail):
    """Two slots, three dead futures at the head of the queue (and maybe a live waiter
    behind them): both holders finish and two requests arrive in the same pass."""
    adm = ModelAdmission("m", max_concurrent=2, max_queue=6)
    ran: list[str] = []
    gate = asyncio.Event()
    holders = [asyncio.create_task(req(adm, f"A{i}", ran, gate)) for i in range(2)]
    await step(adm)
    dead = [asyncio.create_task(req(adm, f"B{i}", ran)) for i in range(3)]
    await step(adm)
    tail = [asyncio.create_task(req(adm, "D", ran))] if live_tail else []
    await step(adm)
    assert adm.in_flight == 2 and adm.live_waiting == 3 + live_tail

    gate.set()
    later = asyncio.Event()
    new = [asyncio.create_task(req(adm, f"C{i}", ran, later)) for i in range(2)]
    for t in dead:
        t.cancel()
    await step(adm)  # the pass: A0, A1 release, C0, C1 arrive, the B's clean up
    assert adm.in_flight == 2
    if live_tail:  # A0's slot went to D (FIFO), A1's to C0; C1 queues behind nobody live
        assert ran == ["A0", "A1", "C0"] and adm.live_waiting == 1
    else:
        assert ran == ["A0", "A1", "C0", "C1"] and adm.live_waiting == 0
    later.set()
    await finish_all(adm, holders + dead + tail + new)
    assert ran == ["A0", "A1", "C0"] + (["D", "C1"] if live_tail else ["C1"])
    assert all(t.cancelled() for t in dead)


@pytest.mark.parametrize("hold_ms", [0, 3, 6, 10, 15])
async def test_cancellations_and_timeouts_mixed(hold_ms):
    """Dead futures (cancelled, no timeout) ahead of waiters with a queue timeout that
    may fire before, while or after the holder finishes; cancels land in the same pass
    as the release and new arrivals. Checked after every step; nobody hangs."""
    adm = ModelAdmission("m", max_concurrent=1, max_queue=10)
    ran: list[str] = []
    gate = asyncio.Event()
    holder = asyncio.create_task(req(adm, "H", ran, gate))
    await step(adm)
    untimed = [asyncio.create_task(req(adm, f"U{i}", ran)) for i in range(2)]
    await step(adm)
    adm.resize(1, 10, queue_timeout_s=0.008)
    timed = [asyncio.create_task(req(adm, f"T{i}", ran)) for i in range(3)]
    await step(adm)
    assert adm.live_waiting == 5

    watch = Watch(adm)
    end = asyncio.get_running_loop().time() + hold_ms / 1000
    while asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0)
        watch()
    gate.set()
    arrivals = [asyncio.create_task(req(adm, f"N{i}", ran)) for i in range(2)]
    untimed[0].cancel()
    timed[1].cancel()
    tasks = [holder, *untimed, *timed, *arrivals]
    deadline = asyncio.get_running_loop().time() + 1.0
    while not all(t.done() for t in tasks) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0)
        watch()
    await finish_all(adm, tasks)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, (QueueTimeout, asyncio.CancelledError)) for r in results)
    assert "U1" in ran  # no timeout, not cancelled: always served (the rest may time out)
    assert "U0" not in ran and "T1" not in ran
    assert adm.finished_total == adm.admitted_total


@pytest.mark.parametrize("queue_timeout_s", [0.0, 30.0])
async def test_cancel_after_handoff_passes_slot_on_to_a_new_arrival(queue_timeout_s):
    """B is handed the slot and cancelled before it runs, while C arrives in that pass:
    C queues (the slot is B's), and B's cleanup passes the slot on to C."""
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5, queue_timeout_s=queue_timeout_s)
    ran: list[str] = []
    gate = asyncio.Event()
    a = asyncio.create_task(req(adm, "A", ran, gate))
    await step(adm)
    b = asyncio.create_task(req(adm, "B", ran))
    await step(adm)
    gate.set()
    await asyncio.sleep(0)   # A finishes: the slot is handed to B (in flight, not yet resumed)
    check(adm)
    assert adm.in_flight == 1 and adm.waiting == 0 and "B" not in ran
    b.cancel()
    c = asyncio.create_task(req(adm, "C", ran))
    await finish_all(adm, [a, b, c])
    assert ran == ["A", "C"]


@pytest.mark.parametrize("queue_timeout_s", [0.0, 30.0])
async def test_cancel_after_handoff_with_nobody_behind_frees_the_slot(queue_timeout_s):
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5, queue_timeout_s=queue_timeout_s)
    ran: list[str] = []
    gate = asyncio.Event()
    a = asyncio.create_task(req(adm, "A", ran, gate))
    await step(adm)
    b = asyncio.create_task(req(adm, "B", ran))
    await step(adm)
    gate.set()
    await asyncio.sleep(0)
    b.cancel()
    await finish_all(adm, [a, b])
    assert ran == ["A"] and adm.free_slots == 1
    async with adm.slot() as waited:  # the freed slot is usable at once
        assert waited < 0.5 and adm.in_flight == 1
    check(adm)


async def test_fifo_survives_dead_futures_between_live_waiters():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=10)
    ran: list[str] = []
    gate = asyncio.Event()
    tasks = [asyncio.create_task(req(adm, "A", ran, gate))]
    await step(adm)
    for name in "bcdefg":
        tasks.append(asyncio.create_task(req(adm, name, ran)))
        await step(adm)
    for t in tasks[2::2]:  # c, e, g
        t.cancel()
    gate.set()
    await finish_all(adm, tasks)
    assert ran == ["A", "b", "d", "f"]


# --------------------------------------------------------------------------- close()

def counters(adm: ModelAdmission) -> tuple[int, ...]:
    return (adm.admitted_total, adm.finished_total, adm.rejected_total, adm.anomalies_total,
            adm.waiting, adm.in_flight)


async def outcome(adm: ModelAdmission, name: str, log: dict[str, str],
                  gate: asyncio.Event | None = None) -> None:
    try:
        async with adm.slot():
            log[name] = "in"
            if gate is not None:
                await gate.wait()
        log[name] = "done"
    except ShuttingDown:
        log[name] = "shutdown"


@pytest.mark.parametrize("queue_timeout_s", [0.0, 30.0])
async def test_close_ends_every_wait_and_spares_holders(queue_timeout_s):
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5, queue_timeout_s=queue_timeout_s)
    log: dict[str, str] = {}
    gate = asyncio.Event()
    a = asyncio.create_task(outcome(adm, "A", log, gate))
    await step(adm)
    waiters = [asyncio.create_task(outcome(adm, n, log)) for n in ("B", "C")]
    await step(adm)
    assert adm.waiting == 2 and not adm.closed

    adm.close()
    assert adm.closed and adm.live_waiting == 0 and adm.in_flight == 1
    check(adm)
    for _ in range(20):  # A still holds its slot: step until the waiters are gone
        if all(t.done() for t in waiters):
            break
        await step(adm)
    assert all(t.done() for t in waiters)
    assert log == {"A": "in", "B": "shutdown", "C": "shutdown"}
    assert adm.waiting == 0 and adm.finished_total == 2 and adm.in_flight == 1

    before = counters(adm)
    with pytest.raises(ShuttingDown):
        async with adm.slot():
            pass  # pragma: no cover - never entered
    assert counters(adm) == before  # refused at once, nothing counted

    assert not a.done()  # the holder is unaffected and releases normally
    gate.set()
    await finish_all(adm, [a])
    assert log["A"] == "done" and adm.finished_total == adm.admitted_total == 3
    adm.close()  # idempotent
    check(adm)


async def test_close_spares_a_waiter_already_handed_a_slot():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5)
    log: dict[str, str] = {}
    gate = asyncio.Event()
    tasks = [asyncio.create_task(outcome(adm, "A", log, gate))]
    await step(adm)
    tasks += [asyncio.create_task(outcome(adm, n, log)) for n in ("B", "C")]
    await step(adm)
    gate.set()
    await asyncio.sleep(0)  # A released: B handed the slot, not yet resumed
    assert adm.in_flight == 1 and adm.live_waiting == 1 and "B" not in log
    adm.close()
    await finish_all(adm, tasks)
    assert log == {"A": "done", "B": "done", "C": "shutdown"}


async def test_close_with_nothing_queued_refuses_new_requests():
    adm = ModelAdmission("m", max_concurrent=2, max_queue=0)
    adm.close()
    for _ in range(3):
        with pytest.raises(ShuttingDown):
            async with adm.slot():
                pass  # pragma: no cover
    assert counters(adm) == (0, 0, 0, 0, 0, 0)


# --------------------------------------------------------------------------- resize()

async def test_resize_growing_admits_waiters_at_once_in_fifo_order():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5)
    ran: list[str] = []
    gate = asyncio.Event()
    tasks = []
    for name in "ABCDE":
        tasks.append(asyncio.create_task(req(adm, name, ran, gate)))
        await step(adm)
    assert adm.in_flight == 1 and adm.waiting == 4
    adm.resize(3, 5)
    assert adm.in_flight == 3 and adm.waiting == 2 and adm.live_waiting == 2  # synchronous
    check(adm)
    await step(adm)
    assert ran == ["A", "B", "C"]
    gate.set()
    await finish_all(adm, tasks)
    assert ran == list("ABCDE")


async def test_resize_shrinking_preempts_no_holder_and_admits_nobody_until_below():
    adm = ModelAdmission("m", max_concurrent=3, max_queue=5)
    ran: list[str] = []
    gates = [asyncio.Event() for _ in range(3)]
    holders = [asyncio.create_task(req(adm, f"A{i}", ran, g)) for i, g in enumerate(gates)]
    await step(adm)
    waiters = [asyncio.create_task(req(adm, f"W{i}", ran)) for i in range(2)]
    await step(adm)
    assert adm.in_flight == 3 and adm.waiting == 2

    adm.resize(1, 5)
    watch = Watch(adm)  # caps: the 3 holders stay; nobody new until in_flight < 1
    assert adm.in_flight == 3 and adm.waiting == 2 and adm.free_slots == 0
    late = asyncio.create_task(req(adm, "N", ran))  # arrives while over the limit: queues
    await asyncio.sleep(0)
    watch()
    assert adm.waiting == 3
    for i, g in enumerate(gates):
        g.set()
        await asyncio.sleep(0)
        watch()
        assert adm.in_flight <= 3 - i  # never grows while at or over the limit
        if i < 2:
            assert adm.live_waiting == 3 and ran == ["A0", "A1", "A2"]
    await finish_all(adm, holders + waiters + [late])
    assert ran == ["A0", "A1", "A2", "W0", "W1", "N"]


async def test_resize_shrinking_max_queue_keeps_queued_requests():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=4)
    ran: list[str] = []
    gate = asyncio.Event()
    tasks = [asyncio.create_task(req(adm, "A", ran, gate))]
    await step(adm)
    tasks += [asyncio.create_task(req(adm, f"W{i}", ran)) for i in range(3)]
    await step(adm)
    adm.resize(1, 1)
    assert adm.waiting == 3 and adm.max_queue == 1
    before = counters(adm)
    with pytest.raises(QueueFull):
        async with adm.slot():
            pass  # pragma: no cover
    after = counters(adm)
    assert after[2] == before[2] + 1 and after[:2] + after[3:] == before[:2] + before[3:]
    gate.set()
    await finish_all(adm, tasks)
    assert ran == ["A", "W0", "W1", "W2"]


async def test_resize_queue_timeout_applies_to_new_waiters_only():
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5)
    ran: list[str] = []
    gate = asyncio.Event()
    a = asyncio.create_task(req(adm, "A", ran, gate))
    w1 = asyncio.create_task(req(adm, "W1", ran))  # waits with no timeout
    await step(adm)
    adm.resize(1, 5, queue_timeout_s=0.01)
    assert adm.queue_timeout_s == 0.01
    with pytest.raises(QueueTimeout):
        async with adm.slot():
            pass  # pragma: no cover
    check(adm)
    assert not w1.done() and adm.waiting == 1
    adm.resize(1, 5)  # None keeps the timeout
    assert adm.queue_timeout_s == 0.01
    gate.set()
    await finish_all(adm, [a, w1])
    assert ran == ["A", "W1"]


@pytest.mark.parametrize("limits", [(0, 1, 0.0), (1, -1, 0.0), (1, 1, -1.0)])
def test_impossible_limits_are_refused(limits):
    with pytest.raises(ValueError):
        ModelAdmission("m", *limits)
    adm = ModelAdmission("m", 2, 3, 1.0)
    with pytest.raises(ValueError):
        adm.resize(*limits)
    assert (adm.max_concurrent, adm.max_queue, adm.queue_timeout_s) == (2, 3, 1.0)


def test_limits_change_only_through_resize():
    """A bare attribute write would skip _dispatch and could strand waiters."""
    adm = ModelAdmission("m", 1, 1)
    for attr in ("max_concurrent", "max_queue", "queue_timeout_s"):
        with pytest.raises(AttributeError):
            setattr(adm, attr, 5)


# --------------------------------------------------------------------------- stalled_seconds()

async def test_stalled_seconds_measures_a_reintroduced_stall(monkeypatch):
    """Zero by design; if a bug strands a waiter next to a free slot, it grows."""
    adm = ModelAdmission("m", max_concurrent=1, max_queue=5)
    ran: list[str] = []
    gate = asyncio.Event()
    a = asyncio.create_task(req(adm, "A", ran, gate))
    await step(adm)
    b = asyncio.create_task(req(adm, "B", ran))
    await step(adm)
    assert adm.stalled_seconds() == 0.0 and adm.is_work_conserving()

    monkeypatch.setattr(adm, "_dispatch", adm._note_stall)  # the bug: hand the slot to nobody
    gate.set()
    await asyncio.sleep(0)
    await a
    assert adm.in_flight == 0 and adm.live_waiting == 1 and adm.free_slots == 1
    assert not adm.is_work_conserving()
    later = asyncio.get_running_loop().time() + 10  # the loop's clock is time.monotonic
    assert 10 <= adm.stalled_seconds(now=later) < 11
    assert adm.stalled_seconds() > 0

    monkeypatch.undo()
    adm.resize(1, 5)  # any dispatch repairs it
    assert adm.stalled_seconds(now=later) == 0.0 and adm.in_flight == 1
    await finish_all(adm, [b])
    assert ran == ["A", "B"]


# --------------------------------------------------------------------------- interleavings

class Client:
    """A request the plan drives: it holds its slot until ``release`` is set."""

    def __init__(self, adm: ModelAdmission, fail: bool) -> None:
        self.adm = adm
        self.fail = fail
        self.release = asyncio.Event()
        self.outcome = "not started"
        self.arrived_closed: bool | None = None
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        self.arrived_closed = self.adm.closed
        self.outcome = "arrived"
        try:
            async with self.adm.slot():
                self.outcome = "in"
                await self.release.wait()
                if self.fail:
                    raise Boom()
            self.outcome = "done"
        except QueueFull:
            self.outcome = "full"
        except QueueTimeout:
            self.outcome = "timeout"
        except ShuttingDown:
            self.outcome = "shutdown"
        except Boom:
            self.outcome = "boom"


def pick(clients: list[Client], outcome: str, k: int) -> Client | None:
    """The k-th (mod) live client in that state: "in" holds a slot, "arrived" queues."""
    pool = [c for c in clients if c.outcome == outcome and not c.task.done()]
    return pool[k % len(pool)] if pool else None


idx = st.integers(0, 7)
# A release, an arrival and a cancel of a queued request in one pass, in any order.
churn = st.tuples(st.just("churn"), st.permutations(["finish", "arrive", "cancel_queued"]), idx)
arrive = st.tuples(st.just("arrive"), st.booleans())        # fail inside the slot?
step_op = st.tuples(st.just("step"), st.integers(1, 3))      # ops between steps share a pass
plan_op = st.one_of(
    arrive, arrive, arrive, step_op, step_op,                # weighted: fill slots and queue
    st.tuples(st.just("finish"), idx),                       # a holder releases
    st.tuples(st.just("cancel_queued"), idx),
    st.tuples(st.just("cancel_held"), idx),
    st.tuples(st.just("wait"), st.sampled_from([0.001, 0.004])),  # real time: timeouts fire
    st.tuples(st.just("resize"), st.integers(1, 4), st.integers(0, 4),
              st.sampled_from([None, 0.0, 0.002, 0.02])),
    churn, churn,
)
# The B/A/C bug as a plan: A in, B queued; A finishes, C arrives, B cancelled; one pass.
BAC = [("arrive", False), ("step", 1), ("arrive", False), ("step", 1),
       ("finish", 0), ("arrive", False), ("cancel_queued", 0), ("step", 1)]


def expand(plan: list[tuple]) -> list[tuple]:
    """Unroll each churn into its ops, with nothing (no loop step) between them."""
    out: list[tuple] = []
    for op, *args in plan:
        if op == "churn":
            order, k = args
            out += [(o, False) if o == "arrive" else (o, k) for o in order]
        else:
            out.append((op, *args))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(plan_op, min_size=4, max_size=30), max_concurrent=st.integers(1, 3),
       max_queue=st.integers(0, 4), queue_timeout_s=st.sampled_from([0.0, 0.002]),
       close_at=st.one_of(st.none(), st.integers(0, 30)),  # close() before that op, once
       prefill=st.integers(0, 6))  # requests that arrive (one step) before the plan starts
@example(plan=BAC, max_concurrent=1, max_queue=2, queue_timeout_s=0.0, close_at=None, prefill=0)
@example(plan=[("churn", ["finish", "arrive", "cancel_queued"], 0), ("resize", 1, 2, None),
               ("step", 1), ("arrive", False), ("step", 1)],
         max_concurrent=1, max_queue=2, queue_timeout_s=0.0, close_at=3, prefill=2)
def test_random_interleavings_stay_work_conserving(plan, max_concurrent, max_queue,
                                                   queue_timeout_s, close_at, prefill):
    """Arrivals, finishes, failures, cancellations (queued and in flight), timeouts,
    resize and close in any order; both invariants after every op and every loop step,
    then nobody hung and everything drained."""
    async def scenario() -> None:
        adm = ModelAdmission("m", max_concurrent, max_queue, queue_timeout_s)
        watch = Watch(adm)
        clients = [Client(adm, fail=False) for _ in range(prefill)]
        await asyncio.sleep(0)
        watch()
        loop = asyncio.get_running_loop()
        for i, (op, *args) in enumerate(expand(plan)):
            if i == close_at:
                adm.close()
                watch()
            if op == "arrive":
                clients.append(Client(adm, fail=args[0]))
            elif op == "finish" and (c := pick(clients, "in", args[0])):
                c.release.set()
            elif op.startswith("cancel") and (
                    c := pick(clients, "arrived" if op == "cancel_queued" else "in", args[0])):
                c.task.cancel()
            elif op == "step":
                for _ in range(args[0]):
                    await asyncio.sleep(0)
                    watch()
            elif op == "wait":
                end = loop.time() + args[0]
                while loop.time() < end:
                    await asyncio.sleep(0)
                    watch()
            elif op == "resize":
                adm.resize(*args)
            watch()
        await asyncio.sleep(0)  # let the plan's last pass run before teardown releases all
        watch()
        for c in clients:
            c.release.set()
        for _ in range(20 + 10 * len(clients)):
            if all(c.task.done() for c in clients):
                break
            await asyncio.sleep(0)
            watch()
        hung = [c.outcome for c in clients if not c.task.done()]
        assert not hung, f"hung requests: {hung}"
        assert adm.waiting == 0 and adm.in_flight == 0
        check(adm)
        started = [c for c in clients if c.arrived_closed is not None]
        refused = [c for c in started if c.arrived_closed]
        assert all(c.outcome == "shutdown" for c in refused)  # at once, nothing counted
        assert adm.admitted_total + adm.rejected_total == len(started) - len(refused)
        assert adm.rejected_total == sum(c.outcome == "full" for c in clients)
        assert adm.finished_total == adm.admitted_total

    asyncio.run(scenario())
