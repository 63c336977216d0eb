"""The Prometheus config, alert rules and their promtool unit tests stay valid.

Every alert must be covered by alerts_test.yml with a case where it fires and a
case where it must not, so a threshold typo cannot ship untested.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

try:
    from tests.tools import require_tool
except ImportError:  # tests/ is not a package: pytest puts tests/ on sys.path
    from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "dashboards" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
CONFIG = PROM_DIR / "prometheus.yml"
DOCS = ROOT / "docs" / "metrics.md"


def _promtool() -> str:
    return require_tool("promtool", "Debian package prometheus")


def _run(*args: str) -> None:
    proc = subprocess.run([_promtool(), *args], cwd=PROM_DIR, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, (
        f"promtool {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def _rule_tests() -> list[dict]:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    return [case for t in doc["tests"] for case in t.get("alert_rule_test") or []]


@pytest.mark.prometheus
def test_promtool_check_rules():
    _run("check", "rules", ALERTS.name)


@pytest.mark.prometheus
def test_promtool_test_rules():
    _run("test", "rules", ALERTS_TEST.name)


@pytest.mark.prometheus
def test_promtool_check_config():
    _run("check", "config", CONFIG.name)


def test_config_loads_alerts_and_scrapes_gateway_and_sd():
    cfg = yaml.safe_load(CONFIG.read_text())
    assert ALERTS.name in cfg["rule_files"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = [t for sc in jobs["vllm-gateway"]["static_configs"] for t in sc["targets"]]
    assert "gateway:8080" in targets
    sd_urls = [sd["url"] for sd in jobs["vllm"]["http_sd_configs"]]
    assert sd_urls == ["http://gateway:8080/gateway/sd"]


def test_every_alert_has_for_severity_and_annotations():
    rules = _alert_rules()
    assert rules, "alerts.yml has no alerting rules"
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for r in rules:
        assert "for" in r, f"{r['alert']}: no for:"
        assert r.get("labels", {}).get("severity") in {"warning", "critical"}, r["alert"]
        ann = r.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), f"{r['alert']}: annotations"


def test_every_alert_has_firing_and_quiet_cases():
    cases = _rule_tests()
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        name = case["alertname"]
        exp = case.get("exp_alerts")
        if exp:
            firing.add(name)
            for a in exp:
                assert a.get("exp_labels", {}).get("severity"), f"{name}: exp_labels"
                assert a.get("exp_annotations", {}).get("summary"), f"{name}: exp_annotations"
        else:
            assert exp == [], f"{name}: write exp_alerts: [] for a not-firing case"
            quiet.add(name)
    alerts = {r["alert"] for r in _alert_rules()}
    assert not alerts - firing, f"alerts with no firing test case: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts with no not-firing test case: {sorted(alerts - quiet)}"
    unknown = (firing | quiet) - alerts
    assert not unknown, f"test cases for alerts that do not exist: {sorted(unknown)}"


def test_docs_describe_every_alert():
    text = DOCS.read_text()
    missing = [r["alert"] for r in _alert_rules() if r["alert"] not in text]
    assert not missing, f"docs/metrics.md does not describe: {missing}"
