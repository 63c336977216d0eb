"""What a newcomer runs into first, run as the real commands: every config problem in one
pass, one line each; no traceback for a missing plugin, a broken entry point or a taken
port; plugin failures named; installed plugins kept out of the suite; the plugin guide's
example package builds and loads as documented.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import REPO, free_port, gateway_env, start_gateway, start_simulator

from gateway.app import build_gateway
from gateway.config import load_settings
from gateway.plugins import build_plugin_manager, list_plugins

FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from gwtest_process import start_gateway as start_plugin_gateway

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
DOCS = REPO / "docs" / "plugins.md"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=gateway_env(env),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=REPO)


def lines_of(stderr: str) -> list[str]:
    """stderr without log records (``<date> <time> LEVEL logger: ...``)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"\d{4}-\d\d-\d\d \d", line)]


def write(tmp_path: Path, config) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return str(path)


EVERYTHING_WRONG = {
    "limits": {"max_concurent": 3},
    "plugins": {"modules": ["no_such_plugin_module"]},
    "models": [
        {"name": "chat-small", "backend": "process", "max_queu": 3},  # and no command
        {"name": "bad name", "backend": "static", "url": "http://127.0.0.1:9"},
        {"name": "remote", "backend": "static"},
    ],
}


def expected_problems(path: str) -> list[str]:
    return [
        f"{path}: limits.max_concurent: unknown key (did you mean max_concurrent?)",
        f"{path}: models[chat-small].max_queu: unknown key (did you mean max_queue?)",
        f"{path}: models[1].name: String should match pattern '^[A-Za-z0-9._:/@+-]+$' "
        "(got 'bad name')",
        f"{path}: plugins.modules: cannot import 'no_such_plugin_module': ModuleNotFoundError: "
        "No module named 'no_such_plugin_module'",
        f"{path}: models[chat-small].command: required for backend process (a list: "
        "[program, arg, ...])",
        f"{path}: models[remote].url: required for backend static (or urls: [...])",
    ]


def test_check_config_reports_every_problem_in_one_pass(tmp_path):
    """Schema problems (with the nearest key for a typo, and the model's name), plugin
    problems and the backend drivers' own checks, all at once."""
    path = write(tmp_path, EVERYTHING_WRONG)
    result = cli("check-config", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert lines_of(result.stderr) == expected_problems(path)
    assert result.stdout == ""


def test_serve_prints_the_same_problems_and_exits_2(tmp_path):
    path = write(tmp_path, EVERYTHING_WRONG)
    result = cli("serve", "--config", path, "--port", str(free_port()))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert lines_of(result.stderr) == expected_problems(path)


@pytest.mark.parametrize("config, env, line", [
    ("models: []\n", None, "{path}: models: must list at least one model"),
    ("models: [{name: m, backend: static, url: 'http://127.0.0.1:9'}]\n",
     {"ALLOWED_MODELS_JSON": "[]"},
     "environment ALLOWED_MODELS_JSON: models: must list at least one model"),
], ids=["empty", "empty-from-env"])
def test_a_config_without_models_is_one_line(tmp_path, config, env, line):
    path = write(tmp_path, config)
    result = cli("check-config", path, env=env)
    assert result.returncode == 1
    assert lines_of(result.stderr) == [line.format(path=path)]


def test_yaml_syntax_error_is_file_line_column(tmp_path):
    path = write(tmp_path, "models:\n  - name: m\n    backend: static\n   url: x\n")
    result = cli("check-config", path)
    assert result.returncode == 1
    [line] = lines_of(result.stderr)
    assert re.fullmatch(re.escape(path) + r":4:\d+: not valid YAML: .+", line), line


def test_port_in_use_is_one_line_and_no_serving_line(tmp_path):
    config = {"models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}
    path = write(tmp_path, config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--config", path, "--port", str(port))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert lines_of(result.stderr) == [
        f"{path}: listen: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(set listen.port or --port)"]
    assert "serving" not in result.stderr


def test_serving_line_is_logged_once_listening(tmp_path):
    config = {"models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}
    with start_gateway(config, tmp_path) as gw:
        log = gw.log_text()
        assert f"serving 1 model(s) from {gw.config_path} on http://127.0.0.1:{gw.port}" in log


def test_unknown_plugin_names_are_warned_one_line_each(tmp_path):
    config = {"plugins": {"disabled": ["lru_evicton", "backoff_retry"]},
              "models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}
    result = cli("check-config", write(tmp_path, config),
                 env={"VLLM_GATEWAY_LOAD_PLUGINS": "not-installed"})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, result.stderr
    assert ("plugins.disabled: no plugin is named 'lru_evicton' (did you mean lru_eviction?)"
            in warnings[1])
    assert "VLLM_GATEWAY_LOAD_PLUGINS: no entry-point plugin named 'not-installed'" in warnings[0]


@pytest.fixture(scope="module")
def sims():
    with start_simulator("m", ttft_ms=0, itl_ms=0) as a, \
            start_simulator("m", ttft_ms=0, itl_ms=0) as b:
        yield a, b


SEEING_PLUGIN = '''
import os

from gateway import hookimpl


@hookimpl
def select_backend(request, model, candidates, in_flight):
    with open(os.environ["GWTEST_SEEN"], "a") as f:
        f.write(f"{request.body.get('user')}\\n")
    if request.body.get("user") == "explode":
        raise RuntimeError("selector exploded")
    return None
'''


def test_select_backend_sees_the_body_and_a_failure_is_logged_naming_the_plugin(tmp_path, sims):
    """docs/plugins.md: select_backend gets the request body; a hook that raises on the
    request path answers 500 and is logged with the plugin's name and where it raised."""
    (tmp_path / "gwtest_seeing.py").write_text(SEEING_PLUGIN)
    seen = tmp_path / "seen"
    cfg = {"plugins": {"modules": ["gwtest_seeing"]},
           "models": [{"name": "m", "backend": "static", "urls": [s.url for s in sims]}]}
    with start_plugin_gateway(cfg, tmp_path / "gw", pythonpath=(str(tmp_path),),
                              env={"GWTEST_SEEN": str(seen)}) as gw:
        assert gw.post("/v1/chat/completions", {"model": "m", "user": "alice", **CHAT}
                       ).status_code == 200
        assert seen.read_text().split() == ["alice"]
        r = gw.post("/v1/chat/completions", {"model": "m", "user": "explode", **CHAT})
        assert r.status_code == 500 and r.json()["error"]["code"] == "plugin_error"
        [line] = [ln for ln in gw.log().splitlines() if "selector exploded" in ln]
        assert ("ERROR vllm_gateway.plugins: plugin gwtest_seeing: hook select_backend raised "
                "RuntimeError: selector exploded (at gwtest_seeing.py:12)") in line
        assert "Traceback" not in gw.log()


EVIL_PLUGIN = '''
from gateway import hookimpl
from gateway.types import Rejection


@hookimpl
def admit_request(request, model):
    return Rejection(status=418, message="an installed plugin got in", code="evil",
                     reason="admission", retry_after_s=None)
'''


@pytest.fixture
def installed_evil_plugin(tmp_path) -> Path:
    """A directory that looks like site-packages with one distribution whose entry-point
    plugin refuses every request: what a stray ``pip install`` into .venv would add."""
    site = tmp_path / "site"
    dist = site / "gw_evil-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gw-evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vllm_gateway]\nevil = gw_evil\n")
    (site / "gw_evil.py").write_text(EVIL_PLUGIN)
    return site


def test_harness_gateways_load_no_installed_entry_point_plugin(tmp_path, sims,
                                                               installed_evil_plugin):
    site = installed_evil_plugin
    assert gateway_env()["VLLM_GATEWAY_LOAD_PLUGINS"] == ""
    cfg = {"models": [{"name": "m", "backend": "static", "url": sims[0].url}]}
    pythonpath = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    with start_gateway(cfg, tmp_path / "a", env=pythonpath) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", **CHAT},
                       timeout=10, trust_env=False)
        assert r.status_code == 200
    # the same gateway, told to load it, is changed by it: so the check above can fail
    with start_gateway(cfg, tmp_path / "b", env={**pythonpath,
                                                 "VLLM_GATEWAY_LOAD_PLUGINS": "evil"}) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", **CHAT},
                       timeout=10, trust_env=False)
        assert r.status_code == 418


def test_in_process_gateways_load_no_installed_entry_point_plugin(monkeypatch,
                                                                  installed_evil_plugin):
    assert os.environ["VLLM_GATEWAY_LOAD_PLUGINS"] == ""  # tests/conftest.py
    monkeypatch.syspath_prepend(str(installed_evil_plugin))
    raw = {"models": [{"name": "m", "backend": "static", "url": "http://127.0.0.1:9"}]}
    names = {p.name for p in list_plugins(build_gateway(load_settings(raw=raw)).hooks.pm)}
    assert "evil" not in names and "lru_eviction" in names
    monkeypatch.setenv("VLLM_GATEWAY_LOAD_PLUGINS", "evil")
    assert "evil" in {p.name for p in list_plugins(build_plugin_manager())}


def _docs_block(label: str, lang: str) -> str:
    text = DOCS.read_text()
    match = re.search(rf"`{re.escape(label)}`:\n\n```{lang}\n(.*?)```", text, re.S)
    assert match, f"docs/plugins.md has no {label} block"
    return match.group(1)


def test_docs_plugin_package_builds_installs_and_loads(tmp_path, monkeypatch):
    """The example package in docs/plugins.md, as printed: its pyproject.toml builds a wheel
    (offline, no build isolation) whose entry point loads as the documented plugin."""
    src = tmp_path / "vllm-gateway-apikey"
    src.mkdir()
    (src / "pyproject.toml").write_text(_docs_block("pyproject.toml", "toml"))
    (src / "gw_apikey.py").write_text(_docs_block("gw_apikey.py", "python"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(src)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("vllm_gateway_apikey-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read("vllm_gateway_apikey-0.1.0.dist-info/entry_points.txt").decode()
        assert "gw_apikey.py" in zf.namelist()
    assert "[vllm_gateway]\napikey = gw_apikey" in entry_points
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(importlib.metadata, "distributions",
                        functools.partial(importlib.metadata.distributions, path=[str(site)]))
    monkeypatch.delenv("VLLM_GATEWAY_LOAD_PLUGINS")  # the default: every installed plugin
    rows = {p.name: p for p in list_plugins(build_plugin_manager())}
    assert rows["apikey"].origin == "distribution vllm-gateway-apikey 0.1.0"
    assert rows["apikey"].hooks == ("admit_request", "select_evictions", "startup")
