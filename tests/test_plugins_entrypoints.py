"""A third-party plugin distribution, installed for real and found by its entry point.

``tests/plugin_pkgs/gw_example_plugin`` declares ``[project.entry-points.vllm_gateway]
example = "gw_example_plugin"``. The module fixture builds and installs it with pip into a
temporary directory (``--target``, no index, no build isolation: offline), and the tests
put that directory on PYTHONPATH so ``importlib.metadata`` finds its dist-info, exactly
as for a plugin installed in the gateway's environment.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import start_simulator

from gateway.app import build_gateway
from gateway.config import load_settings
from gateway.plugins import build_plugin_manager, list_plugins

FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from gwtest_process import run_cli, start_gateway

PACKAGE = Path(__file__).resolve().parent / "plugin_pkgs" / "gw_example_plugin"
DISTRIBUTIONS = importlib.metadata.distributions
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory holding the installed example distribution (module + dist-info)."""
    root = tmp_path_factory.mktemp("example-plugin")
    src = root / "src"  # build from a copy: pip builds in-tree and leaves build/ behind
    shutil.copytree(PACKAGE, src)
    target = root / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--target", str(target), "--no-deps",
         "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q", str(src)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(target.glob("gw_example_plugin-0.1.0.dist-info/entry_points.txt"))
    return target


def listed(site: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    out = run_cli("plugins", "--json", *args, env=env, pythonpath=(str(site),))
    assert out.returncode == 0, out.stderr
    return {row["name"]: row for row in json.loads(out.stdout)}


def test_entry_point_plugin_is_listed_with_its_distribution(site):
    rows = listed(site, env={"VLLM_GATEWAY_LOAD_PLUGINS": "example"})
    assert rows["example"] == {"name": "example", "origin": "distribution gw-example-plugin 0.1.0",
                               "hooks": ["admit_request"]}
    assert rows["lru_eviction"]["origin"] == "builtin"


def test_empty_allow_list_keeps_it_out(site):
    rows = listed(site, env={"VLLM_GATEWAY_LOAD_PLUGINS": ""})
    assert "example" not in rows and "lru_eviction" in rows


def names(pm) -> set[str]:
    return {p.name for p in list_plugins(pm)}


def test_not_found_without_the_distribution(monkeypatch):
    monkeypatch.setenv("VLLM_GATEWAY_LOAD_PLUGINS", "example")
    assert "example" not in names(build_plugin_manager())


@pytest.fixture
def only_site(site, monkeypatch):
    """Entry points are looked up in ``site`` alone: without an allow-list every installed
    plugin would load, and plugins someone installed into .venv must not change results."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(importlib.metadata, "distributions",
                        functools.partial(DISTRIBUTIONS, path=[str(site)]))
    return site


@pytest.mark.parametrize("allow, loaded", [(None, True), ("", False), ("example", True),
                                           ("other", False), (" other , example ", True)])
def test_allow_list_env_var(only_site, monkeypatch, allow, loaded):
    """VLLM_GATEWAY_LOAD_PLUGINS limits entry-point plugins; built-ins always load."""
    if allow is None:
        monkeypatch.delenv("VLLM_GATEWAY_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_GATEWAY_LOAD_PLUGINS", allow)
    found = names(build_plugin_manager())
    assert ("example" in found) is loaded
    assert "lru_eviction" in found


@pytest.mark.parametrize("plugins_cfg", [{"disabled": ["example"]}, {"load_entrypoints": False}],
                         ids=["disabled-by-name", "entrypoints-off"])
def test_config_keeps_entry_point_plugin_out(only_site, monkeypatch, plugins_cfg):
    monkeypatch.delenv("VLLM_GATEWAY_LOAD_PLUGINS", raising=False)
    raw = {"plugins": plugins_cfg, "models": [{"name": "m", "backend": "static",
                                               "url": "http://127.0.0.1:9"}]}
    gw = build_gateway(load_settings(raw=raw, environ={}))
    assert "example" not in names(gw.hooks.pm)
    assert "example" in names(build_gateway(load_settings(raw={**raw, "plugins": {}},
                                                          environ={})).hooks.pm)


def test_entry_point_plugin_admits_through_a_running_gateway(site, tmp_path):
    with start_simulator("m", ttft_ms=0, itl_ms=0) as sim:
        cfg = {"models": [{"name": "m", "backend": "static", "url": sim.url}]}
        with start_gateway(cfg, tmp_path, pythonpath=(str(site),),
                           env={"VLLM_GATEWAY_LOAD_PLUGINS": "example"}) as gw:
            blocked = gw.post("/v1/chat/completions", {"model": "m", "user": "blocked", **CHAT})
            assert blocked.status_code == 403
            assert blocked.json()["error"]["code"] == "user_blocked"
            assert blocked.json()["error"]["message"] == "user 'blocked' may not use m"
            ok = gw.post("/v1/chat/completions", {"model": "m", "user": "alice", **CHAT})
            assert ok.status_code == 200, ok.text
            plugins = {p["name"]: p for p in gw.get("/gateway/plugins").json()}
            assert plugins["example"]["origin"] == "distribution gw-example-plugin 0.1.0"


def test_broken_entry_point_plugin_is_a_clean_error(tmp_path):
    """A plugin whose hook has an argument the spec lacks stops start-up with one message."""
    dist = tmp_path / "gw_bad_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gw-bad-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[vllm_gateway]\nbad = gw_bad_plugin\n")
    (tmp_path / "gw_bad_plugin.py").write_text(
        "from gateway import hookimpl\n\n@hookimpl\ndef select_evictions(req):\n    return []\n")
    allow = {"VLLM_GATEWAY_LOAD_PLUGINS": "bad"}
    out = run_cli("plugins", pythonpath=(str(tmp_path),), env=allow)
    assert out.returncode == 1
    assert "entry-point plugin bad (distribution gw-bad-plugin 0.1.0)" in out.stderr
    assert "Plugin 'bad' for hook 'select_evictions'" in out.stderr
    assert "Traceback" not in out.stderr
    (tmp_path / "gw_bad_plugin.py").write_text("import no_such_module_xyz\n")
    out = run_cli("plugins", pythonpath=(str(tmp_path),), env=allow)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "cannot load plugins from entry-point group 'vllm_gateway': entry point bad = "
        "gw_bad_plugin (distribution gw-bad-plugin 0.1.0): ModuleNotFoundError: No module "
        "named 'no_such_module_xyz' (at gw_bad_plugin.py:1)"]
