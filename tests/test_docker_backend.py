"""The ``docker`` backend against a real Docker daemon, through a real gateway process.

No image can be pulled in CI, so the tests import an empty image and run the
simulator from this checkout inside it: the host's /usr, /lib, /etc, the Python
installation and the repository are bind-mounted read-only, with host networking.
No GPU is needed; where a test needs GPU memory it comes from config
(``vram_mib``) or from a test plugin answering ``read_vram``.

Every test gets its own ``docker.label_prefix``, and its teardown removes every
container carrying it, so no test touches containers it did not start.

Without a daemon the tests skip with the reason, unless VLLM_GATEWAY_REQUIRE_TOOLS=1
(CI), where they fail.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

try:
    from tests.helpers import terminate
except ImportError:  # tests/ itself on sys.path
    from helpers import terminate

try:
    from tests.tools import REQUIRE_ENV
except ImportError:  # tests/ on sys.path instead of the repository root
    from tools import REQUIRE_ENV

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
IMAGE = "gwtest-empty:latest"
SESSION = f"gwtest{uuid.uuid4().hex[:8]}"
_prefixes = itertools.count(1)
_used_prefixes: list[str] = []


# --- the daemon, the image, cleanup ------------------------------------------------------

def _docker_client():
    import docker

    client = docker.from_env(timeout=30)
    client.ping()
    return client


@pytest.fixture(scope="module")
def docker_client():
    try:
        client = _docker_client()
    except Exception as exc:
        reason = f"Docker daemon not available: {type(exc).__name__}: {exc}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; required because {REQUIRE_ENV}=1")
        pytest.skip(reason)
    _ensure_empty_image(client)
    yield client
    for prefix in _used_prefixes:
        _remove_labelled(client, prefix)
    client.close()


def _ensure_empty_image(client) -> None:
    import docker.errors

    try:
        client.images.get(IMAGE)
        return
    except docker.errors.ImageNotFound:
        pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    repo, tag = IMAGE.split(":")
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
    client.images.get(IMAGE)


def _labelled(client, prefix: str, model: str | None = None, running_only: bool = False):
    labels = [f"{prefix}.managed=true"] + ([f"{prefix}.model={model}"] if model else [])
    filters: dict[str, Any] = {"label": labels}
    if running_only:
        filters["status"] = "running"
    return client.containers.list(all=True, filters=filters, ignore_removed=True)


def _remove_labelled(client, prefix: str) -> None:
    for c in _labelled(client, prefix):
        try:
            c.remove(force=True)
        except Exception:
            pass


@pytest.fixture
def prefix(docker_client):
    """A label prefix of this test's own; its containers are removed afterwards."""
    p = f"{SESSION}-{next(_prefixes)}"
    _used_prefixes.append(p)
    yield p
    _remove_labelled(docker_client, p)


# --- config -------------------------------------------------------------------------------

def _mounts() -> list[str]:
    """Read-only mounts that let the empty image run this checkout's Python."""
    paths = ["/usr", "/lib", "/lib64", "/etc", sys.base_prefix, sys.prefix, str(REPO)]
    chosen: list[str] = []
    for p in paths:
        p = os.path.abspath(p)
        if not os.path.exists(p) or any(p == c or p.startswith(c + "/") for c in chosen):
            continue
        chosen.append(p)
    return [f"{p}:{p}:ro" for p in chosen]


def docker_model(name: str, startup_s: float = 0.5, **extra) -> dict[str, Any]:
    return {
        "name": name, "backend": "docker", "image": IMAGE, "network": "host", "gpus": "none",
        "volumes": _mounts(),
        "command": [sys.executable, "-m", "vllm_simulator", "--port", "{port}",
                    "--served-model-name", "{name}", "--startup-s", str(startup_s),
                    "--ttft-ms", "0", "--itl-ms", "0"],
        **extra,
    }


def gateway_config(prefix: str, models: list[dict[str, Any]], tmp_path: Path,
                   **top) -> dict[str, Any]:
    docker = {"label_prefix": prefix, "hf_cache": str(tmp_path / "hf")}
    docker.update(top.pop("docker", {}))
    gpu = {"footprints_file": str(tmp_path / "footprints.json")}
    gpu.update(top.pop("gpu", {}))
    upstream = {"start_timeout_s": 30, "health_interval_s": 0.1, "backoff_s": 0.2}
    upstream.update(top.pop("upstream", {}))
    return {"docker": docker, "gpu": gpu, "upstream": upstream, "models": models,
            "plugins": {"load_entrypoints": False, **top.pop("plugins", {})}, **top}


# --- a gateway subprocess -----------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProc:
    def __init__(self, config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, cfg = tempfile.mkstemp(prefix="gw-", suffix=".yaml", dir=tmp_path)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(config, fh)
        self.log_path = Path(cfg).with_suffix(".log")
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("HF_TOKEN", "TOTAL_GPU_VRAM", "VLLM_IMAGE", "ALLOWED_MODELS_JSON",
                                 "GATEWAY_MAX_MODELS_CONCURRENT", "VLLM_INACTIVITY_TIMEOUT",
                                 "OTEL_EXPORTER_OTLP_ENDPOINT")}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), str(TESTS), os.environ.get("PYTHONPATH")) if p)
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", cfg, "--port",
                 str(self.port)], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self, timeout: float = 30) -> GatewayProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http.get("/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not up after {timeout}s:\n{self.log()}")

    def chat(self, model: str, **kw) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            **kw)

    def status(self) -> dict[str, Any]:
        return self.http.get("/gateway/status").json()

    def metric(self, name: str, **labels: str) -> float:
        text = self.http.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            if "{" in series:
                metric_name, rest = series.split("{", 1)
                got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
            else:
                metric_name, got = series, ""
            if metric_name == name and got == want:
                return float(value)
        return 0.0

    def stop(self, timeout: float = 30) -> int | None:
        terminate(self.proc, timeout)
        self.http.close()
        return self.proc.returncode


@pytest.fixture
def gateways():
    """Start gateways with ``gateways(config, tmp_path, env=...)``; all stop at teardown."""
    started: list[GatewayProc] = []

    def start(config, tmp_path, env=None, wait=True) -> GatewayProc:
        gw = GatewayProc(config, tmp_path, env)
        started.append(gw)
        return gw.wait_up() if wait else gw

    yield start
    for gw in started:
        gw.stop()


def wait_for(predicate, timeout: float = 15, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _assert_quiet(gw: GatewayProc) -> None:
    """No request left queued or in flight, and admission accounting balanced."""
    for name, m in gw.status()["models"].items():
        assert (m["queue_depth"], m["in_flight"], m["drift"]) == (0, 0, 0), (name, m)


# --- tests ----------------------------------------------------------------------------------

pytestmark = pytest.mark.timeout(90)


@pytest.mark.docker
def test_cold_start_through_openai_client(docker_client, prefix, gateways, tmp_path):
    from openai import OpenAI

    gw = gateways(gateway_config(prefix, [docker_model("m1")], tmp_path), tmp_path)
    assert gw.status()["models"]["m1"]["state"] == "stopped"
    client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
    assert reply.choices[0].message.content
    running = _labelled(docker_client, prefix, "m1", running_only=True)
    assert len(running) == 1
    c = running[0]
    assert c.name == f"{prefix}-m1"
    assert c.labels[f"{prefix}.model"] == "m1"
    status = gw.status()["models"]["m1"]
    assert status["state"] == "ready"
    assert status["urls"] == [f"http://127.0.0.1:{c.labels[f'{prefix}.port']}"]
    assert gw.metric("gateway_backend_starts_total", model="m1", result="success") == 1
    _assert_quiet(gw)


@pytest.mark.docker
def test_concurrent_first_requests_start_one_container(docker_client, prefix, gateways, tmp_path):
    gw = gateways(gateway_config(prefix, [docker_model("m1", startup_s=1.0)], tmp_path), tmp_path)
    barrier = threading.Barrier(8)

    def one(_):
        barrier.wait()
        return gw.chat("m1").status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert codes == [200] * 8
    assert len(_labelled(docker_client, prefix)) == 1
    assert gw.metric("gateway_backend_starts_total", model="m1", result="success") == 1
    _assert_quiet(gw)


@pytest.mark.docker
def test_health_wait_timeout_gives_503_and_removes_container(docker_client, prefix, gateways,
                                                              tmp_path):
    model = docker_model("slow", startup_s=30, start_timeout_s=2)
    gw = gateways(gateway_config(prefix, [model], tmp_path), tmp_path)
    started = time.monotonic()
    r = gw.chat("slow")
    assert r.status_code == 503, r.text
    assert time.monotonic() - started < 20
    assert "not healthy after 2s" in r.json()["error"]["message"]
    assert _labelled(docker_client, prefix) == []
    status = gw.status()["models"]["slow"]
    assert status["state"] == "failed"
    assert "not healthy" in status["last_error"]
    assert gw.metric("gateway_backend_starts_total", model="slow", result="failure") == 1
    _assert_quiet(gw)


@pytest.mark.docker
def test_crashed_container_is_restarted_on_next_request(docker_client, prefix, gateways, tmp_path):
    gw = gateways(gateway_config(prefix, [docker_model("m1")], tmp_path), tmp_path)
    assert gw.chat("m1").status_code == 200
    (first,) = _labelled(docker_client, prefix)
    first.kill()
    r = gw.chat("m1")
    assert r.status_code == 200, r.text
    running = _labelled(docker_client, prefix, running_only=True)
    assert len(running) == 1 and running[0].id != first.id
    assert gw.metric("gateway_backend_starts_total", model="m1", result="success") == 2
    _assert_quiet(gw)


@pytest.mark.docker
def test_restarted_gateway_adopts_running_container(docker_client, prefix, gateways, tmp_path):
    cfg = gateway_config(prefix, [docker_model("m1")], tmp_path,
                         docker={"stop_on_shutdown": False})
    gw1 = gateways(cfg, tmp_path)
    assert gw1.chat("m1").status_code == 200
    (container,) = _labelled(docker_client, prefix)
    assert gw1.stop() == 0
    container.reload()
    assert container.status == "running"  # left running for the next gateway

    gw2 = gateways(cfg, tmp_path)
    assert gw2.status()["models"]["m1"]["state"] == "ready"
    assert gw2.chat("m1").status_code == 200
    (again,) = _labelled(docker_client, prefix)
    assert again.id == container.id
    assert gw2.metric("gateway_backend_starts_total", model="m1", result="adopted") == 1
    assert gw2.metric("gateway_backend_starts_total", model="m1", result="success") == 0


@pytest.mark.docker
def test_adoption_skips_container_with_changed_config(docker_client, prefix, gateways, tmp_path):
    cfg = gateway_config(prefix, [docker_model("m1")], tmp_path, docker={"stop_on_shutdown": False})
    gw1 = gateways(cfg, tmp_path)
    assert gw1.chat("m1").status_code == 200
    (old,) = _labelled(docker_client, prefix)
    gw1.stop()
    cfg["models"][0]["env"] = {"SOMETHING": "changed"}
    gw2 = gateways(cfg, tmp_path)
    assert gw2.status()["models"]["m1"]["state"] == "stopped"
    assert _labelled(docker_client, prefix) == []  # the outdated container is removed
    assert gw2.chat("m1").status_code == 200
    (new,) = _labelled(docker_client, prefix)
    assert new.id != old.id


@pytest.mark.docker
def test_idle_container_is_stopped(docker_client, prefix, gateways, tmp_path):
    gw = gateways(gateway_config(prefix, [docker_model("m1", idle_timeout_s=1)], tmp_path),
                  tmp_path)
    assert gw.chat("m1").status_code == 200
    assert len(_labelled(docker_client, prefix)) == 1
    wait_for(lambda: _labelled(docker_client, prefix) == [], timeout=10, what="idle stop")
    assert gw.status()["models"]["m1"]["state"] == "stopped"
    assert gw.metric("gateway_backend_stops_total", model="m1", reason="idle") == 1


@pytest.mark.docker
def test_shutdown_stops_containers(docker_client, prefix, gateways, tmp_path):
    cfg = gateway_config(prefix, [docker_model("a"), docker_model("b")], tmp_path)
    gw = gateways(cfg, tmp_path)
    assert gw.chat("a").status_code == 200
    assert gw.chat("b").status_code == 200
    assert len(_labelled(docker_client, prefix, running_only=True)) == 2
    assert gw.stop() == 0
    assert _labelled(docker_client, prefix) == []


def test_daemon_unreachable_gives_quick_503_with_reason(gateways, tmp_path):
    """Needs no daemon: the gateway is pointed at a socket that does not exist."""
    bogus = f"unix://{tmp_path}/no-docker-here.sock"
    cfg = gateway_config(f"{SESSION}-nodaemon", [docker_model("m1")], tmp_path)
    gw = gateways(cfg, tmp_path, env={"DOCKER_HOST": bogus})
    started = time.monotonic()
    r = gw.chat("m1")
    took = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert took < 10
    message = r.json()["error"]["message"]
    assert f"Docker daemon not reachable at {bogus}" in message
    status = gw.status()["models"]["m1"]
    assert status["state"] == "failed"
    assert "Docker daemon not reachable" in status["last_error"]
    assert gw.http.get("/health").status_code == 200
    _assert_quiet(gw)


@pytest.mark.docker
def test_eviction_order_on_vram_budget(docker_client, prefix, gateways, tmp_path):
    models = [docker_model(n, vram_mib=10_000) for n in ("a", "b", "c")]
    cfg = gateway_config(prefix, models, tmp_path,
                         gpu={"total_vram_mib": 20_000, "min_residency_s": 0})
    gw = gateways(cfg, tmp_path)

    def states():
        return {n: m["state"] for n, m in gw.status()["models"].items()}

    def running():
        return sorted(c.labels[f"{prefix}.model"]
                      for c in _labelled(docker_client, prefix, running_only=True))

    for name in ("a", "b"):
        assert gw.chat(name).status_code == 200
    assert states() == {"a": "ready", "b": "ready", "c": "stopped"}
    assert gw.chat("c").status_code == 200  # a is least recently used
    assert states() == {"a": "stopped", "b": "ready", "c": "ready"}
    assert running() == ["b", "c"]
    assert gw.metric("gateway_evictions_total", model="a", reason="vram") == 1
    assert gw.chat("a").status_code == 200  # now b is
    assert states() == {"a": "ready", "b": "stopped", "c": "ready"}
    assert running() == ["a", "c"]
    assert gw.metric("gateway_evictions_total", model="b", reason="vram") == 1
    assert gw.metric("gateway_evictions_total", model="c", reason="vram") == 0
    assert gw.status()["totals"]["vram_reserved_mib"] == 20_000
    assert len(_labelled(docker_client, prefix)) == 2  # evicted containers are removed
    _assert_quiet(gw)


@pytest.mark.docker
def test_footprints_learned_from_read_vram_hook(docker_client, prefix, gateways, tmp_path):
    fp_file = tmp_path / "footprints.json"
    cfg = gateway_config(prefix, [docker_model("a"), docker_model("b")], tmp_path,
                         gpu={"estimate_mib": 1000, "footprints_file": str(fp_file)},
                         plugins={"modules": ["fake_vram_plugin"]})
    env = {"GWTEST_LABEL_PREFIX": prefix, "GWTEST_FAKE_MIB": json.dumps({"a": 3000, "b": 5000}),
           "GWTEST_FAKE_TOTAL_MIB": "24000"}
    gw = gateways(cfg, tmp_path, env=env)
    assert gw.status()["totals"]["vram_total_mib"] == 24000
    assert gw.chat("a").status_code == 200
    assert gw.chat("b").status_code == 200
    assert json.loads(fp_file.read_text()) == {"a": 3000, "b": 5000}
    models = gw.status()["models"]
    assert (models["a"]["vram_mib"], models["b"]["vram_mib"]) == (3000, 5000)
    assert not list(tmp_path.glob(".footprints-*"))  # atomic write left no temp file
    _assert_quiet(gw)
