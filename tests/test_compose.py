"""docker-compose.yml and deploy/gateway.yaml: valid as written.

``docker-compose config -q`` (Debian's docker-compose, or the ``docker compose``
plugin) parses and interpolates the file; the example gateway config must pass the
gateway's own validation, with the docker backend's checks.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.app import build_gateway
from gateway.config import load_settings

try:
    from tests.tools import require_tool
except ImportError:
    from tools import require_tool

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"


def _compose_command() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return [require_tool("docker-compose", "Debian package docker-compose")]


def test_compose_file_is_valid():
    cmd = _compose_command()
    result = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
                                 "GATEWAY_API_KEY": "k" * 32, "GATEWAY_ADMIN_KEY": "a" * 32})
    assert result.returncode == 0, result.stderr
    keyless = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                             capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp"})
    assert keyless.returncode != 0 and "GATEWAY_API_KEY" in keyless.stderr


def test_compose_mounts_exist_and_wire_the_services():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"gateway", "prometheus", "grafana", "jaeger"}
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
    gw = services["gateway"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in gw["volumes"]
    assert gw["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert gw["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert (REPO / "Dockerfile").exists()
    # Published on loopback only, and the gateway cannot start without its keys.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert gw["environment"]["GATEWAY_API_KEY"].startswith("${GATEWAY_API_KEY:?")


def test_example_gateway_config_needs_its_keys():
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_settings(REPO / "deploy" / "gateway.yaml", environ={})
    assert any("GATEWAY_API_KEY is not set" in line for line in err.value.lines)


def test_example_gateway_config_is_valid():
    keys = {"GATEWAY_API_KEY": "k" * 32, "GATEWAY_ADMIN_KEY": "a" * 32}
    settings = load_settings(REPO / "deploy" / "gateway.yaml", environ=keys)
    build_gateway(settings, source="deploy/gateway.yaml")
    assert [m.backend for m in settings.models] == ["docker", "docker"]
    assert settings.listen.host == "0.0.0.0"
    # the HF cache path must be mounted at the same path in the gateway container
    gw = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]
    assert f"{settings.docker.hf_cache}:{settings.docker.hf_cache}" in gw["volumes"]
    assert settings.gpu.footprints_file.startswith("/var/lib/vllm-gateway/state/")
