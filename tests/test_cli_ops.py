"""``vllm-gateway ps | load | unload | logs | reload`` against a real gateway process, each
command run as its own subprocess (``python -m gateway ...``), as an operator would."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid

import pytest
import yaml
from helpers import REPO, free_port, gateway_env, sim_command, start_gateway

pytestmark = pytest.mark.timeout(120)
FAST = ("--ttft-ms", "5", "--itl-ms", "1", "--startup-s", "0.3")
ADMIN_ENV = "VLLM_GATEWAY_ADMIN_KEY"


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """``python -m gateway ARGS``; no admin key unless ``env`` gives one."""
    environ = {k: v for k, v in gateway_env(env).items() if env and k in env or k != ADMIN_ENV}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=environ,
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


# --- a gateway with API keys: the commands need an admin key ---------------------------------

OPS_KEY = f"sk-cli-ops-{uuid.uuid4().hex}"
TEAM_KEY = f"sk-cli-team-a-{uuid.uuid4().hex}"
COMMANDS = (("ps",), ("load", "{model}"), ("unload", "{model}"), ("logs", "{model}"), ("reload",))
NEED_KEY = f"the gateway refused: admin key required (set {ADMIN_ENV} or --admin-key)"


@pytest.fixture(scope="module")
def keyed_gw(tmp_path_factory):
    """Admin key from the server's environment (key_env), a client key, status protected."""
    tmp = tmp_path_factory.mktemp("cli-keys")
    name = f"cli-keyed-{uuid.uuid4().hex[:6]}"
    cfg = {"upstream": {"health_interval_s": 0.05, "start_timeout_s": 20},
           "auth": {"keys": [{"name": "team-a",
                              "key_sha256": hashlib.sha256(TEAM_KEY.encode()).hexdigest()}],
                    "admin_keys": [{"name": "ops", "key_env": "CLI_OPS_KEY"}],
                    "protect": ["status"]},
           "models": [{"name": name, "backend": "process", "max_concurrent": 3,
                       "command": sim_command(*FAST), "vram_mib": 1500}]}
    with start_gateway(cfg, tmp, env={"CLI_OPS_KEY": OPS_KEY}) as g:
        g.model = name
        yield g


def run_all(gw, env: dict[str, str] | None = None, *extra: str):
    """Every command once; yields (command, its process)."""
    for command in COMMANDS:
        args = [a.format(model=gw.model) for a in command]
        yield args[0], cli(*args, "--url", gw.url, *extra, env=env)


def assert_key_not_shown(proc: subprocess.CompletedProcess, *keys: str) -> None:
    for key in keys:
        assert key not in proc.stdout and key not in proc.stderr, "a key was printed"


def test_keyed_commands_work_with_the_env_var(keyed_gw):
    name, env = keyed_gw.model, {ADMIN_ENV: OPS_KEY}
    ps = cli("ps", "--url", keyed_gw.url, env=env)
    assert ps.returncode == 0, ps.stderr
    assert ps.stdout.splitlines()[1].split()[:2] == [name, "stopped"]
    load = cli("load", name, "--url", keyed_gw.url, env=env)
    assert load.returncode == 0, load.stderr
    assert load.stdout.startswith(f"{name}: ready")
    raw = json.loads(cli("ps", "--json", "--url", keyed_gw.url, env=env).stdout)
    assert raw["models"][name]["urls"], "an admin key sees the upstream URLs"
    assert set(raw["keys"]) >= {"team-a", "ops"}, raw.get("keys")
    logs = cli("logs", name, "-n", "5", "--url", keyed_gw.url, env=env)
    assert logs.returncode == 0, logs.stderr
    assert 1 <= len(logs.stdout.splitlines()) <= 5
    reload = cli("reload", "--url", keyed_gw.url, env=env)
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.startswith("config reloaded"), reload.stdout
    unload = cli("unload", name, "--url", keyed_gw.url, env=env)
    assert unload.returncode == 0, unload.stderr
    assert unload.stdout.strip() == f"{name}: stopped"
    for proc in (ps, load, logs, reload, unload):
        assert_key_not_shown(proc, OPS_KEY)
    assert OPS_KEY not in keyed_gw.log_text()


def test_the_admin_key_flag(keyed_gw):
    proc = cli("reload", "--url", keyed_gw.url, "--admin-key", OPS_KEY)
    assert proc.returncode == 0, proc.stderr
    assert_key_not_shown(proc, OPS_KEY)
    # the flag wins over the variable
    proc = cli("reload", "--url", keyed_gw.url, "--admin-key", OPS_KEY, env={ADMIN_ENV: TEAM_KEY})
    assert proc.returncode == 0, proc.stderr


def test_without_a_key_each_command_is_one_line(keyed_gw):
    for command, proc in run_all(keyed_gw):
        assert one_line_error(proc) == f"vllm-gateway {command}: {NEED_KEY}", command


def test_a_client_key_is_one_line(keyed_gw):
    for command, proc in run_all(keyed_gw, {ADMIN_ENV: TEAM_KEY}):
        assert_key_not_shown(proc, TEAM_KEY)
        if command == "ps":  # a protected status answers any valid key, without internals
            assert proc.returncode == 0, proc.stderr
            raw = json.loads(cli("ps", "--json", "--url", keyed_gw.url,
                                 env={ADMIN_ENV: TEAM_KEY}).stdout)
            assert "keys" not in raw and raw["models"][keyed_gw.model]["urls"] == []
            continue
        assert one_line_error(proc) == (
            f"vllm-gateway {command}: the gateway refused: key 'team-a' is not an admin key "
            f"(the key in {ADMIN_ENV} must be one of auth.admin_keys)"), command


def test_a_wrong_key_is_one_line_and_never_printed(keyed_gw):
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    for command, proc in run_all(keyed_gw, {ADMIN_ENV: wrong}):
        assert one_line_error(proc) == (f"vllm-gateway {command}: the gateway refused the admin "
                                        f"key from {ADMIN_ENV}: the API key is not valid")
        assert_key_not_shown(proc, wrong)
    proc = cli("unload", keyed_gw.model, "--url", keyed_gw.url, "--admin-key", wrong)
    assert one_line_error(proc).endswith("refused the admin key from --admin-key: the API key "
                                         "is not valid")
    assert_key_not_shown(proc, wrong)


@pytest.mark.parametrize("bad", ["sk-has a space", "sk-\u00e9t\u00e9-key", "sk-\x01-ctl",
                                 "k" * 600])
def test_a_malformed_key_is_refused_before_sending(keyed_gw, bad):
    proc = cli("ps", "--url", keyed_gw.url, env={ADMIN_ENV: bad})
    line = one_line_error(proc)
    assert line == (f"vllm-gateway ps: the admin key in {ADMIN_ENV} is not a valid API key "
                    "(1-512 printable ASCII characters, no spaces)"), line
    assert_key_not_shown(proc, bad)


def test_config_listen_is_read_without_the_servers_key_env(keyed_gw, tmp_path):
    """--config only needs listen: a key_env set for the server but not in this shell does
    not stop the command."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": {"port": keyed_gw.port},
        "auth": {"admin_keys": [{"name": "ops", "key_env": "CLI_OPS_KEY"}]},
        "models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}))
    ps = cli("ps", "--config", str(cfg), env={ADMIN_ENV: OPS_KEY})
    assert ps.returncode == 0, ps.stderr
    assert keyed_gw.model in ps.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"listen": {"port": "nope"}, "models": []}))
    assert "listen.port" in one_line_error(cli("ps", "--config", str(broken)))
