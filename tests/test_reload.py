"""Config reload (SIGHUP, POST /gateway/reload) on a real gateway process: the config file is
rewritten under it, and requests before, during and after the reload show what changed.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import yaml
from helpers import (
    free_port,
    gateway_env,
    pid_alive,
    pids_matching,
    sim_command,
    start_gateway,
    start_simulator,
    wait_until,
)

CHAT = [{"role": "user", "content": "hi"}]
FAST = ("--ttft-ms", "5", "--itl-ms", "1")
UPSTREAM = {"retries": 1, "backoff_s": 0.05, "backoff_multiplier": 1, "health_interval_s": 0.05,
            "start_timeout_s": 20}


def chat(gw, model: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=timeout, trust_env=False,
                      json={"model": model, "messages": CHAT, "max_tokens": 2})


def reload(gw) -> httpx.Response:
    return httpx.post(f"{gw.url}/gateway/reload", timeout=30, trust_env=False)


def rewrite(gw, config: dict) -> None:
    gw.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def model_ids(gw) -> list[str]:
    data = httpx.get(f"{gw.url}/v1/models", timeout=5, trust_env=False).json()["data"]
    return [m["id"] for m in data]


def static(name: str, sim, **extra) -> dict:
    return {"name": name, "backend": "static", "url": sim.url, **extra}


def in_background(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args)), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture(scope="module")
def sim():
    with start_simulator("m", ttft_ms=0, itl_ms=0) as s:
        yield s


def test_reload_without_a_config_file_is_refused(tmp_path):
    """The built-in demo has no file to re-read: 400 no_config_file, counted as an error."""
    port = free_port()
    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                            cwd=tmp_path, env=gateway_env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), 20, what="the demo gateway")
        r = httpx.post(f"{url}/gateway/reload", timeout=10, trust_env=False)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "no_config_file"
        metrics = httpx.get(f"{url}/metrics", timeout=5, trust_env=False).text
        assert 'gateway_config_reloads_total{result="error"} 1.0' in metrics
        assert 'gateway_config_reloads_total{result="success"} 0.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_invalid_config_keeps_the_running_one(tmp_path, sim):
    """An invalid file changes nothing: 400 invalid_config with one line per problem (schema
    and backend checks together), logged one line each; requests are still served."""
    cfg = {"upstream": UPSTREAM, "models": [static("m", sim, max_queue=5)]}
    with start_gateway(cfg, tmp_path) as gw:
        for metric in ("success", "invalid", "error"):  # born at 0
            assert gw.metric("gateway_config_reloads_total", result=metric) == 0
        rewrite(gw, {"models": [static("m", sim, max_queu=7),
                                {"name": "p", "backend": "process"}]})
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: gw.metric("gateway_config_reloads_total", result="invalid") == 1, 10,
                   what="the invalid reload to be counted")
        r = reload(gw)
        assert r.status_code == 400
        body = r.json()
        assert body["error"]["code"] == "invalid_config"
        path = str(gw.config_path)
        assert body["problems"] == [
            f"{path}: models[m].max_queu: unknown key (did you mean max_queue?)",
            f"{path}: models[p].command: required for backend process (a list: [program, "
            "arg, ...])"]
        assert chat(gw, "m").status_code == 200
        assert model_ids(gw) == ["m"]
        assert gw.status()["models"]["m"]["max_queue"] == 5
        assert gw.metric("gateway_config_reloads_total", result="invalid") == 2
        log = gw.log_text()
        assert log.count("models[m].max_queu: unknown key") == 2  # SIGHUP and POST
        assert "Traceback" not in log


def test_environment_overrides_still_apply_after_a_reload(tmp_path, sim):
    """The file is re-read the way serve read it: GATEWAY_MAX_QUEUE_SIZE still wins."""
    cfg = {"upstream": UPSTREAM, "models": [static("m", sim)]}
    with start_gateway(cfg, tmp_path, env={"GATEWAY_MAX_QUEUE_SIZE": "7"}) as gw:
        assert gw.status()["models"]["m"]["max_queue"] == 7
        rewrite(gw, {**cfg, "limits": {"max_queue": 3, "max_concurrent": 5}})
        assert reload(gw).json()["changed"] == ["m"]
        status = gw.status()["models"]["m"]
        assert (status["max_queue"], status["max_concurrent"]) == (7, 5)


def test_sighup_adds_a_model_and_reports_what_needs_a_restart(tmp_path, sim):
    cfg = {"upstream": UPSTREAM, "models": [static("m", sim)]}
    with start_gateway(cfg, tmp_path) as gw:
        with start_simulator("n", ttft_ms=0, itl_ms=0) as sim_n:
            assert chat(gw, "n").status_code == 404
            rewrite(gw, {"listen": {"host": "0.0.0.0"}, "auth": {"allow_anonymous": True},
                         "upstream": UPSTREAM,
                         "plugins": {"modules": ["not_loaded_until_restart"]},
                         "models": [static("m", sim), static("n", sim_n)]})
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "n" in model_ids(gw), 10, what="model n to be listed")
            assert chat(gw, "n").status_code == 200
            assert gw.metric("gateway_config_reloads_total", result="success") == 1
            # its series are born at 0 with the model
            assert 'gateway_rejections_total{model="n",reason="queue_full"} 0.0' in gw.metrics()
            r = reload(gw)  # the same file again: nothing left to change
            assert r.status_code == 200
            assert r.json() == {"result": "success", "added": [], "removed": [], "changed": [],
                                "restart_required": ["listen.host", "plugins.modules"]}
            assert chat(gw, "m").status_code == 200  # still listening where it was
        log = gw.log_text()
        assert "config reloaded from" in log and "Traceback" not in log


def test_removed_model_finishes_in_flight_request_then_404_and_stops(tmp_path, sim):
    name = f"slow-{uuid.uuid4().hex[:8]}"  # process scans find only this test's servers
    slow = {"name": name, "backend": "process",
            "command": sim_command("--ttft-ms", "1500", "--itl-ms", "1", "--startup-s", "0.2")}
    cfg = {"upstream": UPSTREAM, "models": [static("m", sim), slow]}
    with start_gateway(cfg, tmp_path) as gw:
        assert chat(gw, name).status_code == 200  # started
        pids = pids_matching("--served-model-name", name)
        assert pids
        thread, out = in_background(chat, gw, name)
        wait_until(lambda: gw.status()["models"][name]["in_flight"] == 1, 5,
                   what="a request in flight")
        rewrite(gw, {"upstream": UPSTREAM, "models": [static("m", sim)]})
        r = reload(gw)
        assert r.status_code == 200
        assert r.json()["removed"] == [name]
        gone = chat(gw, name)
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "model_not_found"
        assert name not in model_ids(gw)
        thread.join(10)
        assert out["r"].status_code == 200  # the request it held finished normally
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, what="its server to stop")
        assert gw.metric("gateway_backend_stops_total", model=name, reason="removed") == 1
        assert chat(gw, "m").status_code == 200


def test_raising_max_concurrent_starts_queued_requests_at_once(tmp_path):
    with start_simulator("m", ttft_ms=2500, itl_ms=0, max_num_seqs=16) as slow_sim:
        model = static("m", slow_sim, max_concurrent=1, max_queue=10)
        with start_gateway({"upstream": UPSTREAM, "models": [model]}, tmp_path) as gw:
            clients = [in_background(chat, gw, "m") for _ in range(4)]
            wait_until(lambda: gw.status()["models"]["m"]["queue_depth"] == 3, 10,
                       what="three requests queued")
            rewrite(gw, {"upstream": UPSTREAM, "models": [{**model, "max_concurrent": 4}]})
            r = reload(gw)
            reloaded = time.monotonic()
            assert r.status_code == 200 and r.json()["changed"] == ["m"]
            status = gw.status()["models"]["m"]
            assert (status["in_flight"], status["queue_depth"], status["max_concurrent"]) == (4, 0, 4)
            for thread, _ in clients:
                thread.join(15)
            # the three that were queued ran side by side (one connection pool of 1 would
            # have sent them one after another: about 7.5 s)
            assert time.monotonic() - reloaded < 5.5
            assert [out["r"].status_code for _, out in clients] == [200] * 4
            assert gw.status()["models"]["m"]["drift"] == 0


def test_lowering_max_concurrent_preempts_nobody(tmp_path):
    with start_simulator("m", ttft_ms=1200, itl_ms=0, max_num_seqs=16) as slow_sim:
        model = static("m", slow_sim, max_concurrent=3, max_queue=10)
        with start_gateway({"upstream": UPSTREAM, "models": [model]}, tmp_path) as gw:
            clients = [in_background(chat, gw, "m") for _ in range(5)]
            wait_until(lambda: gw.status()["models"]["m"]["queue_depth"] == 2, 10,
                       what="two requests queued")
            rewrite(gw, {"upstream": UPSTREAM, "models": [{**model, "max_concurrent": 1}]})
            assert reload(gw).json()["changed"] == ["m"]
            status = gw.status()["models"]["m"]
            assert (status["in_flight"], status["queue_depth"], status["max_concurrent"]) == (3, 2, 1)
            # once the three finish, the two queued go one at a time
            wait_until(lambda: (lambda s: (s["in_flight"], s["queue_depth"]) == (1, 1))(
                gw.status()["models"]["m"]), 10, interval=0.02, what="one in flight, one queued")
            for thread, _ in clients:
                thread.join(15)
            assert [out["r"].status_code for _, out in clients] == [200] * 5
            assert gw.status()["models"]["m"]["drift"] == 0


def test_changed_command_takes_effect_at_the_next_start(tmp_path):
    name = f"p-{uuid.uuid4().hex[:8]}"  # process scans find only this test's servers

    def proc_model(itl: str, **extra) -> dict:
        return {"name": name, "backend": "process",
                "command": sim_command("--ttft-ms", "5", "--itl-ms", itl, "--startup-s", "0.2"),
                **extra}

    def servers(itl: str) -> set[int]:
        return set(pids_matching("--served-model-name", name, "--itl-ms", itl))

    with start_gateway({"upstream": UPSTREAM, "models": [proc_model("1")]}, tmp_path) as gw:
        assert chat(gw, name).status_code == 200
        before = servers("1")
        assert before
        rewrite(gw, {"upstream": UPSTREAM, "models": [proc_model("2", idle_timeout_s=1)]})
        assert reload(gw).json()["changed"] == [name]
        assert chat(gw, name).status_code == 200  # the running server keeps serving
        assert servers("1") == before and not servers("2")
        # idle_timeout_s applies at once: it stops, and the next start runs the new command
        wait_until(lambda: gw.status()["models"][name]["state"] == "stopped", 10,
                   what="the idle stop")
        assert chat(gw, name).status_code == 200
        assert servers("2") and not servers("1")
