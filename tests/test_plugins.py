"""Every hook, shown to change behaviour through the real code paths.

``test_hook_<name>`` exists for every hook in ``gateway.hookspecs`` (tests/test_hookspecs.py
checks that). They run the real gateway as a subprocess (``python -m gateway serve``) with
``plugins.modules`` naming small test plugins from ``tests/fixtures/gwtest_plugins`` and real
simulator processes behind it, and compare with the built-in behaviour side by side. Plugins
that don't interfere share one module-scoped gateway (``shared``) to keep the suite fast.
The built-in LRU eviction policy is a pure function and is tested with tables. The plugin
contract (what ``build_plugin_manager`` refuses, ordering, timing, errors) follows.
"""
from __future__ import annotations

import json
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import free_port, start_simulator
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway import hookimpl
from gateway.app import build_gateway
from gateway.config import ConfigError, load_settings
from gateway.drivers import collect_drivers
from gateway.forward import Exchange
from gateway.hookspecs import ASYNC_CAPABLE_HOOKS, SYNC_ONLY_HOOKS
from gateway.plugins import (
    DEFAULT_PLUGINS,
    HookRunner,
    PluginError,
    build_plugin_manager,
    list_plugins,
)
from gateway.types import EvictionRequest, ModelView, Rejection, RequestInfo, VramReading

FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from gwtest_plugins import evict_biggest
from gwtest_process import run_cli, start_gateway
from vllm_gateway_plugins import lru_eviction

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
SIM_CMD = [sys.executable, "-m", "vllm_simulator", "--port", "{port}",
           "--served-model-name", "{name}", "--ttft-ms", "0", "--itl-ms", "0"]


def chat(model: str, **extra) -> dict:
    return {"model": model, **CHAT, **extra}


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, None if absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def sim_requests(sim) -> int:
    return httpx.get(f"{sim.url}/sim/stats", timeout=5, trust_env=False).json()["requests_total"]


def module(name: str, **functions) -> types.ModuleType:
    """A plugin module built in memory (for the contract tests)."""
    mod = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(mod, key, fn)
    return mod


def settings_for(**raw):
    raw.setdefault("models", [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}])
    return load_settings(raw=raw, environ={})


@pytest.fixture(scope="module")
def sims():
    """Two simulators serving the same model name: one model, two URLs."""
    with start_simulator("m", ttft_ms=0, itl_ms=0) as a, \
            start_simulator("m", ttft_ms=0, itl_ms=0) as b:
        yield a, b


@pytest.fixture(scope="module")
def sim(sims):
    return sims[0]


SHARED_PLUGINS = [f"gwtest_plugins.{name}" for name in (
    "admission", "fixed_vram", "pick_last", "broken_select", "custom_backend", "lifecycle")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, sims):
    """One gateway for the hooks whose test plugins don't interfere with each other.

    Models ``m``, ``pick-last`` and ``broken`` are static with both simulators' URLs
    (the latter two rename the model to ``m`` upstream); ``custom`` uses the ``mytest``
    backend a plugin registers. The selection plugins only answer for their own model,
    so ``m`` shows the built-in behaviour next to them.
    """
    workdir = tmp_path_factory.mktemp("shared-gw")
    urls = [s.url for s in sims]
    cfg = {"plugins": {"modules": SHARED_PLUGINS},
           "models": [{"name": "m", "backend": "static", "urls": urls},
                      {"name": "pick-last", "backend": "static", "urls": urls,
                       "served_model_name": "m"},
                      {"name": "broken", "backend": "static", "urls": urls,
                       "served_model_name": "m"},
                      {"name": "custom", "backend": "mytest"}]}
    events = workdir / "events"
    gw = start_gateway(cfg, workdir,
                       env={"GWTEST_EVENTS": str(events), "GWTEST_VRAM_TOTAL": "24576"})
    gw.events = events
    with gw:
        yield gw



# --- register_backends ---------------------------------------------------------------


def test_hook_register_backends(shared):
    """A plugin's ``mytest`` backend starts the model's server for real on first use."""
    assert shared.get("/gateway/status").json()["models"]["custom"]["state"] == "stopped"
    r = shared.post("/v1/chat/completions", chat("custom"))
    assert r.status_code == 200, r.text
    assert r.json()["received_model"] == "custom"
    status = shared.get("/gateway/status").json()["models"]["custom"]
    assert (status["state"], status["backend"]) == ("ready", "mytest")
    assert "start custom port=" in shared.events.read_text()
    rows = {p["name"]: p for p in shared.get("/gateway/plugins").json()}
    assert rows["gwtest_plugins.custom_backend"]["hooks"] == ["register_backends"]
    assert rows["gwtest_plugins.custom_backend"]["origin"] == "registered"


def test_register_backends_unknown_backend_without_plugin():
    raw = {"models": [{"name": "m", "backend": "mytest"}]}
    with pytest.raises(ConfigError, match=r"models\[m\]\.backend: unknown backend 'mytest' "
                                          r"\(known: .*process, static"):
        build_gateway(load_settings(raw=raw, environ={}))
    import gwtest_plugins.custom_backend as plugin
    gw = build_gateway(load_settings(raw=raw, environ={}), extra_plugins=[("mine", plugin)])
    assert type(gw.fleet.get("m").driver).__name__ == "MyTestDriver"


def test_register_backends_driver_validates_model():
    import gwtest_plugins.custom_backend as plugin
    raw = {"models": [{"name": "m", "backend": "mytest", "command": ["x"]}]}
    with pytest.raises(ConfigError, match=r"models\[m\]\.command: not used by backend mytest"):
        build_gateway(load_settings(raw=raw, environ={}), extra_plugins=[("mine", plugin)])


def test_register_backends_plugin_replaces_builtin_but_two_plugins_conflict():
    class Fake:
        manages_lifecycle = False

    fake = Fake()

    class Replacer:
        @hookimpl
        def register_backends(self, register):
            register("static", fake)

    pm = build_plugin_manager(load_entrypoints=False, extra=[("replacer", Replacer())])
    assert collect_drivers(pm)["static"] is fake
    pm = build_plugin_manager(load_entrypoints=False,
                              extra=[("one", Replacer()), ("two", Replacer())])
    with pytest.raises(PluginError, match=r"plugin two: backend 'static' is already registered "
                                          r"by plugin one"):
        collect_drivers(pm)


def test_register_backends_raising_names_plugin():
    class Broken:
        @hookimpl
        def register_backends(self, register):
            raise ValueError("no docker here")

    pm = build_plugin_manager(load_entrypoints=False, extra=[("broken", Broken())])
    with pytest.raises(PluginError, match="plugin broken: hook register_backends raised "
                                          "ValueError: no docker here"):
        collect_drivers(pm)


# --- startup / shutdown --------------------------------------------------------------


def test_hook_startup(shared, tmp_path):
    """An async startup impl is awaited before the gateway serves; raising aborts start-up."""
    # /health answered, so the awaited startup (it sleeps before writing) already ran
    first = shared.events.read_text().splitlines()[0].split(" ", 1)[1]
    assert first == "startup models=broken,custom,m,pick-last"
    cfg = {"plugins": {"modules": ["gwtest_plugins.lifecycle"]},
           "models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}
    failing = start_gateway(cfg, tmp_path, env={"GWTEST_STARTUP_FAIL": "1"}, wait=False)
    try:
        rc = failing.proc.wait(20)
    finally:
        failing.stop()
    assert rc != 0
    assert ("plugin gwtest_plugins.lifecycle: hook startup raised RuntimeError: refusing to "
            "start") in failing.log()


def test_hook_shutdown(tmp_path):
    """An async shutdown impl is awaited on SIGTERM, before model servers are stopped."""
    events = tmp_path / "events"
    cfg = {"plugins": {"modules": ["gwtest_plugins.lifecycle", "gwtest_plugins.custom_backend"]},
           "models": [{"name": "m", "backend": "mytest"}]}
    with start_gateway(cfg, tmp_path, env={"GWTEST_EVENTS": str(events)}) as gw:
        assert gw.post("/v1/chat/completions", chat("m")).status_code == 200
        assert "shutdown" not in events.read_text()
        assert gw.stop() == 0, gw.log()
    lines = [line.split(" ", 1)[1] for line in events.read_text().splitlines()]
    assert lines[0] == "startup models=m" and lines[1].startswith("start m port=")
    # the hook saw the model still ready; the driver stopped its server afterwards
    assert lines[2:] == ["shutdown m=ready", "stop m"]


async def test_shutdown_errors_are_isolated(caplog):
    calls = []

    class Bad:
        @hookimpl(tryfirst=True)
        async def shutdown(self, gateway):
            raise RuntimeError("disk full")

    class Good:
        @hookimpl
        def shutdown(self, gateway):
            calls.append(gateway)

    observed = []
    pm = build_plugin_manager(load_entrypoints=False, extra=[("good", Good()), ("bad", Bad())])
    runner = HookRunner(pm, lambda *a: observed.append(a))
    with caplog.at_level("ERROR", logger="vllm_gateway.plugins"):
        await runner.each("shutdown", gateway="gw", isolate=True)
    assert calls == ["gw"]
    assert "plugin bad: hook shutdown raised RuntimeError: disk full" in caplog.text
    assert [(h, p, type(e).__name__) for h, p, _, e in observed] == [
        ("shutdown", "bad", "RuntimeError"), ("shutdown", "good", "NoneType")]
    with pytest.raises(PluginError, match="plugin bad: hook shutdown raised RuntimeError"):
        await runner.each("shutdown", gateway="gw")


# --- admit_request -------------------------------------------------------------------


def test_hook_admit_request(shared, sims):
    """An async admission plugin refuses with its own 403 before the request queues."""
    before = [sim_requests(s) for s in sims]
    text = shared.get("/metrics").text
    rejected = metric(text, "gateway_rejections_total", model="m", reason="auth") or 0
    timed = metric(text, "gateway_plugin_duration_seconds_count", hook="admit_request",
                   plugin="gwtest_plugins.admission") or 0
    r = shared.post("/v1/chat/completions", chat("m", user="mallory"))
    assert r.status_code == 403
    assert r.json() == {"error": {"message": "user mallory may not use m",
                                  "type": "permission_error", "param": None,
                                  "code": "user_blocked"}}
    assert "Retry-After" not in r.headers  # retry_after_s=None
    assert [sim_requests(s) for s in sims] == before  # never reached a model server
    ok = shared.post("/v1/chat/completions", chat("m", user="alice"))
    assert ok.status_code == 200, ok.text
    assert sum(sim_requests(s) for s in sims) == sum(before) + 1
    text = shared.get("/metrics").text
    assert metric(text, "gateway_rejections_total", model="m", reason="auth") == rejected + 1
    assert metric(text, "gateway_plugin_duration_seconds_count", hook="admit_request",
                  plugin="gwtest_plugins.admission") == timed + 2


async def test_admit_request_is_collect_all_in_call_order():
    seen = []

    class Second:
        @hookimpl
        def admit_request(self, request, model):
            seen.append("second")
            return Rejection(status=401, message="second", reason="auth")

    class First:
        @hookimpl(tryfirst=True)
        async def admit_request(self, request, model):
            seen.append("first")
            return Rejection(status=429, message="first")

    pm = build_plugin_manager(load_entrypoints=False,
                              extra=[("second", Second()), ("first", First())])
    answers = await HookRunner(pm).each("admit_request", request=None, model=None)
    assert seen == ["first", "second"]  # collect-all: every implementation runs
    assert [a.message for a in answers] == ["first", "second"]


# --- select_backend ------------------------------------------------------------------


@pytest.mark.parametrize("model, served_by", [("m", 0), ("pick-last", 1)],
                         ids=["builtin-least-busy", "plugin-picks-last"])
def test_hook_select_backend(shared, sims, model, served_by):
    """Built-in: least in flight, first on ties; the plugin sends everything to the 2nd URL."""
    before = [sim_requests(s) for s in sims]
    for _ in range(3):
        r = shared.post("/v1/chat/completions", chat(model))
        assert r.status_code == 200, r.text
    delta = [sim_requests(s) - b for s, b in zip(sims, before)]
    assert delta[served_by] == 3 and delta[1 - served_by] == 0


def test_raising_decision_hook_is_a_500_naming_the_plugin(shared, sims):
    before = [sim_requests(s) for s in sims]
    text = shared.get("/metrics").text
    errors = metric(text, "gateway_plugin_errors_total", hook="select_backend",
                    plugin="gwtest_plugins.broken_select") or 0
    r = shared.post("/v1/chat/completions", chat("broken"))
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "plugin gwtest_plugins.broken_select: hook select_backend raised "
                   "RuntimeError: selector exploded",
        "type": "server_error", "param": None, "code": "plugin_error"}
    assert [sim_requests(s) for s in sims] == before
    text = shared.get("/metrics").text
    assert metric(text, "gateway_plugin_errors_total", hook="select_backend",
                  plugin="gwtest_plugins.broken_select") == errors + 1
    assert metric(text, "gateway_requests_total", model="broken", code="500") == 1


def test_select_backend_answer_outside_candidates_is_ignored():
    class Bogus:
        @hookimpl
        def select_backend(self, request, model, candidates, in_flight):
            return "http://elsewhere"

    settings = settings_for(models=[{"name": "m", "backend": "static",
                                     "urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"]}])
    gw = build_gateway(settings, extra_plugins=[("bogus", Bogus())])
    rt = gw.fleet.get("m")
    rt.state, rt.urls = "ready", ("http://127.0.0.1:1", "http://127.0.0.1:2")
    request = types.SimpleNamespace(method="POST", headers={}, remote_addr="", ip="")
    ex = Exchange(request, rt, "/v1/chat/completions", {}, b"", False, 0.0)
    assert gw.forwarder.pick_url(ex) == "http://127.0.0.1:1"


# --- decide_retry --------------------------------------------------------------------


def test_hook_decide_retry(tmp_path, sim):
    """The built-in retries only what provably never reached the server (connect errors:
    retries: 2 -> 3 attempts); a read timeout is one delivery and a 504 at once. The
    ``no_retry`` plugin makes connect errors one attempt; ``retry_503`` opts into
    retrying vLLM's 503 answers, which it can tell by ``outcome.status``."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = {"upstream": {"timeout_s": 0.3, "retries": 2, "backoff_s": 0},
           "plugins": {"modules": ["gwtest_plugins.no_retry", "gwtest_plugins.retry_503"]},
           "models": [{"name": "builtin", "backend": "static", "url": sim.url,
                       "served_model_name": "m"},
                      {"name": "retry-503", "backend": "static", "url": sim.url,
                       "served_model_name": "m"},
                      {"name": "dead", "backend": "static", "url": dead},
                      {"name": "no-retry-dead", "backend": "static", "url": dead}]}
    with start_gateway(cfg, tmp_path) as gw:
        before = sim_requests(sim)
        r = gw.post("/v1/chat/completions", chat("builtin"), headers={"X-Sim-Delay-Ms": "1000"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
        assert sim_requests(sim) - before == 1  # never re-sent
        before = sim_requests(sim)
        r = gw.post("/v1/chat/completions", chat("builtin"), headers={"X-Sim-Status": "503"})
        assert r.status_code == 503 and sim_requests(sim) - before == 1  # passed through
        before = sim_requests(sim)
        r = gw.post("/v1/chat/completions", chat("retry-503"), headers={"X-Sim-Status": "503"})
        assert r.status_code == 503 and sim_requests(sim) - before == 3  # opted in: 3 tries
        for model, attempts in (("dead", 3), ("no-retry-dead", 1)):
            r = gw.post("/v1/chat/completions", chat(model))
            assert r.status_code == 503, r.text
            assert f"after {attempts} attempt(s): connect" in r.json()["error"]["message"]
        text = gw.get("/metrics").text
        assert metric(text, "gateway_upstream_retries_total", model="builtin",
                      kind="read_timeout") == 0
        assert metric(text, "gateway_upstream_retries_total", model="retry-503",
                      kind="http_5xx") == 2
        assert metric(text, "gateway_upstream_retries_total", model="dead", kind="connect") == 2
        assert metric(text, "gateway_upstream_retries_total", model="no-retry-dead",
                      kind="connect") == 0
        assert metric(text, "gateway_plugin_duration_seconds_count", hook="decide_retry",
                      plugin="gwtest_plugins.no_retry") > 0


# --- select_evictions: the built-in LRU policy as a pure function ---------------------

NOW = 1000.0


def mv(name: str, vram: int = 30, last_used: float = 0.0, loaded_since: float = 0.0,
       state: str = "ready", waiting: int = 0, in_flight: int = 0, pinned: bool = False,
       reload_cost_s: float = 0.0) -> ModelView:
    return ModelView(name=name, backend="process", state=state, waiting=waiting,
                     in_flight=in_flight, max_concurrent=4, max_queue=8, last_used=last_used,
                     loaded_since=loaded_since, vram_mib=vram, pinned=pinned,
                     reload_cost_s=reload_cost_s)


def eviction(loaded, target_vram=30, total=100, max_models=None, min_residency=0.0):
    return EvictionRequest(target=mv("target", vram=target_vram, state="starting"),
                           loaded=tuple(loaded), total_vram_mib=total,
                           reserved_vram_mib=sum(m.vram_mib for m in loaded),
                           max_models_running=max_models, min_residency_s=min_residency, now=NOW)


ABC = [mv("a", last_used=10), mv("b", last_used=5), mv("c", last_used=20)]  # 90 of 100 MiB

LRU_TABLE = [
    # (id, request, expected victims)
    ("fits-already", eviction(ABC[:2]), []),
    ("lru-first", eviction(ABC), ["b"]),
    ("lru-order-until-fits", eviction(ABC, target_vram=60), ["b", "a"]),
    ("all-three", eviction(ABC, target_vram=100), ["b", "a", "c"]),
    ("min-residency-respected",
     eviction([mv("a", last_used=10), mv("b", last_used=5, loaded_since=NOW - 5), ABC[2]],
              min_residency=10), ["a"]),
    ("residency-just-reached",
     eviction([mv("a", last_used=10), mv("b", last_used=5, loaded_since=NOW - 10), ABC[2]],
              min_residency=10), ["b"]),
    ("pinned-never", eviction([ABC[0], mv("b", last_used=5, pinned=True), ABC[2]]), ["a"]),
    ("in-flight-never", eviction([ABC[0], mv("b", last_used=5, in_flight=1), ABC[2]]), ["a"]),
    ("queued-never", eviction([ABC[0], mv("b", last_used=5, waiting=1), ABC[2]]), ["a"]),
    ("starting-never", eviction([ABC[0], mv("b", last_used=5, state="starting"), ABC[2]]), ["a"]),
    ("cheaper-reload-first-on-ties",
     eviction([mv("slow", last_used=5, reload_cost_s=30), mv("fast", last_used=5, reload_cost_s=2),
               mv("c", last_used=20)]), ["fast"]),
    ("age-beats-reload-cost",
     eviction([mv("slow", last_used=4, reload_cost_s=30), mv("fast", last_used=5, reload_cost_s=2),
               mv("c", last_used=20)]), ["slow"]),
    ("nothing-can-make-room-all-busy",
     eviction([mv(n, in_flight=1) for n in "abc"]), []),
    ("nothing-can-make-room-not-enough",
     eviction([mv("a", last_used=1), mv("b", in_flight=1), mv("c", pinned=True)], target_vram=70),
     []),
    ("max-models-count", eviction(ABC, total=0, max_models=3), ["b"]),
    ("max-models-two-victims", eviction(ABC, total=200, max_models=2), ["b", "a"]),
    ("no-gpu-budget-no-count-limit", eviction(ABC, total=0, target_vram=500), []),
]


@pytest.mark.parametrize("request_, expected", [(r, e) for _, r, e in LRU_TABLE],
                         ids=[i for i, _, _ in LRU_TABLE])
def test_lru_eviction_table(request_, expected):
    assert lru_eviction.select_evictions(request_) == expected


views = st.builds(
    mv, name=st.sampled_from(["a", "b", "c", "d", "e"]), vram=st.integers(1, 60),
    last_used=st.floats(0, NOW), loaded_since=st.floats(0, NOW),
    state=st.sampled_from(["ready", "starting"]), waiting=st.integers(0, 1),
    in_flight=st.integers(0, 1), pinned=st.booleans(), reload_cost_s=st.floats(0, 60))


@hsettings(max_examples=200, deadline=None)
@given(loaded=st.lists(views, max_size=5, unique_by=lambda m: m.name),
       target=st.integers(1, 100), total=st.integers(0, 200),
       max_models=st.none() | st.integers(1, 5), min_residency=st.floats(0, NOW))
def test_lru_eviction_properties(loaded, target, total, max_models, min_residency):
    """Victims are eligible, oldest first, and make the target fit; else nothing."""
    req = eviction(loaded, target_vram=target, total=total, max_models=max_models,
                   min_residency=min_residency)
    victims = lru_eviction.select_evictions(req)
    by_name = {m.name: m for m in loaded}
    chosen = [by_name[v] for v in victims]
    for m in chosen:
        assert m.state == "ready" and not m.busy and not m.pinned
        assert NOW - m.loaded_since >= min_residency
    assert [m.last_used for m in chosen] == sorted(m.last_used for m in chosen)
    if victims:
        left = [m for m in loaded if m.name not in victims]
        reserved = sum(m.vram_mib for m in left)
        assert total <= 0 or reserved + target <= total
        assert max_models is None or len(left) + 1 <= max_models


def test_plugin_select_evictions_overrides_builtin():
    """Registered after the trylast built-in, the plugin answers first (in-process)."""
    loaded = [mv("a", vram=40, last_used=1), mv("b", vram=50, last_used=2)]
    req = eviction(loaded, target_vram=50)
    assert lru_eviction.select_evictions(req) == ["a"]
    pm = build_plugin_manager(load_entrypoints=False, extra=[("biggest", evict_biggest)])
    runner = HookRunner(pm)
    assert runner.first_with_name("select_evictions", request=req) == (["b"], "biggest")
    pm = build_plugin_manager(load_entrypoints=False)
    assert HookRunner(pm).first_with_name("select_evictions", request=req) == (
        ["a"], "lru_eviction")


def _eviction_scenario(workdir: Path, modules: list[str]) -> tuple[dict, str]:
    cfg = {"gpu": {"total_vram_mib": 100, "min_residency_s": 0, "release_timeout_s": 0},
           "plugins": {"modules": modules, "disabled": ["nvml_vram"]},
           "models": [{"name": n, "backend": "process", "command": SIM_CMD, "vram_mib": v}
                      for n, v in (("a", 40), ("b", 50), ("c", 50))]}
    with start_gateway(cfg, workdir) as gw:
        for name in "abc":
            r = gw.post("/v1/chat/completions", chat(name))
            assert r.status_code == 200, (name, r.text)
        models = gw.get("/gateway/status").json()["models"]
        return {n: models[n]["state"] for n in "abc"}, gw.get("/metrics").text


def test_hook_select_evictions(tmp_path):
    """Three process models on a 100 MiB budget: a (40) and b (50) are loaded, c (50)
    needs room. The built-in LRU stops a (least recently used); the plugin stops b (the
    biggest). Both gateways run side by side."""
    with ThreadPoolExecutor(2) as pool:
        builtin = pool.submit(_eviction_scenario, tmp_path / "builtin", [])
        plugin = pool.submit(_eviction_scenario, tmp_path / "plugin",
                             ["gwtest_plugins.evict_biggest"])
        results = {"builtin": builtin.result(), "plugin": plugin.result()}
    for variant, evicted, kept in (("builtin", "a", "b"), ("plugin", "b", "a")):
        states, text = results[variant]
        assert states == {evicted: "stopped", kept: "ready", "c": "ready"}, variant
        assert metric(text, "gateway_evictions_total", model=evicted, reason="vram") == 1
        assert not metric(text, "gateway_evictions_total", model=kept, reason="vram")


def test_core_never_stops_pinned_or_busy_models_even_if_named():
    class Greedy:
        @hookimpl
        def select_evictions(self, request):
            return ["pinned", "busy", "idle", "ghost"]

    settings = settings_for(models=[
        {"name": n, "backend": "process", "command": ["x", "{port}"], "pinned": n == "pinned"}
        for n in ("pinned", "busy", "idle")])
    gw = build_gateway(settings, extra_plugins=[("greedy", Greedy())])
    for rt in gw.fleet.runtimes.values():
        rt.state = "ready"
    gw.fleet.get("busy").admission._in_flight = 1
    names = gw.hooks.first("select_evictions", request=None)
    assert [(rt.name, action) for rt, action in gw.fleet._valid_victims(names)] == [
        ("idle", "stop")]


# --- read_vram -----------------------------------------------------------------------


def test_hook_read_vram(shared):
    """No gpu.total_vram_mib configured: the plugin's reading is the GPU budget."""
    assert shared.get("/gateway/status").json()["totals"]["vram_total_mib"] == 24576
    text = shared.get("/metrics").text
    assert metric(text, "gateway_vram_total_bytes") == 24576 * 1024 * 1024


def test_read_vram_configured_total_wins_and_none_without_any():
    import gwtest_plugins.fixed_vram as plugin
    gw = build_gateway(settings_for(plugins={"disabled": ["nvml_vram"]}))
    assert gw.fleet.gpu.total_mib() is None  # no NVML, no plugin, nothing configured
    gw = build_gateway(settings_for(plugins={"disabled": ["nvml_vram"]}),
                       extra_plugins=[("vram", plugin)])
    assert (gw.fleet.gpu.total_mib(), gw.fleet.gpu.used_mib()) == (12345, 678)
    gw = build_gateway(settings_for(gpu={"total_vram_mib": 8000}), extra_plugins=[("vram", plugin)])
    assert (gw.fleet.gpu.total_mib(), gw.fleet.gpu.used_mib()) == (8000, 678)


# --- the contract: what build_plugin_manager refuses -----------------------------------


SYNC_SIGNATURES = {
    "register_backends": "async def register_backends(register): pass",
    "select_backend": "async def select_backend(request, model, candidates, in_flight): pass",
    "select_evictions": "async def select_evictions(request): pass",
    "decide_retry": "async def decide_retry(outcome, settings): pass",
    "read_vram": "async def read_vram(): pass",
    "limit_store": "async def limit_store(settings): pass",
}


@pytest.mark.parametrize("hook", SYNC_ONLY_HOOKS)
def test_async_impl_of_sync_only_hook_is_refused_naming_plugin(hook):
    namespace: dict = {}
    exec(SYNC_SIGNATURES[hook], namespace)
    plugin = module("sneaky", **{hook: hookimpl(namespace[hook])})
    with pytest.raises(PluginError, match=rf"^plugin sneaky: hook {hook} must be a plain \(sync\) "
                                          "function"):
        build_plugin_manager(load_entrypoints=False, extra=[("sneaky", plugin)])


def test_async_select_evictions_is_refused():
    class Policy:
        @hookimpl
        async def select_evictions(self, request):
            return []

    with pytest.raises(PluginError, match="plugin my-policy: hook select_evictions must be a "
                                          "plain"):
        build_plugin_manager(load_entrypoints=False, extra=[("my-policy", Policy())])


@pytest.mark.parametrize("hook", ASYNC_CAPABLE_HOOKS)
def test_async_impl_of_async_capable_hook_is_accepted(hook):
    args = {"startup": "gateway", "shutdown": "gateway", "admit_request": "request, model"}[hook]
    namespace: dict = {}
    exec(f"async def {hook}({args}): return None", namespace)
    pm = build_plugin_manager(load_entrypoints=False,
                              extra=[("fine", module("fine", **{hook: hookimpl(namespace[hook])}))])
    assert ("fine", hook) in {(p.name, h) for p in list_plugins(pm) for h in p.hooks}


def test_misspelled_hook_is_refused_by_check_pending():
    @hookimpl
    def select_evicton(request):
        return []

    with pytest.raises(PluginError, match=r"^plugin typo-plugin: unknown hook 'select_evicton'"):
        build_plugin_manager(load_entrypoints=False,
                             extra=[("typo-plugin", module("typo", select_evicton=select_evicton))])


def test_unmarked_functions_are_not_hooks():
    def select_evictions(request):  # no @hookimpl: a helper, not an implementation
        return ["x"]

    pm = build_plugin_manager(load_entrypoints=False,
                              extra=[("plain", module("plain", select_evictions=select_evictions))])
    answer = HookRunner(pm).first_with_name("select_evictions", request=eviction([]))
    assert answer == ([], "lru_eviction")


def test_wrong_argument_name_is_a_plugin_error():
    @hookimpl
    def select_evictions(req):
        return []

    with pytest.raises(PluginError,
                       match=r"(?s)^plugin argy: .*\{'req'\} are declared in the hookimpl"):
        build_plugin_manager(load_entrypoints=False,
                             extra=[("argy", module("argy", select_evictions=select_evictions))])


@pytest.mark.parametrize("hook, args", [("select_backend", "request, model, candidates, in_flight"),
                                        ("admit_request", "request, model"),
                                        ("startup", "gateway")])
@pytest.mark.parametrize("kind", ["wrapper", "hookwrapper"])
def test_wrappers_are_refused(hook, args, kind):
    namespace: dict = {}
    exec(f"def {hook}({args}):\n    return (yield)", namespace)
    plugin = module("wrap", **{hook: hookimpl(**{kind: True})(namespace[hook])})
    with pytest.raises(PluginError, match=f"plugin wrap: hook {hook} does not support wrappers"):
        build_plugin_manager(load_entrypoints=False, extra=[("wrap", plugin)])


def test_fewer_arguments_than_the_spec_are_fine():
    @hookimpl
    def select_backend(candidates):
        return candidates[-1]

    pm = build_plugin_manager(load_entrypoints=False,
                              extra=[("short", module("short", select_backend=select_backend))])
    assert HookRunner(pm).first("select_backend", request=None, model=None,
                                candidates=["u1", "u2"], in_flight={}) == "u2"


# --- disabling, listing, ordering ----------------------------------------------------


def test_disabling_a_builtin_removes_it():
    names = {p.name for p in list_plugins(build_plugin_manager(load_entrypoints=False))}
    assert names == {name for name, _ in DEFAULT_PLUGINS}
    pm = build_plugin_manager(disabled=["lru_eviction"], load_entrypoints=False)
    assert "lru_eviction" not in {p.name for p in list_plugins(pm)}
    assert HookRunner(pm).first("select_evictions", request=eviction(ABC)) is None
    gw = build_gateway(settings_for(plugins={"disabled": ["lru_eviction", "least_busy_selection"]}))
    assert {p.name for p in list_plugins(gw.hooks.pm)}.isdisjoint({"lru_eviction",
                                                                   "least_busy_selection"})


def test_disabling_a_module_plugin_by_name():
    raw_plugins = {"modules": ["gwtest_plugins.pick_last"],
                   "disabled": ["gwtest_plugins.pick_last"]}
    gw = build_gateway(settings_for(plugins=raw_plugins))
    assert "gwtest_plugins.pick_last" not in {p.name for p in list_plugins(gw.hooks.pm)}


def test_cli_plugins_lists_name_origin_hooks(tmp_path):
    out = run_cli("plugins")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()}
    assert rows["lru_eviction"] == ["builtin", "select_evictions"]
    assert rows["process_backend"] == ["builtin", "register_backends"]
    assert set(rows) == {name for name, _ in DEFAULT_PLUGINS}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("plugins: {disabled: [lru_eviction]}\n")
    out = run_cli("plugins", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert {"name": "nvml_vram", "origin": "builtin", "hooks": ["read_vram"]} in listed
    assert "lru_eviction" not in {p["name"] for p in listed}


def test_builtins_are_trylast_and_plugins_answer_first():
    order = []

    def selector(name, answer=None, **opts):
        @hookimpl(**opts)
        def select_backend(request, model, candidates, in_flight):
            order.append(name)
            return answer
        return module(name, select_backend=select_backend)

    pm = build_plugin_manager(load_entrypoints=False, extra=[
        ("early", selector("early", tryfirst=True)), ("a", selector("a")), ("b", selector("b")),
        ("late", selector("late", trylast=True))])
    kwargs = dict(request=None, model=None, candidates=["u1", "u2"], in_flight={"u1": 1, "u2": 0})
    assert pm.hook.select_backend(**kwargs) == "u2"  # pluggy's own call: the built-in answers
    pluggy_order = order[:]
    order.clear()
    assert HookRunner(pm).first_with_name("select_backend", **kwargs) == (
        "u2", "least_busy_selection")
    # a third-party trylast impl lands behind the built-in: only asked if it has no opinion
    assert order == pluggy_order == ["early", "b", "a"]


# --- HookRunner: timing and errors ---------------------------------------------------


def test_hook_runner_times_each_implementation():
    class Slow:
        @hookimpl
        def select_backend(self, request, model, candidates, in_flight):
            time.sleep(0.02)
            return None

    gw = build_gateway(settings_for(), extra_plugins=[("slow", Slow())])
    answer = gw.hooks.first("select_backend", request=None, model=None, candidates=["u"],
                            in_flight={})
    assert answer == "u"  # slow had no opinion, the built-in answered
    reg = gw.metrics.registry
    labels = {"hook": "select_backend", "plugin": "slow"}
    assert reg.get_sample_value("gateway_plugin_duration_seconds_count", labels) == 1
    assert reg.get_sample_value("gateway_plugin_duration_seconds_sum", labels) >= 0.02
    assert reg.get_sample_value("gateway_plugin_duration_seconds_count",
                                {"hook": "select_backend", "plugin": "least_busy_selection"}) == 1


def test_raising_decision_hook_is_plugin_error_and_counted():
    class Broken:
        @hookimpl
        def decide_retry(self, outcome, settings):
            raise KeyError("attempt")

    gw = build_gateway(settings_for(), extra_plugins=[("broken", Broken())])
    with pytest.raises(PluginError, match=r"^plugin broken: hook decide_retry raised KeyError"):
        gw.hooks.first("decide_retry", outcome=None, settings=None)
    assert gw.metrics.registry.get_sample_value(
        "gateway_plugin_errors_total", {"hook": "decide_retry", "plugin": "broken"}) == 1


def test_request_info_and_vram_reading_are_frozen():
    info = RequestInfo(model="m", path="/v1/x", method="POST", headers={}, body={})
    with pytest.raises(AttributeError):
        info.model = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        VramReading(1, 0).total_mib = 2  # type: ignore[misc]



def test_lru_sleeps_sleep_mode_models_and_stops_only_when_sleep_is_not_enough():
    from dataclasses import replace

    from gateway.types import Eviction

    old = replace(mv("old", last_used=1, vram=50), sleep_mode=True)
    new = mv("new", last_used=9, vram=40)
    fits_by_sleeping = replace(eviction([old, new], target_vram=45),
                               sleep_residual_mib=5)  # 90 - 50 + 5 + 45 = 95 <= 100
    assert lru_eviction.select_evictions(fits_by_sleeping) == [Eviction("old", "sleep")]
    # a residual so large that sleeping "old" frees too little (110 > 100): stopping it
    # alone makes room, which beats sleeping it and stopping "new" as well
    too_big_residual = replace(fits_by_sleeping, sleep_residual_mib=20)
    assert lru_eviction.select_evictions(too_big_residual) == ["old"]
    # an already sleeping model only holds its residual and can only be stopped
    asleep = replace(old, state="sleeping", reserved_mib=5)
    req = replace(eviction([asleep, new], target_vram=60), reserved_vram_mib=45)
    assert lru_eviction.select_evictions(req) == ["old"]
