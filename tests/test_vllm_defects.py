"""Fast guards for defects first seen against real vLLM (tests/test_real_vllm.py runs
the real thing): each runs against the simulator or as a pure function."""
from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from gwtest_process import start_gateway  # noqa: E402
from helpers import start_simulator  # noqa: E402

from gateway.config import ConfigError, load_settings  # noqa: E402
from gateway.plugins import HookRunner, build_plugin_manager  # noqa: E402
from gateway.vram import GpuBudget, gpu_memory_utilization  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}]


def settings(**raw):
    raw.setdefault("plugins", {"load_entrypoints": False})
    return load_settings(raw=raw, environ={})


# --- defect 5: a sleeping vLLM adopted as awake -------------------------------------------

def test_a_sleeping_server_is_adopted_as_sleeping_and_woken_on_demand(tmp_path):
    with start_simulator("sleepy", ttft_ms=0, itl_ms=0, enable_sleep_mode=True) as sim:
        assert httpx.post(f"{sim.url}/sleep?level=1", trust_env=False).status_code == 200
        cfg = {"plugins": {"modules": ["gwtest_plugins.adopt_url"], "load_entrypoints": False},
               "models": [{"name": "sleepy", "backend": "adopturl", "sleep_mode": True}]}
        with start_gateway(cfg, tmp_path, env={"GWTEST_ADOPT_URL": sim.url}) as gw:
            assert gw.get("/gateway/status").json()["models"]["sleepy"]["state"] == "sleeping"
            r = gw.post("/v1/chat/completions", {"model": "sleepy", "messages": CHAT,
                                                 "max_tokens": 2}, timeout=30)
            assert r.status_code == 200, r.text
            assert httpx.get(f"{sim.url}/is_sleeping", trust_env=False).json() == {
                "is_sleeping": False}
            status = gw.get("/gateway/status").json()["models"]["sleepy"]
            assert status["state"] == "ready"


def test_an_awake_server_is_adopted_as_ready(tmp_path):
    with start_simulator("awake", ttft_ms=0, itl_ms=0, enable_sleep_mode=True) as sim:
        cfg = {"plugins": {"modules": ["gwtest_plugins.adopt_url"], "load_entrypoints": False},
               "models": [{"name": "awake", "backend": "adopturl", "sleep_mode": True}]}
        with start_gateway(cfg, tmp_path, env={"GWTEST_ADOPT_URL": sim.url}) as gw:
            assert gw.get("/gateway/status").json()["models"]["awake"]["state"] == "ready"


# --- defect 6: sleep level 2 would wake without weights ------------------------------------

def test_sleep_level_2_is_refused_with_a_reason():
    with pytest.raises(ConfigError) as info:
        settings(models=[{"name": "m", "backend": "static", "url": "http://127.0.0.1:1",
                          "sleep_mode": True, "sleep_level": 2}])
    (line,) = info.value.lines
    assert "models[m].sleep_level" in line and "discards the weights" in line


# --- defect 7: without NVML every model counted as 16000 MiB -------------------------------

VLLM_CMD = ["/opt/venv/bin/vllm", "serve", "m", "--port", "{port}"]


def budget(**gpu) -> GpuBudget:
    s = settings(gpu=gpu, models=[{"name": "x", "backend": "static", "url": "http://127.0.0.1:1"}])
    return GpuBudget(s, HookRunner(build_plugin_manager([], False, [])))


def model(**kw):
    base = {"name": "m", "backend": "process", "command": VLLM_CMD}
    base.update(kw)
    return settings(models=[base]).models[0]


def test_vllm_footprint_is_estimated_from_its_memory_utilization():
    assert gpu_memory_utilization(model()) == (0.9, False)  # vLLM's own default
    m = model(command=VLLM_CMD + ["--gpu-memory-utilization", "0.3"])
    assert gpu_memory_utilization(m) == (0.3, True)
    assert gpu_memory_utilization(model(command=["sim", "{port}"])) == (None, False)
    b = budget(total_vram_mib=4000)
    assert b.footprint(model()) == 3600
    assert b.footprint(m) == 1200


def test_any_estimate_fits_an_empty_budget():
    """A small budget can always start a model without vram_mib (defect 7 exactly)."""
    b = budget(total_vram_mib=4000)
    assert b.footprint(model(command=["sim", "{port}"])) == 4000  # 16000 capped
    assert budget(total_vram_mib=4000, estimate_mib=1000).footprint(model()) == 1000


def test_a_small_budget_without_nvml_starts_a_model_with_no_vram_mib(tmp_path):
    sim_cmd = [sys.executable, "-m", "vllm_simulator", "--port", "{port}",
               "--served-model-name", "{name}", "--ttft-ms", "0", "--itl-ms", "0"]
    cfg = {"gpu": {"total_vram_mib": 4000, "footprints_file": str(tmp_path / "fp.json")},
           "plugins": {"load_entrypoints": False},
           "models": [{"name": "m", "backend": "process", "command": sim_cmd}]}
    with start_gateway(cfg, tmp_path) as gw:
        r = gw.post("/v1/chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 1},
                    timeout=30)
        assert r.status_code == 200, r.text
        assert gw.get("/gateway/status").json()["models"]["m"]["vram_mib"] == 4000


# --- defect 3: a request right after the server died got 503 instead of a restart ---------

SIM_CMD = [sys.executable, "-m", "vllm_simulator", "--port", "{port}", "--served-model-name",
           "{name}", "--ttft-ms", "0", "--itl-ms", "0"]


def test_request_right_after_the_server_died_restarts_it_even_without_retries(tmp_path):
    import os
    import signal

    cfg = {"upstream": {"retries": 0}, "plugins": {"load_entrypoints": False},
           "gpu": {"footprints_file": str(tmp_path / "fp.json")},
           "models": [{"name": "m", "backend": "process", "command": SIM_CMD}]}
    with start_gateway(cfg, tmp_path) as gw:
        body = {"model": "m", "messages": CHAT, "max_tokens": 1}
        assert gw.post("/v1/chat/completions", body, timeout=30).status_code == 200
        os.killpg(_guard_pid(gw.proc.pid), signal.SIGKILL)  # the server dies, unnoticed yet
        r = gw.post("/v1/chat/completions", body, timeout=30)
        assert r.status_code == 200, r.text
        starts = gw.get("/metrics").text
        assert 'gateway_backend_starts_total{model="m",result="success"} 2.0' in starts


def _guard_pid(gateway_pid: int) -> int:
    children = Path(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read_text().split()
    for pid in children:
        if b"process_guard" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError(f"no guard among {children}")


# --- defect 2: streams that reached [DONE] counted as 499, their usage lost ---------------

async def test_openai_client_streams_that_reached_done_are_200s_with_usage(tmp_path):
    from openai import AsyncOpenAI

    cfg = {"plugins": {"load_entrypoints": False}, "limits": {"max_concurrent": 64},
           "models": [{"name": "m", "backend": "process", "command": SIM_CMD}]}
    with start_gateway(cfg, tmp_path) as gw:
        async with AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0,
                               timeout=30) as client:
            async def one() -> None:
                stream = await client.chat.completions.create(
                    model="m", messages=CHAT, max_tokens=3, stream=True,
                    stream_options={"include_usage": True})
                async for _ in stream:
                    pass
            import asyncio
            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(20)))
        text = gw.get("/metrics").text

    def value(name: str, **labels: str) -> float:
        from helpers import metric_samples
        return sum(metric_samples(text, name, **labels))
    assert value("gateway_requests_total", model="m", code="499") == 0
    assert value("gateway_requests_total", model="m", code="200") == 200
    assert value("gateway_tokens_total", model="m", type="output") == 600
