"""Operator control: the admin API (load, unload, sleep, wake, pin, logs, events), preload,
failed starts with backoff, and computed Retry-After.

The end-to-end tests run a real gateway process with process-backend models running the
simulator; most share one gateway in which each test owns its models. The pure pieces
(backoff arithmetic, Retry-After, the event bus, the loopback guard) are unit-tested.
"""
from __future__ import annotations

import asyncio
import json
import shlex
import signal
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from helpers import sim_command, start_gateway, wait_until

from gateway.config import load_settings
from gateway.events import EventBus
from gateway.lifecycle import ModelRuntime
from gateway.retry_after import DrainRate, retry_after_s
from gateway.routes.guard import admin_refusal
from gateway.tenancy import Tenancy

pytestmark = pytest.mark.timeout(120)
CHAT = [{"role": "user", "content": "hi"}]
FAST = ("--ttft-ms", "5", "--itl-ms", "1")
SECRET = "s3cr3t-value-9f8e7d"
HF = "hf_abcdefghijklmnop1234"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def process_model(name: str, *opts: str, **extra) -> dict:
    return {"name": name, "backend": "process",
            "command": sim_command(*FAST, "--startup-s", "0.3", *opts), **extra}


def config(*models: dict, **top) -> dict:
    base = {"idle_timeout_s": 600,
            "upstream": {"retries": 2, "backoff_s": 0.05, "backoff_multiplier": 1,
                         "health_interval_s": 0.05, "start_timeout_s": 20,
                         "start_backoff_s": 2, "start_backoff_max_s": 8}}
    base.update(top)
    base["models"] = list(models)
    return base


def admin(gw, method: str, name: str, action: str, timeout: float = 30, **params) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/gateway/models/{name}/{action}", params=params,
                         timeout=timeout, trust_env=False)


def chat(gw, model: str, timeout: float = 30, **headers) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=timeout, trust_env=False,
                      headers=headers, json={"model": model, "messages": CHAT, "max_tokens": 2})


def model_status(gw, model: str) -> dict:
    return gw.status()["models"][model]


def assert_settled(gw, *models: str) -> None:
    """Nothing queued, nothing in flight, no drift: admission is exact after the scenario."""
    def idle():
        ms = [model_status(gw, m) for m in models]
        return all(m["queue_depth"] == 0 and m["in_flight"] == 0 and m["drift"] == 0
                   for m in ms)
    wait_until(idle, 10, what=f"{models} to settle")


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


class EventReader:
    """Reads GET /gateway/events with httpx in a thread of its own (its own event loop, so
    leaving cancels the read and closes the connection); ``events`` fills as they arrive."""

    def __init__(self, gw) -> None:
        self.url = f"{gw.url}/gateway/events"
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.headers: httpx.Headers | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=60),
                                         trust_env=False) as client:
                async with client.stream("GET", self.url) as r:
                    self.headers = r.headers
                    async for line in r.aiter_lines():
                        if line.startswith(":"):
                            self.comments.append(line)
                            self._ready.set()
                        elif line.startswith("data: "):
                            self.events.append(json.loads(line[6:]))
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self._ready.set()

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    def find(self, **match) -> dict | None:
        return next((e for e in list(self.events)
                     if all(e.get(k) == v for k, v in match.items())), None)

    def wait_for(self, timeout: float = 10, **match) -> dict:
        return wait_until(lambda: self.find(**match), timeout, what=f"event {match}")

    def __enter__(self) -> EventReader:
        self._thread.start()
        assert self._ready.wait(10), "the event stream did not open"
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._task is not None and not self.ended:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)
        assert self.ended


# --- unit: backoff, Retry-After, the event bus, the loopback guard ---------------------------------

def runtime(**upstream) -> ModelRuntime:
    settings = load_settings(raw={"upstream": upstream, "models": [
        {"name": "m", "backend": "process", "command": ["x", "{port}"]}]}, environ={})
    return ModelRuntime(settings.models[0], settings, driver=SimpleNamespace())


async def test_start_backoff_doubles_up_to_the_max_and_a_success_resets_it():
    rt = runtime(start_backoff_s=10, start_backoff_max_s=35)
    waits = []
    for _ in range(4):
        rt.mark_failed("model 'm': boom")
        waits.append(round(rt.backoff_until - time.monotonic()))
    assert waits == [10, 20, 35, 35]
    assert rt.state == "failed" and rt.last_error == "model 'm': boom"
    assert 34 <= rt.backoff_left() <= 35 and rt.retry_after_s() == 35
    assert rt.reserved_mib() == 0
    rt.mark_ready(SimpleNamespace(url="http://x", extra={}), 1.0)
    await rt.pool.aclose()
    assert rt.failures == 0 and rt.backoff_left() == 0
    rt.mark_failed("again")
    assert round(rt.backoff_until - time.monotonic()) == 10


def test_state_changes_reach_the_listener_with_their_reason():
    seen = []
    rt = runtime()
    rt._on_state = lambda r, reason: seen.append((r.state, reason))
    rt.mark_starting("admin")
    rt.mark_failed("it broke")
    rt.mark_starting("request")
    rt.mark_starting("request")  # no change, no event
    assert seen == [("starting", "admin"), ("failed", "it broke"), ("starting", "request")]


@pytest.mark.parametrize("kwargs, expected", [
    ({"backoff_left_s": 7.2}, 8),  # in backoff: what is left of it, rounded up
    ({"ready": False, "expected_start_s": 30, "starting_for_s": 12.5}, 18),
    ({"ready": False, "expected_start_s": 5, "starting_for_s": 9}, 1),  # overdue: at least 1
    ({"ready": False}, 10),  # never started: nothing learned yet
    ({"waiting": 12, "drain_per_s": 4.0}, 3),  # queue over drain rate
    ({"waiting": 1, "drain_per_s": 50.0}, 1),  # clamped up to 1
    ({"waiting": 500, "drain_per_s": 0.5}, 60),  # clamped down to 60
    ({"waiting": 5, "drain_per_s": 0.0}, 60),
    ({"waiting": 8, "max_concurrent": 4}, 2),  # no rate measured yet: 1/s per slot
])
def test_retry_after_is_computed(kwargs, expected):
    args = {"ready": True, "waiting": 0, "max_concurrent": 1, "drain_per_s": None,
            "backoff_left_s": 0.0, "expected_start_s": 0.0, "starting_for_s": 0.0, **kwargs}
    assert retry_after_s(**args) == expected


def test_drain_rate_counts_only_busy_windows():
    rate = DrainRate()
    rate.sample(0.0, 0, busy=True)
    rate.sample(0.5, 3, busy=True)  # window too short: ignored
    rate.sample(2.0, 8, busy=True)
    assert rate.per_s == pytest.approx(4.0)
    rate.sample(100.0, 8, busy=False)  # idle: restarts the window, keeps the estimate
    rate.sample(101.0, 10, busy=True)
    assert rate.per_s == pytest.approx(0.3 * 2 + 0.7 * 4.0)


async def test_event_bus_drops_oldest_for_a_slow_subscriber_and_forgets_closed_ones():
    bus = EventBus(queue_size=3)
    slow = bus.subscribe()
    with bus.subscribe() as fast:
        for i in range(5):
            bus.publish("state", f"m{i}", "r", "ready")  # sync, never blocks
        assert [(await fast.get(1))["model"] for _ in range(3)] == ["m2", "m3", "m4"]
        assert fast.dropped == 2 and bus.subscribers == 2
        assert await fast.get(0.05) is None  # timeout, still open
    assert bus.subscribers == 1
    event = await slow.get(1)
    assert set(event) == {"type", "model", "reason", "state", "time"}
    bus.close()
    assert bus.subscribers == 0 and slow.closed
    assert [(await slow.get(1))["model"] for _ in range(2)] == ["m3", "m4"]
    assert await slow.get(1) is None  # closed and drained: ends at once


def _fake_request(ip: str, allow_remote: bool):
    settings = load_settings(raw={"admin": {"allow_remote": allow_remote}}, environ={})
    return SimpleNamespace(ip=ip, method="POST", headers={}, scheme="http", host="gw",
                           app=SimpleNamespace(ctx=SimpleNamespace(
                               gateway=SimpleNamespace(settings=settings,
                                                       tenancy=Tenancy(settings.auth)))))


@pytest.mark.parametrize("ip", ["203.0.113.5", "198.51.100.20", "2001:db8::1", "", "garbage"])
def test_admin_routes_refuse_non_loopback_clients(ip):
    refused = admin_refusal(_fake_request(ip, allow_remote=False))
    assert refused is not None and refused.status == 403
    assert json.loads(refused.body)["error"]["code"] == "admin_forbidden"


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.8.9.1", "::1"])
def test_admin_routes_answer_loopback_clients(ip):
    assert admin_refusal(_fake_request(ip, allow_remote=False)) is None


def test_allow_remote_opens_admin_routes():
    assert admin_refusal(_fake_request("203.0.113.5", allow_remote=True)) is None


def test_every_admin_route_asks_the_guard_first(monkeypatch):
    """A refused caller gets the 403 from every route, before any model lookup."""
    from gateway.routes import models as routes

    calls = []
    refusal = object()
    monkeypatch.setattr(routes, "admin_refusal", lambda req: calls.append(req) or refusal)
    request = SimpleNamespace(method="POST", path="/x", args={})
    for action in [*routes.POST_ACTIONS, *routes.GET_ACTIONS]:
        table = routes.POST_ACTIONS if action in routes.POST_ACTIONS else routes.GET_ACTIONS
        assert asyncio.run(routes._dispatch(request, f"no-such-model/{action}", table)) is refusal
    assert asyncio.run(routes.events(request)) is refusal
    assert len(calls) == len(routes.POST_ACTIONS) + len(routes.GET_ACTIONS) + 1


# --- end to end: one shared gateway ---------------------------------------------------------------

@pytest.fixture(scope="module")
def names():
    return SimpleNamespace(**{role: unique(role) for role in (
        "loadable", "drained", "forced", "sleepy", "logged", "broken", "flaky", "preloaded",
        "queued", "coldq", "preload_fails")})


@pytest.fixture(scope="module")
def gw(names, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    sim = " ".join(shlex.quote(p) for p in sim_command(*FAST, "--startup-s", "0.3"))
    launches = tmp / "broken-launches.log"
    flaky_marker = tmp / "flaky-failed-once"
    models = [
        process_model(names.loadable),
        process_model(names.drained),
        process_model(names.forced, "--itl-ms", "50"),
        process_model(names.sleepy, "--enable-sleep-mode", sleep_mode=True),
        {"name": names.logged, "backend": "process", "env": {"MY_API_KEY": SECRET},
         "command": ["sh", "-c", f'echo "key is $MY_API_KEY, token {HF}"; echo plain line; '
                     f"exec {sim}", "sh", "{port}"]},
        {"name": names.broken, "backend": "process",
         "command": ["sh", "-c", f"echo launched >> {shlex.quote(str(launches))}; "
                     f"echo 'boom: cannot load weights'; exit 3", "sh", "{port}"]},
        {"name": names.flaky, "backend": "process",
         "command": ["sh", "-c", f"m={shlex.quote(str(flaky_marker))}; "
                     f"if [ -e \"$m\" ]; then exec {sim}; fi; touch \"$m\"; exit 4",
                     "sh", "{port}"]},
        process_model(names.preloaded, "--startup-s", "2", preload=True),
        {"name": names.preload_fails, "backend": "process", "preload": True,
         "command": ["sh", "-c", "echo 'no such weights'; exit 5", "sh", "{port}"]},
        process_model(names.queued, max_concurrent=1, max_queue=6),
        process_model(names.coldq, "--startup-s", "2", max_concurrent=1, max_queue=0),
    ]
    with start_gateway(config(*models), tmp) as g:
        g.launches = launches
        yield g


def test_preload_starts_in_the_background_at_start_up(gw, names):
    name = names.preloaded
    # the gateway already answers /health while the 2 s start runs
    assert model_status(gw, name)["state"] in ("starting", "stopped")
    wait_until(lambda: model_status(gw, name)["state"] == "ready", 15, what="the preload")
    time.sleep(1.5)  # a sweep or two: a preloaded model is not idle from the start
    status = model_status(gw, name)
    assert status["state"] == "ready" and status["admitted_total"] == 0  # no request started it
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 1
    assert_settled(gw, name)


def test_a_failed_preload_is_recorded_like_any_failed_start(gw, names):
    name = names.preload_fails
    wait_until(lambda: model_status(gw, name)["state"] == "failed", 15, what="the preload")
    status = model_status(gw, name)
    assert "exit code 5" in status["last_error"] and "no such weights" in status["last_error"]
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1
    assert httpx.get(f"{gw.url}/ready", trust_env=False).status_code == 200  # still serving


def test_load_unload_and_load_without_waiting(gw, names):
    name = names.loadable
    missing = admin(gw, "POST", "no-such-model", "load")
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    with EventReader(gw) as events:
        r = admin(gw, "POST", name, "load")
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name and r.json()["state"] == "ready"
        r = admin(gw, "POST", name, "unload")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "stopped"
        assert gw.metric("gateway_backend_stops_total", model=name, reason="unload") == 1
        r = admin(gw, "POST", name, "load", wait="false")
        assert r.status_code == 202, r.text
        assert r.json()["state"] in ("stopped", "starting")
        wait_until(lambda: model_status(gw, name)["state"] == "ready", 10, what="the load")
        events.wait_for(type="start", model=name, reason="admin", state="ready")
        events.wait_for(type="stop", model=name, reason="unload", state="stopped")
        assert events.find(type="state", model=name, state="starting", reason="admin"), events.events
        assert events.find(type="state", model=name, state="stopping", reason="unload")
        assert events.headers["content-type"].startswith("text/event-stream")
        assert all(isinstance(e["time"], float) for e in events.events)
        assert gw.status()["totals"]["event_subscribers"] >= 1
    # the subscriber that went away is removed
    wait_until(lambda: gw.status()["totals"]["event_subscribers"] == 0, 5,
               what="the closed event stream to unsubscribe")
    assert chat(gw, name).status_code == 200
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 2
    assert_settled(gw, name)


async def test_unload_drains_an_in_flight_request_then_restarts_on_demand(gw, names):
    name = names.drained
    assert chat(gw, name).status_code == 200
    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        body = {"model": name, "messages": CHAT, "max_tokens": 2}
        slow = asyncio.create_task(h.post(f"{gw.url}/v1/chat/completions", json=body,
                                          headers={"X-Sim-Delay-Ms": "1500"}))
        await asyncio.sleep(0.4)
        unload = asyncio.create_task(h.post(f"{gw.url}/gateway/models/{name}/unload"))
        await asyncio.sleep(0.3)
        assert not unload.done()  # waits for the request in flight
        later = asyncio.create_task(h.post(f"{gw.url}/v1/chat/completions", json=body))
        r_slow = await slow
        r_unload = await unload
        r_later = await later  # queued during the drain, then served by a fresh start
    assert r_slow.status_code == 200, r_slow.text  # finished, not cut off
    assert r_unload.status_code == 200, r_unload.text
    assert r_later.status_code == 200, r_later.text
    assert gw.metric("gateway_backend_stops_total", model=name, reason="unload") == 1
    assert gw.metric("gateway_backend_starts_total", model=name, result="success") == 2
    assert_settled(gw, name)


async def test_forced_unload_ends_requests_in_flight_with_a_clear_error(gw, names):
    name = names.forced
    assert admin(gw, "POST", name, "load").status_code == 200
    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        plain = asyncio.create_task(h.post(
            f"{gw.url}/v1/chat/completions", headers={"X-Sim-Delay-Ms": "8000"},
            json={"model": name, "messages": CHAT, "max_tokens": 2}))

        async def stream() -> list[str]:
            body = {"model": name, "messages": CHAT, "max_tokens": 300, "stream": True}
            async with h.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                return [line async for line in r.aiter_lines() if line.startswith("data: ")]

        streamed = asyncio.create_task(stream())
        await asyncio.sleep(0.8)
        assert model_status(gw, name)["in_flight"] == 2
        started = time.monotonic()
        r = await h.post(f"{gw.url}/gateway/models/{name}/unload", params={"force": "true"})
        took = time.monotonic() - started
        r_plain, lines = await plain, await streamed
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    assert took < 5, f"a forced unload waited {took:.1f}s"
    assert r_plain.status_code == 503, r_plain.text
    err = error_of(r_plain)
    assert err["code"] == "model_unloaded" and "unloaded by an operator" in err["message"]
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "model_unloaded", lines[-3:]
    assert "unloaded by an operator" in last["error"]["message"]
    assert model_status(gw, name)["state"] == "stopped"
    assert_settled(gw, name)


def test_sleep_and_wake_a_sleep_mode_model(gw, names):
    name = names.sleepy
    plain = admin(gw, "POST", names.loadable, "sleep")
    assert plain.status_code == 400 and error_of(plain)["code"] == "not_sleep_mode"
    assert admin(gw, "POST", names.loadable, "wake").status_code == 400
    stopped = admin(gw, "POST", name, "sleep")
    assert stopped.status_code == 409 and error_of(stopped)["code"] == "model_not_running"
    assert admin(gw, "POST", name, "load").status_code == 200
    url = model_status(gw, name)["urls"][0]
    r = admin(gw, "POST", name, "sleep")
    assert r.status_code == 200 and r.json()["state"] == "sleeping", r.text
    stats = httpx.get(f"{url}/sim/stats", trust_env=False).json()
    assert stats["sleeps_total"] == 1
    r = admin(gw, "POST", name, "wake")
    assert r.status_code == 200 and r.json()["state"] == "ready", r.text
    assert model_status(gw, name)["urls"] == [url]  # the same server, woken
    assert gw.metric("gateway_backend_starts_total", model=name, result="woken") == 1
    assert chat(gw, name).status_code == 200
    assert_settled(gw, name)


def test_logs_are_the_servers_last_lines_with_secrets_masked(gw, names):
    name = names.logged
    empty = admin(gw, "GET", name, "logs")
    assert empty.status_code == 200 and empty.json() == {"model": name, "lines": []}
    assert chat(gw, name).status_code == 200
    r = admin(gw, "GET", name, "logs", lines=500)
    assert r.status_code == 200, r.text
    lines = r.json()["lines"]
    text = "\n".join(lines)
    assert "plain line" in text and "key is ***" in text
    assert SECRET not in text and HF not in text
    assert len(admin(gw, "GET", name, "logs", lines=1).json()["lines"]) == 1
    for bad in ("0", "5001", "ten"):
        r = admin(gw, "GET", name, "logs", lines=bad)
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"
    assert_settled(gw, name)


def test_failed_start_backs_off_without_relaunching(gw, names):
    name = names.broken
    r = chat(gw, name)
    assert r.status_code == 503, r.text
    err = error_of(r)
    assert err["code"] == "model_unavailable"
    assert "exit code 3" in err["message"] and "boom: cannot load weights" in err["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 2  # the 2 s backoff, not a constant
    status = model_status(gw, name)
    assert status["state"] == "failed"
    assert "exit code 3" in status["last_error"] and "boom" in status["last_error"]
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1

    started = time.monotonic()
    r = chat(gw, name)  # during the backoff: refused at once, nothing launched
    assert time.monotonic() - started < 0.5
    assert r.status_code == 503 and error_of(r)["code"] == "model_unavailable"
    assert "exit code 3" in error_of(r)["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 2
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1
    assert gw.launches.read_text().splitlines() == ["launched"]

    time.sleep(2.1)  # the backoff is over: the next request is a fresh try
    r = chat(gw, name)
    assert r.status_code == 503
    assert 3 <= int(r.headers["Retry-After"]) <= 4  # doubled: 4 s
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 2

    r = admin(gw, "POST", name, "load")  # an operator's load ignores the backoff
    assert r.status_code == 503 and "exit code 3" in error_of(r)["message"]
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 3
    assert len(gw.launches.read_text().splitlines()) == 3
    assert_settled(gw, name)


def test_a_success_after_a_failure_resets_the_backoff(gw, names):
    name = names.flaky
    assert chat(gw, name).status_code == 503
    assert model_status(gw, name)["state"] == "failed"
    assert chat(gw, name).status_code == 503  # in backoff
    r = admin(gw, "POST", name, "load")
    assert r.status_code == 200 and r.json()["state"] == "ready", r.text
    assert r.json()["last_error"] is None and r.json()["retry_in_s"] is None
    assert chat(gw, name).status_code == 200
    assert gw.metric("gateway_backend_starts_total", model=name, result="failure") == 1
    assert_settled(gw, name)


async def test_queue_full_retry_after_comes_from_the_drain_rate(gw, names):
    """One slot, 0.5 s a request: about 2 leave per second, so a full queue of 6 is
    about 3 s away from having room, not the old constant 1."""
    name = names.queued
    assert chat(gw, name).status_code == 200
    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        def post():
            return h.post(f"{gw.url}/v1/chat/completions", headers={"X-Sim-Delay-Ms": "500"},
                          json={"model": name, "messages": CHAT, "max_tokens": 1})
        warm = [asyncio.create_task(post()) for _ in range(7)]
        await asyncio.sleep(2.5)  # the rate is measured while these drain
        burst = await asyncio.gather(*(post() for _ in range(10)))
        rest = await asyncio.gather(*warm)
    refused = [r for r in burst if r.status_code == 429]
    assert refused, [r.status_code for r in burst]
    assert error_of(refused[0])["code"] == "queue_full"
    retry = int(refused[0].headers["Retry-After"])
    # About 3 here; a loaded machine drains slower and says so (11 was seen in CI). The
    # lower bound is what separates a measured rate from the old constant 1.
    assert 2 <= retry <= 20, retry
    assert all(r.status_code == 200 for r in rest)
    assert_settled(gw, name)


async def test_retry_after_while_starting_comes_from_the_learned_start_time(gw, names):
    name = names.coldq
    assert admin(gw, "POST", name, "load").status_code == 200  # learns ~2 s
    assert admin(gw, "POST", name, "unload").status_code == 200
    async with httpx.AsyncClient(timeout=30, trust_env=False) as h:
        body = {"model": name, "messages": CHAT, "max_tokens": 1}
        first = asyncio.create_task(h.post(f"{gw.url}/v1/chat/completions", json=body))
        await asyncio.sleep(0.5)
        r = await h.post(f"{gw.url}/v1/chat/completions", json=body)  # no queue: 429
        assert (await first).status_code == 200
    assert r.status_code == 429 and error_of(r)["code"] == "queue_full"
    assert 1 <= int(r.headers["Retry-After"]) <= 3, r.headers["Retry-After"]
    assert_settled(gw, name)


def test_unknown_action_and_static_models(gw, names):
    r = admin(gw, "POST", names.loadable, "explode")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = admin(gw, "GET", names.loadable, "load")
    assert r.status_code == 404


# --- end to end: pinning against eviction, and the events it causes -------------------------------

def test_pin_is_respected_by_eviction_and_unpin_releases_it(tmp_path):
    a, b = unique("pin-a"), unique("pin-b")
    cfg = config(process_model(a, vram_mib=60), process_model(b, vram_mib=60),
                 gpu={"total_vram_mib": 100, "min_residency_s": 0, "load_timeout_s": 2})
    with start_gateway(cfg, tmp_path) as gw, EventReader(gw) as events:
        assert admin(gw, "POST", a, "load").status_code == 200
        r = admin(gw, "POST", a, "pin")
        assert r.status_code == 200 and r.json()["pinned"] is True
        r = chat(gw, b)
        assert r.status_code == 503 and "no room" in error_of(r)["message"], r.text
        assert model_status(gw, a)["state"] == "ready"  # pinned: not evicted
        assert gw.metric("gateway_evictions_total", model=a, reason="vram") == 0
        r = admin(gw, "POST", a, "unpin")
        assert r.status_code == 200 and r.json()["pinned"] is False
        assert chat(gw, b).status_code == 200
        assert model_status(gw, a)["state"] == "stopped"
        assert gw.metric("gateway_evictions_total", model=a, reason="vram") == 1
        events.wait_for(type="eviction", model=a, reason="vram")
        events.wait_for(type="stop", model=a, reason="eviction", state="stopped")
        events.wait_for(type="start", model=b, reason="request", state="ready")
        assert events.find(type="pin", model=a) and events.find(type="unpin", model=a)
        assert events.find(type="start", model=a, reason="admin")
        kinds = [e["type"] for e in events.events if e["model"] == a]
        assert kinds.index("eviction") < kinds.index("stop")
        assert_settled(gw, a, b)
    # the stream ended with the gateway's drain rather than holding up its exit
    assert gw.proc.returncode == 0


def test_pinned_in_config_can_be_unpinned_at_run_time(tmp_path):
    a, b = unique("cfgpin-a"), unique("cfgpin-b")
    cfg = config(process_model(a, vram_mib=60, pinned=True), process_model(b, vram_mib=60),
                 gpu={"total_vram_mib": 100, "min_residency_s": 0, "load_timeout_s": 1})
    with start_gateway(cfg, tmp_path) as gw:
        assert model_status(gw, a)["pinned"] is True
        assert chat(gw, a).status_code == 200
        assert chat(gw, b).status_code == 503
        assert admin(gw, "POST", a, "unpin").status_code == 200
        assert chat(gw, b).status_code == 200
        assert model_status(gw, a)["state"] == "stopped"
        assert_settled(gw, a, b)


def test_events_stream_ends_when_the_gateway_drains(tmp_path):
    cfg = config(process_model(unique("m")))
    with start_gateway(cfg, tmp_path) as gw, EventReader(gw) as reader:
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        # ended by the drain, well before Sanic's 5 s wait for open connections
        wait_until(lambda: reader.ended, 3, what="the event stream to end")
        assert gw.proc.wait(10) == 0
        assert time.monotonic() - started < 4, "an open event stream held up the shutdown"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
