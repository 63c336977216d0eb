"""``vllm-gateway ps | load | unload | logs | reload`` against a real gateway process, each
command run as its own subprocess (``python -m gateway ...``), as an operator would."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import yaml
from helpers import REPO, free_port, gateway_env, sim_command, start_gateway

pytestmark = pytest.mark.timeout(120)
FAST = ("--ttft-ms", "5", "--itl-ms", "1", "--startup-s", "0.3")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=gateway_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    name = f"cli-{uuid.uuid4().hex[:6]}"
    cfg = {"upstream": {"health_interval_s": 0.05, "start_timeout_s": 20},
           "models": [{"name": name, "backend": "process", "max_concurrent": 3,
                       "command": sim_command(*FAST), "vram_mib": 1500}]}
    with start_gateway(cfg, tmp) as g:
        g.model = name
        yield g


def test_ps_load_logs_unload(gw):
    name = gw.model
    ps = cli("ps", "--url", gw.url)
    assert ps.returncode == 0, ps.stderr
    header, row = ps.stdout.splitlines()[:2]
    for column in ("MODEL", "STATE", "QUEUE", "IN FLIGHT", "VRAM", "IDLE FOR", "LAST ERROR"):
        assert column in header
    assert row.split()[:4] == [name, "stopped", "0", "0"]

    load = cli("load", name, "--url", gw.url)
    assert load.returncode == 0, load.stderr
    assert load.stdout.startswith(f"{name}: ready")

    ps = cli("ps", "--url", gw.url)
    row = ps.stdout.splitlines()[1]
    assert row.split()[:4] == [name, "ready", "0", "0"]
    assert "1.5 GiB" in row

    raw = cli("ps", "--json", "--url", gw.url)
    assert json.loads(raw.stdout)["models"][name]["state"] == "ready"

    logs = cli("logs", name, "-n", "5", "--url", gw.url)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert 1 <= len(lines) <= 5
    logs_json = json.loads(cli("logs", name, "-n", "5", "--json", "--url", gw.url).stdout)
    assert logs_json["model"] == name and logs_json["lines"] == lines

    unload = cli("unload", name, "--url", gw.url)
    assert unload.returncode == 0, unload.stderr
    assert unload.stdout.strip() == f"{name}: stopped"
    status = gw.status()["models"][name]
    assert (status["queue_depth"], status["in_flight"], status["drift"]) == (0, 0, 0)


def test_http_errors_are_the_message_and_exit_1(gw):
    line = one_line_error(cli("load", "no-such-model", "--url", gw.url))
    assert "`no-such-model` does not exist" in line
    line = one_line_error(cli("logs", gw.model, "-n", "0", "--url", gw.url))
    assert "lines must be an integer" in line


def test_connection_refused_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("ps",), ("load", "m"), ("unload", "m"), ("logs", "m"), ("reload",)):
        line = one_line_error(cli(*args, "--url", url))
        assert f"cannot connect to the gateway at {url}" in line


def test_url_defaults_to_the_configs_listen_address(gw, tmp_path):
    cfg = tmp_path / "gw.yaml"
    model = {"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}
    cfg.write_text(yaml.safe_dump({"listen": {"host": "0.0.0.0", "port": gw.port},
                                   "auth": {"allow_anonymous": True},
                                   "models": [model]}))
    ps = cli("ps", "--config", str(cfg))
    assert ps.returncode == 0, ps.stderr
    assert gw.model in ps.stdout
    other = tmp_path / "other.yaml"
    port = free_port()
    other.write_text(yaml.safe_dump({"listen": {"port": port}, "models": [model]}))
    assert f"127.0.0.1:{port}" in one_line_error(cli("ps", "--config", str(other)))


def test_reload_posts_to_the_reload_endpoint(gw):
    proc = cli("reload", "--url", gw.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config reloaded"), proc.stdout
    raw = cli("reload", "--json", "--url", gw.url)
    assert json.loads(raw.stdout)["result"] == "success"


def test_a_rejected_reload_prints_its_problems(gw):
    good = gw.config_path.read_text()
    try:
        gw.config_path.write_text(good.replace("max_concurrent: 3", "max_concurrent: -1"))
        proc = cli("reload", "--url", gw.url)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "max_concurrent" in proc.stderr, proc.stderr
    finally:
        gw.config_path.write_text(good)
