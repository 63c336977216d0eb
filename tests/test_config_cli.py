"""``vllm-gateway check-config`` and ``serve`` with good and bad configuration, run as the real
command: every problem is one line naming the key (or environment variable), never a traceback.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import free_port, gateway_env, start_gateway

CLI_TIMEOUT_S = 30


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``vllm-gateway`` console script (``python -m gateway`` without one)."""
    script = Path(sys.executable).parent / "vllm-gateway"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]
    return subprocess.run([*cmd, *args], env=gateway_env(env), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


def write(tmp_path: Path, config, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def problem_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines, minus log records (``<date> <time> LEVEL logger: ...``)."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and not (line[:4].isdigit() and " INFO " in line[:40])]


def assert_problems(result: subprocess.CompletedProcess, expected: list[tuple[str, ...]]) -> None:
    """Non-zero exit, no traceback, and exactly one stderr line per expected problem, each
    line containing every fragment of its tuple."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = problem_lines(result)
    assert len(lines) == len(expected), result.stderr
    for fragments in expected:
        matching = [line for line in lines if all(f in line for f in fragments)]
        assert len(matching) == 1, (fragments, lines)


VALID = {
    "listen": {"port": 8123},
    "limits": {"max_concurrent": 4},
    "models": [
        {"name": "chat", "backend": "process",
         "command": ["vllm-gateway", "simulate", "--port", "{port}", "--served-model-name",
                     "{name}"]},
        {"name": "remote", "backend": "static", "url": "http://127.0.0.1:9/"},
    ],
}

SCHEMA_PROBLEMS = {
    "listen": {"port": 70000, "backlog": 0},
    "limits": {"max_concurrent": 0, "max_queue": "lots"},
    "idle_timeout_s": -5,
    "colour": "blue",
    "models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}],
}
SCHEMA_EXPECTED = [
    ("listen.port", "70000"),
    ("listen.backlog", "(got 0)"),
    ("limits.max_concurrent", "(got 0)"),
    ("limits.max_queue", "integer", "'lots'"),
    ("idle_timeout_s", "-5"),
    ("colour", "unknown key"),
]

MODEL_PROBLEMS = {
    "models": [
        {"name": "no-command", "backend": "process"},
        {"name": "no-url", "backend": "static"},
        {"name": "odd", "backend": "teleport", "url": "http://127.0.0.1:9"},
    ],
}
MODEL_EXPECTED = [
    ("models[no-command].command", "required"),
    ("models[no-url].url", "required"),
    ("models[odd].backend", "unknown backend 'teleport'"),
]


def test_check_config_prints_effective_config(tmp_path):
    path = write(tmp_path, VALID)
    result = cli("check-config", path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    effective = json.loads(result.stdout)
    assert effective["listen"]["port"] == 8123
    assert effective["limits"]["max_concurrent"] == 4
    assert effective["limits"]["max_queue"] == 200  # a default, filled in
    assert [m["name"] for m in effective["models"]] == ["chat", "remote"]
    assert effective["models"][1]["url"] == "http://127.0.0.1:9"  # normalised


def test_check_config_hides_hf_token(tmp_path):
    result = cli("check-config", write(tmp_path, VALID), env={"HF_TOKEN": "hf_secret"})
    assert result.returncode == 0, result.stderr
    assert "hf_secret" not in result.stdout
    assert json.loads(result.stdout)["docker"]["hf_token"] == "***"


def test_check_config_reports_one_line_per_schema_problem(tmp_path):
    path = write(tmp_path, SCHEMA_PROBLEMS)
    result = cli("check-config", path)
    assert_problems(result, SCHEMA_EXPECTED)
    assert all(line.startswith(path + ": ") for line in problem_lines(result))
    assert result.stdout == ""


def test_check_config_reports_one_line_per_model_problem(tmp_path):
    path = write(tmp_path, MODEL_PROBLEMS)
    result = cli("check-config", path)
    assert_problems(result, MODEL_EXPECTED)
    assert all(line.startswith(path + ": ") for line in problem_lines(result))


@pytest.mark.parametrize("config,expected", [(SCHEMA_PROBLEMS, SCHEMA_EXPECTED),
                                             (MODEL_PROBLEMS, MODEL_EXPECTED)],
                         ids=["schema", "models"])
def test_serve_with_bad_config_exits_with_problem_lines(tmp_path, config, expected):
    path = write(tmp_path, config)
    result = cli("serve", "--config", path, "--port", str(free_port()))
    assert_problems(result, expected)


@pytest.mark.parametrize("variable,value,key", [
    ("GATEWAY_MAX_CONCURRENT", "0", "limits.max_concurrent"),
    ("VLLM_PORT", "99999", "docker.vllm_port"),
    ("GATEWAY_MAX_QUEUE_SIZE", "many", "limits.max_queue"),
    ("VLLM_INACTIVITY_TIMEOUT", "-1", "idle_timeout_s"),
])
def test_env_override_problem_names_the_variable(tmp_path, variable, value, key):
    result = cli("check-config", write(tmp_path, VALID), env={variable: value})
    assert_problems(result, [(f"environment {variable}: {key}", value)])


def test_env_max_queue_size_is_applied(tmp_path):
    result = cli("check-config", write(tmp_path, VALID), env={"GATEWAY_MAX_QUEUE_SIZE": "7"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["limits"]["max_queue"] == 7


def test_env_max_queue_size_reaches_the_running_gateway(tmp_path):
    config = {"models": [{"name": "remote", "backend": "static", "url": "http://127.0.0.1:9"}]}
    with start_gateway(config, tmp_path, env={"GATEWAY_MAX_QUEUE_SIZE": "7"}) as gw:
        assert gw.status()["models"]["remote"]["max_queue"] == 7


def test_allowed_models_json_replaces_models(tmp_path):
    models = [{"name": "s", "backend": "static", "url": "http://127.0.0.1:9"}, "org/model-x"]
    result = cli("check-config", write(tmp_path, VALID),
                 env={"ALLOWED_MODELS_JSON": json.dumps(models)})
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)["models"]
    assert [(m["name"], m["backend"]) for m in got] == [("s", "static"), ("org/model-x", "docker")]
    assert got[1]["model"] == "org/model-x"


@pytest.mark.parametrize("value,fragment", [
    ("[1", "Expecting"),
    ('"just a string"', "must be a JSON list or object"),
    ("[3]", "entries must be strings or objects"),
    ('{"name": 1}', "models[name].model"),
])
def test_allowed_models_json_problem_names_the_variable(tmp_path, value, fragment):
    result = cli("check-config", write(tmp_path, VALID), env={"ALLOWED_MODELS_JSON": value})
    assert_problems(result, [("environment ALLOWED_MODELS_JSON: models", fragment)])


def test_malformed_yaml_is_one_clear_line(tmp_path):
    path = write(tmp_path, "models: [a, b\n  listen: :\n")
    result = cli("check-config", path)
    assert_problems(result, [(f"{path}:2:9: not valid YAML", "flow sequence at line 1")])


@pytest.mark.parametrize("content,fragment", [("- a\n- b\n", "must be a mapping"),
                                              (None, "cannot read")])
def test_unusable_file_is_one_line(tmp_path, content, fragment):
    path = write(tmp_path, content) if content is not None else str(tmp_path / "absent.yaml")
    result = cli("check-config", path)
    assert_problems(result, [(path, fragment)])


def test_serve_rejects_out_of_range_port_argument(tmp_path):
    result = cli("serve", "--config", write(tmp_path, VALID), "--port", "70000")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "port must be between 1 and 65535" in result.stderr


def test_serve_uses_a_valid_config(tmp_path):
    config = {"models": [{"name": "remote", "backend": "static", "url": "http://127.0.0.1:9"}]}
    with start_gateway(config, tmp_path) as gw:
        data = httpx.get(f"{gw.url}/v1/models", trust_env=False).json()["data"]
        assert [m["id"] for m in data] == ["remote"]


def test_listen_backlog_reaches_the_listening_socket(tmp_path):
    """listen.backlog is the kernel's accept queue (Sanic's own default is 100, which a
    burst of hundreds of stream opens on a busy core overflows into resets)."""
    config = {"listen": {"host": "127.0.0.1", "backlog": 777},
              "models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}
    with start_gateway(config, tmp_path) as gw:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{gw.port}"], capture_output=True,
                             text=True, check=True).stdout.split()
        # LISTEN's Send-Q column is the socket's backlog.
        assert out[0] == "LISTEN" and out[2] == "777", out
