"""Fair queuing and priorities in ``ModelAdmission``, and one accounting for keys.

Who is served next: the highest band first; within a band keys take turns (weighted);
FIFO within a key. A key's counts (``KeyLoad``) change in the same synchronous step as
the model's, so after every step, under any interleaving of arrivals, finishes,
cancels, timeouts, resizes and closes over several models: every model is drift-free
and work-conserving, and each key's counts equal the sum of what the models hold of it.
"""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_admission import check

from gateway.admission import KeyBusy, KeyLoad, ModelAdmission, QueueFull, QueueTimeout, ShuttingDown
from gateway.keys import Tenant

pytestmark = pytest.mark.timeout(120)


def tenant(name: str, **kw) -> Tenant:
    return Tenant(name, **kw)


async def flood(adm: ModelAdmission, requests: list[tuple[Tenant, KeyLoad, str]],
                done: list[str], hold_steps: int = 2) -> list[asyncio.Task]:
    """Queue ``requests`` in order (one loop step apart, so arrival order is theirs);
    each holds its slot a few loop steps and logs its label when it finishes."""
    async def one(t: Tenant, load: KeyLoad, label: str) -> None:
        async with adm.slot(t, load):
            for _ in range(hold_steps):
                await asyncio.sleep(0)
        done.append(label)

    tasks = []
    for t, load, label in requests:
        tasks.append(asyncio.create_task(one(t, load, label)))
        await asyncio.sleep(0)
    return tasks


def test_a_flooding_key_does_not_starve_one_queued_behind_it():
    """The issue's case: A queues 40 on a one-slot model, then B queues 5. B's 5 finish
    before 15 more of A's do (round-robin: about one of A's per one of B's)."""
    async def scenario() -> list[str]:
        adm = ModelAdmission("m", 1, 100)
        a, b = tenant("a"), tenant("b")
        la, lb = KeyLoad(), KeyLoad()
        done: list[str] = []
        tasks = await flood(adm, [(a, la, f"A{i}") for i in range(40)], done)
        a_done_when_b_arrived = sum(x.startswith("A") for x in done)
        tasks += await flood(adm, [(b, lb, f"B{i}") for i in range(5)], done)
        await asyncio.gather(*tasks)
        check(adm)
        assert (la.active, la.held, lb.active, lb.held) == (0, 0, 0, 0)
        return done, a_done_when_b_arrived

    done, before = asyncio.run(scenario())
    last_b = max(i for i, x in enumerate(done) if x.startswith("B"))
    a_between = sum(x.startswith("A") for x in done[:last_b]) - before
    assert a_between < 15, done
    assert a_between <= 6  # strictly alternating, give or take the slot holder
    assert [x for x in done if x.startswith("B")] == [f"B{i}" for i in range(5)]  # FIFO
    assert [x for x in done if x.startswith("A")] == [f"A{i}" for i in range(40)]


def test_weights_share_turns_and_priority_bands_go_first():
    async def scenario() -> list[str]:
        adm = ModelAdmission("m", 1, 100)
        heavy, light = tenant("heavy", weight=3), tenant("light", weight=1)
        vip = tenant("vip", band=0)
        batch = tenant("batch", band=1, band_name="batch")
        loads = {n: KeyLoad() for n in ("heavy", "light", "vip", "batch")}
        done: list[str] = []
        blocker = await flood(adm, [(vip, loads["vip"], "first")], done, hold_steps=30)
        tasks = await flood(adm, [(batch, loads["batch"], f"batch{i}") for i in range(3)], done)
        tasks += await flood(adm, [(heavy, loads["heavy"], f"H{i}") for i in range(12)]
                             + [(light, loads["light"], f"L{i}") for i in range(4)], done)
        await asyncio.gather(*blocker, *tasks)
        check(adm)
        return done

    done = asyncio.run(scenario())
    assert done[0] == "first"
    assert done[-3:] == ["batch0", "batch1", "batch2"]  # the lower band waits for the higher
    served = done[1:-3]
    first_eight = served[:8]
    assert sum(x.startswith("H") for x in first_eight) == 6  # 3:1 while both wait
    assert sum(x.startswith("L") for x in first_eight) == 2


def test_queue_shares_refuse_a_lower_band_and_a_key_earlier():
    async def scenario() -> None:
        adm = ModelAdmission("m", 1, 10)
        inter = tenant("i")
        batch = tenant("b", band=1, band_name="batch", queue_share=0.5)
        capped = tenant("c", max_queued=2)
        loads = {n: KeyLoad() for n in "ibc"}
        holder = await flood(adm, [(inter, loads["i"], "hold")], [], hold_steps=10_000)
        waiting = await flood(adm, [(inter, loads["i"], "x")] * 5, [])
        with pytest.raises(QueueFull) as full:
            async with adm.slot(batch, loads["b"]):
                pass
        assert "batch" in full.value.why and "5" in full.value.why
        waiting += await flood(adm, [(capped, loads["c"], "c")] * 2, [])
        with pytest.raises(QueueFull) as full:
            async with adm.slot(capped, loads["c"]):
                pass
        assert "max_queued 2" in full.value.why
        assert adm.waiting == 7 and adm.rejected_total == 2
        check(adm)
        for t in [*holder, *waiting]:
            t.cancel()
        await asyncio.gather(*holder, *waiting, return_exceptions=True)
        check(adm)
        assert all((ld.active, ld.held) == (0, 0) for ld in loads.values())

    asyncio.run(scenario())


def test_a_keys_max_concurrent_counts_every_model_and_its_queue():
    async def scenario() -> None:
        m1, m2 = ModelAdmission("m1", 1, 10), ModelAdmission("m2", 1, 10)
        k = tenant("k", max_concurrent=3)
        load = KeyLoad()
        tasks = await flood(m1, [(k, load, "a"), (k, load, "b")], [], hold_steps=10_000)
        tasks += await flood(m2, [(k, load, "c")], [], hold_steps=10_000)
        assert (load.active, load.held) == (3, 2)  # one of m1's is queued
        for adm in (m1, m2):
            with pytest.raises(KeyBusy):
                async with adm.slot(k, load):
                    pass
        assert m1.admitted_total == 2 and m2.admitted_total == 1  # a refusal counts nothing
        tasks[0].cancel()  # the holder on m1 leaves: its queued one takes the slot
        await asyncio.sleep(0)
        assert (load.active, load.held) == (2, 2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for adm in (m1, m2):
            check(adm)
        assert (load.active, load.held) == (0, 0)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- interleavings

KEYS = [tenant("a"), tenant("b", weight=2), tenant("c", band=1, band_name="batch",
                                                   queue_share=0.5),
        tenant("d", max_concurrent=2), tenant("e", max_queued=1)]


class Req:
    def __init__(self, adm: ModelAdmission, t: Tenant, load: KeyLoad) -> None:
        self.adm, self.tenant, self.load = adm, t, load
        self.release = asyncio.Event()
        self.outcome = "arrived"
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        try:
            async with self.adm.slot(self.tenant, self.load):
                self.outcome = "in"
                await self.release.wait()
            self.outcome = "done"
        except (QueueFull, KeyBusy, QueueTimeout, ShuttingDown) as exc:
            self.outcome = type(exc).__name__


def check_keys(models: list[ModelAdmission], loads: dict[str, KeyLoad]) -> None:
    """Every model's invariants, and each key's counts = what the models hold of it."""
    for adm in models:
        check(adm, in_flight_cap=10, waiting_cap=10)
    for t in KEYS:
        queued = sum(adm.by_key().get(t.name, (0, 0))[0] for adm in models)
        held = sum(adm.by_key().get(t.name, (0, 0))[1] for adm in models)
        load = loads[t.name]
        assert (load.active, load.held) == (queued + held, held), t.name
        if t.max_concurrent is not None:
            assert load.active <= t.max_concurrent


op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 1), st.integers(0, len(KEYS) - 1)),
    st.tuples(st.just("arrive"), st.integers(0, 1), st.integers(0, len(KEYS) - 1)),
    st.tuples(st.just("finish"), st.integers(0, 9)),
    st.tuples(st.just("cancel"), st.integers(0, 9)),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("wait"), st.sampled_from([0.001, 0.004])),
    st.tuples(st.just("resize"), st.integers(0, 1), st.integers(1, 3), st.integers(0, 4)),
    st.tuples(st.just("close"), st.integers(0, 1)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(op, min_size=4, max_size=40), timeout=st.sampled_from([0.0, 0.002]))
def test_random_interleavings_over_models_and_keys_stay_exact(plan, timeout):
    async def scenario() -> None:
        models = [ModelAdmission("m0", 1, 4, timeout), ModelAdmission("m1", 2, 3, timeout)]
        loads = {t.name: KeyLoad() for t in KEYS}
        reqs: list[Req] = []
        for step in plan:
            kind = step[0]
            if kind == "arrive":
                reqs.append(Req(models[step[1]], KEYS[step[2]], loads[KEYS[step[2]].name]))
            elif kind in ("finish", "cancel"):
                live = [r for r in reqs if not r.task.done()
                        and (r.outcome == "in" or kind == "cancel")]
                if live:
                    r = live[step[1] % len(live)]
                    r.release.set() if kind == "finish" else r.task.cancel()
            elif kind == "step":
                for _ in range(step[1]):
                    await asyncio.sleep(0)
                    check_keys(models, loads)
            elif kind == "wait":
                await asyncio.sleep(step[1])
            elif kind == "resize":
                models[step[1]].resize(step[2], step[3])
            elif kind == "close":
                models[step[1]].close()
            check_keys(models, loads)
        for r in reqs:
            r.release.set()
        for _ in range(50 + 10 * len(reqs)):
            if all(r.task.done() for r in reqs):
                break
            await asyncio.sleep(0)
            check_keys(models, loads)
        assert all(r.task.done() for r in reqs), [r.outcome for r in reqs]
        check_keys(models, loads)
        assert all((ld.active, ld.held) == (0, 0) for ld in loads.values())
        for adm in models:
            assert adm.admitted_total == adm.finished_total

    asyncio.run(scenario())
