"""Model lifecycle end to end: a real gateway process starting, stopping and restarting real
simulator processes (the ``process`` backend), observed from outside through HTTP and /proc.

Most tests share one gateway in which each test owns one model (a unique name, so process
scans by ``--served-model-name`` find only that model's servers). Tests that stop the gateway
or change its environment start their own.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from helpers import pid_alive, pids_matching, sim_command, start_gateway, wait_until
from openai import AsyncOpenAI

CHAT = [{"role": "user", "content": "hi"}]
FAST = ("--ttft-ms", "5", "--itl-ms", "1")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def config(*models: dict, **top) -> dict:
    base = {"idle_timeout_s": 600,
            "upstream": {"retries": 2, "backoff_s": 0.05, "backoff_multiplier": 1,
                         "health_interval_s": 0.05, "start_timeout_s": 20}}
    base.update(top)
    base["models"] = list(models)
    return base


def process_model(name: str, *opts: str, **extra) -> dict:
    return {"name": name, "backend": "process",
            "command": sim_command(*FAST, "--startup-s", "0.3", *opts), **extra}


def chat(gw, model: str, timeout: float = 30, **headers) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=timeout, trust_env=False,
                      headers=headers, json={"model": model, "messages": CHAT, "max_tokens": 2})


def state(gw, model: str) -> str:
    return gw.status()["models"][model]["state"]


def model_pids(gw, model: str) -> list[int]:
    """Live children of the gateway serving ``model`` (each server runs under a guard
    process, which carries the model's VLLM_GATEWAY_MODEL marker)."""
    def marked(pid: int) -> bool:
        try:
            return f"\0VLLM_GATEWAY_MODEL={model}\0".encode() in (
                b"\0" + Path(f"/proc/{pid}/environ").read_bytes())
        except OSError:
            return False
    return [p for p in gw.children() if marked(p)]


def server_pid(gw, model: str) -> int:
    """The pid of ``model``'s server: its port (from /gateway/status) found in /proc."""
    urls = gw.status()["models"][model]["urls"]
    assert len(urls) == 1, urls
    port = urls[0].rsplit(":", 1)[1]
    pids = [p for p in pids_matching("--port", port, "--served-model-name", model)
            if p in gw.children()]
    assert len(pids) == 1, (model, port, pids)
    return pids[0]


def settled(gw, model: str) -> dict:
    """Wait until ``model`` has nothing queued or in flight; returns its status entry."""
    def idle():
        m = gw.status()["models"][model]
        return m if m["in_flight"] == 0 and m["queue_depth"] == 0 else None
    return wait_until(idle, 10, what=f"{model} to settle")


@pytest.fixture(scope="module")
def names():
    return SimpleNamespace(**{role: unique(role) for role in (
        "cold", "herd", "dies", "sluggish", "idle", "busy", "crashy", "swept", "abandoned",
        "missing", "refused", "marker")})


@pytest.fixture(scope="module")
def gw(names, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    starts = tmp / "herd-starts.log"
    sim = " ".join(shlex.quote(p) for p in sim_command(*FAST, "--startup-s", "0.5"))
    not_executable = tmp / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    models = [
        process_model(names.cold),
        {"name": names.herd, "backend": "process",
         "command": ["sh", "-c", f"echo started >> {shlex.quote(str(starts))}; exec {sim}"]},
        {"name": names.dies, "backend": "process",
         "command": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)", "{port}",
                     names.marker]},
        process_model(names.sluggish, "--startup-s", "60", start_timeout_s=1),
        process_model(names.idle, idle_timeout_s=1),
        process_model(names.busy, idle_timeout_s=1),
        process_model(names.crashy),
        process_model(names.swept),
        process_model(names.abandoned, "--startup-s", "1"),
        {"name": names.missing, "backend": "process",
         "command": [str(tmp / "no-such-program"), "{port}"]},
        {"name": names.refused, "backend": "process",
         "command": [str(not_executable), "{port}"]},
    ]
    with start_gateway(config(*models), tmp) as g:
        g.herd_starts = starts
        yield g


def test_cold_start_on_first_request(gw, names):
    name = names.cold
    listed = {m["id"]: m["state"] for m in
              httpx.get(f"{gw.url}/v1/models", trust_env=False).json()["data"]}
    assert listed[name] == "stopped"
    assert model_pids(gw, name) == []
    r = chat(gw, name)
    assert r.status_code == 200, r.text
    assert r.json()["received_model"] == name
    assert state(gw, name) == "ready"
    assert model_pids(gw, name) == [server_pid(gw, name)]
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 1


async def test_concurrent_first_requests_start_one_process(gw, names):
    name = names.herd
    assert state(gw, name) == "stopped"
    async with AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0,
                           timeout=30) as client:
        results = await asyncio.gather(*(
            client.chat.completions.create(model=name, messages=CHAT, max_tokens=1)
            for _ in range(10)))
    assert len(results) == 10 and all(r.choices for r in results)
    assert gw.herd_starts.read_text().splitlines() == ["started"]
    assert len(model_pids(gw, name)) == 1
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 1
    assert settled(gw, name)["drift"] == 0


def test_start_failure_when_command_exits(gw, names):
    name = names.dies
    r = chat(gw, name)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_unavailable"
    assert name in err["message"] and "exited during start-up" in err["message"]
    assert "\n" not in err["message"]
    assert r.headers["Retry-After"]
    status = gw.status()["models"][name]
    assert status["state"] == "failed"
    assert "exited during start-up (exit code 3)" in status["last_error"]
    assert status["drift"] == 0 and status["in_flight"] == 0
    assert pids_matching(names.marker) == []
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1
    # the next request falls in the start backoff: refused the same way, nothing relaunched
    assert chat(gw, name).status_code == 503
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1


def test_start_timeout_kills_the_server(gw, names):
    name = names.sluggish
    started = time.monotonic()
    r = chat(gw, name)
    elapsed = time.monotonic() - started
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_unavailable"
    assert "not healthy after 1s" in err["message"] and "start_timeout_s" in err["message"]
    assert 1 <= elapsed < 10
    # the half-started server is gone before the client hears about it
    assert pids_matching("--served-model-name", name) == []
    assert state(gw, name) == "failed"
    assert gw.metric("gateway_backend_stops_total", model=name, reason="failed_start") == 1
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1


@pytest.mark.parametrize("kind", ["missing", "refused"])
def test_unrunnable_command_is_503_not_500(gw, names, kind):
    name = getattr(names, kind)
    r = chat(gw, name)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_unavailable"
    assert "cannot run" in err["message"]
    assert state(gw, name) == "failed"
    assert settled(gw, name)["drift"] == 0


def test_idle_model_stops_and_restarts(gw, names):
    name = names.idle
    assert chat(gw, name).status_code == 200
    first = server_pid(gw, name)
    wait_until(lambda: state(gw, name) == "stopped", 6, what="the idle model to stop")
    assert not pid_alive(first)
    assert model_pids(gw, name) == []
    assert gw.metric("gateway_backend_stops_total", model=name, reason="idle") == 1
    r = chat(gw, name)
    assert r.status_code == 200, r.text
    assert state(gw, name) == "ready"
    assert server_pid(gw, name) != first
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 2


def test_busy_model_is_not_stopped_for_idleness(gw, names):
    name = names.busy
    assert chat(gw, name).status_code == 200
    pid = server_pid(gw, name)
    # a request that runs three times the idle timeout keeps the model up
    r = chat(gw, name, **{"X-Sim-Delay-Ms": "3000"})
    assert r.status_code == 200, r.text
    assert server_pid(gw, name) == pid
    assert gw.metric("gateway_backend_stops_total", model=name, reason="idle") == 0


def test_crashed_model_restarts_on_next_request(gw, names):
    name = names.crashy
    assert chat(gw, name).status_code == 200
    pid = server_pid(gw, name)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 5, what="the killed server to die")
    r = chat(gw, name)  # at once: before the sweeper's crash check
    assert r.status_code == 200, r.text
    assert state(gw, name) == "ready"
    assert server_pid(gw, name) != pid
    assert gw.metric("gateway_backend_stops_total", model=name, reason="crash") == 1
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 2
    assert settled(gw, name)["drift"] == 0


def test_crash_detected_by_sweeper_while_idle(gw, names):
    name = names.swept
    assert chat(gw, name).status_code == 200
    pid = server_pid(gw, name)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: state(gw, name) == "stopped", 6, what="the sweeper to notice")
    assert gw.status()["models"][name]["last_error"].startswith("server exited unexpectedly")
    assert chat(gw, name).status_code == 200
    assert server_pid(gw, name) != pid


async def test_client_gone_during_cold_start_does_not_abort_it(gw, names):
    name = names.abandoned
    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        body = {"model": name, "messages": CHAT, "max_tokens": 1}
        task = asyncio.create_task(h.post(f"{gw.url}/v1/chat/completions", json=body))
        await asyncio.sleep(0.3)
        assert state(gw, name) == "starting"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # the start (which other requests may be waiting on) goes on; nothing stays counted
    wait_until(lambda: state(gw, name) == "ready", 10, what="the start to finish")
    m = settled(gw, name)
    assert m["drift"] == 0
    assert chat(gw, name).status_code == 200
    assert len(model_pids(gw, name)) == 1
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 1


# --- tests with a gateway of their own --------------------------------------------------------

def eviction_config(*models: dict) -> dict:
    """A 100 MiB GPU budget: a (40) and b (40) fit together, c (90) needs both gone."""
    return config(*models, gpu={"total_vram_mib": 100, "min_residency_s": 0,
                                "load_timeout_s": 15})


def evictable(name: str, vram: int, *opts: str) -> dict:
    return process_model(name, *opts, vram_mib=vram)


def complete(h: httpx.AsyncClient, gw, model: str):
    """A one-token completion through the gateway (a coroutine)."""
    return h.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})


async def wait_state(h: httpx.AsyncClient, gw, model: str, wanted: set[str],
                     timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = (await h.get(f"{gw.url}/gateway/status")).json()["models"][model]["state"]
        if got in wanted:
            return got
        await asyncio.sleep(0.005)
    raise AssertionError(f"{model} never reached {wanted}")


def test_start_waiting_for_placement_does_not_block_eviction(tmp_path):
    a, b, c = unique("a"), unique("b"), unique("c")
    cfg = eviction_config(evictable(a, 40), evictable(b, 40), evictable(c, 90))
    with start_gateway(cfg, tmp_path) as gw:
        async def scenario():
            async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
                def post(model):
                    return complete(h, gw, model)
                assert (await post(b)).status_code == 200
                assert (await post(a)).status_code == 200  # b is now least recently used
                started = time.monotonic()
                for_c = asyncio.create_task(post(c))  # evicts b, then a
                await wait_state(h, gw, b, {"stopping", "stopped"})
                for_b = asyncio.create_task(post(b))  # b's start must wait for c's
                return await for_c, time.monotonic() - started, await for_b

        rc, c_took, rb = asyncio.run(scenario())
    assert rc.status_code == 200, rc.text
    # c's start must not sit out load_timeout_s waiting for b's start, which waits for c's
    assert c_took < 8, f"c took {c_took:.1f}s"
    assert rb.status_code == 200, rb.text


def test_eviction_skips_a_victim_that_became_busy(tmp_path):
    a, b, c = unique("a"), unique("b"), unique("c")
    cfg = eviction_config(evictable(a, 40), evictable(b, 40, "--itl-ms", "20"),
                          evictable(c, 90))
    with start_gateway(cfg, tmp_path) as gw:
        async def scenario():
            async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
                def post(model):
                    return complete(h, gw, model)
                assert (await post(a)).status_code == 200  # a is least recently used
                assert (await post(b)).status_code == 200
                for_c = asyncio.create_task(post(c))  # picks a and b as victims
                await wait_state(h, gw, a, {"stopping", "stopped"})
                body = {"model": b, "prompt": "x", "max_tokens": 60, "stream": True}  # ~1.2 s
                streamed = await h.post(f"{gw.url}/v1/completions", json=body)
                return streamed, await for_c

        streamed, rc = asyncio.run(scenario())
        assert streamed.status_code == 200, streamed.text
        events = [e for e in streamed.text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]", events[-3:]
        assert not any('"error"' in e for e in events)
        # 60 tokens in 48 content events (every 4th carries two), the finish event, [DONE]
        assert len(events) == 48 + 1 + 1
        assert gw.metric("gateway_upstream_retries_total", model=b) == 0
        assert rc.status_code == 200, rc.text
        assert gw.status()["models"][b]["drift"] == 0


def test_sigterm_stops_every_child(tmp_path):
    a, b = unique("first"), unique("second")
    gw = start_gateway(config(process_model(a), process_model(b)), tmp_path)
    try:
        assert chat(gw, a).status_code == 200
        assert chat(gw, b).status_code == 200
        children = gw.children()
        assert sorted(children) == sorted([server_pid(gw, a), server_pid(gw, b)])
        started = time.monotonic()
        code = gw.stop()
        assert time.monotonic() - started < 15
    finally:
        gw.stop()
    assert gw.orphans == [], f"model servers left running: {gw.orphans}\n{gw.log_text()}"
    assert not any(pid_alive(p) for p in children)
    assert pids_matching("--served-model-name", a) == pids_matching("--served-model-name", b) == []
    assert code == 0, gw.log_text()
    assert "Traceback" not in gw.log_text()


def test_sigterm_during_cold_start_leaves_no_process(tmp_path):
    name = unique("interrupted")
    gw = start_gateway(config(process_model(name, "--startup-s", "30")), tmp_path)
    answer: list = []

    def waiting_client() -> None:
        try:
            answer.append(chat(gw, name).status_code)
        except httpx.HTTPError as exc:  # the gateway went away mid-request: expected
            answer.append(type(exc).__name__)

    try:
        waiter = threading.Thread(target=waiting_client, daemon=True)
        waiter.start()
        wait_until(lambda: state(gw, name) == "starting" and gw.children(), 10,
                   what="the cold start to begin")
        children = gw.children()
        code = gw.stop()
        waiter.join(15)
        assert not waiter.is_alive() and answer, "the waiting client was never answered"
    finally:
        gw.stop()
    assert gw.orphans == [], f"left running: {gw.orphans}\n{gw.log_text()}"
    assert not any(pid_alive(p) for p in children)
    assert pids_matching("--served-model-name", name) == []
    assert code == 0, gw.log_text()


def test_response_timeout_does_not_kill_slow_cold_start(tmp_path):
    name = unique("patient")
    model = process_model(name, "--startup-s", "2", max_concurrent=1)
    # Sanic reads SANIC_RESPONSE_TIMEOUT from the environment; the gateway must override it
    with start_gateway(config(model), tmp_path, env={"SANIC_RESPONSE_TIMEOUT": "1"}) as gw:
        async def both():
            async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
                body = {"model": name, "messages": CHAT, "max_tokens": 1}
                first = asyncio.create_task(h.post(f"{gw.url}/v1/chat/completions", json=body))
                await asyncio.sleep(0.2)
                started = time.monotonic()
                queued = await h.post(f"{gw.url}/v1/chat/completions", json=body)
                return await first, queued, time.monotonic() - started

        first, queued, waited = asyncio.run(both())
        assert first.status_code == 200, first.text
        assert queued.status_code == 200, queued.text
        assert waited > 1.5  # queued behind the cold start for longer than Sanic's limit
        assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 1


def test_max_models_running_from_seed_env_evicts_lru_and_spares_pinned(tmp_path):
    """GATEWAY_MAX_MODELS_CONCURRENT=2 caps running models whatever VRAM says; the
    pinned model is never the victim, so the least recently used other one is."""
    keep, a, b = unique("pinned"), unique("a"), unique("b")
    cfg = config(process_model(keep, pinned=True), process_model(a), process_model(b),
                 gpu={"min_residency_s": 0, "load_timeout_s": 15})
    with start_gateway(cfg, tmp_path, env={"GATEWAY_MAX_MODELS_CONCURRENT": "2"}) as gw:
        assert chat(gw, keep).status_code == 200
        assert chat(gw, a).status_code == 200
        assert chat(gw, keep).status_code == 200  # a is now the least recently used
        assert chat(gw, b).status_code == 200
        states = {m: state(gw, m) for m in (keep, a, b)}
        assert states == {keep: "ready", a: "stopped", b: "ready"}, states
        assert gw.metric("gateway_evictions_total", model=a, reason="max_models") == 1
        assert gw.metric("gateway_evictions_total", model=keep) == 0
        assert model_pids(gw, a) == []


def test_no_room_while_everything_is_pinned_is_a_clear_503(tmp_path):
    keep, other = unique("pinned"), unique("other")
    cfg = config(process_model(keep, pinned=True), process_model(other),
                 max_models_running=1, gpu={"min_residency_s": 0, "load_timeout_s": 1})
    with start_gateway(cfg, tmp_path) as gw:
        assert chat(gw, keep).status_code == 200
        resp = chat(gw, other)
        assert resp.status_code == 503
        err = resp.json()["error"]
        assert err["code"] == "model_unavailable" and "no room" in err["message"]
        assert resp.headers["Retry-After"]
        assert state(gw, keep) == "ready" and state(gw, other) == "stopped"
        assert gw.status()["models"][other]["drift"] == 0


def test_sleep_mode_evicts_by_sleeping_and_wakes_without_a_cold_start(tmp_path):
    """Two sleep-mode models that don't fit together: the idle one is put to sleep (its
    process stays), and asking for it again wakes that same process."""
    a, b = unique("sleepy-a"), unique("sleepy-b")
    models = [process_model(n, "--enable-sleep-mode", vram_mib=60, sleep_mode=True) for n in (a, b)]
    cfg = config(*models, gpu={"total_vram_mib": 100, "min_residency_s": 0, "load_timeout_s": 15,
                               "sleep_residual_mib": 10})
    with start_gateway(cfg, tmp_path) as gw:
        assert chat(gw, a).status_code == 200
        [a_pid] = model_pids(gw, a)
        assert chat(gw, b).status_code == 200
        status = gw.status()["models"]
        assert status[a]["state"] == "sleeping" and status[b]["state"] == "ready"
        assert status[a]["vram_mib"] == 10  # only the residual stays reserved
        assert model_pids(gw, a) == [a_pid]  # asleep, not stopped
        assert gw.metric("gateway_evictions_total", model=a, reason="vram") == 1

        assert chat(gw, a).status_code == 200  # wakes a; b goes to sleep
        status = gw.status()["models"]
        assert status[a]["state"] == "ready" and status[b]["state"] == "sleeping"
        assert model_pids(gw, a) == [a_pid]  # the same server: no cold start
        assert gw.metric("gateway_backend_starts_total", model=a, result="woken") == 1
        assert gw.metric("gateway_backend_starts_total", model=a, result="success") == 1
        sim_url = status[a]["urls"][0]
        stats = httpx.get(f"{sim_url}/sim/stats", trust_env=False).json()
        assert stats["sleeps_total"] == 1 and stats["wakes_total"] == 1
        assert all(m["drift"] == 0 and m["in_flight"] == 0 for m in status.values())


def test_sleeping_model_idle_past_its_timeout_is_stopped(tmp_path):
    a, b = unique("doze-a"), unique("doze-b")
    models = [process_model(a, "--enable-sleep-mode", vram_mib=60, sleep_mode=True,
                            idle_timeout_s=2),
              process_model(b, vram_mib=60)]
    cfg = config(*models, gpu={"total_vram_mib": 100, "min_residency_s": 0, "load_timeout_s": 15,
                               "sleep_residual_mib": 10})
    with start_gateway(cfg, tmp_path) as gw:
        assert chat(gw, a).status_code == 200
        assert chat(gw, b).status_code == 200
        assert state(gw, a) == "sleeping"
        assert wait_until(lambda: state(gw, a) == "stopped", timeout=10)
        assert model_pids(gw, a) == []
        assert gw.metric("gateway_backend_stops_total", model=a, reason="idle") == 1
